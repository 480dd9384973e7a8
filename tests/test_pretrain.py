"""Pretraining end to end at toy size: the data cache, bad data, the CLI from two folders,
and exact resume after SIGINT and after SIGKILL."""

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
from model.tokenizer import load_tokenizer
from train.data import DataError, build_token_cache, cache_paths, load_pretrain_data
from train.train_pretrain import main as pretrain_main

from tests.helpers import TOY_MODEL, checkpoint_step, latest_step, launch, step_losses, wait_for, write_corpus

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder / "train.jsonl", 600, seed=1)
    write_corpus(folder / "val.jsonl", 60, seed=2)
    return folder


def run_args(corpus: Path, tokenizer_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus / "train.jsonl"), "--val-data", str(corpus / "val.jsonl"),
            "--tokenizer-dir", str(tokenizer_dir), "--out-dir", str(out_dir), "--model-config", TOY_MODEL,
            "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "5", "--lr", "3e-3",
            "--eval-every", "50", "--eval-batches", "2", "--log-every", "50", "--device", "cpu", *extra]


def test_pretraining_learns_and_saves_a_model_folder(corpus, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "model"
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "60", "--eval-every", "60")) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert all("tokens_per_sec" in r for r in records if "loss" in r)
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, out / "checkpoint", out / "model.safetensors", out / "checkpoint" / "model.safetensors"):
        ordinary = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == ordinary, f"{path} has mode {path.stat().st_mode & 0o777:o}"
    model = load_model_folder(out)
    assert model.config.n_layers == 2 and model.config.vocab_size == load_tokenizer(tiny_tokenizer_dir).vocab_size


def test_init_from_continues_a_trained_model(corpus, tiny_tokenizer_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, first, "--max-steps", "40", "--eval-every", "40")) == 0
    args = [a for a in run_args(corpus, tiny_tokenizer_dir, second, "--max-steps", "10", "--init-from", str(first))]
    del args[args.index("--model-config"):args.index("--model-config") + 2]  # the shape comes from --init-from
    assert pretrain_main(args) == 0
    evals = lambda folder: [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                            if "val_loss" in r]
    # the continued run starts where the first one ended, not from a fresh initialisation
    assert evals(second)[0]["val_loss"] == pytest.approx(evals(first)[-1]["val_loss"], abs=1e-4)


# Muon (+ AdamW) restores two optimizers' states; one interruption suffices to show it.
@pytest.mark.parametrize("how,optimizer", [("sigint", "adamw"), ("sigkill", "adamw"), ("sigkill", "muon")])
def test_exact_resume_after_interruption(corpus, tiny_tokenizer_dir, tmp_path, how, optimizer):
    steps = "400"
    recipe = ("--optimizer", optimizer, "--schedule", "wsd" if optimizer == "muon" else "cosine")
    reference = tmp_path / "reference"
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, reference, "--max-steps", steps,
                                  "--save-every", "25", *recipe)) == 0
    expected = step_losses(reference)
    assert len(expected) == 400

    interrupted = tmp_path / "interrupted"
    args = run_args(corpus, tiny_tokenizer_dir, interrupted, "--max-steps", steps, "--save-every", "25", *recipe)
    process = launch("train/train_pretrain.py", args)
    if how == "sigint":
        wait_for(lambda: latest_step(interrupted) >= 30, process)
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 130, output
        assert "checkpoint saved" in output
    else:
        wait_for(lambda: checkpoint_step(interrupted) >= 50, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    stopped_at = checkpoint_step(interrupted)
    assert 0 < stopped_at < 400
    assert not (interrupted / "config.json").exists(), "an interrupted run has no final model yet"

    assert pretrain_main(args) == 0
    resumed = step_losses(interrupted)
    assert sorted(resumed) == list(range(1, 401))
    mismatched = [s for s in resumed if resumed[s] != expected[s]]
    assert not mismatched, f"resumed from step {stopped_at}; first differing step {mismatched[:3]}"


def test_resume_refuses_changed_data_order(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "5")) == 0
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "10", "--seed", "7")) == 2
    assert "--no-resume" in capsys.readouterr().err
    assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "10", "--seed", "7",
                                  "--no-resume")) == 0


