"""Supervised fine-tuning data: conversations rendered once into an on-disk token cache, packed
whole into fixed windows, memory-mapped at training time.

An SFT file (JSONL, {"conversations": [...]} or {"messages": [...]} per line; the common dataset
shapes are converted on the fly, see model/chat_formats.py) is rendered in one streaming pass,
in parallel batches, into a folder beside it, `<source>.sft-tokens/`:

    ids.bin        every conversation's ChatML ids, one after another (uint16 when the vocabulary fits)
    mask.bin       uint8, 1 where the target is trained: assistant content and its closing <|im_end|>
    lengths.bin    uint32, tokens per conversation (their running sum locates each one)
    trained.bin    uint32, trained tokens per conversation (for the summary line)
    meta.json      what the cache was built from; a changed source or tokenizer rebuilds it
    pack-v<V>-<L>.npz  the packing for windows of L + 1 tokens, computed once per window size

So memory holds the packing plan (a few bytes per conversation), never the tokens, and a 7 GB
file costs what its pages cost. Packing is best-fit decreasing over rooms kept in buckets:
near-linear where first-fit by rescanning every window was quadratic.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import zipfile
from bisect import bisect_left, insort
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from model.chat_formats import Rejected, rejection_text, to_conversation
from model.checkpoint import atomic_write, atomic_write_json
from model.model import IGNORE_INDEX as IGNORE
from model.tokenizer import EtudeTokenizer
from train.data import (DataError, _skipped_note, plural, read_jsonl, source_fingerprint, token_dtype,
                        tokenizer_hash)

SFT_CACHE_VERSION = 1
PACK_VERSION = 1  # of pack_windows: a changed packing must not reuse old plans
# A render batch is flushed at this many conversations or characters: big enough that the
# tokenizer's threads stay busy, small enough that the batch's Python lists stay a few MB.
RENDER_BATCH_CONVERSATIONS = 2000
RENDER_BATCH_CHARS = 1 << 22


def _as_conversation(obj: object) -> list[dict]:
    """The messages of one SFT line, or ValueError saying why the line is not a conversation."""
    try:
        messages = to_conversation(obj)
    except Rejected as exc:
        raise ValueError(rejection_text(exc)) from None
    if any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise ValueError("an assistant message is empty")
    return messages


def read_conversations(path: Path | str, skip_bad_lines: bool = False,
                       report: dict | None = None) -> Iterator[list[dict]]:
    """Conversations of an SFT JSONL file as role/content messages. Our own shape
    ({"conversations": [...]} or {"messages": [...]}) and the common ones (Alpaca, ShareGPT,
    OpenAI messages with a "developer" role) are read line by line, each converted once; a JSON
    array file is refused with the command that converts it."""
    for _, messages in read_jsonl(path, skip_bad_lines, report=report, array_hint=_ARRAY_HINT,
                                  convert=_as_conversation):
        yield messages


_ARRAY_HINT = ("this file is one JSON array, not JSONL (one object per line). Convert it once with "
               "`python tool/cut_jsonl_sft.py {path} --out {stem}.sft.jsonl` (it reads Alpaca, ShareGPT and "
               "OpenAI shapes), then pass --data {stem}.sft.jsonl")


# ---- the token cache ------------------------------------------------------------------------------

def sft_cache_dir(source: Path | str) -> Path:
    source = Path(source)
    return source.with_name(source.name + ".sft-tokens")


class ConversationTokens:
    """Rendered conversations: `ids` and `mask` (flat, memory-mapped from the cache or in memory),
    `offsets` (conversation i is ids[offsets[i]:offsets[i + 1]]) and `trained` per conversation."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, trained: np.ndarray,
                 folder: Path | None = None, meta: dict | None = None):
        self.ids, self.mask, self.trained = ids, mask, trained
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.folder, self.meta = folder, meta or {}

    @classmethod
    def from_rendered(cls, rendered: list[tuple[list[int], list[int]]]) -> ConversationTokens:
        """In memory, from render_chat() results (tests, small sets)."""
        flat_ids = [t for ids, _ in rendered for t in ids]
        flat_mask = [m for _, mask in rendered for m in mask]
        return cls(np.asarray(flat_ids, dtype=np.int64), np.asarray(flat_mask, dtype=np.uint8),
                   np.asarray([len(ids) for ids, _ in rendered]), np.asarray([sum(mask) for _, mask in rendered]))

    @classmethod
    def open(cls, folder: Path, meta: dict) -> ConversationTokens:
        def mapped(name: str, dtype: str, count: int) -> np.ndarray:
            return np.memmap(folder / name, dtype=dtype, mode="r", shape=(count,))
        n_tokens = meta["n_tokens"]
        return cls(mapped("ids.bin", meta["dtype"], n_tokens), mapped("mask.bin", "uint8", n_tokens),
                   np.fromfile(folder / "lengths.bin", dtype=np.uint32), np.fromfile(folder / "trained.bin", dtype=np.uint32),
                   folder, meta)

    def __len__(self) -> int:
        return len(self.lengths)


