"""Streaming input and output shared by the data tools (extract_xml, cut_txt, cut_jsonl,
cut_jsonl_sft): compressed files by suffix, text in UTF-8 or (with a byte-order mark) UTF-16 or
UTF-32, always handed on as UTF-8, a progress bar in MB over the file on disk, line numbers and
reports for bad lines, and outputs that appear only once they are complete.

Only the standard library and tqdm: the tools must not import torch, so that their memory is
their data's and not a framework's.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import os
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from config import DATA_DIR

# A JSONL line longer than this is reported as bad and read past, so that one runaway line
# (a file without newlines) cannot take the memory with it.
MAX_LINE_BYTES = 64 << 20
PROGRESS_EVERY = 4 << 20  # move the bar after this many bytes, not on every line
ARRAY_READ_BYTES = 1 << 20  # a JSON array file is read in pieces of this size
COMPRESSIONS = {".gz": (gzip.open, b"\x1f\x8b"), ".bz2": (bz2.open, b"BZh"), ".xz": (lzma.open, b"\xfd7zXZ\x00")}
# A text that starts with one of these byte-order marks is in that encoding (UTF-32's marks
# first: UTF-32-LE's begins with UTF-16-LE's); one without is UTF-8.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
TRANSCODE_BYTES = 1 << 20  # UTF-16/32 input is converted to UTF-8 in pieces of this size
# UTF-16/32 code units that do not decode become a lone surrogate, which encodes (with
# surrogatepass) to bytes that no UTF-8 decoder accepts: the line holding them is reported.
UNDECODABLE = "etude-undecodable-to-surrogate"
codecs.register_error(UNDECODABLE, lambda exc: ("\udcff", exc.end))
# What a corrupted or cut-off compressed file raises while it is read.
COMPRESSED_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)

_UMASK = os.umask(0)
os.umask(_UMASK)


class DataError(ValueError):
    """Bad input or arguments; the message names the file (and line) and the fix."""


def compression(path: Path | str) -> str | None:
    """".gz", ".bz2" or ".xz" when the name says the file is compressed, else None."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def base_name(path: Path | str) -> str:
    """The file name without its compression suffix and then its format suffix:
    enwiki-latest-pages-articles.xml.bz2 -> enwiki-latest-pages-articles."""
    path = Path(path)
    if compression(path):
        path = path.with_suffix("")
    return path.with_suffix("").name if path.suffix else path.name


def default_output(path: Path | str, suffix: str) -> Path:
    """training_data/<input base name><suffix>: where a tool writes when --out is not given."""
    return DATA_DIR / (base_name(path) + suffix)


