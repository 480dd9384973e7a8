"""Where a batch-1 decoding step spends its time: before issue 28, with the eager fixed-shape step,
and with the compiled one, side by side in one process, per precision.

    python tool/profile_decode.py                         # issue shape, fp32 bf16 int8, 2 threads
    python tool/profile_decode.py --shape small --precisions int8 --tokens 128 --no-compile

For each precision it builds the decoding copy inference/inference.py uses (merge_projections, or
quantize_int8) and times three decoders of the same prompt, greedy, taking turns (so drift on a
shared machine hits all alike), medians in tokens/s:
  - before: the pre-issue loop (model forward on a cache sliced to the filled length, the history
    grown with torch.cat each token), kept here as the reference;
  - eager: generate() as it is now (model/decode_step.py's fixed-shape step, run eagerly);
  - compiled: generate(compile=True) (the step through torch.compile; its first call, the
    compilation, is timed apart).
Then torch.profiler over --profile-tokens tokens of each, self CPU time per token grouped into
phases (matmul kernels, attention, the compiled program's own code, every other operator) and the
top operators, which is the table the issue's closing note quotes.
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

from model.decoding import merge_projections, quantize_int8
from model.model import EtudeModel, KVCache, sample_next
from tool.benchmark import SHAPES, alternate

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise",
              "mkl::_mkl_linear", "aten::linear", "aten::matmul")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math", "aten::baddbmm", "aten::_softmax")


@torch.inference_mode()
def generate_before(model: EtudeModel, prompt: torch.Tensor, new: int) -> list[int]:
    """Greedy decoding as generate() did it before issue 28."""
    cache = KVCache(model.config, 1, prompt.numel() + new, prompt.device, model.embed_tokens.weight.dtype)
    generated, step_input, out = prompt, prompt[None], []
    for _ in range(new):
        logits, _, _ = model(step_input, kv_cache=cache, last_only=True)
        next_id = sample_next(logits[0, -1].float(), generated, 0.0, None, None, 1.0)
        generated = torch.cat((generated, next_id.view(1)))
        step_input = next_id.view(1, 1)
        out.append(int(next_id))
    return out


def phases(profile, tokens: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Self CPU ms per token by phase, and the top operators."""
    totals = {"matmul": 0.0, "attention": 0.0, "compiled code": 0.0, "other ops": 0.0}
    ops = []
    for event in profile.key_averages():
        ms = event.self_cpu_time_total / 1e3 / tokens
        name = event.key
        if name.startswith("ProfilerStep") or ms <= 0:
            continue
        ops.append((name, ms))
        if name in MATMUL_OPS:
            totals["matmul"] += ms
        elif name in ATTENTION_OPS:
            totals["attention"] += ms
        elif "Compiled" in name or "compiled" in name or name.startswith(("cpp_fused", "graph_", "kernel_")):
            totals["compiled code"] += ms
        else:
            totals["other ops"] += ms
    ops.sort(key=lambda item: -item[1])
    return totals, ops[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shape", default="issue", choices=sorted(SHAPES), help="model shape (default issue)")
    add("--precisions", default="fp32,bf16,int8", help="of fp32, bf16, int8 (default all three)")
    add("--prompt-len", type=int, default=32)
    add("--tokens", type=int, default=256, help="new tokens per timed run (default 256)")
    add("--repeats", type=int, default=3, help="timed rounds (default 3)")
    add("--profile-tokens", type=int, default=64, help="tokens under torch.profiler per decoder (default 64)")
    add("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="include the compiled step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = dict(SHAPES[args.shape]["model"])
    shape["max_seq_len"] = max(shape.get("max_seq_len", 0), args.prompt_len + args.tokens)
    from config import EtudeConfig
    torch.manual_seed(0)
    base = EtudeModel(EtudeConfig(**shape)).eval()
    prompt = torch.randint(3, base.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(2))
    print(f"shape {args.shape}: {base.num_parameters() / 1e6:.1f}M parameters; prompt {args.prompt_len} + "
          f"{args.tokens} new, greedy, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        model = {"fp32": lambda: merge_projections(base), "bf16": lambda: merge_projections(base).to(torch.bfloat16),
                 "int8": lambda: quantize_int8(base)}[precision]()
        outputs: dict[str, list[int]] = {}
        runs = {
            "before": lambda: outputs.__setitem__("before", generate_before(model, prompt, args.tokens)),
            "eager": lambda: outputs.__setitem__("eager", list(model.generate(prompt, args.tokens))),
        }
        if args.compile:
            start = time.perf_counter()
            list(model.generate(prompt, args.tokens, compile=True))
            print(f"{precision}: compiled step's first call {time.perf_counter() - start:.1f} s", flush=True)
            runs["compiled"] = lambda: outputs.__setitem__("compiled", list(model.generate(prompt, args.tokens,
                                                                                          compile=True)))
        times = alternate(runs, args.repeats, 1, torch.device("cpu"))
        speeds = {name: args.tokens / statistics.median(seconds) for name, seconds in times.items()}
        same = {name: outputs[name] == outputs["before"] for name in outputs}
        print(f"{precision}: " + ", ".join(f"{name} {speed:.1f} tok/s" for name, speed in speeds.items())
              + f"; greedy tokens equal to before: {same}", flush=True)
        from torch.profiler import ProfilerActivity, profile
        for name in runs:
            def decode(n=args.profile_tokens, name=name):
                if name == "before":
                    return generate_before(model, prompt, n)
                return list(model.generate(prompt, n, compile=name == "compiled"))
            decode(8)
            with profile(activities=[ProfilerActivity.CPU]) as recorded:
                decode()
            totals, top = phases(recorded, args.profile_tokens)
            print(f"  {precision} {name}: {sum(totals.values()):.2f} ms/token of CPU time: "
                  + ", ".join(f"{phase} {ms:.2f}" for phase, ms in totals.items()))
            print("    top: " + "; ".join(f"{op} {ms:.3f}" for op, ms in top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
