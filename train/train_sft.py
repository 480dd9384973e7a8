"""Supervised fine-tuning: teach a pretrained Etude model to chat.

    python train/train_sft.py --preset tiny
    python train/train_sft.py --init-from weight/etude_pretrained_model --data my_chats.jsonl

Starts from a model folder (default weight/etude_pretrained_model/), inheriting its shape and
tokenizer. Reads training_data/sft.jsonl: one {"conversations": [{"role": "system|user|assistant",
"content": ...}, ...]} (or {"messages": [...]}) per line. Loss only on assistant replies and
their closing <|im_end|>. Writes weight/etude_sft_model/ with a resumable checkpoint/ inside.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import ConfigError
from model.checkpoint import load_model_folder
from model.tokenizer import load_tokenizer
from train.cli import build_parser, print_config, run_stage, train_config_from_args
from train.data import load_sft_data
from train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("sft", __doc__)
    args = parser.parse_args(argv)

    def body():
        cfg = train_config_from_args("sft", args)
        init = Path(cfg.init_from)
        if not (init / "config.json").is_file():
            raise FileNotFoundError(f"no model to fine-tune at {init}; pretrain one first with "
                                    "`python train/train_pretrain.py` or pass --init-from FOLDER")
        if args.tokenizer_dir is None and (init / "tokenizer.json").is_file():
            cfg.tokenizer_dir = str(init)  # the tokenizer the model was trained with
        tokenizer = load_tokenizer(cfg.tokenizer_dir)
        model = load_model_folder(init)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer in {cfg.tokenizer_dir} has {tokenizer.vocab_size} ids but the model "
                             f"in {init} only {model.config.vocab_size}; use the tokenizer it was trained with")
        if args.seq_len is None and args.preset is None:
            cfg.seq_len = model.config.max_seq_len
        if cfg.seq_len > model.config.max_seq_len:
            raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's context of "
                              f"{model.config.max_seq_len} tokens; lower it")
        print_config(f"fine-tuning {init} with", model=model.config.to_dict(), run=cfg.to_dict())
        train_data = load_sft_data(cfg.data, tokenizer, cfg.seq_len, cfg.skip_bad_lines)
        val_data = load_sft_data(cfg.val_data, tokenizer, cfg.seq_len, cfg.skip_bad_lines) if cfg.val_data else None
        prompt, _ = tokenizer.render_chat([{"role": "user", "content": cfg.sample_prompt}], add_generation_prompt=True)
        trainer = Trainer(model, cfg, train_data, val_data,
                          token_bytes=torch.tensor(tokenizer.token_bytes(), dtype=torch.float64),
                          sample_ids=prompt, decode=tokenizer.decode, stop_ids=(tokenizer.im_end_id,))
        return trainer.fit()

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())
