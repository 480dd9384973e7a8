"""Command-line flags shared by every training stage, spelled the same everywhere.

Precedence: stage defaults < --preset < explicit flags. A flag left out is None here and does
not override anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config import PRESETS, STAGE_DEFAULTS, TRACKERS, ConfigError, TrainConfig, resolve_train_config
from train.tracking import check_tracker


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with every shared flag; stage scripts may add their own."""
    defaults = STAGE_DEFAULTS[stage]
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default=None,
        help="model size and run length: tiny (4.6M parameters, the demo's; its pretraining takes ~8 min on 2 "
             "CPU cores), small (~26M), base (~105M, one GPU), tiny-moe and small-moe (mixtures of experts)")
    add("--data", help=f"training data (default {defaults['data']})")
    add("--val-data", help=f"validation data (default {defaults.get('val_data')}); 'none' turns evaluation off")
    add("--out-dir", help=f"model folder this stage writes, with checkpoint/ inside (default {defaults['out_dir']})")
    add("--init-from", help="model folder a later stage starts from"
        + (f" (default {defaults['init_from']})" if defaults.get("init_from") else ""))
    add("--tokenizer-dir", help="tokenizer folder (default weight/tokenizer)")
    add("--batch-size", type=int, help=f"windows per device per micro-step (stage default {defaults['batch_size']})")
    add("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    add("--lr", type=float, help=f"peak learning rate (stage default {defaults['lr']})")
    add("--warmup-steps", type=int, help="linear warmup steps before the schedule (capped at 20%% of the run)")
    add("--schedule", choices=["cosine", "wsd", "constant"],
        help="learning-rate schedule after warmup: cosine decay to lr x min-lr-ratio; wsd (warmup-stable-decay): "
             "lr held, then a cool-down over the last --cooldown-frac of the run; constant (default cosine)")
    add("--min-lr-ratio", type=float, help="the schedule ends at lr x this (default 0.1)")
    add("--cooldown-frac", type=float, help="wsd: fraction of the run spent cooling down (default 0.2)")
    add("--cooldown", choices=["linear", "1-sqrt"], help="wsd: shape of the cool-down (default linear)")
    add("--optimizer", choices=["adamw", "muon"],
        help="adamw: AdamW for every parameter; muon: torch.optim.Muon for the attention and MLP matrices at "
             "--muon-lr, AdamW at --lr for embeddings, norms and the output layer (default adamw)")
    add("--muon-lr", type=float, help="peak learning rate of the Muon group (default 0.02)")
    add("--muon-weight-decay", type=float, help="decoupled weight decay of the Muon group (default 0)")
    add("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    add("--grad-clip", type=float, help="global gradient-norm clip, 0 for none (default 1.0)")
    add("--epochs", type=int, help=f"passes over the data (stage default {defaults['epochs']})")
    add("--max-steps", type=int, help="optimizer steps to run; overrides --epochs")
    add("--stop-at-step", type=int,
        help="end this invocation after step N with a checkpoint (the schedule still spans the whole run); "
             "run again without it to continue")
    add("--seq-len", type=int, help="tokens per training window")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], help="auto: CUDA, then MPS, then CPU")
    add("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 autocast where the hardware runs it fast (CUDA, CPUs with AMX/AVX512-BF16), else fp32")
    add("--resume", action=argparse.BooleanOptionalAction, default=None,
        help="continue from <out-dir>/checkpoint/ when it exists (default on)")
    add("--eval-every", type=int, help="steps between validations")
    add("--eval-batches", type=int, help="validation batches per evaluation")
    add("--save-every", type=int, help="steps between resumable checkpoints")
    add("--log-every", type=int, help="steps between log lines")
    add("--seed", type=int, help="seed of the initialisation and the data order (default 42)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model (default off: on CPU it costs more than it saves at these sizes)")
    add("--fsdp", action=argparse.BooleanOptionalAction, default=None,
        help="under torchrun: shard weights, gradients and optimizer state across ranks (FSDP2) "
             "instead of replicating the model (DDP, the default)")
    add("--skip-bad-lines", action="store_true", default=None,
        help="skip malformed data lines (counted and reported) instead of stopping")
    add("--on-nan", choices=["skip", "stop"],
        help="a step with a NaN/inf loss or gradient is never applied; skip: count it and go on (10 in a "
             "row stop the run), stop: end the run at once with exit status 2; either way the last "
             "checkpoint is kept (default skip)")
    add("--keep", choices=["best", "last"],
        help="the model the out-dir receives at the end: best, the evaluation with the lowest validation loss "
             "(kept in <out-dir>/best/ as the run goes), or last, the final step's (default best)")
    add("--tracker", choices=TRACKERS,
        help="also send the scalars of metrics.jsonl to TensorBoard (<out-dir>/tensorboard/) or Weights & Biases "
             "(WANDB_MODE=offline keeps the run in <out-dir>/wandb/); neither is installed by default (default none)")
    return parser


