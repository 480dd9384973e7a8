"""Fault injection: a run killed in the middle of a save, a full disk, damaged checkpoint and model
files, parts that do not belong together, bad data, NaN/inf losses and gradients, chat-template
injection, unsafe loading, and awkward prompts. Each test injects the fault and checks the outcome:
nothing saved is lost, a resumed run continues from the last good checkpoint, and every refusal
names what is wrong and how to go on.

Cases already covered elsewhere are not repeated here; they are named where they belong:
- tests/test_pretrain.py::test_exact_resume_after_interruption (SIGINT / SIGKILL at a random
  moment of a run, then an exact resume), ::test_malformed_jsonl_names_file_and_line (not JSON,
  wrong shape, empty text; skipped with --skip-bad-lines), ::test_missing_data_names_the_command,
  ::test_resume_refuses_changed_data_order (seed changed on resume).
- tests/test_sft.py::test_bad_sft_lines_are_named (bad role, skipped and counted),
  ::test_chat_refuses_empty_prompt_and_missing_model (whitespace-only --prompt),
  ::test_long_history_drops_oldest_turns, ::test_sft_refuses_missing_init.
- tests/test_lora.py::test_adapter_for_another_base_is_refused (other shape, other base weights,
  no recorded base), ::test_train_lora_refuses_bad_input.
- tests/test_model.py::test_strict_load_refuses_another_architecture.
- tests/test_tokenizer.py::test_special_token_strings_in_text_are_plain_text (encode and a user
  turn), tests/test_server.py::test_special_token_text_in_a_message_stays_plain_text (the server).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train.trainer as trainer_module
from config import ROOT, EtudeConfig, TrainConfig
from model.checkpoint import load_model_folder, read_model_config, save_model_folder
from model.lora import apply_lora, save_adapter
from model.model import EtudeModel
from train.cli import load_init_model
from train.train_pretrain import main as pretrain_main
from train.train_sft import main as sft_main
from train.trainer import (find_resume_state,
                           load_resume_state)

from tests.conftest import TINY_VOCAB_SIZE
from tests.helpers import TOY_MODEL, assert_same_losses, checkpoint_step, write_corpus

STEPS = 6  # a toy run: checkpoints at steps 2 and 4 (--save-every 2), the final one at 6


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """Every fit() measures a matmul peak for MFU (~1 s on 2 cores); these tests do not need it."""
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device, dtype: (1e12, "fixed for tests"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault_corpus")
    write_corpus(folder / "train.jsonl", 120, seed=1)
    return folder


def run_args(corpus: Path, tokenizer_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus / "train.jsonl"), "--val-data", "none", "--tokenizer-dir", str(tokenizer_dir),
            "--out-dir", str(out_dir), "--model-config", TOY_MODEL, "--seq-len", "32", "--batch-size", "4",
            "--warmup-steps", "2", "--lr", "3e-3", "--max-steps", str(STEPS), "--save-every", "2",
            "--log-every", "100", "--eval-every", "100", "--device", "cpu", "--dtype", "fp32", *extra]


@pytest.fixture(scope="module")
def reference(corpus, tiny_tokenizer_dir, tmp_path_factory):
    """An uninterrupted toy run: its per-step losses are what every resumed run must give."""
    out = tmp_path_factory.mktemp("reference") / "model"
    trainer_module.peak_flops, saved = (lambda device, dtype: (1e12, "fixed")), trainer_module.peak_flops
    try:
        assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, out)) == 0
    finally:
        trainer_module.peak_flops = saved
    return out


def litter(folder: Path) -> list[str]:
    """Temporary files or folders a save left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ---- killed during a save -----------------------------------------------------------------------

