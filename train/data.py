"""Training data: the pretokenized pretraining stream and its packed windows.

Pretraining text (JSONL `{"text": ...}` or plain .txt, one document per blank-line separated
block) is tokenized once into a cache beside the source: `<source>.tokens.bin` (uint16 when the
vocabulary fits, else uint32) and `<source>.tokens.json` (what it was built from). The cache is
rebuilt when the source file or the tokenizer changes. Documents are joined with <|endoftext|>
and cut into fixed windows of seq_len + 1 tokens that overlap by one (inputs and shifted
targets), so no token is padding.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import atomic_write, atomic_write_json
from model.tokenizer import EtudeTokenizer, not_text

CACHE_VERSION = 1
ENCODE_BATCH_DOCS = 2000
# Encoding holds ~100+ bytes per character inside `tokenizers` (a 100 MB document on one line
# took 14 GB): long documents are encoded in pieces, and a batch is flushed at this many characters.
ENCODE_PIECE_CHARS = 1 << 18
ENCODE_BATCH_CHARS = 1 << 22
# A space between two non-space characters: the byte-level pre-tokenizer always splits just before
# it, so cutting there gives exactly the ids of the whole text.
_PIECE_CUT = re.compile(r"(?<=\S) (?=\S)")


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


def _bad_line(path: Path, lineno: int, problem: str) -> str:
    return f"{path}:{lineno}: {problem}"


def text_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line as UTF-8 bytes) of a text file: UTF-8, with or without a byte-order
    mark, or UTF-16 with one (as Windows tools save text), re-encoded line by line."""
    with open(path, "rb") as handle:
        head = handle.read(3)
        if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            handle.seek(0)
            lineno = 0
            try:
                for lineno, line in enumerate(io.TextIOWrapper(handle, encoding="utf-16"), start=1):
                    yield lineno, line.encode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno + 1}: not valid UTF-16 text ({exc.reason}) although the file "
                                "starts with a UTF-16 byte-order mark; re-save it as UTF-8") from None
            return
        handle.seek(len(codecs.BOM_UTF8) if head == codecs.BOM_UTF8 else 0)
        yield from enumerate(handle, start=1)


def read_jsonl(path: Path | str, skip_bad_lines: bool = False, validate=None,
               report: dict | None = None, array_hint: str | None = None,
               convert=None) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object) from a JSONL file. Blank lines are ignored. A line
    that is not JSON, or that `validate(obj)` rejects (by returning an error string), or that
    `convert(obj)` refuses (by raising ValueError; what it returns is yielded instead of the
    object), stops with file:line; with skip_bad_lines it is counted in report["skipped"]
    instead. A file that
    is one JSON array rather than JSONL stops at once, with `array_hint` ({path} and {stem}
    filled in) saying what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}. Build the demo data with "
                                "`python tool/prepare_data.py` or pass --data PATH.")
    report = report if report is not None else {}
    report.setdefault("skipped", 0)
    first = True
    for lineno, raw in text_lines(path):
        if not raw.strip():
            continue
        if first and raw.lstrip().startswith(b"["):
            hint = array_hint or "write one JSON object per line instead"
            raise DataError(f"{path}:{lineno}: " + hint.format(path=path, stem=path.with_suffix("")))
        first = False
        try:
            obj = json.loads(raw.decode("utf-8"))
            problem = validate(obj) if validate else None
            if convert is not None and not problem:
                obj = convert(obj)
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
        except ValueError as exc:  # convert's verdict
            problem = str(exc)
        if problem:
            message = _bad_line(path, lineno, problem)
            if not skip_bad_lines:
                raise DataError(message + ". Fix the line, or pass --skip-bad-lines to skip "
                                          "bad lines (they are counted and reported).")
            _count_skipped(report, message)
            continue
        yield lineno, obj


def _count_skipped(report: dict, message: str) -> None:
    """Record a bad line that --skip-bad-lines skipped: the count and the first five messages."""
    report["skipped"] = report.get("skipped", 0) + 1
    if len(report.setdefault("first_skipped", [])) < 5:
        report["first_skipped"].append(message)