def _cache_is_whole(folder: Path, meta: dict) -> bool:
    """Every file has the size the meta promises (a cache cut short is rebuilt, never read)."""
    try:
        n, n_tokens = meta["n_conversations"], meta["n_tokens"]
        sizes = {"ids.bin": n_tokens * np.dtype(meta["dtype"]).itemsize, "mask.bin": n_tokens,
                 "lengths.bin": 4 * n, "trained.bin": 4 * n}
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (KeyError, TypeError, OSError):
        return False


def build_sft_cache(source: Path | str, tokenizer: EtudeTokenizer, skip_bad_lines: bool = False,
                    verbose: bool = True) -> ConversationTokens:
    """The rendered conversations of `source`, memory-mapped from its cache, which is (re)built
    when missing, damaged, or older than the source or the tokenizer."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"data file not found: {source}. Build the demo data with "
                                "`python tool/prepare_data.py` or pass --data PATH.")
    folder = sft_cache_dir(source)
    wanted = {"version": SFT_CACHE_VERSION, "source": source_fingerprint(source),
              "tokenizer": tokenizer_hash(tokenizer)}
    # One builder at a time (torchrun starts one process per rank, each loading the data): the
    # others wait here, then find the finished cache and map it.
    with open(folder.with_name(folder.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = _read_meta(folder / "meta.json")
        if meta is None or any(meta.get(k) != v for k, v in wanted.items()) or not _cache_is_whole(folder, meta):
            meta = _write_sft_cache(source, tokenizer, folder, wanted, skip_bad_lines, verbose)
    return ConversationTokens.open(folder, meta)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_sft_cache(source: Path, tokenizer: EtudeTokenizer, folder: Path, wanted: dict,
                     skip_bad_lines: bool, verbose: bool) -> dict:
    """Render every conversation in one streaming pass into a staging folder, then swap it in:
    an interrupted build leaves the old cache (or none), never half of one. Called under the
    cache's lock, so a staging folder found here was left by a killed build."""
    dtype = token_dtype(tokenizer.vocab_size)
    for stale in folder.parent.glob(folder.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    staging.mkdir(parents=True)
    started = time.perf_counter()
    report: dict = {}
    totals = {"n_conversations": 0, "n_tokens": 0, "n_trained": 0, "n_chars": 0}
    try:
        files = {name: open(staging / name, "wb") for name in ("ids.bin", "mask.bin", "lengths.bin", "trained.bin")}
        try:
            batch: list[list[dict]] = []
            chars = 0

            def flush() -> None:
                nonlocal chars
                flat_ids: list[int] = []
                flat_mask: list[int] = []
                lengths, trained = [], []
                for ids, mask in tokenizer.render_chats(batch):
                    flat_ids += ids
                    flat_mask += mask
                    lengths.append(len(ids))
                    trained.append(sum(mask))
                np.asarray(flat_ids, dtype=dtype).tofile(files["ids.bin"])
                np.asarray(flat_mask, dtype=np.uint8).tofile(files["mask.bin"])
                np.asarray(lengths, dtype=np.uint32).tofile(files["lengths.bin"])
                np.asarray(trained, dtype=np.uint32).tofile(files["trained.bin"])
                totals["n_conversations"] += len(batch)
                totals["n_tokens"] += len(flat_ids)
                totals["n_trained"] += sum(trained)
                batch.clear()
                chars = 0

            for messages in read_conversations(source, skip_bad_lines, report):
                batch.append(messages)
                size = sum(len(m["content"]) for m in messages)
                chars += size
                totals["n_chars"] += size
                if len(batch) >= RENDER_BATCH_CONVERSATIONS or chars >= RENDER_BATCH_CHARS:
                    flush()
            if batch:
                flush()
        finally:
            for handle in files.values():
                handle.close()
        if totals["n_conversations"] == 0:
            raise DataError(f"{source} holds no conversations{_skipped_note(report)}; add one JSON object "
                            '{"conversations": [{"role": ..., "content": ...}, ...]} per line')
        seconds = time.perf_counter() - started
        meta = {**wanted, "dtype": np.dtype(dtype).name, **totals, "skipped_lines": report.get("skipped", 0),
                "build_seconds": round(seconds, 3)}
        atomic_write_json(staging / "meta.json", meta)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if verbose:
        mb = source.stat().st_size / 1e6
        print(f"rendered {source.name}: {meta['n_conversations']:,} conversations, {mb:.1f} MB -> "
              f"{meta['n_tokens']:,} tokens ({meta['n_trained']:,} trained) in {seconds:.1f} s "
              f"({mb / max(seconds, 1e-9):.1f} MB/s)"
              + (f"; skipped {report['skipped']} bad lines, first: {report['first_skipped'][0]}"
                 if report.get("skipped") else ""))
    return meta


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the finished staging folder in place of the old cache."""
    if folder.exists():
        retired = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-old")
        os.replace(folder, retired)
        shutil.rmtree(retired, ignore_errors=True)
    os.replace(staging, folder)


# ---- packing ------------------------------------------------------------------------------------

def pack_windows(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack conversations of these token lengths into windows of `width` tokens, never splitting
    one (a conversation longer than a window fills one alone, truncated). Best-fit decreasing:
    longest first (ties by position), each into the open window whose room fits it most tightly,
    found by bisecting the sorted list of distinct rooms (at most `width` of them), so the cost
    is O(n log n) for the sort and O(n log width) for the rest.

    Returns (members, starts): window w holds conversations members[starts[w]:starts[w + 1]],
    in file order."""
    sizes = np.minimum(np.asarray(lengths, dtype=np.int64), width)
    order = np.lexsort((np.arange(len(sizes)), -sizes))
    window_of = np.empty(len(sizes), dtype=np.int64)
    windows_with_room: list[list[int]] = [[] for _ in range(width + 1)]  # by room left
    rooms: list[int] = []  # the distinct rooms of open windows, sorted
    n_windows = 0
    for index, size in zip(order.tolist(), sizes[order].tolist()):
        k = bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            window = windows_with_room[room].pop()
            if not windows_with_room[room]:
                del rooms[k]
        else:
            window, room = n_windows, width
            n_windows += 1
        window_of[index] = window
        left = room - size
        if left:
            if not windows_with_room[left]:
                insort(rooms, left)
            windows_with_room[left].append(window)
    members = np.argsort(window_of, kind="stable")  # by window, then file order within one
    starts = np.zeros(n_windows + 1, dtype=np.int64)
    np.cumsum(np.bincount(window_of, minlength=n_windows), out=starts[1:])
    return members, starts


def cached_packing(tokens: ConversationTokens, width: int) -> tuple[np.ndarray, np.ndarray]:
    """pack_windows() of a cache, stored in it (pack-<seq_len>.npz) after the first time."""
    if tokens.folder is None:
        return pack_windows(tokens.lengths, width)
    path = tokens.folder / f"pack-v{PACK_VERSION}-{width - 1}.npz"
    try:
        with np.load(path) as saved:
            members, starts = saved["members"], saved["starts"]
        if len(members) == len(tokens) and starts[-1] == len(tokens):
            return members, starts
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # missing or damaged: packed anew
        pass
    members, starts = pack_windows(tokens.lengths, width)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, members=members, starts=starts)

    atomic_write(path, write)
    return members, starts


