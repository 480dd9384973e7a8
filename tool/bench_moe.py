"""Time one training step of a mixture-of-experts model against the dense model with the same
active parameters (a benchmark, not a test).

    python tool/bench_moe.py                                   # tiny-moe vs tiny, batch 8 x 256
    python tool/bench_moe.py --moe-preset small-moe --dense-preset small --batch-size 4 --seq-len 512
    python tool/bench_moe.py --steps 20 --threads 2 --dtype bf16

A step is forward + backward + AdamW (fused where available) on fresh random token ids, in fp32
(or --dtype bf16 autocast) on the CPU (or --device). The two models alternate step by step (dense,
MoE, dense, MoE, ...) so that a machine whose speed drifts (other jobs, turbo) affects both alike; each is reported by its median
and its fastest run. Printed: the active and total parameters of each, the step times, and the
ratio MoE / dense (the aim is <= 1.3x), for the whole model and for the feed-forward layer alone
(SparseMoE against FeedForward, forward + backward on the same hidden states), where the
dispatch overhead shows undiluted by attention and the output layer. Writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import PRESETS, ConfigError, preset_model_config
from model.model import EtudeModel, FeedForward, SparseMoE


def active_parameters(model: EtudeModel) -> int:
    """Parameters a token runs through (matmul weights as flops_per_token counts them, plus the
    embedding row it reads, which is negligible and left out)."""
    return int(model.flops_per_token(seq_len=0) / 6)


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate(steps: dict[str, callable], repeats: int, warmup: int,
              device: torch.device) -> dict[str, tuple[float, float]]:
    """(median, fastest) seconds of each step, run in alternation after `warmup` untimed rounds.
    The fastest is what the step costs on an otherwise idle machine; on a shared one the median
    also carries other jobs' interference."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            seconds = timed(step, device)
            if round_index >= warmup:
                times[name].append(seconds)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def training_step(model: EtudeModel, ids: torch.Tensor, dtype: torch.dtype):
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4, fused=ids.device.type in ("cpu", "cuda"))
    generator = torch.Generator(device=ids.device).manual_seed(1)

    def step():
        # Fresh ids every step, as in training: the experts' row counts (so the matmul shapes)
        # change from step to step, which a fixed batch would hide.
        ids.random_(0, model.config.vocab_size, generator=generator)
        with autocast(ids.device, dtype):
            _, loss, aux_loss = model(ids[:, :-1], labels=ids[:, 1:])
        (loss + aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def layer_step(layer: torch.nn.Module, hidden: torch.Tensor, dtype: torch.dtype):
    generator = torch.Generator(device=hidden.device).manual_seed(2)

    def step():
        hidden.normal_(generator=generator)
        with autocast(hidden.device, dtype):
            out = layer(hidden)
        out.float().square().mean().backward()
        layer.zero_grad(set_to_none=True)
    return step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--moe-preset", default="tiny-moe", choices=sorted(PRESETS), help="the MoE model (default tiny-moe)")
    add("--dense-preset", default="tiny", choices=sorted(PRESETS), help="the dense model (default tiny)")
    add("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    add("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    add("--steps", type=int, default=10, help="timed steps of each model (default 10)")
    add("--warmup", type=int, default=2, help="untimed steps of each model first (default 2)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--device", default="cpu", help="cpu or cuda (default cpu)")
    add("--dtype", choices=("fp32", "bf16"), default="fp32",
        help="fp32, or bf16 autocast as the trainer uses where the hardware runs it fast (default fp32)")
    add("--seed", type=int, default=0, help="seed for the weights and the token ids (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if min(args.batch_size, args.seq_len, args.steps) <= 0 or args.warmup < 0:
            raise ValueError("--batch-size, --seq-len and --steps must be positive, --warmup >= 0")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        moe_config = preset_model_config(args.moe_preset, max_seq_len=max(args.seq_len + 1, 2))
        dense_config = preset_model_config(args.dense_preset, max_seq_len=max(args.seq_len + 1, 2))
        if not moe_config.use_moe or dense_config.use_moe:
            raise ValueError(f"--moe-preset must name a MoE preset and --dense-preset a dense one "
                             f"(got {args.moe_preset}, {args.dense_preset})")
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    models = {"dense": EtudeModel(dense_config).to(device), "moe": EtudeModel(moe_config).to(device)}
    ids = torch.randint(0, min(dense_config.vocab_size, moe_config.vocab_size),
                        (args.batch_size, args.seq_len + 1), device=device)
    print(f"{torch.get_num_threads()} threads on {device}; batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}, "
          f"{args.steps} alternating steps after {args.warmup} warm-up")
    for name, preset in (("dense", args.dense_preset), ("moe", args.moe_preset)):
        model = models[name]
        print(f"  {name:5s} {preset:10s} {active_parameters(model) / 1e6:6.2f}M active, "
              f"{model.num_parameters() / 1e6:6.2f}M total parameters")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    step = alternate({name: training_step(model, ids.clone(), dtype) for name, model in models.items()},
                     args.steps, args.warmup, device)
    hidden = torch.randn(args.batch_size, args.seq_len, dense_config.hidden_size, device=device)
    layers = {"dense": FeedForward(dense_config.hidden_size, dense_config.intermediate_size).to(device),
              "moe": SparseMoE(moe_config).to(device)}
    layer = alternate({name: layer_step(module, hidden, dtype) for name, module in layers.items()},
                      args.steps, args.warmup, device)
    for what, times in (("training step (fwd+bwd+AdamW)", step), ("feed-forward layer alone (fwd+bwd)", layer)):
        (dense, dense_min), (moe, moe_min) = times["dense"], times["moe"]
        print(f"{what}: median dense {dense * 1e3:.1f} ms, MoE {moe * 1e3:.1f} ms -> MoE/dense {moe / dense:.2f}x; "
              f"fastest {dense_min * 1e3:.1f} / {moe_min * 1e3:.1f} ms -> {moe_min / dense_min:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