def plural(count: int, noun: str) -> str:
    """'1 conversation', '2 conversations': a count with its noun in the right number."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _skipped_note(report: dict) -> str:
    """Why a file with lines in it can still hold nothing: its bad lines were all skipped."""
    if not report.get("skipped"):
        return ""
    skipped = report["skipped"]
    return (f" ({plural(skipped, 'bad line')} {'was' if skipped == 1 else 'were'} skipped, "
            f"first: {report['first_skipped'][0]})")


def _text_problem(obj: object) -> str | None:
    if not isinstance(obj, dict) or "text" not in obj:
        return 'expected an object with a "text" field, e.g. {"text": "..."}'
    if not isinstance(obj["text"], str):
        return f'"text" must be a string, got {type(obj["text"]).__name__}'
    if not obj["text"].strip():
        return '"text" is empty'
    problem = not_text(obj["text"])
    return f'"text" {problem}' if problem else None


def iter_documents(path: Path | str, skip_bad_lines: bool = False,
                   report: dict | None = None) -> Iterator[str]:
    """Pretraining documents of a .jsonl ({"text": ...} per line) or .txt (blank-line
    separated blocks) file."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        block: list[str] = []
        report = report if report is not None else {}
        for lineno, raw in text_lines(path):
            try:  # line by line, so a bad byte is reported with its line number
                line = raw.decode("utf-8").replace("\r\n", "\n")
            except UnicodeDecodeError as exc:
                message = _bad_line(path, lineno, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                if not skip_bad_lines:
                    raise DataError(message + ". Convert the file to UTF-8, or pass --skip-bad-lines to skip "
                                              "such lines (they are counted and reported).") from None
                _count_skipped(report, message)
                continue
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).strip("\n")
                block = []
        if block:
            yield "".join(block).strip("\n")
        return
    for _, obj in read_jsonl(path, skip_bad_lines, _text_problem, report):
        yield obj["text"]


