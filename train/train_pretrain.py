"""Pretrain an Etude model from scratch on plain text.

    python train/train_pretrain.py --preset tiny            # ~8 min on 2 CPU cores
    python train/train_pretrain.py --preset small --dtype bf16
    torchrun --nproc_per_node 4 train/train_pretrain.py --preset base

Reads training_data/pretrain.jsonl ({"text": ...} per line, or a .txt file) and its .val split,
tokenized once into a cache beside them; writes weight/etude_pretrained_model/ (config.json,
model.safetensors, generation_config.json, tokenizer files, metrics.jsonl) and a resumable
checkpoint/ inside it. Run the same command again to resume; --no-resume starts over.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import ConfigError, preset_model_config
from model.model import EtudeModel
from model.tokenizer import load_tokenizer
from train.cli import (build_parser, check_data_files, load_init_model, parse_model_overrides, print_config, run_stage,
                       train_config_from_args)
from train.data import load_pretrain_data, unigram_bits_per_byte
from train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("pretrain", __doc__)
    parser.add_argument("--model-config", help="JSON object (or file) of model fields overriding the "
                        "preset, e.g. '{\"n_layers\": 2, \"hidden_size\": 64}'")
    args = parser.parse_args(argv)

    def body():
        cfg = train_config_from_args("pretrain", args)
        if cfg.init_from:  # continue pretraining an existing model (an Etude or a Llama folder)
            if args.model_config:
                raise ConfigError("--model-config cannot reshape a model given by --init-from; drop one of them")
            tokenizer, model = load_init_model(cfg, tokenizer_dir_given=args.tokenizer_dir is not None)
            model_config = model.config
        else:
            tokenizer = load_tokenizer(cfg.tokenizer_dir)
            # The vocabulary comes from the tokenizer; the context must hold a training window.
            overrides = {"vocab_size": tokenizer.vocab_size, **parse_model_overrides(args.model_config)}
            model_config = preset_model_config(args.preset or "small", **overrides)
            if model_config.max_seq_len < cfg.seq_len:
                model_config = preset_model_config(args.preset or "small", **{**overrides, "max_seq_len": cfg.seq_len})
        check_data_files(cfg, args)
        print_config("pretraining with", model=model_config.applicable(), run=cfg.applicable())
        train_data = load_pretrain_data(cfg.data, tokenizer, cfg.seq_len, cfg.skip_bad_lines)
        val_data = load_pretrain_data(cfg.val_data, tokenizer, cfg.seq_len, cfg.skip_bad_lines) \
            if cfg.val_data else None

        token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64)
        if val_data is not None:
            baseline = unigram_bits_per_byte(train_data.tokens, val_data.tokens, token_bytes.numpy())
            print(f"unigram baseline (token frequencies alone): {baseline:.4f} bits per byte on the validation set")
        torch.manual_seed(cfg.seed)
        if not cfg.init_from:
            model = EtudeModel(model_config)
        trainer = Trainer(model, cfg, train_data, val_data, token_bytes=token_bytes,
                          sample_ids=tokenizer.encode(cfg.sample_prompt), decode=tokenizer.decode,
                          stop_ids=(tokenizer.eos_id,))
        return trainer.fit()

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())