class Reader:
    """One input file as a binary stream, decompressed according to its suffix, with a progress
    bar over its bytes on disk (so a compressed input shows progress in compressed MB)."""

    def __init__(self, path: Path | str, progress: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"input file not found: {self.path}")
        self.size = self.path.stat().st_size
        self._raw = open(self.path, "rb")
        kind = compression(self.path)
        if kind:
            opener, magic = COMPRESSIONS[kind]
            head = self._raw.read(len(magic))
            self._raw.seek(0)
            if head != magic:
                self._raw.close()
                raise DataError(f"{self.path}: the name ends in {kind} but the file is not {kind[1:]}-compressed; "
                                "rename it to what it is, or compress it")
            self.stream = opener(self._raw, "rb")
        else:
            self.stream = self._raw
        self.encoding = "UTF-8"
        self._decode_byte_order_mark()
        self.bar = tqdm(total=self.size, unit="B", unit_scale=True, desc=self.path.name, disable=not progress,
                        file=sys.stderr, mininterval=0.5, leave=False)
        self._since_tick = 0

    def _decode_byte_order_mark(self) -> None:
        """A text that starts with a byte-order mark is read in the encoding the mark names
        (the mark itself dropped): UTF-8 as it is, UTF-16 and UTF-32 converted to UTF-8 on the
        fly, so every tool reads UTF-8 bytes. A text without a mark is UTF-8, unless its first
        two characters are plainly ASCII in UTF-16 (every other byte zero): then UTF-16."""
        try:
            head = self.stream.peek(4)[:4]
        except COMPRESSED_ERRORS:  # a corrupt compressed file: the first read reports it, at its line
            return
        for mark, encoding in BYTE_ORDER_MARKS:
            if head.startswith(mark):
                self.stream.read(len(mark))
                break
        else:
            encoding = unmarked_encoding(head)
        if encoding != "utf-8":
            self.encoding = encoding.upper()
            self.stream = io.BufferedReader(ToUtf8(self.stream, encoding), buffer_size=TRANSCODE_BYTES)

    def undecodable(self, data: bytes, exc: UnicodeDecodeError) -> tuple[str, str]:
        """(kind, detail) of a bad-line report on `data`, which did not decode as UTF-8 with `exc`."""
        if self.encoding == "UTF-8":
            return "not UTF-8", f"byte 0x{data[exc.start]:02x}"
        return f"not {self.encoding}", "an unpaired surrogate, or a character cut off at the end of the file"

    def readline(self, limit: int) -> bytes:
        """The next line of the decompressed stream, or its first `limit` bytes; moves the bar
        every few MB."""
        line = self.stream.readline(limit)
        self._since_tick += len(line)
        if self._since_tick >= PROGRESS_EVERY:
            self.tick()
            self._since_tick = 0
        return line

    def tick(self) -> None:
        """Move the bar to the current position in the file on disk."""
        position = self._raw.tell() if not self._raw.closed else self.size
        self.bar.update(position - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        self.stream.close()
        self._raw.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unmarked_encoding(head: bytes) -> str:
    """The encoding of a text without a byte-order mark, from its first four bytes: UTF-16 (LE
    or BE) when they are two ASCII characters in it, each with a zero byte (how "<?" or '{"' start
    a UTF-16 file), else UTF-8."""
    if len(head) == 4 and all(0 < byte < 0x80 for byte in head[0::2]) and head[1] == head[3] == 0:
        return "utf-16-le"
    if len(head) == 4 and all(0 < byte < 0x80 for byte in head[1::2]) and head[0] == head[2] == 0:
        return "utf-16-be"
    return "utf-8"


class ToUtf8(io.RawIOBase):
    """A binary stream of text in `encoding` (UTF-16 or UTF-32 without its byte-order mark) read
    as UTF-8 bytes, a piece at a time. A code unit that does not decode (an unpaired surrogate, a
    character cut off at the end) becomes bytes that are not UTF-8, so that the tool reading the
    line reports it as it reports any other undecodable line."""

    def __init__(self, stream: Any, encoding: str):
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder(encoding)(errors=UNDECODABLE)
        self._pending, self._at, self._eof = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._pending) and not self._eof:
            chunk = self._stream.read(TRANSCODE_BYTES)
            self._eof = not chunk
            self._pending = self._decoder.decode(chunk, final=self._eof).encode("utf-8", "surrogatepass")
            self._at = 0
        count = min(len(buffer), len(self._pending) - self._at)
        buffer[:count] = self._pending[self._at:self._at + count]
        self._at += count
        return count

    def close(self) -> None:
        self._stream.close()
        super().close()


class BadLines:
    """What happens to a malformed input line: without --skip-bad-lines it stops the tool with
    file:line and the reason; with it, the line is skipped, reported (to stderr, or one per line
    to the --rejects file) and counted by kind of fault."""

    def __init__(self, skip: bool, rejects: Path | str | None = None):
        if rejects and not skip:
            raise DataError("--rejects lists the lines that --skip-bad-lines skips; pass both, or neither")
        self.skip = skip
        self.counts: Counter[str] = Counter()
        self._rejects = open(rejects, "w", encoding="utf-8") if rejects else None

    def __call__(self, path: Path | str, lineno: int, kind: str, detail: str = "") -> None:
        message = f"{path}:{lineno}: {kind}" + (f" ({detail})" if detail else "")
        if not self.skip:
            raise DataError(f"{message}. Fix the line, or pass --skip-bad-lines to skip bad lines "
                            "(each one is reported and counted).")
        self.counts[kind] += 1
        if self._rejects:
            self._rejects.write(message + "\n")
        else:
            tqdm.write(f"skipped {message}", file=sys.stderr)

    def cut_off(self, path: Path | str, lineno: int, exc: BaseException) -> None:
        """A compressed file that is corrupt or ends early: nothing after `lineno` can be read."""
        self(path, lineno, "compressed data is corrupt or cut off",
             f"{exc}; nothing after this point can be read; re-download or re-compress the file")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary_rows(self) -> list[tuple[str, Any]]:
        return [(f"skipped: {kind}", count) for kind, count in self.counts.most_common()]

    def close(self) -> None:
        if self._rejects:
            self._rejects.close()


