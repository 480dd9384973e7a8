"""GRPO: reinforcement learning with verifiable rewards - the model practises and a checker grades.

    python train/train_grpo.py --preset tiny                       # the demo: counting problems
    python train/train_grpo.py --data prompts.jsonl --group-size 8 --kl-coef 0.02
    python tool/evaluate.py weight/etude_sft_model weight/etude_grpo_model --tasks counting

Starts from a chat model (default weight/etude_sft_model/). Each step takes --batch-size prompts
with checkable answers (default training_data/grpo.jsonl, written by tool/prepare_data.py:
{"prompt", "task", "answer"} per line, train/rollouts.py), samples a group of --group-size
completions per prompt from the model being trained (the KV-cached sampler of chat and
evaluation), rewards each (1: the checker accepts the answer and the reply ends its turn within
--max-new-tokens; else 0), normalises the rewards within each group and takes one step of the
clipped policy-gradient loss, with an optional KL penalty towards the starting model. Logged per
step: loss, mean reward, pass rate (answers right), share of replies that end, completion length,
share of groups with a right answer. Same loop as every stage: resumable (the same completions
are drawn again), Ctrl-C safe, torchrun for several GPUs. Writes weight/etude_grpo_model/ (chat
with inference/inference.py --model, export with tool/convert_hf.py --model), or with --lora
weight/lora/grpo/.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ConfigError
from train.cli import build_parser, print_config, run_stage, train_config_from_args
from train.policy import add_policy_flags, check_positive, default_out_dir, prepare_policy
from train.rollouts import GRPOObjective, RolloutPrompts, read_task_prompts
from train.trainer import Trainer


def plot_rewards(out_dir: Path) -> Path:
    """reward.png beside metrics.jsonl: mean reward per step and its 10-step moving average."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [r["step"] for r in records if "reward" in r]
    rewards = [r["reward"] for r in records if "reward" in r]
    window = 10
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
              for i in range(len(rewards))]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, rewards, color="0.75", linewidth=1, label="mean reward of the step's completions")
    axis.plot(steps, smooth, color="C0", linewidth=2, label=f"{window}-step moving average")
    axis.set_xlabel("step")
    axis.set_ylabel("reward")
    axis.set_title(f"GRPO: {out_dir.name}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = out_dir / "reward.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("grpo", __doc__)
    add = parser.add_argument
    add("--group-size", type=int, default=8, help="completions sampled per prompt (default 8)")
    add("--max-new-tokens", type=int, default=16,
        help="longest completion; one that has not ended its turn by then earns no reward (default 16, the "
             "budget tool/evaluate.py gives the synthetic tasks)")
    add("--temperature", type=float, default=1.0, help="sampling temperature of the completions (default 1.0)")
    add("--epsilon", type=float, default=0.2, help="clip range of the probability ratio (default 0.2)")
    add("--kl-coef", type=float, default=0.0,
        help="weight of the KL penalty towards the starting model (default 0: none, and no reference copy)")
    add_policy_flags(parser, "grpo")
    args = parser.parse_args(argv)

    def body():
        for name in ("group_size", "max_new_tokens", "temperature", "epsilon"):
            check_positive(name.replace("_", "-"), getattr(args, name))
        if args.group_size < 2:
            raise ConfigError("--group-size must be at least 2: advantages compare completions within a group")
        if args.kl_coef < 0:
            raise ConfigError(f"--kl-coef must be >= 0, got {args.kl_coef}")
        default_out_dir(args, "grpo")
        cfg = train_config_from_args("grpo", args)
        if cfg.fsdp:
            raise ConfigError("GRPO samples on every rank on its own, which sharded (FSDP) weights cannot do; "
                              "drop --fsdp (DDP replicates the model)")
        if not Path(cfg.data).is_file():
            raise FileNotFoundError(f"prompts not found: {cfg.data}. Build the demo prompts with `python "
                                    "tool/prepare_data.py`, or pass --data PATH")
        settings = {k: getattr(args, k) for k in ("group_size", "max_new_tokens", "temperature", "epsilon", "kl_coef")}
        tokenizer, model, reference, save_model = prepare_policy(cfg, args, "grpo", settings,
                                                                 needs_reference=args.kl_coef > 0)
        print_config(f"GRPO on {cfg.init_from}{' (LoRA)' if args.lora else ''} with", grpo=settings,
                     model=model.config.to_dict(), run=cfg.to_dict())
        prompts = RolloutPrompts(read_task_prompts(cfg.data, cfg.skip_bad_lines), tokenizer, args.group_size,
                                 args.max_new_tokens, args.temperature, model.config.max_seq_len)
        print(f"{prompts.num_samples:,} prompts; {cfg.batch_size} per step x {args.group_size} completions")
        sample, _ = tokenizer.render_chat([{"role": "user", "content": cfg.sample_prompt}], add_generation_prompt=True)
        trainer = Trainer(model, cfg, prompts, None, save_model=save_model, sample_ids=sample,
                          decode=tokenizer.decode, stop_ids=(tokenizer.im_end_id,),
                          objective=GRPOObjective(args.epsilon, args.kl_coef, reference, args.group_size))
        prompts.policy = trainer.model
        summary = trainer.fit()
        if summary.get("status") == "complete" and trainer.dist.is_main:
            print(f"reward curve: {plot_rewards(Path(cfg.out_dir))}")
        return summary

    return run_stage(body)


if __name__ == "__main__":
    sys.exit(main())
