"""What can the model do? Evaluate model folders on tasks and print one table, models as columns.

    python tool/evaluate.py                                    # the demo models on the default tasks
    python tool/evaluate.py weight/etude_sft_model weight/etude_hf_model --limit 200
    python tool/evaluate.py MODEL --tasks bpb,continuation,arc_easy --data-dir ~/eval_data
    python tool/evaluate.py MODEL --tasks mc=my_questions.jsonl,bpb=my_text.txt
    python tool/evaluate.py MODEL --tasks humaneval --allow-code-execution
    python tool/evaluate.py --report weight/report           # + report.md and PNG plots
    python tool/evaluate.py MODEL --bench                      # batched vs one-by-one scoring speed
    python tool/evaluate.py MODEL --tasks arithmetic --tools   # with a calculator the model may call

A model is an Etude folder, a LoRA adapter folder (weight/lora/NAME, applied to the base it names)
or a Hugging Face folder (weight/etude_hf_model, or any causal LM that transformers loads). Tasks
(tool/eval/tasks.py has the details; each states its random-chance baseline):

  bpb            bits per byte of held-out text (default training_data/pretrain.val.jsonl)
  continuation   demo multiple choice: the true next words of a held-out passage among 4 (chance 25%)
  hellaswag, arc_easy, arc_challenge, mmlu, piqa
                 multiple choice from the official files, found under --data-dir or given as NAME=PATH
  mc=FILE        multiple choice from a {"query", "choices", "gold"} JSONL
  chat           held-out SFT conversations, normalised exact match (default training_data/sft.val.jsonl)
  arithmetic, counting, spelling     seeded synthetic problems with checkable answers (NAME=SEED)
  humaneval      HumanEval pass@1; runs model-written code, so only with --allow-code-execution

--tools offers the built-in tools (calculator, date; model/builtin_tools.py) in the exact-answer
tasks: the calls a model makes are run and their results fed back (up to 4 rounds), and the task
also reports tool_use, the share of examples where the model called a tool. --no-think closes the
<think> block in the prompt. A reply's answer is read after its </think>, if it thinks; exact-answer
tasks report `thinking`, the share of first replies that opened a <think> block.

Multiple-choice tasks report lm-evaluation-harness's acc and acc_norm. Nothing is downloaded.
--json writes every figure to a file; --report DIR writes report.md with plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from config import DATA_DIR, LORA_DIR, PRETRAINED_DIR, SFT_DIR
from inference.inference import MAX_TOOL_ROUNDS, run_calls
from model.builtin_tools import BUILTIN_TOOLS, tool_names
from model.chat_markup import parse_reply
from model.decoding import inference_dtype, pick_inference_device
from tool.eval.formats import TaskFileError, write_lm_eval_task
from tool.eval.models import EvalModel, bits_per_byte, load_eval_model
from tool.eval.sandbox import network_isolation, run_program
from tool.eval.tasks import (CHAT_MAX_NEW_TOKENS, CODE_MAX_NEW_TOKENS, DEFAULT_TASKS, Task, build_task,
                             choice_metrics, choice_requests, exact_metrics, exact_prompts, humaneval_program, parse_task_specs,
                             truncate_code)

EVAL_DATA_DIR = DATA_DIR / "eval"
# Room for a <think> trace or a tool call before the answer (greedy decoding stops at <|im_end|>,
# so a short answer costs no more); the answer is read after the </think>.
SYNTHETIC_MAX_NEW_TOKENS = 96


def default_models() -> list[Path]:
    """The demo's models that exist: pretrained, SFT, and the LoRA adapter (weight/lora/identity)."""
    found = [p for p in (PRETRAINED_DIR, SFT_DIR, LORA_DIR / "identity") if p.is_dir()]
    if not found:
        raise FileNotFoundError(f"no model given and none of {PRETRAINED_DIR}, {SFT_DIR} exists; train them "
                                "(python tool/demo.py) or name model folders on the command line")
    return found


