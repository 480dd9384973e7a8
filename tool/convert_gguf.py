"""Export an Etude model folder to GGUF for llama.cpp, Ollama and LM Studio, verified by llama.cpp.

    python tool/convert_gguf.py                         # weight/etude_sft_model -> weight/etude_gguf/
    python tool/convert_gguf.py --type f16 --verify     # checked with llama.cpp (llama-cpp-python)
    python tool/convert_gguf.py --type q8_0 f16 f32 bf16 q4_0 --verify \\
        --check-tokens training_data/sft.val.jsonl training_data/pretrain.val.jsonl
    python tool/convert_gguf.py --lora identity --name etude_mira   # a LoRA adapter merged in

Writes <out-dir>/<name>-<type>.gguf for each --type (f32, f16, bf16, q8_0, q4_0; default q8_0) and
an Ollama `Modelfile` beside them whose FROM is the first type given (ChatML template, the stop
tokens, inference/inference.py's default sampling). The format (model/gguf_llama.py): llama.cpp's
`llama` architecture (`qwen2moe` for a Qwen2-MoE-shaped mixture of experts), the byte-level BPE
tokenizer with pre-tokenizer "gpt-2", the ChatML template.
Files appear only when all of them are complete (and, with --verify, all checks passed).

--verify loads each file with llama.cpp (pip install llama-cpp-python) and checks against the Etude
model whose weights are rounded exactly as the file stores them (so the figures measure the
conversion; how far the rounding itself moves the logits from the fp32 model is printed beside):
  (a) token ids of a sample set (English, Chinese, emoji, code, whitespace runs, special-token
      strings as plain text) identical to ours;
  (b) logits of a prompt: max abs difference within --tolerance (default per type, TOLERANCES);
  (c) greedy continuation identical token for token;
  (d) a chat: llama.cpp's C++ template engine (llama_chat_apply_template) renders our text, whose
      ids are ours, and create_chat_completion at temperature 0 (llama-cpp-python's own handling
      of the template in the file) answers exactly what `inference/inference.py --temperature 0
      --repetition-penalty 1` does (llama.cpp's repeat penalty looks only at generated tokens,
      ours at the whole conversation, so the two agree only without one).
(b)-(d) must hold for f32 and f16; for bf16, q8_0 and q4_0 they are reported (rounding the
activations as well changes near-tied choices). llama.cpp runs with an f32 KV cache here, so
only the file is being tested. --check-tokens FILE... also compares llama.cpp's ids with ours on
every document of those JSONL files (pretraining {"text"} lines; SFT conversations: each message
as plain text and the whole rendered chat). Any failure: nothing is written, exit status 1.
Exit status: 0 done, 1 verification failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from config import GGUF_DIR, SFT_DIR, SPECIAL_TOKENS, TOKENIZER_DIR, ConfigError
from model.gguf_llama import GGUF_TYPES, gguf_arch, modelfile, rounded_model, tokenizer_refusal, write_gguf
from model.model import EtudeModel
from model.lora import resolve_adapter
from model.tokenizer import EtudeTokenizer
from tool.convert_hf import (SAMPLE_CHAT, SAMPLE_TEXT, VerificationFailed, exit_status, export_tokenizer,
                             load_source_model, source_folder)

# Texts whose ids llama.cpp must give exactly as we do: each a way pre-tokenizers tend to differ.
SAMPLE_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's theirs, wouldn't you? 'quoted' \"double\"",
    "今天天气很好，我们去学习音乐。你好吗？",
    "Emoji: 😀🎉👍❤️ 👨‍👩‍👧 flags 🇫🇷 and keycaps 1️⃣",
    "def f(x):\n    return x ** 2  # code\n\nfor i in range(10):\n\tprint(f(i), end='')\n",
    "spaces   between    words     and\ttabs\t\there\n\n\n  leading and trailing   ",
    "   \n \n\n\t \r\n\r\n     ",
    "<|im_start|>user\nforged turn<|im_end|>\n<|endoftext|> plain text, not special ids",
    "Numbers 1234567890 3.14159 -42 1e-9 0x1F and 12,345.67",
    "Ünïcödé àccents, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "combining e\u0301 n\u0303 and zero\u200bwidth, nbsp\u00a0here, ellipsis\u2026 dashes \u2014 \u2013",
    "URL https://example.com/path?q=1&r=2 email a.b@c.org <b>&amp;</b> {\"json\": [1, 2]}",
]
SAMPLE_CHATS = [SAMPLE_CHAT, [{"role": "user", "content": "Hello! How are you today?"}]]
# The largest max-abs logit difference each type is held to (None: reported, not checked).
# f32: llama.cpp sums in another order; f16: llama.cpp also rounds the activations to f16 before
# each f16 matmul. Measured on the demo model: see README "GGUF and Ollama".
TOLERANCES = {"f32": 1e-3, "f16": 5e-2, "bf16": None, "q8_0": None, "q4_0": None}
STRICT_TYPES = ("f32", "f16")
GGML_TYPE_F32 = 0  # llama.cpp's enum value, for an f32 KV cache


def open_llama(path: Path, n_ctx: int):
    """llama-cpp-python's Llama on `path`: logits for every position, an f32 KV cache, quiet."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise FileNotFoundError("--verify needs llama.cpp's Python binding: pip install llama-cpp-python "
                                "(it builds llama.cpp from source; a C++ compiler and cmake are needed)") from None
    threads = torch.get_num_threads()
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                 n_threads=threads, n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                 seed=0, verbose=False)


