"""torchrun on 2 CPU processes (gloo): DDP and FSDP2 follow a single-process run step for step,
and a run resumes on another number of ranks with the same global batch and data order."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import ROOT
from model.checkpoint import load_model_folder
from train.train_pretrain import main as pretrain_main

from tests.helpers import TOY_MODEL, checkpoint_step, step_losses, wait_for, write_corpus

TOLERANCE = 1e-5  # fp32; reductions in another order differ in the last bits only


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist_corpus")
    write_corpus(folder / "train.jsonl", 300, seed=1)
    write_corpus(folder / "val.jsonl", 30, seed=2)
    return folder


def run_args(corpus: Path, tokenizer_dir: Path, out: Path, max_steps: int, *extra: str) -> list[str]:
    return ["--data", str(corpus / "train.jsonl"), "--val-data", str(corpus / "val.jsonl"),
            "--tokenizer-dir", str(tokenizer_dir), "--out-dir", str(out), "--model-config", TOY_MODEL,
            "--seq-len", "64", "--batch-size", "4", "--max-steps", str(max_steps), "--lr", "3e-3",
            "--device", "cpu", "--dtype", "fp32", "--log-every", "100", "--eval-every", "1000",
            "--eval-batches", "2", "--save-every", "4", *extra]


def start(nproc: int, args: list[str]) -> subprocess.Popen:
    """train_pretrain.py as one process (nproc 0) or under torchrun with nproc ranks, in its own
    process group so that a test can kill every rank at once."""
    script = str(ROOT / "train" / "train_pretrain.py")
    launcher = [] if nproc == 0 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.Popen([sys.executable, *launcher, script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    return output


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its ranks in sessions of their own, so killing
    its process group does not reach them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_after_checkpoint(process: subprocess.Popen, out: Path, step: int) -> tuple[int, str]:
    """SIGKILL the launcher and every rank at once, as a lost machine would."""
    wait_for(lambda: checkpoint_step(out) >= step, process, timeout=240)
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = process.communicate(timeout=60)[0]
    return checkpoint_step(out), output


def max_difference(got: dict[int, float], want: dict[int, float]) -> float:
    assert sorted(got) == sorted(want), f"steps differ: {sorted(set(got) ^ set(want))}"
    return max(abs(got[s] - want[s]) for s in want)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_follow_one_process(corpus, tiny_tokenizer_dir, tmp_path, mode):
    """Global batch 8 as one process (batch 4 x accumulation 2) and as 2 ranks x batch 4."""
    single, double = tmp_path / "single", tmp_path / "double"
    reference = start(0, run_args(corpus, tiny_tokenizer_dir, single, 12, "--grad-accum", "2"))
    finish(reference)
    extra = ["--fsdp"] if mode == "fsdp" else []
    output = finish(start(2, run_args(corpus, tiny_tokenizer_dir, double, 12, *extra)))
    assert "2 rank(s)" in output and output.count("saved ") == 1, "rank 0 alone logs and saves"
    difference = max_difference(step_losses(double), step_losses(single))
    print(f"{mode}: max per-step loss difference vs one process: {difference:.2e}")
    assert difference <= TOLERANCE

    # The final folder is the ordinary model folder, whatever the sharding was.
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = load_model_folder(double)(ids)[0]
        want = load_model_folder(single)(ids)[0]
    assert (got - want).abs().max().item() <= 1e-4
    if mode == "fsdp":
        assert sorted(p.name for p in (double / "checkpoint").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_resume_on_another_number_of_ranks(corpus, tiny_tokenizer_dir, tmp_path, mode):
    """2 ranks, killed after a checkpoint; resumed on 1 rank, killed again; finished on 2 ranks.
    Every step's loss equals the uninterrupted run's: no window skipped or seen twice."""
    steps = 60
    extra = ["--fsdp"] if mode == "fsdp" else []
    reference = tmp_path / "reference"
    finish(start(2, run_args(corpus, tiny_tokenizer_dir, reference, steps, *extra)))

    out = tmp_path / "resumed"
    args = run_args(corpus, tiny_tokenizer_dir, out, steps, *extra)
    first, _ = kill_after_checkpoint(start(2, args), out, 8)
    # One rank: a plain process, or FSDP under torchrun with one process.
    second, output = kill_after_checkpoint(start(1 if mode == "fsdp" else 0, args), out, first + 8)
    assert 0 < first < second < steps
    assert "global batch of 8 on 1 rank(s) x batch 4: gradient accumulation 1 -> 2" in output
    output = finish(start(2, args))
    assert f"resuming from {out / 'checkpoint'} at step {second}" in output

    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_batch"] == 8 and state["samples_seen"] == steps * 8
    difference = max_difference(step_losses(out), step_losses(reference))
    print(f"{mode}: 2 -> 1 -> 2 ranks (stopped at {first}, {second}): max loss difference {difference:.2e}")
    assert difference <= TOLERANCE

    # Settings that cannot continue this checkpoint are refused by name, before any step.
    longer = [*args[:args.index("--max-steps") + 1], str(steps + 8), *args[args.index("--max-steps") + 2:]]
    misfit = ["--batch-size", "3"] if mode == "ddp" else []
    other_kind = ["--fsdp"] if mode == "ddp" else ["--no-fsdp"]
    for extra_args, nproc, expected in ((misfit, 0, "global batch of 8"),
                                        (other_kind, 1, "add --fsdp" if mode == "fsdp" else "drop --fsdp")):
        if not extra_args:
            continue
        refused = start(nproc, [*longer, *extra_args])
        text = refused.communicate(timeout=120)[0]
        assert refused.returncode != 0 and expected in text and "--no-resume" in text, text


def test_fsdp_needs_torchrun(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, tmp_path / "m", 4, "--fsdp")) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err
