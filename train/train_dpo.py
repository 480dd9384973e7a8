"""Direct Preference Optimisation: teach a chat model which of two replies is the better one.

    python train/train_dpo.py --preset tiny                         # the demo pairs (tool/prepare_data.py --dpo)
    python train/train_dpo.py --data pairs.jsonl --beta 0.1 --lr 5e-6
    python train/train_dpo.py --preset tiny --lora                  # train an adapter only

Starts from a chat model (default weight/etude_sft_model/) and keeps a frozen copy of it as the
reference (with --lora, the same model with the adapter switched off). Data: JSONL, one pair per
line, {"chosen": [messages], "rejected": [messages]} or TRL's {"prompt", "chosen", "rejected"}
(train/preference.py); both sides must share the prompt. The loss is DPO's sigmoid loss over the
reply tokens only; logged per step: loss, reward accuracy and margin, the implicit rewards and the
chosen/rejected log-probabilities (and at each evaluation the same on the held-out pairs). Same
loop as every stage: resumable, Ctrl-C safe, torchrun for several GPUs. Writes
weight/etude_dpo_model/ (a model folder like any other: chat with inference/inference.py --model,
export with tool/convert_hf.py --model), or with --lora weight/lora/dpo/.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from train.cli import build_parser, print_config, run_stage, train_config_from_args
from train.policy import add_policy_flags, check_positive, default_out_dir, prepare_policy
from train.preference import DPOObjective, PreferencePairs, read_pairs
from train.trainer import Trainer

DEFAULT_BETA = 0.1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("dpo", __doc__)
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA,
                        help=f"strength of the pull towards the reference: higher keeps the model closer to it "
                             f"(default {DEFAULT_BETA})")
    add_policy_flags(parser, "dpo")
    args = parser.parse_args(argv)

    def body():
        check_positive("beta", args.beta)
        default_out_dir(args, "dpo")
        cfg = train_config_from_args("dpo", args)
        for path in (cfg.data, cfg.val_data):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"preference pairs not found: {path}. Build the demo pairs with `python "
                                        "tool/prepare_data.py --dpo` (it samples the SFT model), or pass --data PATH "
                                        "(and --val-data PATH or none)")
        tokenizer, model, reference, save_model = prepare_policy(cfg, args, "dpo", {"beta": args.beta},
                                                                 needs_reference=True)
        print_config(f"DPO on {cfg.init_from} (beta {args.beta}{', LoRA' if args.lora else ''}) with",
                     model=model.config.to_dict(), run=cfg.to_dict())
        train_data = PreferencePairs(read_pairs(cfg.data, cfg.skip_bad_lines), tokenizer, cfg.seq_len, cfg.data)
        val_data = PreferencePairs(read_pairs(cfg.val_data, cfg.skip_bad_lines), tokenizer, cfg.seq_len,
                                   cfg.val_data) if cfg.val_data else None
        print(f"{train_data.num_samples:,} training pairs" +
              (f", {val_data.num_samples:,} held-out pairs" if val_data else ""))
        prompt, _ = tokenizer.render_chat([{"role": "user", "content": cfg.sample_prompt}], add_generation_prompt=True)
        trainer = Trainer(model, cfg, train_data, val_data, save_model=save_model,
                          token_bytes=torch.tensor(tokenizer.token_bytes(), dtype=torch.float64),
                          sample_ids=prompt, decode=tokenizer.decode, stop_ids=(tokenizer.im_end_id,),
                          objective=DPOObjective(args.beta, reference))
        return trainer.fit()

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())