def _generate_texts(model: EvalModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                    bar: tqdm | None, ended: list[bool] | None = None) -> list[str]:
    """Greedy replies as text; `ended`, when given, receives whether each reply ended its turn."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        for ids in model.generate(batch, max_new_tokens, model.stop_ids):
            texts.append(model.decode([t for t in ids if t not in model.stop_ids]))
            if ended is not None:
                ended.append(bool(ids) and ids[-1] in model.stop_ids)
        if bar is not None:
            bar.update(len(batch))
    return texts


def _answers(model: EvalModel, conversations: list[list[dict]], max_new_tokens: int, batch_size: int, bar: tqdm,
             tools: list[dict] | None, enable_thinking: bool | None) -> tuple[list[str], list[int], int, list[bool]]:
    """Greedy answers (reasoning left out), the number of tool calls each took, how many
    answers opened with a <think> block, and whether each answer ended its turn. With tools,
    the calls in a reply are run and the conversation goes on, all unfinished ones batched
    together each round, as inference.converse does one at a time."""
    names = tool_names(tools) if tools else None
    conversations = [list(messages) for messages in conversations]
    answers: list[str] = [""] * len(conversations)
    calls = [0] * len(conversations)
    thought = 0
    ended = [True] * len(conversations)
    active = list(range(len(conversations)))
    for round_ in range(MAX_TOOL_ROUNDS + 1):
        prompts = [model.chat_ids(conversations[i], tools, enable_thinking) for i in active]
        finished: list[bool] = []
        texts = _generate_texts(model, prompts, max_new_tokens, batch_size, bar if round_ == 0 else None, finished)
        waiting = []
        for i, text, done in zip(active, texts, finished):
            reply = parse_reply(text, names, parse_calls=bool(tools))
            thought += reply.reasoning is not None and round_ == 0
            if reply.tool_calls and round_ < MAX_TOOL_ROUNDS:
                calls[i] += len(reply.tool_calls)
                conversations[i].append({"role": "assistant", "content": reply.content, "tool_calls": [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in reply.tool_calls]})
                conversations[i] += run_calls(reply.tool_calls)
                waiting.append(i)
            else:
                answers[i], ended[i] = reply.content, done
        active = waiting
        if not active:
            break
    return answers, calls, thought, ended


def run_task(model: EvalModel, task: Task, batch_size: int, allow_code: bool = False,
             code_timeout: float = 10.0, tools: list[dict] | None = None,
             enable_thinking: bool | None = None) -> dict:
    """Scores of one model on one task, as {metric: value, "n": examples}."""
    bar = tqdm(total=len(task.examples) if task.kind != "bpb" else None, desc=f"{model.name} | {task.name}",
               unit="ex" if task.kind != "bpb" else "window", leave=False, file=sys.stderr)
    try:
        if task.kind == "bpb":
            nats, n_bytes = model.text_nll(task.examples, batch_size, progress=bar.update)
            return {"bpb": bits_per_byte(nats, n_bytes), "n": len(task.examples), "bytes": n_bytes}
        if task.kind == "choice":
            lls = model.score_choices(choice_requests(task.examples), batch_size, bar.update)
            return {**choice_metrics(task.examples, lls), "n": len(task.examples)}
        if task.kind == "exact":
            budget = CHAT_MAX_NEW_TOKENS if task.name == "chat" else SYNTHETIC_MAX_NEW_TOKENS
            replies, calls, thought, ended = _answers(model, exact_prompts(task), budget, batch_size, bar, tools,
                                                      enable_thinking)
            used = {"tool_use": sum(1 for c in calls if c) / max(len(calls), 1)} if tools else {}
            return {**exact_metrics(task, replies, ended), **used, "thinking": thought / max(len(replies), 1),
                    "n": len(replies)}
        if not allow_code:
            raise PermissionError("the humaneval task runs model-written code; add --allow-code-execution "
                                  "to run it (in a separate process with time, memory and network limits)")
        prompts = [model.encode(problem["prompt"]) for problem in task.examples]
        completions = [truncate_code(text) for text in
                       _generate_texts(model, prompts, CODE_MAX_NEW_TOKENS, batch_size, bar)]
        programs = [humaneval_program(p, c) for p, c in zip(task.examples, completions)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda code: run_program(code, timeout=code_timeout), programs))
        return {"pass@1": sum(r.passed for r in results) / max(len(results), 1), "n": len(results),
                "sandbox": network_isolation()}
    finally:
        bar.close()


def evaluate(model_paths: list[Path], tasks: list[Task], device: torch.device, dtype: torch.dtype,
             batch_size: int, allow_code: bool = False, tools: list[dict] | None = None,
             enable_thinking: bool | None = None) -> dict:
    """{"models": [{name, path, parameters}], "results": {model name: {task name: metrics}}}."""
    out = {"models": [], "results": {}}
    names = _unique_names(model_paths)
    for path, name in zip(model_paths, names):
        model = load_eval_model(path, device, dtype)
        model.name = name
        out["models"].append({"name": name, "path": str(path), "parameters": model.parameters})
        out["results"][name] = {task.name: run_task(model, task, batch_size, allow_code, tools=tools,
                                                     enable_thinking=enable_thinking) for task in tasks}
        del model
    return out


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table_rows(results: dict, tasks: list[Task]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: one row per task metric, a column per model, then chance."""
    models = [m["name"] for m in results["models"]]
    header = ["task", "metric", *models, "chance", "n"]
    rows = []
    for task in tasks:
        first = results["results"][models[0]][task.name]
        for metric in (k for k in first if k not in ("n", "bytes", "sandbox")):
            chance = task.chance if metric in ("acc", "acc_norm", "pass@1") else None
            rows.append([task.name, metric + (" (lower better)" if metric in ("bpb", "degenerate") else ""),
                         *(_fmt(results["results"][m][task.name][metric]) for m in models),
                         "-" if chance is None else _fmt(chance), str(first["n"])])
    return header, rows