def test_token_cache_is_reused_and_rebuilt_on_change(tiny_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    source = tmp_path / "data.jsonl"
    write_corpus(source, 50, seed=3)
    tokens, meta = build_token_cache(source, tokenizer, verbose=False)
    bin_path, _ = cache_paths(source)
    built_at = bin_path.stat().st_mtime_ns
    again, _ = build_token_cache(source, tokenizer, verbose=False)
    assert bin_path.stat().st_mtime_ns == built_at and len(again) == len(tokens)
    assert tokens[-1] == tokenizer.eos_id and meta["n_documents"] == 50

    with open(source, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "one more document about the cat"}) + "\n")
    grown, meta = build_token_cache(source, tokenizer, verbose=False)
    assert meta["n_documents"] == 51 and len(grown) > len(tokens)
    expected_tail = tokenizer.encode("one more document about the cat") + [tokenizer.eos_id]
    assert list(grown[-len(expected_tail):]) == expected_tail


def test_packed_windows_have_no_padding(tiny_tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    source = tmp_path / "data.jsonl"
    write_corpus(source, 30, seed=4)
    data = load_pretrain_data(source, tokenizer, seq_len=16)
    inputs, targets = data.get_batch([0, 1])
    assert inputs.shape == targets.shape == (2, 16)
    assert torch.equal(inputs[0, 1:], targets[0, :-1]) and targets[0, -1] == inputs[1, 0]
    assert len(data) == (len(data.tokens) - 1) // 16


@pytest.mark.parametrize("line,problem", [
    ('{"text": "fine"}\n{"text": \n', "not valid JSON"),
    ('{"text": "fine"}\n{"body": "x"}\n', 'expected an object with a "text" field'),
    ('{"text": "fine"}\n{"text": "   "}\n', '"text" is empty'),
])
def test_malformed_jsonl_names_file_and_line(tiny_tokenizer_dir, tmp_path, line, problem):
    source = tmp_path / "bad.jsonl"
    source.write_text(line, encoding="utf-8")
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(DataError, match=f"bad.jsonl:2: {problem}"):
        build_token_cache(source, tokenizer, verbose=False)
    _, meta = build_token_cache(source, tokenizer, skip_bad_lines=True, verbose=False)
    assert meta["skipped_lines"] == 1 and meta["n_documents"] == 1


def test_missing_data_names_the_path(tiny_tokenizer_dir, tmp_path, capsys):
    code = pretrain_main(["--data", str(tmp_path / "nope.jsonl"), "--tokenizer-dir", str(tiny_tokenizer_dir),
                          "--out-dir", str(tmp_path / "o")])
    # The user named the file, so the fix is the path (the demo-data command is for a missing default:
    # tests/test_first_run.py).
    assert code == 2 and "nope.jsonl (from --data); check the path" in capsys.readouterr().err


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "train"])
def test_script_runs_from_root_and_from_its_folder(corpus, tiny_tokenizer_dir, tmp_path, cwd):
    script = "train/train_pretrain.py" if cwd == ROOT else "train_pretrain.py"
    help_text = subprocess.run([sys.executable, script, "--help"], cwd=cwd, capture_output=True, text=True,
                               check=True).stdout
    for flag in ("--preset", "--data", "--out-dir", "--init-from", "--batch-size", "--grad-accum", "--lr",
                 "--epochs", "--max-steps", "--seq-len", "--device", "--dtype", "--resume", "--no-resume",
                 "--eval-every", "--save-every", "--seed", "--compile", "--no-compile"):
        assert flag in help_text, flag
    done = subprocess.run([sys.executable, script, *run_args(corpus, tiny_tokenizer_dir, tmp_path / "m",
                                                             "--max-steps", "3")],
                          cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
