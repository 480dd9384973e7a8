"""Helpers shared by the end-to-end tests: toy corpora, toy runs, and watching a run that the
test interrupts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from config import ROOT

TOY_MODEL = json.dumps({"n_layers": 2, "hidden_size": 64, "n_heads": 4, "n_kv_heads": 2})
WORDS = ("the cat sat on a mat while the dog ran to the old red barn and a bird sang in the tall green "
         "tree as the sun rose over the quiet hills").split()
QA = [("What color is the sky?", "The sky is blue."), ("What do cats say?", "Cats say meow."),
      ("Where does the sun rise?", "The sun rises in the east."), ("How many legs has a dog?", "A dog has four legs."),
      ("What is two plus two?", "Two plus two is four."), ("Who sang in the tree?", "A bird sang in the tree."),
      ("What is red?", "The old barn is red."), ("Say hello.", "Hello! Nice to meet you.")]


def fit_chats(model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int, steps: int) -> float:
    """Fit a toy model to rendered chats (render_chat's (ids, mask) pairs: loss on the masked
    tokens only), full batch, AdamW at 1e-2; returns the last loss."""
    from model.model import IGNORE_INDEX

    width = max(len(ids) for ids, _ in rows)
    inputs = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for row, (ids, mask) in enumerate(rows):
        inputs[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids) - 1] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _, loss, _ = model(inputs, labels=labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def write_corpus(path: Path, n_docs: int, seed: int) -> None:
    """Pretraining JSONL of random sentences over a small vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n_docs):
            picks = torch.randint(0, len(WORDS), (int(torch.randint(20, 60, (1,), generator=generator)),),
                                  generator=generator)
            handle.write(json.dumps({"text": " ".join(WORDS[i] for i in picks) + "."}) + "\n")


def write_sft(path: Path, repeats: int, system_every: int = 3) -> None:
    """SFT JSONL of the QA pairs, some with a system prompt, some as two-turn chats."""
    with open(path, "w", encoding="utf-8") as handle:
        for r in range(repeats):
            for i, (question, answer) in enumerate(QA):
                messages = [{"role": "system", "content": "You are a toy."}] if (r + i) % system_every == 0 else []
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                if (r + i) % 4 == 1:
                    q2, a2 = QA[(i + 1) % len(QA)]
                    messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
                handle.write(json.dumps({"conversations": messages}) + "\n")


def step_losses(out_dir: Path) -> dict[int, float]:
    """Per-step training losses from metrics.jsonl (the last record of a step wins)."""
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def assert_same_losses(resumed: Path, reference: Path, rel: float = 0.0) -> None:
    """Per-step losses of a resumed run equal those of the uninterrupted one: bit for bit by
    default, or within a relative tolerance `rel` where the kernels themselves are not
    reproducible across processes (a resume bug - another batch, lost optimizer moments, a reset
    schedule - moves a loss by 1e-2 or more, far beyond such a tolerance)."""
    got, want = step_losses(resumed), step_losses(reference)
    assert sorted(got) == sorted(want), f"steps logged differ: {sorted(set(got) ^ set(want))}"
    differ = {step: (got[step], want[step]) for step in sorted(want)
              if abs(got[step] - want[step]) > rel * abs(want[step])}
    assert not differ, f"steps whose loss differs (resumed, reference): {differ}"


def launch(script: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError("training ended before the test could interrupt it:\n" + process.stdout.read())
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training run")
        time.sleep(0.01)


def latest_step(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except json.JSONDecodeError:  # caught mid-write
        return 0


def checkpoint_step(out_dir: Path) -> int:
    try:
        return json.loads((out_dir / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def crash_at_step(monkeypatch, stage_main, args: list[str], step: int) -> None:
    """Run a stage in-process and crash it (KeyboardInterrupt, no save) as it starts step `step`:
    a crash between checkpoints, whose steps since the last checkpoint a resumed run redoes."""
    import pytest

    from train.trainer import Trainer

    original = Trainer._train_step

    def dies(self, at):
        if at == step:
            raise KeyboardInterrupt
        return original(self, at)

    monkeypatch.setattr(Trainer, "_train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        stage_main(args)
    monkeypatch.setattr(Trainer, "_train_step", original)


def check_exact_resume(monkeypatch, stage_main, args: list[str], out: Path, crash_at: int, saved_at: int,
                       reference: Path) -> None:
    """A run crashed at step `crash_at` (its last checkpoint at `saved_at`), then run again with
    the same arguments, logs the very losses of the uninterrupted run in `reference`."""
    crash_at_step(monkeypatch, stage_main, [*args, "--out-dir", str(out)], crash_at)
    assert checkpoint_step(out) == saved_at
    assert stage_main([*args, "--out-dir", str(out)]) == 0
    assert step_losses(out) == step_losses(reference)
