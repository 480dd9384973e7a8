"""GRPO at toy size: prompt files and their errors (file:line), group-normalised advantages, the
policy-gradient step (the rewarded completion gains probability), a run through the shared loop
with exact resume, and the evaluation-set questions left out of training."""

from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import load_model_folder
from model.synthetic_tasks import HELD_OUT, make_problems, training_problems
from model.tokenizer import load_tokenizer
from train.data import DataError
from train.preference import sequence_logps
from train.rollouts import GRPOObjective, RolloutPrompts, read_task_prompts, sample_group
from train.train_grpo import main as grpo_main
from train.train_sft import main as sft_main

from tests.helpers import check_exact_resume
from tests.test_convert_hf import make_native

TASK = "counting"


def write_lines(path, lines) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def prompt_lines(count: int, seed: int) -> list[dict]:
    return [{"prompt": p.question, "task": p.kind, "answer": p.answer} for p in training_problems(TASK, count, seed)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer_dir):
    """A toy chat model that has seen counting problems (so some sampled answers are right), and
    a GRPO run on other counting problems."""
    folder = tmp_path_factory.mktemp("grpo")
    make_native(folder / "base", tiny_tokenizer_dir, seed=0, initializer_range=0.02)
    conversations = [{"conversations": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]}
                     for p in training_problems(TASK, 400, seed=5)]
    write_lines(folder / "sft.jsonl", conversations)
    common = ["--device", "cpu", "--dtype", "fp32", "--log-every", "100", "--eval-every", "1000"]
    assert sft_main(["--init-from", str(folder / "base"), "--data", str(folder / "sft.jsonl"), "--val-data", "none",
                     "--out-dir", str(folder / "sft"), "--seq-len", "96", "--batch-size", "8", "--lr", "3e-3",
                     "--max-steps", "60", "--warmup-steps", "5", *common]) == 0
    write_lines(folder / "prompts.jsonl", prompt_lines(64, seed=6))
    args = ["--init-from", str(folder / "sft"), "--data", str(folder / "prompts.jsonl"), "--batch-size", "4",
            "--group-size", "4", "--max-new-tokens", "6", "--lr", "1e-3", "--warmup-steps", "1", "--max-steps", "12",
            "--save-every", "4", "--seq-len", "96", *common]
    assert grpo_main([*args, "--out-dir", str(folder / "grpo")]) == 0
    return {"folder": folder, "args": args, "tokenizer": load_tokenizer(tiny_tokenizer_dir)}


def test_prompt_lines_and_their_errors(tmp_path):
    good = prompt_lines(2, seed=1)
    chat = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": good[0]["prompt"]}],
            "task": TASK, "answer": good[0]["answer"]}
    write_lines(tmp_path / "ok.jsonl", [*good, chat])
    prompts = read_task_prompts(tmp_path / "ok.jsonl")
    assert [p.answer for _, p in prompts] == [good[0]["answer"], good[1]["answer"], good[0]["answer"]]
    assert prompts[2][0][0]["role"] == "system"
    cases = {"no checker for task 'poetry'": {**good[0], "task": "poetry"},
             "no checker for task None": {"prompt": "Hi", "answer": "1"},
             '"answer" is missing or empty': {**good[0], "answer": ""},
             'expected {"prompt"': {"question": "What?"}}
    for expected, bad in cases.items():
        write_lines(tmp_path / "bad.jsonl", [good[0], bad])
        with pytest.raises(DataError, match=f"bad.jsonl:2: {expected}"):
            read_task_prompts(tmp_path / "bad.jsonl")


def test_training_problems_leave_the_evaluation_questions_out():
    held_out = {p.question for p in make_problems("arithmetic", HELD_OUT, seed=0)}
    drawn = training_problems("arithmetic", 3000, seed=1)
    assert len(drawn) == 3000 and not held_out & {p.question for p in drawn}
    assert drawn == training_problems("arithmetic", 3000, seed=1)
    with pytest.raises(ValueError, match="seed 0"):
        training_problems("arithmetic", 1, seed=0)


