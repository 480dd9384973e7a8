"""What the two alignment stages (train/train_dpo.py, train/train_grpo.py) set up alike: the model
they train (the whole chat model, or a LoRA adapter on it), its frozen reference, how the result
is saved, and the stage settings that a resumed run must share."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from config import LORA_DIR, ConfigError, TrainConfig
from model.checkpoint import atomic_write_json
from model.lora import apply_lora, display_path, save_adapter
from train.cli import load_init_model
from train.train_lora import add_lora_flags, check_resumable, lora_settings_from_args


def add_policy_flags(parser, stage: str) -> None:
    parser.add_argument("--lora", action="store_true",
                        help=f"train a LoRA adapter on the chat model instead of the whole model; the reference is "
                             f"then the model with the adapter switched off (no second copy in memory). Writes "
                             f"{LORA_DIR.name}/{stage}/ unless --out-dir says otherwise; chat with --lora FOLDER")
    add_lora_flags(parser, name=False)


def prepare_policy(cfg: TrainConfig, args, stage: str, settings: dict, needs_reference: bool):
    """(tokenizer, model to train, frozen reference or None, save_model or None for a model
    folder). With --lora the reference is None: the objective switches the adapters off instead.
    `settings` (the stage's own, e.g. beta) are checked against a checkpoint being resumed and
    written beside it."""
    tokenizer, model = load_init_model(cfg, tokenizer_dir_given=args.tokenizer_dir is not None,
                                       inherit_seq_len=args.seq_len is None and args.preset is None)
    reference, save_model, lora = None, None, None
    if args.lora:
        lora = lora_settings_from_args(args)
        apply_lora(model, lora["targets"], r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], seed=cfg.seed)
        save_model = lambda m, folder: save_adapter(m, folder, base_model=cfg.init_from)  # noqa: E731
    elif needs_reference:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    out_dir, run_file = Path(cfg.out_dir), f"{stage}_run.json"
    run = {**settings, "lora": lora}
    if cfg.resume:
        check_resumable(out_dir, model, run, display_path(cfg.init_from), run_file=run_file)
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write_json(out_dir / run_file, {**run, "base": display_path(cfg.init_from)})
    return tokenizer, model, reference, save_model


def default_out_dir(args, stage: str) -> None:
    """--lora without --out-dir writes weight/lora/<stage>/ (an adapter is not a model folder)."""
    if args.lora and args.out_dir is None:
        args.out_dir = str(LORA_DIR / stage)


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"--{name} must be > 0, got {value}")