def llama_ids(llm, text: str, special: bool = False) -> list[int]:
    """llama.cpp's ids of `text`, no BOS; special=True turns special-token strings into their ids."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two id lists differ (None when they are equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def llama_chat_text(llm, messages: list[dict]) -> str:
    """The prompt that llama.cpp's C++ template engine renders from the file's chat template."""
    import llama_cpp
    template = llm.metadata["tokenizer.chat_template"].encode("utf-8")
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages])
    size = 4096
    while True:  # the call returns the length it needs when the buffer is too small
        buffer = ctypes.create_string_buffer(size)
        length = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buffer, size)
        if length < 0:
            raise VerificationFailed(f"llama.cpp could not apply the chat template (returned {length})")
        if length <= size:
            return buffer.raw[:length].decode("utf-8")
        size = length


def chatml_text(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Our ChatML prompt as text (model/tokenizer.py)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def verify(path: Path, model: EtudeModel, tokenizer: EtudeTokenizer, type_name: str, tolerance: float | None,
           max_new_tokens: int) -> tuple[list[str], dict]:
    """Load the GGUF at `path` with llama.cpp and compare it with `model` (fp32) and its rounded
    copy. Prints each figure; returns (failures, figures)."""
    failures, figures = [], {"type": type_name}
    strict = type_name in STRICT_TYPES
    context = model.config.max_seq_len
    llm = open_llama(path, context)
    reference = rounded_model(model, type_name)

    # (a) tokenizer
    wrong = [text for text in SAMPLE_TEXTS if llama_ids(llm, text) != tokenizer.encode(text)]
    figures["sample_texts_mismatching"] = len(wrong)
    print(f"verify {type_name}: tokenizer ids identical on {len(SAMPLE_TEXTS) - len(wrong)}/{len(SAMPLE_TEXTS)} "
          f"sample texts{'' if not wrong else '  FAILED: ' + repr(wrong[0][:40])}")
    if wrong:
        failures.append(f"llama.cpp tokenizes {len(wrong)} sample texts differently, e.g. {wrong[0][:40]!r}")

    # (b) logits
    chat_ids, _ = tokenizer.render_chat(SAMPLE_CHAT, add_generation_prompt=True)
    sample = (chat_ids + tokenizer.encode(SAMPLE_TEXT))[:context]
    llm.reset()
    llm.eval(sample)
    theirs = torch.from_numpy(np.array(llm.scores[:len(sample)], dtype=np.float32))
    with torch.no_grad():
        diff = (theirs - reference(torch.tensor([sample]))[0][0]).abs().max().item()
        from_fp32 = (theirs - model(torch.tensor([sample]))[0][0]).abs().max().item()
    figures.update(max_logit_diff=diff, max_logit_diff_fp32=from_fp32, logit_tokens=len(sample))
    verdict = "" if tolerance is None else f" (tolerance {tolerance:g})" + ("" if diff <= tolerance else "  FAILED")
    print(f"verify {type_name}: max abs logit difference {diff:.3g} over {len(sample)} tokens{verdict}; "
          f"{from_fp32:.3g} from the fp32 model")
    if tolerance is not None and not diff <= tolerance:
        failures.append(f"logits differ by {diff:.3g} > tolerance {tolerance:g}")

    # (c) greedy continuation (llama.cpp's greedy sampler, no penalty)
    prompt = chat_ids[-context // 2:]
    budget = min(max_new_tokens, context - len(prompt))
    ours = list(reference.generate(prompt, budget, temperature=0.0))
    fp32_ours = ours if reference is model else list(model.generate(prompt, budget, temperature=0.0))
    llm.reset()
    generated = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        generated.append(token)
        if len(generated) == budget:
            break
    agree = first_difference(generated, ours)
    agree_fp32 = first_difference(generated, fp32_ours)
    figures.update(greedy_tokens=budget, greedy_agree=budget if agree is None else agree,
                   greedy_agree_fp32=budget if agree_fp32 is None else agree_fp32)
    print(f"verify {type_name}: greedy {figures['greedy_agree']}/{budget} tokens as ours "
          f"({figures['greedy_agree_fp32']}/{budget} as the fp32 model)"
          f"{'  FAILED' if strict and agree is not None else ''}")
    if strict and agree is not None:
        failures.append(f"greedy continuation differs from token {agree}")

    # (d) chats through llama.cpp's template handling
    figures["chats"] = [check_chat(llm, reference, tokenizer, messages, type_name, strict, max_new_tokens, failures)
                        for messages in SAMPLE_CHATS]
    del llm
    return failures, figures


def check_chat(llm, reference: EtudeModel, tokenizer: EtudeTokenizer, messages: list[dict], type_name: str,
               strict: bool, max_new_tokens: int, failures: list[str]) -> dict:
    """Check (d) on one conversation: llama.cpp's C++ template engine renders our prompt (text and
    ids), and create_chat_completion at temperature 0 answers what our greedy decoding does."""
    text = llama_chat_text(llm, messages)
    our_ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    same_prompt = text == chatml_text(messages) and llama_ids(llm, text, special=True) == our_ids
    print(f"verify {type_name}: llama_chat_apply_template renders our prompt {'exactly' if same_prompt else 'differently  FAILED'}")
    if not same_prompt:
        failures.append("llama.cpp's chat template renders another prompt than ours")
    stops = (tokenizer.im_end_id, tokenizer.eos_id)
    budget = min(max_new_tokens, reference.config.max_seq_len - len(our_ids))
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, repeat_penalty=1.0, max_tokens=budget)
    theirs = reply["choices"][0]["message"]["content"] or ""
    # llama-cpp-python goes past max_tokens while the text ends inside a UTF-8 character (an
    # untrained model's habit): decode as many tokens as it did.
    budget = max(budget, min(reply["usage"]["completion_tokens"], reference.config.max_seq_len - len(our_ids)))
    answer_ids = [t for t in reference.generate(our_ids, budget, temperature=0.0, stop_ids=stops) if t not in stops]
    # It also drops the bytes of a cut UTF-8 character where we print U+FFFD: compare the answer
    # as llama.cpp spells our ids (equal text <=> equal ids here).
    ours = b"".join(llm.detokenize([t]) for t in answer_ids).decode("utf-8", errors="ignore")
    print(f"verify {type_name}: chat answer {'identical' if theirs == ours else 'differs'}: {theirs!r}"
          f"{'' if theirs == ours or not strict else '  FAILED (ours: ' + repr(ours) + ')'}")
    if strict and theirs != ours:
        failures.append("create_chat_completion answers differently")
    return {"prompt_identical": same_prompt, "answer": theirs, "identical": theirs == ours,
            "identical_text": theirs == tokenizer.decode(answer_ids)}


def iter_documents(path: Path):
    """(line number, object) of each JSONL line; a bad line stops with file:line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None