def iter_lines(reader: Reader, bad: BadLines) -> Iterator[tuple[int, bytes]]:
    """Every line of `reader` as (line number, bytes without the line ending). A line over
    MAX_LINE_BYTES is reported as bad and read past in constant memory; a compressed file that is
    corrupt or cut off is reported at the line where it breaks, and nothing after it is read."""
    lineno = 0
    while True:
        try:
            line = reader.readline(MAX_LINE_BYTES)
            if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the runaway line
                    line = reader.readline(MAX_LINE_BYTES)
                lineno += 1
                bad(reader.path, lineno, "line too long", f"over {MAX_LINE_BYTES >> 20} MB")
                continue
        except COMPRESSED_ERRORS as exc:
            return bad.cut_off(reader.path, lineno + 1, exc)
        if not line:
            return
        lineno += 1
        yield lineno, line.rstrip(b"\r\n")


def iter_json_objects(reader: Reader, bad: BadLines) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """(line number, raw line, parsed object) of every non-blank line that is a UTF-8 JSON object;
    any other line goes to `bad` with its reason. A file that starts with "[" is read as one JSON
    array instead (how Alpaca and ShareGPT data are often shipped), element by element."""
    head = reader.stream.peek(256)[:256].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from iter_json_array(reader, bad)
        return
    for lineno, raw in iter_lines(reader, bad):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            kind, detail = reader.undecodable(raw, exc)
            bad(reader.path, lineno, kind, f"{detail} at column {exc.start + 1}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            bad(reader.path, lineno, "not valid JSON", f"{exc.msg} at column {exc.colno}")
            continue
        if not isinstance(obj, dict):
            bad(reader.path, lineno, "not a JSON object", f"got {type(obj).__name__}")
            continue
        yield lineno, raw, obj


def iter_json_array(reader: Reader, bad: BadLines) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """(line where it starts, compact JSON, object) of each element of a JSON array, decoded one
    at a time from a buffer that holds the current element and one read: memory is bounded by
    the largest element (MAX_LINE_BYTES at most), not by the file. An element that is not an
    object is reported and skipped; malformed JSON ends the file (there is no telling where the
    next element would start)."""
    decoder, text_decoder = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buffer, pos, line, eof = "", 0, 1, False

    def more() -> bool:
        nonlocal buffer, pos, line, eof
        if eof:
            return False
        line += buffer.count("\n", 0, pos)
        buffer, pos = buffer[pos:], 0
        try:
            chunk = reader.stream.read(ARRAY_READ_BYTES)
            buffer += text_decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            kind, detail = reader.undecodable(exc.object, exc)
            bad(reader.path, line + buffer.count("\n"), kind, f"{detail}; the rest of the array cannot be read")
            eof = True
            return False
        except COMPRESSED_ERRORS as exc:
            bad.cut_off(reader.path, line + buffer.count("\n"), exc)
            eof = True
            return False
        reader.tick()
        eof = not chunk
        return bool(chunk)

    def next_char() -> str:
        """The next character that is not white space, without consuming it ("" at the end)."""
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buffer) or not more():
                return buffer[pos:pos + 1]

    def fail(problem: str) -> None:
        bad(reader.path, line + buffer.count("\n", 0, pos), "not valid JSON",
            f"{problem}; the rest of the array cannot be read")

    next_char()
    pos += 1  # the "[" that iter_json_objects saw
    if next_char() == "]":
        return
    while True:
        next_char()
        start_line = line + buffer.count("\n", 0, pos)
        while True:
            try:
                obj, end = decoder.raw_decode(buffer, pos)
                if end < len(buffer) or not more():  # a number at the very end may go on
                    break
            except json.JSONDecodeError as exc:
                if len(buffer) - pos > MAX_LINE_BYTES or not more():  # more() keeps the element whole
                    return fail(f"{exc.msg} in the element starting at line {start_line}")
        raw = buffer[pos:end]
        pos = end
        if isinstance(obj, dict):
            yield start_line, json.dumps(obj, ensure_ascii=False).encode("utf-8"), obj
        else:
            bad(reader.path, start_line, "not a JSON object", f"got {type(obj).__name__}: {raw[:40]}")
        separator = next_char()
        pos += 1
        if separator == "]":
            return
        if separator != ",":
            pos -= 1
            return fail(f"expected ',' or ']' after the element starting at line {start_line}, "
                        f"found {separator or 'the end of the file'!r}")


