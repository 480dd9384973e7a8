"""LoRA fine-tuning: teach a chat model something new by training a small adapter only.

    python train/train_lora.py --preset tiny                    # the demo: the assistant becomes "Mira"
    python train/train_lora.py --data my_chats.jsonl --lora-name support --lora-r 16
    python inference/inference.py --lora identity               # chat with the adapter applied

Starts from a model folder (default weight/etude_sft_model/), freezes all of it and wraps the
linear layers named by --lora-targets (default every attention and MLP projection) with low-rank
adapters; only those train, through the same loop as every stage (resumable, Ctrl-C safe).
Data is SFT-format JSONL (default training_data/lora_identity.jsonl, written by
tool/prepare_data.py). Writes weight/lora/<name>/: adapter_config.json and
adapter_model.safetensors in the PEFT layout (loadable by `peft` onto the Hugging Face export),
with checkpoint/ and metrics.jsonl of the run beside them.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import CHECKPOINT_SUBDIR, LORA_DIR, ConfigError, read_json
from model.checkpoint import WEIGHTS_FILE, atomic_write_json
from model.lora import (ADAPTER_WEIGHTS_FILE, DEFAULT_TARGETS, adapter_settings, apply_lora, check_lora_settings,
                        display_path, save_adapter)
from train.cli import build_parser, check_data_files, load_init_model, print_config, run_stage, train_config_from_args
from train.sft_data import load_sft_data
from train.trainer import Trainer, find_resume_state

DEFAULT_NAME = "identity"
DEFAULT_R = 8
DEFAULT_ALPHA = 16.0
RUN_FILE = "lora_run.json"  # the LoRA settings of the run in this folder, checked on resume


def add_lora_flags(parser, name: bool = True) -> None:
    """The --lora-* flags (train/train_dpo.py and train_grpo.py take them too, without --lora-name)."""
    add = parser.add_argument
    if name:
        add("--lora-name", default=DEFAULT_NAME,
            help=f"adapter name: the run writes {LORA_DIR}/<name>/ (default {DEFAULT_NAME}); --out-dir overrides the folder")
    add("--lora-r", type=int, default=DEFAULT_R, help=f"rank of the low-rank update (default {DEFAULT_R})")
    add("--lora-alpha", type=float, default=DEFAULT_ALPHA,
        help=f"scale numerator: the update is multiplied by alpha/r (default {DEFAULT_ALPHA:g})")
    add("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input while training (default 0)")
    add("--lora-targets", default=",".join(DEFAULT_TARGETS),
        help="comma-separated names of the linear layers to adapt, chosen by name in every block "
             f"(default {','.join(DEFAULT_TARGETS)})")


def lora_settings_from_args(args) -> dict:
    name = getattr(args, "lora_name", None)
    if name is not None and ("/" in name or "\\" in name or name in ("", ".", "..")):
        raise ConfigError(f"--lora-name {args.lora_name!r} must be a plain name (it becomes "
                          f"{LORA_DIR}/<name>/); to write elsewhere use --out-dir")
    settings = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                "targets": [t.strip() for t in args.lora_targets.split(",") if t.strip()]}
    problems = check_lora_settings(settings["r"], settings["alpha"], settings["dropout"], settings["targets"])
    if problems:
        raise ConfigError("invalid LoRA settings:\n  - " + "\n  - ".join(problems))
    return settings


def check_resumable(out_dir: Path, model, settings: dict, base: str | None, run_file: str = RUN_FILE) -> None:
    """A checkpoint in out_dir is resumed only by a run with the same LoRA layers, settings (those
    of the stage: LoRA's, DPO's beta, ...) and base model; say so plainly rather than fail deep
    inside the weight loading."""
    found = find_resume_state(out_dir / CHECKPOINT_SUBDIR)
    if found is None:
        return
    saved = read_json(out_dir / run_file, "run settings") if (out_dir / run_file).is_file() else None
    now = {**settings, "base": base}
    if saved is not None and saved != now:
        changed = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in now if saved.get(k) != now.get(k))
        raise ConfigError(f"the checkpoint in {found} was made with other settings ({changed}); run with the "
                          "same flags and --init-from to resume, or pass --no-resume to start over")
    if not (found / WEIGHTS_FILE).is_file():  # an FSDP checkpoint (sharded): the trainer checks it on load
        return
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(found / WEIGHTS_FILE), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read weights {found / WEIGHTS_FILE}: {exc}. The file is corrupted or truncated; "
                         "start over with --no-resume.") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict_for_save().items()}
    if shapes != expected:
        raise ConfigError(f"the checkpoint in {found} holds other LoRA layers than these settings make "
                          f"(r={settings['r']}, targets {settings['targets']}); run with the flags it was made "
                          "with to resume, or pass --no-resume to start over")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("lora", __doc__)
    add_lora_flags(parser)
    args = parser.parse_args(argv)

    def body():
        settings = lora_settings_from_args(args)
        if args.out_dir is None:
            args.out_dir = str(LORA_DIR / args.lora_name)
        cfg = train_config_from_args("lora", args)
        if not (Path(cfg.init_from) / "config.json").is_file():
            raise FileNotFoundError(f"no base model at {cfg.init_from}; fine-tune a chat model first with "
                                    "`python train/train_sft.py`, or pass --init-from FOLDER")
        tokenizer, model = load_init_model(cfg, tokenizer_dir_given=args.tokenizer_dir is not None,
                                           inherit_seq_len=args.seq_len is None and args.preset is None)
        base_params = model.num_parameters()
        wrapped = apply_lora(model, settings["targets"], r=settings["r"], alpha=settings["alpha"],
                             dropout=settings["dropout"], seed=cfg.seed)
        out_dir, base = Path(cfg.out_dir), display_path(cfg.init_from)
        if cfg.resume:
            check_resumable(out_dir, model, settings, base)
        blocks = {name.split(".")[1] for name in wrapped if name.startswith("layers.")}
        where = f"{len(wrapped)} linear layers in {len(blocks)} blocks" if blocks else f"{len(wrapped)} linear layers"
        check_data_files(cfg, args)
        print_config(f"LoRA on {cfg.init_from} ({where}) with", lora=adapter_settings(model),
                     model=model.config.applicable(), run=cfg.applicable())
        train_data = load_sft_data(cfg.data, tokenizer, cfg.seq_len, cfg.skip_bad_lines)
        val_data = load_sft_data(cfg.val_data, tokenizer, cfg.seq_len, cfg.skip_bad_lines) if cfg.val_data else None
        prompt, _ = tokenizer.render_chat([{"role": "user", "content": cfg.sample_prompt}], add_generation_prompt=True)
        trainer = Trainer(model, cfg, train_data, val_data,
                          token_bytes=torch.tensor(tokenizer.token_bytes(), dtype=torch.float64),
                          save_model=lambda m, folder: save_adapter(m, folder, base_model=cfg.init_from),
                          sample_ids=prompt, decode=tokenizer.decode, stop_ids=(tokenizer.im_end_id,))
        if trainer.dist.is_main:
            atomic_write_json(out_dir / RUN_FILE, {**settings, "base": base})
        summary = trainer.fit()
        if summary.get("status") == "complete" and (out_dir / ADAPTER_WEIGHTS_FILE).is_file():
            adapter_bytes = (out_dir / ADAPTER_WEIGHTS_FILE).stat().st_size
            base_bytes = (Path(cfg.init_from) / WEIGHTS_FILE).stat().st_size \
                if (Path(cfg.init_from) / WEIGHTS_FILE).is_file() else 4 * base_params
            named = out_dir.resolve() == (LORA_DIR / args.lora_name).resolve()
            print(f"adapter {out_dir / ADAPTER_WEIGHTS_FILE}: {adapter_bytes / 1e6:.2f} MB "
                  f"({adapter_bytes / base_bytes:.1%} of the base model's {base_bytes / 1e6:.2f} MB); "
                  f"chat with it: python inference/inference.py --lora {args.lora_name if named else out_dir}")
        return summary

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())