# A training run in a child process that SIGKILLs itself at a chosen moment of its Nth checkpoint
# save: the fault is exact (no timing race), and the kill is as hard as a power cut for the files.
KILL_SCRIPT = textwrap.dedent('''
    import io, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import torch
    import model.checkpoint as checkpoint
    import train.trainer as trainer
    from train.train_pretrain import main

    moment, kill_at_save, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    trainer.peak_flops = lambda device, dtype: (1e12, "fixed")
    saves = 0

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def armed():
        return saves == kill_at_save

    real_save_state, real_save_file, real_torch_save = trainer.save_resume_state, checkpoint.save_file, torch.save
    real_swap_in, real_replace = trainer._swap_in, os.replace

    def save_state(*a, **k):
        global saves
        saves += 1
        return real_save_state(*a, **k)

    def half_weights(tensors, path, metadata=None):  # model.safetensors cut off mid-write
        real_save_file(tensors, path, metadata=metadata)
        if armed():
            size = os.path.getsize(path)
            os.truncate(path, size // 2)
            die()

    def half_optimizer(obj, handle, *a, **k):  # optimizer.pt cut off mid-write
        if not armed():
            return real_torch_save(obj, handle, *a, **k)
        buffer = io.BytesIO()
        real_torch_save(obj, buffer)
        handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        handle.flush()
        die()

    def swap_in(staging, folder):  # everything written, nothing renamed yet
        if armed():
            die()
        return real_swap_in(staging, folder)

    def replace(src, dst):  # the new checkpoint written, the old one moved aside, the new one not in place
        if armed() and Path(src).name.startswith(".checkpoint.") and Path(dst).name == "checkpoint":
            die()
        return real_replace(src, dst)

    trainer.save_resume_state = save_state
    if moment == "mid-weights":
        checkpoint.save_file = half_weights
    elif moment == "mid-optimizer":
        torch.save = half_optimizer
    elif moment == "before-renames":
        trainer._swap_in = swap_in
    elif moment == "between-renames":
        os.replace = replace
    sys.exit(main(args))
''')


def run_killed(tmp_path: Path, moment: str, kill_at_save: int, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "killed_run.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), moment, str(kill_at_save), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, f"the run was not killed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


# Each case is a child process (~5-10 s on 2 cores): the default run keeps one mid-write kill; the
# kill between the renames runs by default in the test after this one.
@pytest.mark.parametrize("moment", [pytest.param("mid-weights", marks=pytest.mark.slow), "mid-optimizer",
                                    pytest.param("before-renames", marks=pytest.mark.slow),
                                    pytest.param("between-renames", marks=pytest.mark.slow)])
def test_killed_during_a_save_resumes_from_the_previous_checkpoint(corpus, tiny_tokenizer_dir, tmp_path,
                                                                   reference, moment, capsys):
    out = tmp_path / "model"
    args = run_args(corpus, tiny_tokenizer_dir, out)
    run_killed(tmp_path, moment, 2, args)  # killed while saving the step-4 checkpoint
    found = find_resume_state(out / "checkpoint")
    assert found is not None, f"no checkpoint survived: {sorted(p.name for p in out.iterdir())}"
    assert json.loads((found / "trainer_state.json").read_text())["step"] == 2
    # The survivor is complete: its weights and optimizer state load into a fresh model.
    model = EtudeModel(read_state_model_config(found))
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3)
    assert load_resume_state(found, model, optimizer)["step"] == 2
    assert not (out / "config.json").exists(), "a killed run has no final model"

    assert pretrain_main(args) == 0
    assert f"resuming from {found} at step 2" in capsys.readouterr().out
    assert_same_losses(out, reference, rel=1e-5)  # kernels may differ in the last bits across processes
    assert litter(out) == [] and not (out / "checkpoint.old").exists()
    assert checkpoint_step(out) == STEPS


def read_state_model_config(folder: Path) -> EtudeConfig:
    return EtudeConfig.from_dict(json.loads((folder / "trainer_state.json").read_text())["model_config"])


