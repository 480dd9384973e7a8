"""The log's speed and time left: smoothed, with evaluations priced apart (train/progress.py),
and no MFU printed on a CPU (its peak moves with the machine's load)."""

import json

import pytest
import torch

from train.progress import Progress, evaluations_between
from train.trainer import peak_flops


def test_eta_is_steady_through_one_slow_step_and_an_evaluation():
    progress = Progress(span=50)
    progress.evaluation(20.0)  # the step-0 evaluation: 20 s each, 5 more to come
    progress.step(9.0)  # the first step warms up and is left out
    etas = []
    for step in range(1, 200):
        progress.step(5.0 if step == 100 else 0.1)  # one step 50x slower than the others
        etas.append(progress.eta(1000 - step, 5))
    assert progress.seconds_per_step == pytest.approx(0.1, rel=0.15)
    # Window-of-5 averaging moved the ETA by 5x around such a step; the smoothed one moves < 2x.
    ratios = [later / earlier for earlier, later in zip(etas, etas[1:])]
    assert max(ratios) < 2.0 and min(ratios) > 0.5
    assert progress.eta(100, 5) == pytest.approx(100 * progress.seconds_per_step + 5 * 20.0)


def test_the_average_is_unbiased_from_the_first_steps():
    progress = Progress(span=50)
    assert progress.eta(10) is None
    progress.step(3.0)
    assert progress.seconds_per_step == 3.0  # only the warm-up step: that is all there is
    progress.step(0.5)
    progress.step(0.5)
    assert progress.seconds_per_step == pytest.approx(0.5)  # not pulled toward 0 by the empty average


@pytest.mark.parametrize("step,total,every,expected", [
    (0, 100, 10, 10), (5, 100, 10, 10), (10, 100, 10, 9), (95, 100, 10, 1), (100, 100, 10, 0),
    (0, 25, 10, 3), (20, 25, 10, 1), (24, 25, 10, 1)])
def test_evaluations_left_count_the_regular_ones_and_the_last_step(step, total, every, expected):
    assert evaluations_between(step, total, every) == expected


def test_no_mfu_against_a_cpu_peak_measured_once():
    peak, reason = peak_flops(torch.device("cpu"), torch.bfloat16)
    assert peak is None and "CPU" in reason


def test_a_cpu_run_logs_tokens_per_second_and_no_mfu(tmp_path, tiny_tokenizer_dir, capsys):
    from tests.helpers import TOY_MODEL, write_corpus
    from train.train_pretrain import main as pretrain_main

    write_corpus(tmp_path / "train.jsonl", 200, seed=1)
    out = tmp_path / "model"
    assert pretrain_main(["--data", str(tmp_path / "train.jsonl"), "--val-data", "none", "--tokenizer-dir",
                          str(tiny_tokenizer_dir), "--out-dir", str(out), "--model-config", TOY_MODEL,
                          "--seq-len", "32", "--batch-size", "4", "--max-steps", "12", "--log-every", "6",
                          "--device", "cpu"]) == 0
    log = capsys.readouterr().out
    assert "no MFU on a CPU" in log and "MFU " not in log.replace("no MFU on a CPU", "")
    assert "tok/s | ETA" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12 and all(r["tokens_per_sec"] > 0 and "mfu" not in r for r in steps)