def train_config_from_args(stage: str, args: argparse.Namespace) -> TrainConfig:
    """Resolve the run settings from defaults, preset and flags; report bad values clearly."""
    flags = {name: getattr(args, name, None) for name in (
        "data", "val_data", "out_dir", "init_from", "tokenizer_dir", "batch_size", "grad_accum", "lr",
        "warmup_steps", "weight_decay", "grad_clip", "epochs", "max_steps", "seq_len", "device", "dtype",
        "resume", "eval_every", "eval_batches", "save_every", "log_every", "seed", "compile", "fsdp",
        "skip_bad_lines", "on_nan", "optimizer", "muon_lr", "muon_weight_decay", "schedule", "min_lr_ratio",
        "cooldown_frac", "cooldown", "stop_at_step", "tracker", "keep")}
    if flags["val_data"] is not None and flags["val_data"].lower() == "none":
        flags["val_data"] = ""
    for name in ("data", "val_data", "out_dir", "init_from", "tokenizer_dir"):
        if flags[name]:
            flags[name] = str(Path(flags[name]).expanduser().resolve())
    cfg = resolve_train_config(stage, args.preset, flags)
    check_tracker(cfg.tracker)  # a missing package stops here, before any data is read
    if cfg.val_data == "":
        cfg.val_data = None
    return cfg


def check_data_files(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """Stop before the configuration is printed or anything is built when a data file is
    missing. A path the user typed is theirs to fix; a missing default means the demo data was
    never built. (Stages call it after loading the model they start from, so that a missing
    earlier stage is named first.)"""
    given = {name for name in ("data", "val_data") if getattr(args, name, None)}
    for name, flag in (("data", "--data"), ("val_data", "--val-data")):
        path = getattr(cfg, name)
        if not path or Path(path).is_file():
            continue
        what = "training data" if name == "data" else "validation data"
        if Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path} is a folder; give the {what} file (JSONL) inside it")
        if name in given:
            raise FileNotFoundError(f"{what} not found: {path} (from {flag}); check the path")
        fix = f"build the demo data with `python tool/prepare_data.py`, or pass {flag} PATH"
        if name == "val_data":
            fix += " (or --val-data none to train without validation)"
        raise FileNotFoundError(f"{what} not found at the default {path}; {fix}")


def parse_model_overrides(text: str | None) -> dict[str, Any]:
    """--model-config: a JSON object or a path to a JSON file of EtudeConfig fields."""
    if not text:
        return {}
    path = Path(text)
    try:
        data = json.loads(path.read_text(encoding="utf-8") if path.is_file() else text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-config must be a JSON object or a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--model-config must be a JSON object, e.g. '{\"n_layers\": 2}'")
    return data


def print_config(title: str, **sections: dict[str, Any]) -> None:
    print(title)
    for name, values in sections.items():
        print(f"  {name}: " + json.dumps(values, sort_keys=True))


def run_stage(body: Callable[[], dict[str, Any]]) -> int:
    """Run a stage's body and turn the user's mistakes (bad config, data, paths, checkpoints)
    into one 'error:' line and exit status 2; an interrupted run exits 130 after saving.
    ETUDE_DEBUG=1 shows the full traceback instead."""
    from train.data import DataError  # torch-heavy; imported only when a stage runs
    try:
        summary = body()
    except (ConfigError, DataError, OSError, ValueError) as exc:  # OSError: a full disk, permissions
        if os.environ.get("ETUDE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 130 if summary.get("status") == "interrupted" else 0


def load_init_model(cfg: TrainConfig, tokenizer_dir_given: bool, inherit_seq_len: bool = False):
    """The model in cfg.init_from (an Etude or a Hugging Face Llama folder) and its tokenizer:
    the folder's own copy unless --tokenizer-dir was given. Checks that the two belong together
    and that a training window fits the model's context (with inherit_seq_len, a window is the
    model's whole context). Returns (tokenizer, model)."""
    from model.checkpoint import load_model_folder
    from model.tokenizer import load_tokenizer

    init = Path(cfg.init_from)
    if not (init / "config.json").is_file():
        raise FileNotFoundError(f"no model to start from at {init}; pretrain one first with "
                                "`python train/train_pretrain.py` or pass --init-from FOLDER")
    if not tokenizer_dir_given and (init / "tokenizer.json").is_file():
        cfg.tokenizer_dir = str(init)  # the tokenizer the model was trained with
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    if tokenizer_dir_given and (init / "tokenizer.json").is_file():
        try:
            own = load_tokenizer(init)
        except ValueError:  # the folder's copy is damaged: the one given is what the user wants
            own = tokenizer
        if own.fingerprint() != tokenizer.fingerprint():
            raise ValueError(f"the tokenizer in {cfg.tokenizer_dir} is not the one the model in {init} was trained "
                             f"with (its own copy is in that folder: {own.vocab_size} ids against "
                             f"{tokenizer.vocab_size}, other tokens or merges); drop --tokenizer-dir to use it")
    model = load_model_folder(init)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {cfg.tokenizer_dir} has {tokenizer.vocab_size} ids but the model "
                         f"in {init} only {model.config.vocab_size}; use the tokenizer it was trained with")
    if inherit_seq_len:
        cfg.seq_len = model.config.max_seq_len
    if cfg.seq_len > model.config.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's context of "
                          f"{model.config.max_seq_len} tokens; lower it")
    return tokenizer, model