def format_table(results: dict, tasks: list[Task], markdown: bool = False) -> str:
    header, rows = table_rows(results, tasks)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def bench(model: EvalModel, task: Task, batch_size: int) -> dict:
    """Examples/s of batched scoring vs one forward pass per choice, on the same questions, in one run."""
    questions = choice_requests(task.examples)
    model.score_one_by_one(questions[:2])  # warm-up (first-call allocations)
    t0 = time.perf_counter()
    single = model.score_one_by_one(questions)
    t1 = time.perf_counter()
    batched = model.score_choices(questions, batch_size)
    t2 = time.perf_counter()
    diff = max(abs(a - b) for x, y in zip(single, batched) for a, b in zip(x, y))
    return {"task": task.name, "examples": len(questions), "batch_size": batch_size,
            "one_by_one_examples_per_s": len(questions) / (t1 - t0), "batched_examples_per_s": len(questions) / (t2 - t1),
            "speedup": (t1 - t0) / (t2 - t1), "max_abs_loglik_diff": diff}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model folders (default: the demo's pretrained, SFT and LoRA models)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated tasks, NAME or NAME=PATH (default {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto|fp32|bf16|fp16 (default auto: fp32 on CPU)")
    parser.add_argument("--data-dir", type=Path, default=EVAL_DATA_DIR,
                        help=f"where the official task files are looked for (default {EVAL_DATA_DIR})")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--report", type=Path, default=None, help="write report.md and PNG plots to this folder")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="let the humaneval task run model-written code (sandboxed: time, memory, network)")
    parser.add_argument("--lm-eval-tasks", type=Path, default=None, metavar="DIR",
                        help="also write each multiple-choice task as a JSONL file + lm-eval task YAML in DIR, "
                             "to score the same questions with lm-evaluation-harness")
    parser.add_argument("--tools", action="store_true",
                        help="offer the built-in calculator and date tools in exact-answer tasks and run the calls")
    parser.add_argument("--no-think", action="store_true",
                        help="close the <think> block in the prompt: answers without reasoning")
    parser.add_argument("--bench", action="store_true",
                        help="time batched vs one-by-one log-likelihood scoring on the first multiple-choice task")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        specs = parse_task_specs(args.tasks)
        if any(name == "humaneval" for name, _ in specs) and not args.allow_code_execution:
            raise PermissionError("the humaneval task runs model-written code; add --allow-code-execution to "
                                  "run it (in a separate process with time, memory and network limits)")
        model_paths = [Path(m) for m in args.models] or default_models()
        device = pick_inference_device(args.device)
        dtype = inference_dtype(device, args.dtype)
        tasks = [build_task(name, path, args.data_dir, args.limit) for name, path in specs]
        print(f"evaluating {', '.join(str(p) for p in model_paths)} on {', '.join(t.name for t in tasks)} "
              f"({device}, {str(dtype).removeprefix('torch.')}, batch {args.batch_size}"
              f"{f', limit {args.limit}' if args.limit else ''}{', with tools' if args.tools else ''}"
              f"{', thinking off' if args.no_think else ''})", flush=True)
        if args.lm_eval_tasks:
            for task in (t for t in tasks if t.kind == "choice"):
                name = write_lm_eval_task(task.examples, task.name, args.lm_eval_tasks)
                print(f"lm-eval task {name} written to {args.lm_eval_tasks}: HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "
                      f"lm_eval --model hf --model_args pretrained=FOLDER --include_path {args.lm_eval_tasks} "
                      f"--tasks {name} --device cpu")
        if args.bench:
            choice = next((t for t in tasks if t.kind == "choice"), None)
            if choice is None:
                raise ValueError("--bench times multiple-choice scoring; include a multiple-choice task in --tasks")
            figures = bench(load_eval_model(model_paths[0], device, dtype), choice, args.batch_size)
            print(json.dumps(figures, indent=2))
            return 0
        results = evaluate(model_paths, tasks, device, dtype, args.batch_size, args.allow_code_execution,
                           tools=BUILTIN_TOOLS if args.tools else None,
                           enable_thinking=False if args.no_think else None)
    except (FileNotFoundError, TaskFileError, ValueError, PermissionError, ImportError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    results["tasks"] = {t.name: {"kind": t.kind, "source": t.source, "measures": t.measures, "chance": t.chance}
                        for t in tasks}
    print(format_table(results, tasks))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    if args.report:
        from tool.eval.report import write_report
        print(f"report written to {write_report(args.report, results, tasks, format_table(results, tasks, True))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