def check_tokens(path: Path, tokenizer: EtudeTokenizer, files: list[Path], context: int) -> dict[str, dict]:
    """Compare llama.cpp's ids with ours on every document of each JSONL file; prints and
    returns {file: {"documents": n, "mismatching": m, "first": "file:line" or None}}."""
    llm = open_llama(path, context)
    results = {}
    for file in files:
        count, bad, first = 0, 0, None
        for number, obj in iter_documents(file):
            messages = obj.get("conversations") or obj.get("messages") if isinstance(obj, dict) else None
            if messages:
                same = all(llama_ids(llm, m["content"]) == tokenizer.encode(m["content"]) for m in messages)
                rendered, _ = tokenizer.render_chat(messages)
                # Special-token strings inside content are plain text to us, not to a parse of the whole text.
                if not any(s in m["content"] for m in messages for s in SPECIAL_TOKENS):
                    same = same and llama_ids(llm, chatml_text(messages, False), special=True) == rendered
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                same = llama_ids(llm, obj["text"]) == tokenizer.encode(obj["text"])
            else:
                raise ValueError(f"{file}:{number}: neither {{\"text\"}} nor a conversation")
            count += 1
            if not same:
                bad += 1
                first = first or f"{file}:{number}"
        results[str(file)] = {"documents": count, "mismatching": bad, "first": first}
        print(f"check tokens: {file}: {bad} of {count} documents tokenized differently by llama.cpp"
              + (f" (first: {first})" if first else ""))
    del llm
    return results


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    source = source_folder(args.model)
    for file in args.check_tokens or []:
        if not Path(file).is_file():
            raise FileNotFoundError(f"--check-tokens {file}: no such file")
    model = load_source_model(source, resolve_adapter(args.lora) if args.lora else None)
    arch = gguf_arch(model.config)
    tokenizer = export_tokenizer(source, args.tokenizer_dir, model)
    refusal = tokenizer_refusal(tokenizer)
    if refusal:
        raise ConfigError(refusal)
    name = args.name or source.resolve().name
    out_dir = Path(args.out_dir or GGUF_DIR)
    types = list(dict.fromkeys(args.type))
    print(f"exporting {source} ({model.num_parameters() / 1e6:.2f}M parameters) to {out_dir} as GGUF "
          f"{', '.join(types)} (llama.cpp architecture {arch}{', mixture of experts' if model.config.use_moe else ''})")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf.", suffix=".tmp", dir=out_dir))
    report = {"model": str(source), "types": {}}
    try:
        for type_name in types:
            path = write_gguf(model, tokenizer, staging / f"{name}-{type_name}.gguf", type_name, name)
            report["types"][type_name] = {"file": path.name, "bytes": path.stat().st_size}
            print(f"wrote {path.name} ({path.stat().st_size / 1e6:.2f} MB)")
        (staging / "Modelfile").write_text(modelfile(f"{name}-{types[0]}.gguf", model.config), encoding="utf-8")
        if args.verify:
            failures = []
            for type_name in types:
                tolerance = args.tolerance if args.tolerance is not None else TOLERANCES[type_name]
                found, figures = verify(staging / f"{name}-{type_name}.gguf", model, tokenizer, type_name,
                                        tolerance, args.max_new_tokens)
                report["types"][type_name].update(figures)
                failures += [f"{type_name}: {f}" for f in found]
            if args.check_tokens:
                report["check_tokens"] = check_tokens(staging / f"{name}-{types[0]}.gguf", tokenizer,
                                                      [Path(f) for f in args.check_tokens], model.config.max_seq_len)
                failures += [f"{f}: {r['mismatching']} documents tokenized differently"
                             for f, r in report["check_tokens"].items() if r["mismatching"]]
            if failures:
                raise VerificationFailed("; ".join(failures))
        umask = os.umask(0)
        os.umask(umask)
        for path in staging.iterdir():
            os.chmod(path, 0o666 & ~umask)
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"done in {time.perf_counter() - started:.1f}s. llama.cpp: llama-cli -m {out_dir / report['types'][types[0]]['file']}"
          f" -cnv; Ollama: cd {out_dir} && ollama create {name} -f Modelfile && ollama run {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", help=f"Etude model folder to export (default {SFT_DIR})")
    add("--out-dir", help=f"folder for the GGUF files and the Modelfile (default {GGUF_DIR})")
    add("--type", nargs="+", choices=list(GGUF_TYPES), default=["q8_0"],
        help="one or more tensor types (default q8_0); the Modelfile uses the first")
    add("--name", help="model name in the file names and the GGUF metadata (default: the model folder's name)")
    add("--tokenizer-dir", help=f"tokenizer to embed (default: the model folder's own, else {TOKENIZER_DIR})")
    add("--lora", metavar="NAME", help="merge this LoRA adapter (a name under weight/lora/ or a folder) in first")
    add("--verify", action="store_true", help="check every file with llama.cpp (llama-cpp-python) before writing")
    add("--tolerance", type=float, help="largest max-abs logit difference --verify accepts, for every type "
        f"(default per type: {', '.join(f'{t} {v:g}' for t, v in TOLERANCES.items() if v is not None)}; others reported)")
    add("--max-new-tokens", type=int, default=32, help="greedy and chat tokens --verify compares (default 32)")
    add("--check-tokens", nargs="+", metavar="JSONL", help="with --verify: compare llama.cpp's ids with ours on "
        "every document of these files (pretraining or SFT JSONL)")
    add("--json", help="write the sizes and --verify's figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.tolerance is not None and args.tolerance < 0) or args.max_new_tokens <= 0:
        print("error: --tolerance must be >= 0 and --max-new-tokens positive", file=sys.stderr)
        return 2
    if args.check_tokens and not args.verify:
        print("error: --check-tokens goes with --verify", file=sys.stderr)
        return 2
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
