"""How the data path scales: time and peak memory of every stage that reads the data, on synthetic
pretraining and SFT JSONL of growing size, so that super-linear growth shows at a glance.

    python tool/bench_data_scale.py --sizes-mb 100 1000 2000 --json scale.json
    python tool/bench_data_scale.py --sizes-mb 5 20 --stages prepare sft      # a quick look

For each size, tool/synthetic_data.py writes a pretraining file ({"text"} lines) and an SFT file
({"conversations"} lines: single- and multi-turn, system prompts, a few long ones) into
--work-dir/data/seed<N>/, once: later runs reuse them (a smaller file is a prefix of a larger
one). Then each stage runs in its own process on them, and the table gives per stage and size:
seconds, MB/s of its input, CPU seconds (all threads), its peak resident memory (tool/measure.py:
ru_maxrss, and VmHWM polled every 50 ms) and "growth": (time / previous size's time) / (size /
previous size) — 1.0 is linear, and 2.0 at each doubling means the time grows with the square of
the size; "CPU growth" is the same for CPU time, which other work on a shared machine sways less.
At small sizes the fixed cost of a stage (starting Python, importing torch, building the model,
its first step) keeps growth below 1.

  prepare --pretrain / --sft   tool/prepare_data.py validating and splitting the file
  tokenizer                    train/train_tokenizer.py all on the pretraining file, its memory
                               cap at --tokenizer-max-mb (validation reads the whole file)
  pretrain cold / warm         train/train_pretrain.py --preset tiny --max-steps 1: the token cache
                               built beside the file, the unigram baseline over it, the first step
                               and two evaluations on a 1 MB held-out file; warm: again, cache kept
  sft cold / warm              train/train_sft.py --preset tiny --max-steps 1 from a tiny model,
                               loading (and caching, where train/data.py does) the conversations

The pretraining and SFT stages share one tokenizer (trained once on a --tokenizer-slice-mb file)
and SFT starts from one tiny model (one pretraining step on that slice), both kept in --work-dir,
so that sizes differ only in the data. Each stage's input is hard-linked into a fresh folder, so
caches that a stage writes beside its input start cold and go away after each size. Logs stay in
--work-dir/logs/.

Exits 1 when a stage fails or its peak memory (ru_maxrss) passes --max-rss-mb (default 4000). A
stage whose resident memory passes --kill-rss-mb (default twice --max-rss-mb) is killed so that it
cannot take a shared machine down, and a stage that failed is not run again at larger sizes.
Standard library only: this process stays small, because on Linux every child's ru_maxrss counts
what it inherited from it at fork (its own peak is printed as that floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ROOT
from tool.measure import own_peak_mb, run_measured

STAGES = ("prepare", "tokenizer", "pretrain", "sft")
LOG_TAIL_LINES = 25


def size_name(size_mb: float) -> str:
    """A size as it appears in file names and the table: 100, 0.3."""
    return f"{size_mb:g}"


def generate(kind: str, path: Path, size_mb: float, seed: int) -> dict:
    """Write (in a child process, so numpy stays out of this one) or reuse a synthetic file; its
    generation report, with 'reused' when it was already there."""
    if path.is_file():
        return {"kind": kind, "path": str(path), "bytes": path.stat().st_size, "reused": True}
    print(f"generating {path} ({size_mb:g} MB)", flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "tool" / "synthetic_data.py"), kind, str(path), "--mb",
                           str(size_mb), "--seed", str(seed)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"generating {path} failed:\n{done.stderr.strip()}\nCheck that --work-dir is writable and "
                         f"its disk has {size_mb:g} MB free.")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "reused": False}


def check_disk(work: Path, data: Path, sizes: list[float], keep: bool) -> None:
    """Stop before starting when the disk cannot hold the inputs still to generate and what the
    largest size writes (prepared copies of both files and the token caches, about 3x them)."""
    missing = sum(size for size in sizes for kind in ("pretrain", "sft")
                  if not (data / f"{kind}_{size_name(size)}mb.jsonl").is_file())
    outputs = 3 * 2 * (sum(sizes) if keep else max(sizes))
    need_mb, free_mb = missing + outputs, shutil.disk_usage(work).free / 1e6
    if need_mb > free_mb:
        raise SystemExit(f"{work} has {free_mb:,.0f} MB free but this run needs about {need_mb:,.0f} MB "
                         f"({missing:,.0f} MB of inputs to generate, ~{outputs:,.0f} MB of outputs and caches): "
                         "free some space, pick a --work-dir on a larger disk, or give smaller --sizes-mb.")


def fresh_link(source: Path, folder: Path) -> Path:
    """`source` hard-linked into an empty `folder` under its own name (a copy where the file
    system has no hard links), so that caches written beside it land in `folder`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    target = folder / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a stage's log, for the message when it fails."""
    with open(log, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


class Runner:
    """Runs stages as measured child processes and keeps their rows; a stage that failed is not
    run again at a larger size."""

    def __init__(self, args: argparse.Namespace, logs: Path, sizes: list[float]):
        self.args, self.logs, self.sizes, self.rows = args, logs, sizes, []
        self.generation: list[dict] = []
        self.failed_stages: dict[str, str] = {}

    def save_json(self, complete: bool = False, setup_failed: str = "") -> None:
        """Every figure so far into --json; written after each run too, so that an interrupted
        long run keeps what it measured ("complete": false)."""
        if not self.args.json:
            return
        failed = [row for row in self.rows if not row["ok"]]
        report = {"complete": complete, "ok": complete and not failed and not setup_failed,
                  "sizes_mb": self.sizes, "stages": self.args.stages, "max_rss_mb": self.args.max_rss_mb,
                  "floor_mb": own_peak_mb(), "generation": self.generation, "rows": with_growth(self.rows)}
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args.json.with_name(self.args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(self.args.json)

    def run(self, stage: str, size_mb: float | None, command: list, input_path: Path, log_name: str) -> dict:
        """One measured run of `command` (a script under ROOT and its flags); its row, kept in
        self.rows unless it is a setup run (size_mb None)."""
        log = self.logs / f"{log_name}.log"
        command = [str(part) for part in command]
        print(f"[{size_name(size_mb) + ' MB' if size_mb is not None else 'setup'}] {stage}: python {' '.join(command)}",
              flush=True)
        result = run_measured([sys.executable, *command], log, cwd=ROOT, timeout_s=self.args.stage_timeout_s,
                              kill_above_mb=self.args.kill_rss_mb)
        mb = input_path.stat().st_size / 1e6
        row = {"stage": stage, "size_mb": size_mb, "mb": mb, "mb_per_s": mb / result["seconds"], **result,
               "command": ["python", *command]}
        row["over_limit"] = row["peak_rss_mb"] > self.args.max_rss_mb
        row["ok"] = row["rc"] == 0 and not row["over_limit"]
        print(f"    {row['seconds']:.1f} s ({row['cpu_seconds']:.1f} s CPU), {row['mb_per_s']:.2f} MB/s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB"
              + ("" if row["ok"] else f"  <- {problem(row, self.args.max_rss_mb)}"), flush=True)
        if row["rc"]:
            print(f"    last lines of {log}:\n" + log_tail(log), flush=True)
        if size_mb is not None:
            self.rows.append(row)
            self.save_json()
        return row

    def stage(self, stage: str, size_mb: float, command: list, input_path: Path) -> None:
        """A measured stage at one size, or a 'skipped' row when it failed at a smaller size."""
        if stage in self.failed_stages:
            self.skip(stage, size_mb, self.failed_stages[stage])
            return
        row = self.run(stage, size_mb, command, input_path, f"{size_name(size_mb)}mb_{stage.replace(' ', '_')}")
        if not row["ok"]:
            self.failed_stages[stage] = f"skipped: failed at {size_name(size_mb)} MB"

    def skip(self, stage: str, size_mb: float, why: str) -> None:
        self.rows.append({"stage": stage, "size_mb": size_mb, "skipped": why, "ok": False})


def problem(row: dict, max_rss_mb: float) -> str:
    """What went wrong with a row, in words ('' when nothing)."""
    if row.get("skipped"):
        return row["skipped"]
    if row["stopped"]:
        return row["stopped"]
    if row["rc"]:
        return f"exit status {row['rc']} (see {row['log']})"
    if row["over_limit"]:
        return f"peak RSS over --max-rss-mb {max_rss_mb:g}"
    return ""


def with_growth(rows: list[dict]) -> list[dict]:
    """Each row with `growth`: its wall time over the same stage's time at the previous size,
    divided by the ratio of the input sizes (1.0: linear), and `cpu_growth`, the same for CPU time;
    None for the smallest size or against a failed run."""
    previous: dict[str, dict] = {}
    out = []
    for row in sorted(rows, key=lambda r: r["size_mb"]):
        before = previous.get(row["stage"])
        growth = {"growth": None, "cpu_growth": None}
        if before is not None and row["ok"] and before["ok"]:
            for key, seconds in (("growth", "seconds"), ("cpu_growth", "cpu_seconds")):
                if before[seconds] > 0:
                    growth[key] = (row[seconds] / before[seconds]) / (row["mb"] / before["mb"])
        out.append({**row, **growth})
        previous[row["stage"]] = row
    return out


def format_table(rows: list[dict], max_rss_mb: float) -> str:
    """One table: a line per stage and size, stages in the order they first ran, sizes ascending."""
    order = list(dict.fromkeys(row["stage"] for row in rows))
    rows = sorted(with_growth(rows), key=lambda r: (order.index(r["stage"]), r["size_mb"]))
    width = max([len(r["stage"]) for r in rows] + [5])
    lines = [f"{'stage':<{width}} {'size MB':>8} {'input MB':>9} {'s':>8} {'MB/s':>7} {'CPU s':>8} "
             f"{'peak RSS MB':>11} {'VmHWM MB':>9} {'growth':>7} {'CPU growth':>10}"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['stage']:<{width}} {size_name(r['size_mb']):>8} {'':>9} {'-':>8}  {r['skipped']}")
            continue
        growth, cpu_growth = ("" if value is None else f"{value:.2f}" for value in (r["growth"], r["cpu_growth"]))
        note = problem(r, max_rss_mb)
        lines.append(f"{r['stage']:<{width}} {size_name(r['size_mb']):>8} {r['mb']:>9.1f} {r['seconds']:>8.1f} "
                     f"{r['mb_per_s']:>7.2f} {r['cpu_seconds']:>8.1f} {r['peak_rss_mb']:>11.0f} "
                     f"{r['polled_hwm_mb']:>9.0f} {growth:>7} {cpu_growth:>10}" + (f"  <- {note}" if note else ""))
    return "\n".join(lines)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every bad value named at once, with what to give instead."""
    problems = []
    if any(size <= 0 for size in args.sizes_mb):
        problems.append(f"--sizes-mb {' '.join(map(size_name, args.sizes_mb))}: every size must be above 0, "
                        "e.g. --sizes-mb 100 1000 2000")
    if len(set(args.sizes_mb)) != len(args.sizes_mb):
        problems.append("--sizes-mb lists a size twice; give each size once")
    for flag in ("max_rss_mb", "tokenizer_slice_mb"):
        if getattr(args, flag) <= 0:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag):g}: must be above 0")
    for flag in ("kill_rss_mb", "stage_timeout_s", "tokenizer_max_mb"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} {getattr(args, flag):g}: must be 0 (off) or above")
    if problems:
        parser.error("\n  ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000, 2000],
                        help="sizes of the pretraining and SFT files, in MB (default 100 1000 2000)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help=f"stages to run (default all: {' '.join(STAGES)})")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/etude_bench_data_scale"),
                        help="generated data, tokenizer, model, logs (default /tmp/etude_bench_data_scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
    parser.add_argument("--max-rss-mb", type=float, default=4000,
                        help="peak memory allowed per stage; above it the run fails (default 4000)")
    parser.add_argument("--kill-rss-mb", type=float, default=None,
                        help="kill a stage whose resident memory passes this (default twice --max-rss-mb; 0: never)")
    parser.add_argument("--stage-timeout-s", type=float, default=0,
                        help="kill a stage that runs longer than this (default 0: no limit)")
    parser.add_argument("--tokenizer-max-mb", type=float, default=64,
                        help="the tokenizer stage's --max-mb: MB of text it trains on (default 64, its own default)")
    parser.add_argument("--tokenizer-slice-mb", type=float, default=10,
                        help="MB of text for the one tokenizer that pretraining and SFT share (default 10)")
    parser.add_argument("--vocab-size", type=int, default=6400, help="vocabulary of that tokenizer (default 6400)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="device of the training stages (default auto)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--keep", action="store_true",
                        help="keep each size's outputs and caches in --work-dir/runs/ (default: delete after the size)")
    return parser


def shared_setup(runner: Runner, args: argparse.Namespace, work: Path, slice_path: Path,
                 held_out: Path) -> tuple[Path, Path, str]:
    """The tokenizer that pretraining and SFT share and the tiny model that SFT starts from,
    made once per (slice, vocabulary, seed) and kept in `work`; with why they could not be made
    ('' when they were)."""
    name = f"slice{size_name(args.tokenizer_slice_mb)}mb_vocab{args.vocab_size}_seed{args.seed}"
    tokenizer_dir, init_model = work / f"tokenizer_{name}", work / f"model_{name}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        row = runner.run("shared tokenizer", None, ["train/train_tokenizer.py", "all", "--data", slice_path,
                                                    "--val-data", held_out, "--vocab-size", args.vocab_size,
                                                    "--max-mb", 0, "--out-dir", tokenizer_dir],
                         slice_path, f"setup_tokenizer_{name}")
        if row["rc"]:
            return tokenizer_dir, init_model, f"the shared tokenizer failed (see {row['log']})"
    if "sft" in args.stages and not (init_model / "config.json").is_file():
        folder = work / "runs" / "setup"
        row = runner.run("shared tiny model", None, ["train/train_pretrain.py", "--preset", "tiny", "--data",
                                                     fresh_link(slice_path, folder), "--val-data", "none",
                                                     "--max-steps", 1, "--tokenizer-dir", tokenizer_dir,
                                                     "--out-dir", init_model, "--no-resume", "--device", args.device],
                         slice_path, f"setup_model_{name}")
        shutil.rmtree(folder, ignore_errors=True)
        if row["rc"]:
            return tokenizer_dir, init_model, f"the shared tiny model failed (see {row['log']})"
    return tokenizer_dir, init_model, ""


def run_size(runner: Runner, args: argparse.Namespace, size: float, data: Path, run: Path, held_out: Path,
             tokenizer_dir: Path | None, init_model: Path | None, setup_failed: str) -> None:
    """Every chosen stage on the files of one size, its outputs in `run`."""
    pretrain, sft = data / f"pretrain_{size_name(size)}mb.jsonl", data / f"sft_{size_name(size)}mb.jsonl"
    shutil.rmtree(run, ignore_errors=True)
    if "prepare" in args.stages:
        runner.stage("prepare --pretrain", size, ["tool/prepare_data.py", "--pretrain", pretrain, "--out-dir",
                                                  run / "prepared_pretrain"], pretrain)
        runner.stage("prepare --sft", size, ["tool/prepare_data.py", "--sft", sft, "--out-dir", run / "prepared_sft"],
                     sft)
    if "tokenizer" in args.stages:
        runner.stage("tokenizer", size, ["train/train_tokenizer.py", "all", "--data", pretrain, "--val-data", held_out,
                                         "--vocab-size", args.vocab_size, "--max-mb", args.tokenizer_max_mb,
                                         "--out-dir", run / "tokenizer"], pretrain)
    for name, script, source, start in (
            ("pretrain", "train/train_pretrain.py", pretrain, ["--tokenizer-dir", tokenizer_dir]),
            ("sft", "train/train_sft.py", sft, ["--init-from", init_model])):
        if name not in args.stages:
            continue
        if setup_failed:
            for temperature in ("cold", "warm"):
                runner.skip(f"{name} {temperature}", size, f"skipped: {setup_failed}")
            continue
        linked = fresh_link(source, run / name)  # its caches start cold, beside it, and go with `run`
        # Pretraining validates on held-out text, so its whole-stream statistic (the unigram
        # baseline, counted over every training token) is part of what is measured.
        val = fresh_link(held_out, run / name / "val") if name == "pretrain" else "none"
        command = [script, "--preset", "tiny", "--data", linked, "--val-data", val, "--max-steps", 1, *start,
                   "--out-dir", run / name / "model", "--no-resume", "--device", args.device]
        runner.stage(f"{name} cold", size, command, linked)
        runner.stage(f"{name} warm", size, command, linked)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)


def print_report(runner: Runner, args: argparse.Namespace, setup_failed: str) -> int:
    """The generation times, the table, the JSON; the exit status."""
    floor = own_peak_mb()
    print("\ngenerated inputs (reused ones are not timed):")
    for item in runner.generation:
        timing = "reused" if item["reused"] else f"{item['seconds']:.1f} s, {item['mb_per_s']:.1f} MB/s"
        print(f"  {item['path']}: {item['bytes'] / 1e6:.1f} MB, {timing}")
    print(f"\nthis process: {floor:.0f} MB at its peak (the floor of every peak RSS below); growth = "
          "(time / time at the previous size) / (size / previous size), 1.0 = linear; CPU growth: the same "
          "for CPU time\n")
    print(format_table(runner.rows, args.max_rss_mb) if runner.rows else "(no stage ran)")
    failed = [row for row in runner.rows if not row["ok"]]
    if args.json:
        runner.save_json(complete=True, setup_failed=setup_failed)
        print(f"\nwrote {args.json}")
    if setup_failed:
        print(f"\nFAILED: {setup_failed}", file=sys.stderr)
    if failed:
        print(f"\nFAILED: {len(failed)} stage run(s) failed, passed --max-rss-mb {args.max_rss_mb:g} or were "
              f"skipped; their logs are in {runner.logs}", file=sys.stderr)
    return 1 if failed or setup_failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.kill_rss_mb is None:
        args.kill_rss_mb = 2 * args.max_rss_mb
    sizes = sorted(args.sizes_mb)
    work = args.work_dir.resolve()
    data, logs = work / "data" / f"seed{args.seed}", work / "logs"
    for folder in (data, logs):
        folder.mkdir(parents=True, exist_ok=True)
    check_disk(work, data, sizes, args.keep)
    runner = Runner(args, logs, sizes)
    generation = runner.generation
    generation += [{"size_mb": size, **generate(kind, data / f"{kind}_{size_name(size)}mb.jsonl", size, args.seed)}
                   for size in sizes for kind in ("pretrain", "sft")]
    slice_path = data / f"pretrain_{size_name(args.tokenizer_slice_mb)}mb.jsonl"
    held_out = data / "heldout_1mb.jsonl"  # generated with another seed: text that no tokenizer saw
    if {"tokenizer", "pretrain", "sft"} & set(args.stages):
        generation.append({"size_mb": 1, **generate("pretrain", held_out, 1, args.seed + 1)})
    tokenizer_dir = init_model = None  # only the pretraining and SFT stages need them
    setup_failed = ""
    if {"pretrain", "sft"} & set(args.stages):
        if args.tokenizer_slice_mb not in sizes:
            generation.append({"size_mb": args.tokenizer_slice_mb,
                               **generate("pretrain", slice_path, args.tokenizer_slice_mb, args.seed)})
        tokenizer_dir, init_model, setup_failed = shared_setup(runner, args, work, slice_path, held_out)

    for size in sizes:
        run_size(runner, args, size, data, work / "runs" / f"{size_name(size)}mb", held_out, tokenizer_dir,
                 init_model, setup_failed)
    if not args.keep:
        shutil.rmtree(work / "runs", ignore_errors=True)
    return print_report(runner, args, setup_failed)


if __name__ == "__main__":
    sys.exit(main())