def test_advantages_are_normalised_within_each_group_and_a_step_favours_the_rewarded(toy):
    tokenizer = toy["tokenizer"]
    model = load_model_folder(toy["folder"] / "sft")
    prompts = RolloutPrompts(read_task_prompts(toy["folder"] / "prompts.jsonl"), tokenizer, group_size=6,
                             max_new_tokens=6, temperature=1.0, max_len=model.config.max_seq_len)
    prompts.policy = model
    torch.manual_seed(0)
    batch = prompts.get_batch(list(range(8)))
    groups, advantages = batch["reward"].view(8, 6), batch["advantages"].view(8, 6)
    assert 0 < float(batch["reward"].mean()) < 1  # the toy model is right sometimes: there is a signal
    for rewards, normalised in zip(groups, advantages):
        if rewards.std() == 0:
            assert torch.all(normalised == 0)
        else:
            assert abs(float(normalised.mean())) < 1e-5 and abs(float(normalised.std()) - 1) < 1e-3
    assert torch.equal(batch["reward"], batch["pass_rate"] * batch["ended"])
    # One plain gradient step on the loss raises the log-probability of every rewarded completion
    # with a positive advantage, relative to those with a negative one.
    before = sequence_logps(model(batch["inputs"])[0], batch["targets"]).detach()
    loss, _, metrics = GRPOObjective()(model, batch)
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param -= 0.05 * param.grad
    after = sequence_logps(model(batch["inputs"])[0], batch["targets"]).detach()
    gain = after - before
    assert gain[batch["advantages"] > 0].mean() > gain[batch["advantages"] < 0].mean()
    assert set(metrics) >= {"reward", "pass_rate", "completion_length", "ended"}


def test_grpo_run_logs_rewards_and_writes_a_model_folder(toy):
    folder = toy["folder"]
    records = [json.loads(line) for line in (folder / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 12 and {"pass_rate", "completion_length", "ended", "solved_groups"} <= set(steps[0])
    assert any(r["loss"] != 0 for r in steps)  # some groups had right and wrong answers
    assert load_model_folder(folder / "grpo").config == load_model_folder(folder / "sft").config


def test_grpo_resume_is_exact(toy, tmp_path, monkeypatch):
    """A run that dies after its step-4 checkpoint draws the same completions again on resume."""
    out = tmp_path / "interrupted"
    check_exact_resume(monkeypatch, grpo_main, toy["args"], out, 6, 4, toy["folder"] / "grpo")
    rewards = lambda folder: [json.loads(line).get("reward") for line in (folder / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rewards(out) == rewards(toy["folder"] / "grpo")


def test_grpo_kl_and_lora_and_bad_settings(toy, tmp_path, capsys):
    args = [*toy["args"], "--max-steps", "2", "--save-every", "100"]
    assert grpo_main([*args, "--kl-coef", "0.05", "--out-dir", str(tmp_path / "kl")]) == 0
    assert "kl" in json.loads((tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()[-1])
    assert grpo_main([*args, "--lora", "--kl-coef", "0.05", "--out-dir", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert grpo_main([*args, "--group-size", "1", "--out-dir", str(tmp_path / "o")]) == 2
    assert "--group-size must be at least 2" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    write_lines(bad, [*prompt_lines(2, seed=1), {"prompt": "Write a poem.", "task": "poetry", "answer": "x"}])
    assert grpo_main([*args, "--data", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:3: no checker for task 'poetry'" in capsys.readouterr().err


def test_a_greedy_group_is_the_greedy_answer_repeated(toy):
    """sample_group at temperature 0: every row is model.generate()'s greedy answer, ending at its
    first stop token; sampled rows end at their stop token too."""
    model = load_model_folder(toy["folder"] / "sft", "cpu").eval()
    tokenizer = toy["tokenizer"]
    stop = tokenizer.im_end_id
    for problem in training_problems(TASK, 3, seed=9):
        prompt, _ = tokenizer.render_chat([{"role": "user", "content": problem.question}], add_generation_prompt=True)
        expected = list(model.generate(prompt, max_new_tokens=6, stop_ids=(stop,)))
        assert sample_group(model, prompt, 3, 6, 0.0, stop) == [expected] * 3
        torch.manual_seed(0)
        for row in sample_group(model, prompt, 4, 6, 1.0, stop):
            assert 1 <= len(row) <= 6 and stop not in row[:-1]