class Output:
    """An output file written under a hidden temporary name beside `path` and renamed into place
    by commit(), so an interrupted run never leaves a file that looks complete. Compressed with
    gzip when `path` ends in .gz (mtime 0 in the header: the same input gives the same bytes)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = open(fd, "wb", buffering=1 << 20)
        self._stream = self._file
        if compression(self.path) == ".gz":
            self._stream = gzip.GzipFile(filename=self.path.name, mode="wb", fileobj=self._file,
                                         compresslevel=6, mtime=0)
        elif compression(self.path):
            raise DataError(f"{self.path}: outputs are written plain or as .gz; "
                            f"drop the {compression(self.path)} suffix")
        self.lines = 0

    def write_line(self, data: bytes) -> None:
        self._stream.write(data + b"\n")
        self.lines += 1

    def write_json(self, obj: Any) -> None:
        self.write_line(json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def commit(self) -> None:
        if self._stream is not self._file:
            self._stream.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        try:
            self._stream.close()
            self._file.close()
        finally:
            Path(self._tmp).unlink(missing_ok=True)


class Outputs:
    """Several Output files that appear together: all renamed into place when the `with` block
    ends normally, all discarded when it raises (an error, Ctrl-C)."""

    def __init__(self) -> None:
        self.files: list[Output] = []

    def open(self, path: Path | str) -> Output:
        output = Output(path)
        self.files.append(output)
        return output

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            for output in self.files:
                output.commit()
        else:
            for output in self.files:
                output.discard()


def check_paths(inputs: list[Path], outputs: list[Path]) -> None:
    """Every input exists, and no output would write over one (the tools read while they write)."""
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    taken = {Path(p).resolve() for p in inputs}
    for path in outputs:
        if Path(path).resolve() in taken:
            raise DataError(f"the output {path} is also an input; choose another output name (--out / --name)")


def add_common_flags(parser: Any) -> None:
    """The flags every data tool shares: bad-line handling and the progress bar."""
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip malformed input lines (each is reported as file:line: reason, and counted) "
                             "instead of stopping at the first one")
    parser.add_argument("--rejects", type=Path, metavar="FILE",
                        help="with --skip-bad-lines: write the reports of skipped lines to FILE, one per line, "
                             "instead of to stderr")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")


class Stopwatch:
    """Elapsed time and throughput over the input's bytes on disk."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def rows(self, bytes_read: int) -> list[tuple[str, Any]]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return [("input", f"{bytes_read / 1e6:,.1f} MB"), ("time", f"{elapsed:,.1f} s"),
                ("speed", f"{bytes_read / 1e6 / elapsed:,.1f} MB/s")]


def print_summary(title: str, rows: list[tuple[str, Any]]) -> None:
    """A two-column table of counts on stdout."""
    print(title)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        value = f"{value:,}" if isinstance(value, int) else value
        print(f"  {name:<{width}}  {value}")


def run_tool(body: Callable[[], None]) -> int:
    """Run a tool's body; a user's mistake (bad input, missing file, bad flag value, full disk)
    becomes one 'error:' line and exit status 2, Ctrl-C exit status 130. Outputs are written
    only by a body that finishes. ETUDE_DEBUG=1 shows the traceback instead."""
    try:
        body()
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    except (DataError, OSError, ValueError) as exc:
        if os.environ.get("ETUDE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
