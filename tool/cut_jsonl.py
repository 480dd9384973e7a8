"""Filter, de-duplicate, sample, shuffle, split and shard JSONL files, in bounded memory.

    python tool/cut_jsonl.py training_data/enwiki.jsonl --dedup --min-chars 500 --shuffle \\
        --val-fraction 0.01 --name pretrain          # -> training_data/pretrain.jsonl, pretrain.val.jsonl
    python tool/cut_jsonl.py chats.jsonl.gz --sample 50000 --seed 1 --out-dir data --name chats --gzip
    python tool/cut_jsonl.py big.jsonl --shard-lines 1000000 --out-dir shards   # big-00000.jsonl, ...

Reads .jsonl (or .jsonl.gz/.bz2/.xz) files, where every non-blank line must be a JSON object,
and files holding one JSON array of objects (.json, streamed element by element). A line's
content is the "text" field when it has one, else the messages of "conversations" / "messages"
(roles and contents), else the whole object. Steps, in this order:

  --min-chars / --max-chars   keep lines whose content length (characters) is in range
  --dedup                     keep the first of lines with the same content (a 16-byte BLAKE2b
                              digest per kept line is held: about 90 MB per million lines)
  --sample N                  keep N of the remaining lines, chosen uniformly at random
  --shuffle                   random order, in bounded memory: lines are spread over temporary
                              bucket files at random, then each bucket is shuffled in memory;
                              a bucket larger than --shuffle-buffer-mb is spread again
  --val-fraction / --val-lines   hold out lines (chosen at random) for <name>.val.jsonl
  --shard-lines N             write <name>-00000.jsonl, <name>-00001.jsonl, ... of N lines each

Lines are written exactly as they were read (array elements as compact JSON, one per line).
Without --shuffle the input order is kept. The same
inputs and --seed give the same outputs. Temporary files go to --tmp-dir (default: the output
folder) and are removed at the end. Outputs appear only when complete (written under temporary
names, then renamed). A malformed line stops with file:line, or with --skip-bad-lines is skipped
and reported. The outputs are accepted by `python tool/prepare_data.py --pretrain/--sft` as they are
(uncompressed), and pretrain.jsonl / pretrain.val.jsonl written straight into training_data/ are
what the training scripts read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import DATA_DIR
from tool.textio import (PROGRESS_EVERY, BadLines, DataError, Output, Outputs, Reader, Stopwatch, add_common_flags,
                         base_name, check_paths, compression, iter_json_objects, print_summary, run_tool)

DEFAULT_SHUFFLE_BUFFER_MB = 64
MAX_BUCKETS = 256          # open bucket files at once
COMPRESSION_RATIO = 4      # a guess at how much a compressed input grows, to size the buckets


def content(obj: dict[str, Any]) -> str:
    """What a line holds, for length and duplicates: its "text", or its conversation's roles and
    contents, or (any other shape) the whole object."""
    text = obj.get("text")
    if isinstance(text, str):
        return text
    messages = obj.get("conversations", obj.get("messages"))
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return "\n".join(f"{m.get('role', m.get('from', ''))}: {m.get('content', m.get('value', ''))}"
                         for m in messages)
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def content_length(obj: dict[str, Any]) -> int:
    """Characters of text: "text", or the sum over the messages' contents."""
    text = obj.get("text")
    if isinstance(text, str):
        return len(text)
    messages = obj.get("conversations", obj.get("messages"))
    if isinstance(messages, list):
        return sum(len(m.get("content", m.get("value", ""))) for m in messages
                   if isinstance(m, dict) and isinstance(m.get("content", m.get("value", "")), str))
    return len(content(obj))


def select(total: int, wanted: int, rng: random.Random) -> Iterator[bool]:
    """Selection sampling (Knuth's algorithm S): `total` flags of which exactly `wanted`, chosen
    uniformly at random, are True; constant memory, in one pass."""
    for seen in range(total):
        if (total - seen) * rng.random() < wanted:
            wanted -= 1
            yield True
        else:
            yield False


class Spill:
    """Lines kept after the first pass, on disk: one file in input order, or `n_buckets` files
    that each line joins at random (for the shuffle)."""

    def __init__(self, folder: Path, n_buckets: int, rng: random.Random):
        self.folder, self.rng = folder, rng
        self.paths = [folder / f"bucket-{i:04d}" for i in range(n_buckets)]
        self.files = [open(path, "wb", buffering=1 << 16) for path in self.paths]
        self.lines = self.bytes = 0

    def add(self, line: bytes) -> None:
        bucket = self.files[self.rng.randrange(len(self.files))] if len(self.files) > 1 else self.files[0]
        bucket.write(line + b"\n")
        self.lines += 1
        self.bytes += len(line) + 1

    def close(self) -> None:
        for handle in self.files:
            handle.close()

    def lines_in_order(self, shuffle: bool, buffer_bytes: int) -> Iterator[bytes]:
        for path in self.paths:
            if shuffle:
                yield from shuffled(path, buffer_bytes, self.rng)
            else:
                with open(path, "rb") as handle:
                    for line in handle:
                        yield line[:-1]
            path.unlink()


