"""Compare training recipes at equal compute: the same model on the same data for the same
budget, validation bits per byte at the end and along the way, and tokens/s.

    python tool/compare_recipes.py --preset tiny --tokens 1228800                 # baseline vs default
    python tool/compare_recipes.py --preset tiny --seconds 600 --recipes baseline,adamw-tiny,default
    python tool/compare_recipes.py --preset tiny --tokens 819200 \\
        --recipe "muon-lr03=--optimizer muon --schedule wsd --muon-lr 0.03" --recipes baseline
    python tool/compare_recipes.py --stage sft --preset tiny --tokens 909312 --recipes baseline,default

Every recipe is a set of flags of the stage's script (train/train_pretrain.py, or with --stage sft
train/train_sft.py, which starts every run from the same pretrained model) on top of the common
ones (--preset, --train-args). Named recipes:
    baseline    AdamW + cosine at the original project's settings: pretraining lr 3e-4, warmup
                100; fine-tuning lr 3e-5, warmup 20 (floor 0.1 and weight decay 0.1 for both)
    adamw-tiny  AdamW + cosine at the tiny preset's former pretraining settings (lr 2e-3, warmup 30)
    default     whatever the stage defaults and the preset say now (no recipe flags)
--recipe NAME=FLAGS adds your own (repeatable).

Budgets: --tokens N gives every recipe N training tokens (steps = N / tokens per step);
--seconds S gives every recipe S seconds of training steps: short probes of each recipe, in
turns, measure its step time relative to the first recipe's first, and its run is S / step time
steps long (the schedule needs its length in advance). Both may be given; each is its own comparison.

Drift cancels: the runs take turns in --segments pieces (A B, B A, A B, ...), each piece
resuming the recipe's checkpoint (exact resume, so a piece-wise run equals an uninterrupted one),
so a machine that slows down (other jobs) slows every recipe alike. Validation runs at the end of
every piece, which gives the curve. Training time is the sum of the step times that the trainer
records (evaluation, saving and start-up are left out).

Writes <out-dir>/results.json, each run's folder with its metrics.jsonl and log, and
<out-dir>/curves.png when matplotlib is installed (optional: pip install matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import PRESETS, WEIGHT_DIR, ConfigError

NAMED_RECIPES = {
    "pretrain": {
        "baseline": "--optimizer adamw --schedule cosine --lr 3e-4 --warmup-steps 100 --min-lr-ratio 0.1 "
                    "--weight-decay 0.1",
        "adamw-tiny": "--optimizer adamw --schedule cosine --lr 2e-3 --warmup-steps 30 --min-lr-ratio 0.1 "
                      "--weight-decay 0.1",
        "default": "",
    },
    "sft": {
        "baseline": "--optimizer adamw --schedule cosine --lr 3e-5 --warmup-steps 20 --min-lr-ratio 0.1 "
                    "--weight-decay 0.1",
        "default": "",
    },
}
SCRIPTS = {"pretrain": "train_pretrain.py", "sft": "train_sft.py"}
# The tool sets these itself for every run.
RESERVED_FLAGS = ("--out-dir", "--max-steps", "--stop-at-step", "--eval-every", "--save-every", "--log-every",
                  "--resume", "--no-resume", "--epochs")
DEFAULT_OUT = WEIGHT_DIR / "compare_recipes"


def parse_recipes(names: str, custom: list[str], stage: str = "pretrain") -> dict[str, list[str]]:
    """{name: flags} from --recipes (named ones) and --recipe NAME=FLAGS; at least two."""
    recipes: dict[str, list[str]] = {}
    named = NAMED_RECIPES[stage]
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in named:
            raise ConfigError(f"unknown {stage} recipe {name!r}; named recipes are {sorted(named)} "
                              "(or define one with --recipe NAME=FLAGS)")
        recipes[name] = shlex.split(named[name])
    for text in custom:
        name, sep, flags = text.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--recipe {text!r} must be NAME=FLAGS, e.g. \"muon=--optimizer muon\"")
        recipes[name.strip()] = shlex.split(flags)
    if len(recipes) < 2:
        raise ConfigError(f"compare at least two recipes (got {sorted(recipes)}); add --recipes or --recipe")
    for name, flags in recipes.items():
        reserved = [f for f in flags if f.split("=")[0] in RESERVED_FLAGS]
        if reserved:
            raise ConfigError(f"recipe {name!r} sets {reserved}, which the tool sets itself; leave them out")
    return recipes


def tokens_per_step(flags: list[str], stage: str = "pretrain") -> int:
    """Training tokens of one optimizer step of a run with these flags (one rank; for
    fine-tuning, packed windows of whole conversations, padding included)."""
    from train.cli import build_parser, train_config_from_args
    parser = build_parser(stage, "")
    if stage == "pretrain":
        parser.add_argument("--model-config")
    cfg = train_config_from_args(stage, parser.parse_args(flags))
    return cfg.batch_size * cfg.grad_accum * cfg.seq_len


def run_piece(flags: list[str], log: Path, stage: str = "pretrain") -> None:
    """One invocation of the stage's training script (in this process), its output appended to log."""
    if stage == "pretrain":
        from train.train_pretrain import main as train_main
    else:
        from train.train_sft import main as train_main
    with open(log, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        handle.write(f"$ {SCRIPTS[stage]} " + shlex.join(flags) + "\n")
        status = train_main(flags)
    if status != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{SCRIPTS[stage]} stopped with status {status} (log {log}):\n{tail}")


def read_run(folder: Path, step_tokens: int) -> dict[str, Any]:
    """Steps, training seconds (sum of recorded step times) and the validation curve of a run."""
    seconds, curve, last_step = 0.0, [], 0
    for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record and record.get("tokens_per_sec"):
            # With --log-every 1 each record's rate covers exactly its own step.
            seconds += step_tokens / record["tokens_per_sec"]
            last_step = max(last_step, record["step"])
        if "val_bpb" in record:
            curve.append({"step": record["step"], "tokens": record["step"] * step_tokens,
                          "val_bpb": record["val_bpb"], "val_loss": record["val_loss"]})
    return {"steps": last_step, "tokens": last_step * step_tokens, "train_seconds": seconds,
            "tokens_per_sec": last_step * step_tokens / seconds if seconds else 0.0, "curve": curve,
            "final_val_bpb": curve[-1]["val_bpb"] if curve else None}


def train_in_turns(recipes: dict[str, list[str]], common: list[str], steps: dict[str, int], segments: int,
                   folder: Path, stage: str = "pretrain") -> dict[str, dict[str, Any]]:
    """Train every recipe for its number of steps, the recipes taking turns piece by piece."""
    plans = {}
    for name, flags in recipes.items():
        run_dir = folder / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        piece = math.ceil(steps[name] / segments)
        plans[name] = dict(dir=run_dir, piece=piece, flags=[
            *common, *flags, "--out-dir", str(run_dir), "--max-steps", str(steps[name]),
            "--eval-every", str(piece), "--save-every", str(steps[name] + 1), "--log-every", "1", "--resume"])
    order = list(recipes)
    for index in range(segments):
        for name in (order if index % 2 == 0 else order[::-1]):
            plan = plans[name]
            stop = min(steps[name], (index + 1) * plan["piece"])
            if (index * plan["piece"]) >= steps[name]:
                continue
            print(f"  {name}: steps {index * plan['piece']} -> {stop} of {steps[name]}", flush=True)
            extra = ["--stop-at-step", str(stop)] if stop < steps[name] else []
            run_piece(plan["flags"] + extra, plan["dir"] / "compare.log", stage)
    return {name: {"flags": shlex.join(recipes[name]), **read_run(plans[name]["dir"], tokens_per_step(
        [*common, *recipes[name]], stage))} for name in recipes}


def probe_step_seconds(recipes: dict[str, list[str]], common: list[str], probe_steps: int, rounds: int,
                       folder: Path, stage: str = "pretrain") -> dict[str, float]:
    """Seconds per training step of each recipe, from short probe runs in turns (A B, B A, ...).
    A shared machine's speed swings within seconds, so each recipe is measured against the
    first one in the same round (median step time over median step time), and those ratios
    (their median over the rounds) scale the first recipe's median step time. The first step
    of a probe, which pays for warm-up, is left out."""
    medians: dict[str, list[float]] = {name: [] for name in recipes}
    folder.mkdir(parents=True, exist_ok=True)
    order = list(recipes)
    for round_index in range(rounds):
        for name in (order if round_index % 2 == 0 else order[::-1]):
            run_dir = folder / "probe" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            run_piece([*common, *recipes[name], "--out-dir", str(run_dir), "--max-steps", str(probe_steps),
                       "--eval-every", str(probe_steps + 1), "--save-every", str(probe_steps + 1), "--log-every", "1",
                       "--val-data", "none", "--no-resume"], folder / f"probe-{name}.log", stage)
            step_tokens = tokens_per_step([*common, *recipes[name]], stage)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            medians[name].append(statistics.median(step_tokens / r["tokens_per_sec"] for r in records
                                                   if "loss" in r and r.get("tokens_per_sec") and r["step"] > 1))
    shutil.rmtree(folder / "probe", ignore_errors=True)
    first = order[0]
    reference = statistics.median(medians[first])
    return {name: reference * statistics.median(t / r for t, r in zip(medians[name], medians[first]))
            for name in recipes}


def format_table(comparison: dict[str, Any], reference: str) -> str:
    runs = comparison["runs"]
    base = runs[reference]["final_val_bpb"]
    lines = [f"{comparison['title']}",
             f"{'recipe':<14} {'steps':>6} {'tokens':>11} {'train s':>9} {'tokens/s':>9} {'val bpb':>8} "
             f"{'vs ' + reference:>14}"]
    for name, run in runs.items():
        bpb = run["final_val_bpb"]
        change = "" if name == reference or bpb is None or base is None else f"{(bpb - base) / base:+.1%}"
        lines.append(f"{name:<14} {run['steps']:>6} {run['tokens']:>11,} {run['train_seconds']:>9.1f} "
                     f"{run['tokens_per_sec']:>9,.0f} {bpb if bpb is not None else float('nan'):>8.4f} {change:>14}")
    lines.append("curve (validation bits per byte at tokens seen):")
    for name, run in runs.items():
        lines.append(f"  {name:<12} " + "  ".join(f"{p['tokens']:,}: {p['val_bpb']:.4f}" for p in run["curve"]))
    return "\n".join(lines)


def plot(comparisons: list[dict[str, Any]], path: Path) -> bool:
    """curves.png (validation bpb against tokens per comparison); False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(comparisons), figsize=(6 * len(comparisons), 4), squeeze=False)
    for axis, comparison in zip(axes[0], comparisons):
        for name, run in comparison["runs"].items():
            points = [p for p in run["curve"] if p["step"] > 0]
            axis.plot([p["tokens"] for p in points], [p["val_bpb"] for p in points], marker="o", label=name)
        axis.set(title=comparison["title"], xlabel="training tokens", ylabel="validation bits per byte")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(SCRIPTS), default="pretrain",
                        help="pretraining (train_pretrain.py) or fine-tuning (train_sft.py, every run from the same "
                             "--init-from model); default pretrain")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default tiny)")
    parser.add_argument("--recipes", default="baseline,default",
                        help="comma-separated named recipes: pretrain " + ", ".join(NAMED_RECIPES["pretrain"])
                             + "; sft " + ", ".join(NAMED_RECIPES["sft"]) + " (default baseline,default)")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=FLAGS",
                        help="a recipe of your own: the stage script's flags, e.g. \"lr1e-3=--lr 1e-3\" (repeatable)")
    parser.add_argument("--tokens", type=int, help="equal-tokens budget: training tokens per recipe")
    parser.add_argument("--seconds", type=float, help="equal-time budget: seconds of training steps per recipe")
    parser.add_argument("--segments", type=int, default=4,
                        help="pieces each run is cut into, taking turns (also the points of the curve; default 4)")
    parser.add_argument("--probe-steps", type=int, default=6, help="--seconds: steps of each probe run (default 6)")
    parser.add_argument("--probe-rounds", type=int, default=4,
                        help="--seconds: probe rounds, each recipe once per round, in turns (default 4)")
    parser.add_argument("--train-args", default="",
                        help="flags for every run, e.g. \"--eval-batches 16 --dtype fp32 --data FILE\"")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT), help=f"where runs and results go (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        if args.tokens is None and args.seconds is None:
            raise ConfigError("give a budget: --tokens N (equal tokens) and/or --seconds S (equal training time)")
        if (args.tokens is not None and args.tokens <= 0) or (args.seconds is not None and args.seconds <= 0) \
                or args.segments <= 0 or args.probe_steps < 2 or args.probe_rounds <= 0:
            raise ConfigError("--tokens, --seconds, --segments and --probe-rounds must be > 0 and --probe-steps >= 2")
        recipes = parse_recipes(args.recipes, args.recipe, args.stage)
        common = ["--preset", args.preset, *shlex.split(args.train_args)]
        reserved = [f for f in common if f.split("=")[0] in RESERVED_FLAGS]
        if reserved:
            raise ConfigError(f"--train-args sets {reserved}, which the tool sets itself; leave them out")
        step_tokens = {name: tokens_per_step([*common, *flags], args.stage) for name, flags in recipes.items()}
    except (ConfigError, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code == 0:
            raise
        print(f"error: {exc}" if isinstance(exc, ConfigError) else "error: a recipe or --train-args has a bad flag "
              "(see the message above)", file=sys.stderr)
        return 2

    out = Path(args.out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    reference = next(iter(recipes))
    comparisons = []
    try:
        if args.tokens is not None:
            steps = {name: max(1, args.tokens // step_tokens[name]) for name in recipes}
            print(f"equal tokens: {args.tokens:,} per recipe; steps {steps}", flush=True)
            runs = train_in_turns(recipes, common, steps, args.segments, out / "tokens", args.stage)
            comparisons.append({"budget": "tokens", "value": args.tokens, "runs": runs,
                                "title": f"{args.stage}, equal tokens ({args.tokens:,}), preset {args.preset}"})
            print(format_table(comparisons[-1], reference), flush=True)
        if args.seconds is not None:
            step_seconds = probe_step_seconds(recipes, common, args.probe_steps, args.probe_rounds, out / "seconds",
                                              args.stage)
            steps = {name: max(1, int(args.seconds / step_seconds[name])) for name in recipes}
            print("equal time: " + ", ".join(f"{n} {s:.2f} s/step -> {steps[n]} steps" for n, s in step_seconds.items()),
                  flush=True)
            runs = train_in_turns(recipes, common, steps, args.segments, out / "seconds", args.stage)
            for name in runs:
                runs[name]["probe_step_seconds"] = step_seconds[name]
            comparisons.append({"budget": "seconds", "value": args.seconds, "runs": runs,
                                "title": f"{args.stage}, equal time ({args.seconds:g} s of steps), preset {args.preset}"})
            print(format_table(comparisons[-1], reference), flush=True)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = {"stage": args.stage, "preset": args.preset, "train_args": args.train_args, "reference": reference,
               "recipes": {name: shlex.join(flags) for name, flags in recipes.items()}, "comparisons": comparisons}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'results.json'}")
    if plot(comparisons, out / "curves.png"):
        print(f"wrote {out / 'curves.png'}")
    else:
        print("no plot: matplotlib is not installed (optional; pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