def encoding_pieces(text: str, size: int = ENCODE_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters or fewer whose ids, concatenated, equal
    the ids of the whole (cut only before a space that starts a word); a piece with no such space
    in it runs on to the next one."""
    pieces, start = [], 0
    while len(text) - start > size:
        window = text[start + 1:start + size]
        last = None
        for last in _PIECE_CUT.finditer(window):
            pass
        if last is not None:
            cut = start + 1 + last.start()
        else:
            found = _PIECE_CUT.search(text, start + size)
            if found is None:
                break
            cut = found.start()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def source_fingerprint(path: Path) -> dict:
    """What identifies a source file's version for its caches: size and modification time."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned type that holds every id: uint16 up to 65,536 ids, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenizer_hash(tokenizer: EtudeTokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def cache_paths(source: Path) -> tuple[Path, Path]:
    return source.with_name(source.name + ".tokens.bin"), source.with_name(source.name + ".tokens.json")


def build_token_cache(source: Path | str, tokenizer: EtudeTokenizer, skip_bad_lines: bool = False,
                      verbose: bool = True) -> tuple[np.ndarray, dict]:
    """Return the memory-mapped token stream of `source`, (re)building the cache if the source
    or the tokenizer changed since it was written."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"data file not found: {source}. Build the demo data with "
                                "`python tool/prepare_data.py` or pass --data PATH.")
    bin_path, meta_path = cache_paths(source)
    wanted = {"version": CACHE_VERSION, "source": source_fingerprint(source),
              "tokenizer": tokenizer_hash(tokenizer)}
    meta = None
    if bin_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
    if meta is None or any(meta.get(k) != v for k, v in wanted.items()) \
            or bin_path.stat().st_size != meta.get("n_tokens", -1) * np.dtype(meta.get("dtype", "uint16")).itemsize:
        meta = _write_token_cache(source, tokenizer, bin_path, meta_path, wanted, skip_bad_lines, verbose)
    tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    return tokens, meta


def _write_token_cache(source: Path, tokenizer: EtudeTokenizer, bin_path: Path, meta_path: Path,
                       wanted: dict, skip_bad_lines: bool, verbose: bool) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    started = time.perf_counter()
    report: dict = {}
    n_docs = n_tokens = n_bytes = 0

    def write(tmp: str) -> None:
        nonlocal n_docs, n_tokens, n_bytes
        with open(tmp, "wb") as out:
            batch: list[str] = []
            ends: list[bool] = []  # whether a batch item is the last piece of its document
            chars = 0

            def flush() -> None:
                nonlocal n_tokens, chars
                for ids, end in zip(tokenizer.encode_batch(batch), ends):
                    if end:
                        ids.append(tokenizer.eos_id)
                    np.asarray(ids, dtype=dtype).tofile(out)
                    n_tokens += len(ids)
                batch.clear()
                ends.clear()
                chars = 0

            for doc in iter_documents(source, skip_bad_lines, report):
                pieces = encoding_pieces(doc)
                for index, piece in enumerate(pieces):
                    batch.append(piece)
                    ends.append(index == len(pieces) - 1)
                    chars += len(piece)
                    if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
                        flush()
                n_docs += 1
                n_bytes += len(doc.encode("utf-8"))
            if batch:
                flush()

    atomic_write(bin_path, write)
    if n_tokens == 0:
        bin_path.unlink(missing_ok=True)
        raise DataError(f"{source} holds no documents{_skipped_note(report)}; add text to it (one JSON object "
                        '{"text": ...} per line, or blank-line separated .txt blocks)')
    seconds = time.perf_counter() - started
    meta = {**wanted, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_documents": n_docs,
            "n_bytes": n_bytes, "skipped_lines": report.get("skipped", 0), "build_seconds": round(seconds, 3)}
    atomic_write_json(meta_path, meta)
    if verbose:
        print(f"tokenized {source.name}: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB -> "
              f"{n_tokens:,} tokens in {seconds:.1f} s ({n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)"
              + (f"; skipped {report['skipped']} bad lines, first: {report['first_skipped'][0]}"
                 if report.get("skipped") else ""))
    return meta


class PackedTokens:
    """Fixed windows over a token stream: window i covers tokens [i*L, i*L + L] (L + 1 tokens),
    giving inputs [:-1] and targets [1:]."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "data"):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_samples = (len(tokens) - 1) // seq_len
        if self.num_samples <= 0:
            raise DataError(f"{name} has {len(tokens)} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}; add data or lower --seq-len")

    def __len__(self) -> int:
        return self.num_samples

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(indices), seq_len) int64."""
        length = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * length: i * length + length + 1]) for i in indices])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def load_pretrain_data(path: Path | str, tokenizer: EtudeTokenizer, seq_len: int,
                       skip_bad_lines: bool = False) -> PackedTokens:
    """Tokenize (or reuse the cache of) a pretraining file and pack it into windows."""
    tokens, _ = build_token_cache(path, tokenizer, skip_bad_lines)
    return PackedTokens(tokens, seq_len, name=str(path))


STATISTICS_CHUNK = 1 << 24  # tokens per pass over a stream: 16M ids, 128 MB as int64


def stream_chunks(stream: np.ndarray, size: int | None = None) -> Iterator[np.ndarray]:
    """A token stream in pieces of `size` ids. A memory-mapped cache is read from its file
    rather than through the mapping, so a pass over all of it leaves no pages resident in this
    process: its memory stays one piece (default STATISTICS_CHUNK ids), whatever the size of
    the cache."""
    filename = getattr(stream, "filename", None)
    size = size or STATISTICS_CHUNK
    for start in range(0, len(stream), size):
        count = min(size, len(stream) - start)
        if filename is not None:
            yield np.fromfile(filename, dtype=stream.dtype, count=count,
                              offset=stream.offset + start * stream.dtype.itemsize)
        else:
            yield np.asarray(stream[start:start + count])


def unigram_bits_per_byte(train: np.ndarray, val: np.ndarray, token_bytes: np.ndarray) -> float:
    """Bits per byte of the best context-free model: each token's frequency in the training
    stream (add-one smoothed), scored on the validation stream. A trained model should land far
    below it. Both streams are read in chunks (stream_chunks)."""
    counts = np.ones(len(token_bytes), dtype=np.float64)
    for chunk in stream_chunks(train):
        counts += np.bincount(chunk, minlength=len(token_bytes))
    log_probs = np.log2(counts / counts.sum())
    total_bits = total_bytes = 0.0
    for chunk in stream_chunks(val):
        total_bits -= float(log_probs[chunk].sum())
        total_bytes += float(token_bytes[chunk].sum())
    return total_bits / max(total_bytes, 1)
