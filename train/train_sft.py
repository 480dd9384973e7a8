"""Supervised fine-tuning: teach a pretrained Etude model to chat.

    python train/train_sft.py --preset tiny
    python train/train_sft.py --init-from weight/etude_pretrained_model --data my_chats.jsonl

Starts from a model folder (default weight/etude_pretrained_model/), inheriting its shape and
tokenizer. Reads training_data/sft.jsonl: one {"conversations": [{"role": "system|user|assistant|tool",
"content": ...}, ...]} (or {"messages": [...]}) per line; tool lists, calls and thinking are text
in the content (model/chat_markup.py). Loss only on assistant replies and their closing <|im_end|>. Writes weight/etude_sft_model/ with a resumable checkpoint/ inside.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from train.cli import build_parser, check_data_files, load_init_model, print_config, run_stage, train_config_from_args
from train.sft_data import load_sft_data
from train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("sft", __doc__)
    args = parser.parse_args(argv)

    def body():
        cfg = train_config_from_args("sft", args)
        tokenizer, model = load_init_model(cfg, tokenizer_dir_given=args.tokenizer_dir is not None,
                                           inherit_seq_len=args.seq_len is None and args.preset is None)
        check_data_files(cfg, args)
        print_config(f"fine-tuning {cfg.init_from} with", model=model.config.applicable(), run=cfg.applicable())
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
