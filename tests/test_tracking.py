"""Experiment tracking (--tracker): TensorBoard event files hold exactly the scalars of
metrics.jsonl, also across a resume from a checkpoint older than the last logged step; W&B in
offline mode writes its run on disk and continues it on resume; a missing package stops the
run at its start with the pip command."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from config import ConfigError, TrainConfig
from train.train_pretrain import main as pretrain_main

from tests.helpers import TOY_MODEL, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder / "train.jsonl", 300, seed=1)
    write_corpus(folder / "val.jsonl", 40, seed=2)
    return folder


def run_args(corpus: Path, tokenizer_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus / "train.jsonl"), "--val-data", str(corpus / "val.jsonl"),
            "--tokenizer-dir", str(tokenizer_dir), "--out-dir", str(out_dir), "--model-config", TOY_MODEL,
            "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "2", "--lr", "3e-3", "--max-steps", "40",
            "--eval-every", "10", "--eval-batches", "1", "--save-every", "10", "--log-every", "10",
            "--device", "cpu", *extra]


def metrics_by_tag(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in metrics.jsonl, by name, in file order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name != "step":
                series.setdefault(name, []).append((record["step"], value))
    return series


def tensorboard_by_tag(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar as TensorBoard itself reads the folder (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(corpus, tiny_tokenizer_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = run_args(corpus, tiny_tokenizer_dir, out, "--tracker", "tensorboard")
    assert pretrain_main([*args, "--stop-at-step", "20"]) == 0
    kept = tmp_path / "checkpoint-20"
    shutil.copytree(out / "checkpoint", kept)
    # The run goes on to step 30 and is then "killed": its checkpoint is lost, so the resume
    # starts again from step 20, and the events of steps 21..30 already written must not show.
    assert pretrain_main([*args, "--stop-at-step", "30"]) == 0
    shutil.rmtree(out / "checkpoint")
    shutil.copytree(kept, out / "checkpoint")
    assert pretrain_main(args) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 3  # one per invocation

    expected = metrics_by_tag(out)
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "val_loss", "val_bpb"} <= set(expected)
    assert [step for step, _ in expected["loss"]] == list(range(1, 41))
    assert [step for step, _ in expected["val_loss"]] == [0, 10, 20, 30, 40]
    logged = tensorboard_by_tag(out / "tensorboard")
    assert set(logged) == set(expected)
    for tag, series in expected.items():
        assert [step for step, _ in logged[tag]] == [step for step, _ in series], tag
        assert [value for _, value in logged[tag]] == pytest.approx([value for _, value in series], rel=1e-6), tag


def test_tensorboard_fresh_start_hides_an_older_run(corpus, tiny_tokenizer_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = run_args(corpus, tiny_tokenizer_dir, out, "--tracker", "tensorboard", "--max-steps", "10")
    assert pretrain_main(args) == 0
    assert pretrain_main([*args, "--no-resume", "--lr", "1e-3"]) == 0
    logged = tensorboard_by_tag(out / "tensorboard")
    assert [step for step, _ in logged["loss"]] == list(range(1, 11))  # the second run's, once
    second = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [value for _, value in logged["lr"]] == pytest.approx([r["lr"] for r in second if "lr" in r][-10:])


def test_wandb_offline_writes_its_run_and_continues_it_on_resume(corpus, tiny_tokenizer_dir, tmp_path,
                                                                  monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything sent, it would fail
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    out = tmp_path / "run"
    args = run_args(corpus, tiny_tokenizer_dir, out, "--tracker", "wandb", "--max-steps", "20")
    assert pretrain_main([*args, "--stop-at-step", "10"]) == 0
    assert pretrain_main(args) == 0
    import wandb
    wandb.teardown()  # the runs' records are written by W&B's service process: wait for it, as exit does
    run_id = (out / "wandb" / "etude_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith("-" + run_id) for run in runs)  # one run, continued
    for run in runs:
        history = (run / f"run-{run_id}.wandb").read_bytes()
        for name in (b"loss", b"val_loss", b"val_bpb", b"tokens_per_sec"):
            assert name in history


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_tracker_package_says_how_to_install_it(corpus, tiny_tokenizer_dir, tmp_path, monkeypatch,
                                                        capsys, package):
    monkeypatch.setitem(sys.modules, package, None)  # import and find_spec now see no such package
    out = tmp_path / "run"
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, out, "--tracker", package)) == 2
    assert f"`pip install {package}`" in capsys.readouterr().err
    assert not out.exists()  # stopped before anything was read or written


def test_tracker_setting_is_validated():
    assert TrainConfig().tracker == "none"
    with pytest.raises(ConfigError, match="tracker must be one of none, tensorboard, wandb, got 'mlflow'"):
        TrainConfig(tracker="mlflow")