class PackedConversations:
    """SFT windows: whole conversations packed into windows of seq_len + 1 tokens, never split;
    the rest of a window is padding that is not trained. Targets are -100 except on assistant
    content and its closing <|im_end|>. Windows are assembled from the token cache on demand."""

    def __init__(self, tokens: ConversationTokens, seq_len: int, pad_id: int, name: str = "data"):
        if len(tokens) == 0:
            raise DataError(f"{name} holds no conversations")
        self.tokens, self.seq_len, self.pad_id = tokens, seq_len, pad_id
        width = seq_len + 1
        self.members, self.starts = cached_packing(tokens, width)
        self.num_samples = len(self.starts) - 1
        sizes = np.minimum(tokens.lengths, width)
        self.truncated = int((tokens.lengths > width).sum())
        self.pad_fraction = 1.0 - float(sizes.sum()) / (self.num_samples * width)

    @classmethod
    def from_rendered(cls, rendered: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                      name: str = "data") -> PackedConversations:
        """Windows of render_chat() results held in memory."""
        return cls(ConversationTokens.from_rendered(rendered), seq_len, pad_id, name)

    def __len__(self) -> int:
        return self.num_samples

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of window `index`, each seq_len + 1 int64: labels are the ids where
        trained, -100 elsewhere (padding included)."""
        width = self.seq_len + 1
        ids = np.full(width, self.pad_id, dtype=np.int64)
        labels = np.full(width, IGNORE, dtype=np.int64)
        cursor = 0
        for conversation in self.members[self.starts[index]:self.starts[index + 1]].tolist():
            begin = int(self.tokens.offsets[conversation])
            n = min(int(self.tokens.lengths[conversation]), width - cursor)
            piece = self.tokens.ids[begin:begin + n].astype(np.int64)
            ids[cursor:cursor + n] = piece
            labels[cursor:cursor + n] = np.where(self.tokens.mask[begin:begin + n] != 0, piece, IGNORE)
            cursor += n
        return ids, labels

    def trained_tokens(self) -> int:
        """Targets that carry a loss over all windows (a truncated conversation counts its kept part)."""
        width = self.seq_len + 1
        total = int(self.tokens.trained[self.tokens.lengths <= width].sum(dtype=np.int64))
        for conversation in np.flatnonzero(self.tokens.lengths > width).tolist():
            begin = int(self.tokens.offsets[conversation])
            total += int(np.count_nonzero(self.tokens.mask[begin:begin + width]))
        return total

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(indices), seq_len) int64."""
        rows = [self.window(i) for i in indices]
        ids = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))
        return ids[:, :-1], labels[:, 1:]


def load_sft_data(path: Path | str, tokenizer: EtudeTokenizer, seq_len: int,
                  skip_bad_lines: bool = False, verbose: bool = True) -> PackedConversations:
    """The packed windows of an SFT file, through its token cache (built on first use)."""
    tokens = build_sft_cache(path, tokenizer, skip_bad_lines, verbose)
    started = time.perf_counter()
    data = PackedConversations(tokens, seq_len, tokenizer.pad_id, name=str(path))
    if verbose:
        skipped = tokens.meta.get("skipped_lines", 0)
        print(f"{Path(path).name}: {len(tokens):,} conversations -> {data.num_samples:,} windows of "
              f"{seq_len} tokens ({time.perf_counter() - started:.1f} s); {data.pad_fraction:.1%} padding, "
              f"{data.trained_tokens():,} trained tokens"
              + (f"; {plural(data.truncated, 'conversation')} longer than a window "
                 f"{'was' if data.truncated == 1 else 'were'} truncated" if data.truncated else "")
              + (f"; {plural(skipped, 'bad line')} {'was' if skipped == 1 else 'were'} skipped when the cache "
                 "was built" if skipped else ""))
    return data