def test_killed_twice_between_renames_keeps_the_only_checkpoint(corpus, tiny_tokenizer_dir, tmp_path, reference):
    """After a kill between the two renames only checkpoint.old/ is complete; the next save must
    keep it until the new checkpoint is in place (it used to delete it first)."""
    out = tmp_path / "model"
    args = run_args(corpus, tiny_tokenizer_dir, out)
    run_killed(tmp_path, "between-renames", 2, args)
    assert not (out / "checkpoint").exists() and checkpoint_step_of(out / "checkpoint.old") == 2
    run_killed(tmp_path, "between-renames", 1, args)  # the resumed run dies in the same place
    found = find_resume_state(out / "checkpoint")
    assert found is not None and checkpoint_step_of(found) == 2
    assert pretrain_main(args) == 0
    assert_same_losses(out, reference, rel=1e-5)
    assert litter(out) == []


def checkpoint_step_of(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["step"]


# ---- a full disk or another write error during a save ------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(corpus, tiny_tokenizer_dir, tmp_path,
                                                               monkeypatch, capsys):
    out = tmp_path / "model"
    args = run_args(corpus, tiny_tokenizer_dir, out)
    assert pretrain_main([*args, "--max-steps", "2"]) == 0
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(torch, "save", enospc)  # optimizer.pt cannot be written
    assert pretrain_main([*args, "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No space left on device" in err
    assert f"the previous checkpoint in {out / 'checkpoint'} is kept" in err and "Traceback" not in err
    assert checkpoint_step(out) == 2 and (out / "checkpoint" / "model.safetensors").read_bytes() == before
    assert litter(out) == []
    monkeypatch.undo()
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device, dtype: (1e12, "fixed"))
    assert pretrain_main([*args, "--max-steps", "4"]) == 0
    assert "resuming from" in capsys.readouterr().out and checkpoint_step(out) == 4


def test_disk_full_while_writing_the_model_folder_keeps_the_old_files(tmp_path, monkeypatch):
    import model.checkpoint as checkpoint
    folder = tmp_path / "model"
    torch.manual_seed(0)
    save_model_folder(EtudeModel(EtudeConfig(**TOY_SHAPE)), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (Path(a[1]).write_bytes(b"half"), enospc()))
    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        save_model_folder(EtudeModel(EtudeConfig(**TOY_SHAPE)), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no torn file, no temporary file
    with pytest.raises(OSError, match="No space left"):  # a new folder never appears half-written
        save_model_folder(EtudeModel(EtudeConfig(**TOY_SHAPE)), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


TOY_SHAPE = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


# ---- damaged checkpoint and model files ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained(corpus, tiny_tokenizer_dir, tmp_path_factory):
    """A toy run stopped after 2 steps: a model folder with its checkpoint/."""
    out = tmp_path_factory.mktemp("trained") / "model"
    trainer_module.peak_flops, saved = (lambda device, dtype: (1e12, "fixed")), trainer_module.peak_flops
    try:
        assert pretrain_main(run_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "2")) == 0
    finally:
        trainer_module.peak_flops = saved
    return out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(os.urandom(64))


@pytest.mark.parametrize("name,damage,message", [
    ("model.safetensors", truncate, "cannot read weights .*checkpoint/model.safetensors.*corrupted or truncated"),
    ("model.safetensors", garble, "cannot read weights .*checkpoint/model.safetensors"),
    ("optimizer.pt", truncate, "cannot read optimizer state .*checkpoint/optimizer.pt.*corrupted"),
    ("optimizer.pt", Path.unlink, "optimizer state missing: .*checkpoint/optimizer.pt"),
    ("trainer_state.json", truncate, "trainer state .*checkpoint/trainer_state.json is not valid JSON"),
    ("trainer_state.json", garble, "trainer state .*checkpoint/trainer_state.json is not (UTF-8|valid JSON)"),
])
def test_damaged_checkpoint_is_named_and_no_resume_still_works(trained, corpus, tiny_tokenizer_dir, tmp_path,
                                                                capsys, name, damage, message):
    out = tmp_path / "model"
    shutil.copytree(trained, out)
    damage(out / "checkpoint" / name)
    args = run_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "4")
    assert pretrain_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert "--no-resume" in err
    assert pretrain_main([*args, "--no-resume"]) == 0
    assert checkpoint_step(out) == 4 and litter(out) == []


@pytest.mark.parametrize("name,damage,message", [
    ("config.json", truncate, "model config .*config.json is not valid JSON"),
    ("config.json", lambda p: p.write_text('{"n_layers": -1}'), "(?s)config.json: invalid EtudeConfig.*n_layers must be a positive integer, got -1"),
    ("config.json", lambda p: p.write_text('{"n_layerz": 2}'), r"config.json: EtudeConfig: unknown key\(s\) \['n_layerz'\]"),
    ("config.json", Path.unlink, "model config not found: .*config.json"),
    ("model.safetensors", truncate, "cannot read weights .*model.safetensors.*corrupted or truncated"),
    ("model.safetensors", Path.unlink, "weights file not found: .*model.safetensors"),
])
def test_damaged_model_folder_is_named_by_every_reader(trained, tmp_path, capsys, name, damage, message):
    from inference.inference import main as chat_main
    folder = tmp_path / "model"
    shutil.copytree(trained, folder)
    damage(folder / name)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_model_folder(folder)
    # The programs that read a model folder say the same, as one error line.
    assert sft_main(["--init-from", str(folder), "--out-dir", str(tmp_path / "sft")]) == 2
    if name == "config.json" and damage is Path.unlink:
        assert "no model to start from" in capsys.readouterr().err
    else:
        assert __import__("re").search(message, capsys.readouterr().err)
        assert chat_main(["--model", str(folder), "--prompt", "hi"]) == 2
        assert __import__("re").search(message, capsys.readouterr().err)


# ---- parts that do not belong together ----------------------------------------------------------

def test_resume_into_another_model_shape_is_refused(trained, corpus, tiny_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(trained, out)
    args = run_args(corpus, tiny_tokenizer_dir, out, "--max-steps", "4")
    other = json.dumps({**json.loads(TOY_MODEL), "n_layers": 3})
    args[args.index("--model-config") + 1] = other
    assert pretrain_main(args) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint in {out / 'checkpoint'} is of another model (n_layers: 2 -> 3)" in err
    assert "--no-resume" in err
    assert pretrain_main([*args, "--no-resume"]) == 0
    assert read_model_config(out).n_layers == 3


def test_tokenizer_that_does_not_match_the_model_is_refused(tiny_tokenizer_dir, tmp_path, capsys):
    from inference.inference import main as chat_main
    torch.manual_seed(0)
    small = EtudeModel(EtudeConfig(**{**TOY_SHAPE, "vocab_size": 300}))
    folder = save_model_folder(small, tmp_path / "with_tokenizer", tiny_tokenizer_dir)
    with pytest.raises(ValueError, match=f"the tokenizer in {folder} has {TINY_VOCAB_SIZE} ids but the model only 300"):
        load_model_folder(folder)
    assert chat_main(["--model", str(folder), "--prompt", "hi"]) == 2
    assert "do not belong together" in capsys.readouterr().err
    # A later stage given another tokenizer than the model's own.
    bare = save_model_folder(small, tmp_path / "bare")
    cfg = TrainConfig(stage="sft", init_from=str(bare), tokenizer_dir=str(tiny_tokenizer_dir), seq_len=32)
    with pytest.raises(ValueError, match="has 512 ids but the model .* only 300; use the tokenizer it was trained with"):
        load_init_model(cfg, tokenizer_dir_given=True)


def test_lora_adapter_for_another_base_is_refused_by_the_chat(trained, tmp_path, capsys):
    from inference.inference import main as chat_main
    torch.manual_seed(0)
    other = EtudeModel(EtudeConfig(**{**read_model_config(trained).to_dict(), "n_layers": 3}))
    apply_lora(other, r=4, alpha=8)
    save_adapter(other, tmp_path / "adapter", base_model=tmp_path / "other_base")
    assert chat_main(["--model", str(trained), "--lora", str(tmp_path / "adapter"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another base model" in err and "n_layers: adapter 3, model 2" in err