def shuffled(path: Path, buffer_bytes: int, rng: random.Random) -> Iterator[bytes]:
    """The lines of a bucket file in random order. A bucket that fits the buffer is shuffled in
    memory; a larger one (the input was bigger than guessed) is spread over sub-buckets first."""
    size = path.stat().st_size
    if size <= buffer_bytes:
        with open(path, "rb") as handle:
            lines = handle.readlines()
        rng.shuffle(lines)
        for line in lines:
            yield line[:-1]
        return
    n_sub = min(math.ceil(size / buffer_bytes) * 2, MAX_BUCKETS)
    sub_paths = [path.with_name(f"{path.name}-{i:04d}") for i in range(n_sub)]
    files = [open(sub, "wb", buffering=1 << 16) for sub in sub_paths]
    with open(path, "rb") as handle:
        for line in handle:
            files[rng.randrange(n_sub)].write(line)
    for handle in files:
        handle.close()
    path.unlink()
    for sub in sub_paths:
        yield from shuffled(sub, buffer_bytes, rng)
        sub.unlink()


class ShardWriter:
    """Writes lines to <name><suffix> or, with shard_lines, to <name>-00000<suffix>, ..."""

    def __init__(self, outputs: Outputs, folder: Path, name: str, suffix: str, shard_lines: int | None):
        self.outputs, self.folder, self.name, self.suffix = outputs, folder, name, suffix
        self.shard_lines = shard_lines
        self.current: Output | None = None
        self.shards = self.lines = 0

    def path(self, index: int | None) -> Path:
        return self.folder / (self.name + ("" if index is None else f"-{index:05d}") + self.suffix)

    def write(self, line: bytes) -> None:
        if self.current is None or (self.shard_lines and self.current.lines >= self.shard_lines):
            self.current = self.outputs.open(self.path(self.shards if self.shard_lines else None))
            self.shards += 1
        self.current.write_line(line)
        self.lines += 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="JSONL",
                        help=".jsonl files, or .json files holding one array (.gz/.bz2/.xz too)")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="where to write (default training_data/)")
    parser.add_argument("--name",
                        help="output name: <name>.jsonl and <name>.val.jsonl (default: the first input's name)")
    parser.add_argument("--gzip", action="store_true", help="write .jsonl.gz")
    parser.add_argument("--min-chars", type=int, default=0, help="drop lines whose content is shorter (default 0)")
    parser.add_argument("--max-chars", type=int, help="drop lines whose content is longer")
    parser.add_argument("--dedup", action="store_true", help="drop lines whose content was seen before (exact match)")
    parser.add_argument("--sample", type=int, metavar="N", help="keep N lines chosen at random (after filtering)")
    parser.add_argument("--shuffle", action="store_true", help="write the lines in random order")
    parser.add_argument("--shuffle-buffer-mb", type=int, default=DEFAULT_SHUFFLE_BUFFER_MB,
                        help=f"most MB of lines shuffled in memory at once (default {DEFAULT_SHUFFLE_BUFFER_MB})")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, help="share of lines held out for <name>.val.jsonl")
    split.add_argument("--val-lines", type=int, help="number of lines held out for <name>.val.jsonl")
    parser.add_argument("--shard-lines", type=int, metavar="N", help="split the outputs into files of N lines")
    parser.add_argument("--seed", type=int, default=42, help="seed of sampling, shuffling and the split (default 42)")
    parser.add_argument("--tmp-dir", type=Path, help="folder for temporary files (default: --out-dir)")
    add_common_flags(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Every problem with the flags at once."""
    problems = []
    for flag, value, low in (("--min-chars", args.min_chars, 0), ("--max-chars", args.max_chars, 0),
                             ("--sample", args.sample, 1), ("--val-lines", args.val_lines, 0),
                             ("--shard-lines", args.shard_lines, 1),
                             ("--shuffle-buffer-mb", args.shuffle_buffer_mb, 1)):
        if value is not None and value < low:
            problems.append(f"{flag} must be >= {low}, got {value}")
    if args.max_chars is not None and args.max_chars < args.min_chars:
        problems.append(f"--max-chars ({args.max_chars}) is below --min-chars ({args.min_chars})")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        problems.append(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if problems:
        raise DataError("; ".join(problems))


def read_inputs(args: argparse.Namespace, spill: Spill, bad: BadLines, counts: dict[str, int]) -> int:
    """First pass: every line that passes the filters goes to `spill`. Returns the bytes read."""
    seen: set[bytes] = set()  # digests of the contents kept so far, for --dedup
    size = 0
    for path in args.inputs:
        with Reader(path, progress=not args.no_progress) as reader:
            for _, raw, obj in iter_json_objects(reader, bad):
                counts["lines read"] += 1
                length = content_length(obj)
                if length < args.min_chars:
                    counts["dropped: shorter than --min-chars"] += 1
                    continue
                if args.max_chars is not None and length > args.max_chars:
                    counts["dropped: longer than --max-chars"] += 1
                    continue
                if args.dedup:
                    digest = hashlib.blake2b(content(obj).encode("utf-8", "surrogatepass"), digest_size=16).digest()
                    if digest in seen:
                        counts["dropped: duplicate"] += 1
                        continue
                    seen.add(digest)
                spill.add(raw)
            size += reader.size
    return size


def write_outputs(args: argparse.Namespace, spill: Spill, train: ShardWriter, val: ShardWriter, kept: int,
                  n_val: int) -> None:
    """Second pass: the spilled lines, in order or shuffled; `kept` of them chosen at random, of
    which `n_val` go to validation."""
    sampled = select(spill.lines, kept, spill.rng)
    held_out = select(kept, n_val, spill.rng)
    bar = tqdm(total=spill.bytes, unit="B", unit_scale=True, desc="writing", file=sys.stderr,
               disable=args.no_progress, mininterval=0.5, leave=False)
    since_tick = 0
    for line in spill.lines_in_order(args.shuffle, args.shuffle_buffer_mb << 20):
        if next(sampled):
            (val if next(held_out) else train).write(line)
        since_tick += len(line) + 1
        if since_tick >= PROGRESS_EVERY:
            bar.update(since_tick)
            since_tick = 0
    bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        check_args(args)
        name = args.name or base_name(args.inputs[0])
        suffix = ".jsonl.gz" if args.gzip else ".jsonl"
        folder = args.out_dir
        check_paths(args.inputs, [folder / f"{name}{suffix}", folder / f"{name}.val{suffix}",
                                  folder / f"{name}-00000{suffix}"])
        folder.mkdir(parents=True, exist_ok=True)
        watch, bad = Stopwatch(), BadLines(args.skip_bad_lines, args.rejects)
        counts = {"lines read": 0, "dropped: shorter than --min-chars": 0, "dropped: longer than --max-chars": 0,
                  "dropped: duplicate": 0}
        # Buckets of about half the shuffle buffer each, from a guess at the input's size (a
        # bucket that turns out larger is spread again when it is read).
        input_bytes = sum(p.stat().st_size * (COMPRESSION_RATIO if compression(p) else 1) for p in args.inputs)
        buffer_bytes = args.shuffle_buffer_mb << 20
        n_buckets = min(max(math.ceil(input_bytes / buffer_bytes) * 2, 1), MAX_BUCKETS) if args.shuffle else 1
        print(f"cutting {', '.join(map(str, args.inputs))} -> {folder}/{name}*{suffix}")
        try:
            with tempfile.TemporaryDirectory(prefix=".cut_jsonl-", dir=args.tmp_dir or folder) as tmp:
                spill = Spill(Path(tmp), n_buckets, random.Random(f"etude-cut-jsonl:{args.seed}"))
                try:
                    size = read_inputs(args, spill, bad, counts)
                finally:
                    spill.close()
                kept = min(args.sample, spill.lines) if args.sample else spill.lines
                n_val = args.val_lines if args.val_lines is not None else round(kept * (args.val_fraction or 0))
                if n_val > kept:
                    raise DataError(f"--val-lines {n_val} is more than the {kept:,} lines left after filtering")
                counts["dropped: not sampled"] = spill.lines - kept
                with Outputs() as outputs:
                    train = ShardWriter(outputs, folder, name, suffix, args.shard_lines)
                    val = ShardWriter(outputs, folder, f"{name}.val", suffix, args.shard_lines)
                    write_outputs(args, spill, train, val, kept, n_val)
                    if not train.lines:  # an empty file says "nothing was left" better than none
                        outputs.open(train.path(0 if args.shard_lines else None))
        finally:
            bad.close()
        rows = list(counts.items()) + bad.summary_rows() + [
            ("train lines", train.lines), ("train files", max(train.shards, 1)),
            ("validation lines", val.lines), ("validation files", val.shards)] + watch.rows(size)
        print_summary(f"wrote {folder}/{name}*{suffix}", rows)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
