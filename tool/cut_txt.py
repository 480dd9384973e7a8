"""Cut a large plain-text file into pretraining samples: JSONL, one {"text": ...} of at most N
characters (or N tokens of the trained tokenizer) per line.

    python tool/cut_txt.py books.txt                                  # samples of <= 2000 characters
    python tool/cut_txt.py books.txt --max-chars 1000 --overlap 200 --out training_data/books.jsonl
    python tool/cut_txt.py novel_zh.txt.gz --max-tokens 512          # tokens of weight/tokenizer/

Reads .txt (or .txt.gz/.bz2/.xz) as a stream, in constant memory whatever the size of the file
or of its lines. Paragraphs are blocks separated by blank lines. Whole paragraphs are packed
into a sample while they fit; a cut goes at a paragraph boundary when that still fills at least
half a sample, otherwise at a sentence boundary (after . ! ? followed by a space or line end, or
after 。！？, closing quotes included). A single sentence longer than a sample is cut at the last
space that fits (or exactly at the limit, for text without spaces). Inside a sample, paragraphs
are separated by a blank line and the text of each is kept as it was.

--overlap K starts each sample after a cut with the whole sentences that ended the previous
sample, as many as fit in K (same unit as the limit). A sample never spans two input files.

Writes --out (default training_data/<input name>.jsonl), atomically. The text is UTF-8, or UTF-16
or UTF-32 with a byte-order mark; lines that do not decode stop with file:line, or with
--skip-bad-lines are skipped and reported.
"""

from __future__ import annotations

import argparse
import codecs
import re
import sys
from collections.abc import Iterator
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import TOKENIZER_DIR
from tool.textio import (COMPRESSED_ERRORS, BadLines, DataError, Outputs, Reader, Stopwatch, add_common_flags,
                         check_paths, default_output, print_summary, run_tool)

DEFAULT_MAX_CHARS = 2000
LINE_CHUNK = 1 << 20      # lines are read in pieces of at most this many bytes
MEASURE_BATCH = 4096      # most sentences tokenized per call in token mode
MEASURE_BATCH_CHARS = 1 << 18  # and most characters: encodings take ~100 bytes per token
PARAGRAPH_JOIN = "\n\n"
RUN_CUTS = "cuts in runs of text without a sentence end"
# A sentence ends after . ! ? followed by white space, or after 。！？; closing quotes and
# brackets stay with the sentence they close. White space goes with the sentence that follows,
# so that a token count of the pieces adds up to the count of their concatenation.
SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)|[。！？]+[”’」』）)\"']*")


class Measure:
    """The size of text in the unit of the limit: characters, or tokens of a tokenizer."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.unit = "tokens" if tokenizer else "characters"
        # The longest token in bytes, so at least in characters: n tokens never cover more than
        # n * this many characters.
        self.longest_token = max(tokenizer.token_bytes()) if tokenizer else 1
        self.join = self.size(PARAGRAPH_JOIN)

    def size(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) if self.tokenizer else len(text)

    def sizes(self, texts: list[str]) -> list[int]:
        if self.tokenizer:
            return [len(ids) for ids in self.tokenizer.encode_batch(texts)]
        return [len(text) for text in texts]

    def longest_prefix(self, text: str, limit: int) -> int:
        """The largest k (or nearly: a token boundary) such that text[:k] measures at most `limit`."""
        if not self.tokenizer:
            return min(limit, len(text))
        high = min(len(text), limit * self.longest_token)
        ids = self.tokenizer.encode(text[:high])
        if len(ids) <= limit:
            return high
        # The text of the first `limit` tokens is the guess; a prefix can tokenize differently at
        # its end, so check it, and search below it only when it does not fit.
        guess = self.tokenizer.decode(ids[:limit]).rstrip("\ufffd")  # no half character at the end
        if text.startswith(guess) and self.size(guess) <= limit:
            return len(guess)
        low, high = 0, len(guess) if text.startswith(guess) else high
        while low < high:
            middle = (low + high + 1) // 2
            if self.size(text[:middle]) <= limit:
                low = middle
            else:
                high = middle - 1
        return low


def hard_split(text: str, limit: int, measure: Measure) -> list[str]:
    """Cut a text that does not fit into pieces that do: at the last white space in the second
    half of what fits, else exactly where the limit falls."""
    pieces = []
    certainly_over = limit * measure.longest_token  # more characters than this cannot fit
    while len(text) > certainly_over or measure.size(text) > limit:
        fit = max(measure.longest_prefix(text, limit), 1)
        space = max(text.rfind(" ", fit // 2, fit), text.rfind("\n", fit // 2, fit))
        cut = space if space > 0 else fit
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text]


def text_lines(reader: Reader, bad: BadLines) -> Iterator[tuple[str, bool]]:
    """(text, whole) pieces of the lines of `reader`: a line longer than LINE_CHUNK comes in
    pieces, `whole` is True on a line's last piece (which holds its newline)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lineno = 0
    dropping = False  # the rest of a line that was not UTF-8
    while True:
        try:
            raw = reader.readline(LINE_CHUNK)
        except COMPRESSED_ERRORS as exc:
            return bad.cut_off(reader.path, lineno + 1, exc)
        if not raw:
            return
        whole = raw.endswith(b"\n")
        if not dropping:
            try:
                text = decoder.decode(raw, final=whole)
            except UnicodeDecodeError as exc:
                decoder.reset()
                bad(reader.path, lineno + 1, *reader.undecodable(exc.object, exc))
                dropping = True
        if whole:
            lineno += 1
            if dropping:
                dropping = False
                continue
        if not dropping:
            yield (text[:-2] + "\n" if whole and text.endswith("\r\n") else text), whole


def sentences(reader: Reader, bad: BadLines, cap: int, counts: dict[str, int]) -> Iterator[tuple[str, bool]]:
    """(sentence, starts a paragraph) for the text of `reader`. Held text never exceeds `cap`
    characters plus one line piece: a longer run without a sentence end is let out at a space
    (counted in counts[RUN_CUTS])."""
    pending, new_paragraph, line_start = "", True, True
    for text, whole in text_lines(reader, bad):
        if line_start and whole and not text.strip():  # a blank line ends the paragraph
            if pending.strip():
                yield pending.rstrip(), new_paragraph
            pending, new_paragraph = "", True
            continue
        line_start = whole
        scan_from = max(len(pending) - 4, 0)  # a sentence end may straddle the join
        pending += text
        last = 0
        for match in SENTENCE_END.finditer(pending, scan_from):
            if match.end() > last and pending[last:match.end()].strip():
                yield pending[last:match.end()], new_paragraph
                new_paragraph = False
                last = match.end()
        pending = pending[last:]
        while len(pending) > cap:
            space = pending.rfind(" ", cap // 2, cap)
            cut = space if space > 0 else cap
            yield pending[:cut], new_paragraph
            counts[RUN_CUTS] += 1
            new_paragraph = False
            pending = pending[cut:]
    if pending.strip():
        yield pending.rstrip(), new_paragraph


class Packer:
    """Packs sentences into samples of at most `limit`, cutting at paragraph boundaries where
    that fills at least half a sample, else at sentence boundaries, with `overlap`."""

    def __init__(self, limit: int, overlap: int, measure: Measure, write):
        self.limit, self.overlap, self.measure, self.write = limit, overlap, measure, write
        self.items: list[tuple[str, int, bool]] = []  # (text, size, starts a paragraph)
        self.size = 0  # size_of(self.items), kept up to date
        self.n_overlap = 0  # leading items repeated from the previous sample
        self.samples = self.hard_cuts = 0

    def size_of(self, items: list[tuple[str, int, bool]]) -> int:
        return sum(size for _, size, _ in items) + self.measure.join * sum(1 for _, _, p in items[1:] if p)

    def add(self, text: str, size: int, starts_paragraph: bool) -> None:
        if size > self.limit:
            self.hard_cuts += 1
            pieces = hard_split(text, self.limit, self.measure)
            for index, (piece, piece_size) in enumerate(zip(pieces, self.measure.sizes(pieces))):
                self.add(piece, piece_size, starts_paragraph and index == 0)
            return
        while self.items and self.size + self.cost(size, starts_paragraph) > self.limit:
            if len(self.items) == self.n_overlap:  # only repeated text left: it cannot make room
                self.items, self.size, self.n_overlap = [], 0, 0
                break
            self.cut(starts_paragraph)
        self.size += self.cost(size, starts_paragraph)
        self.items.append((text, size, starts_paragraph))

    def cost(self, size: int, starts_paragraph: bool) -> int:
        """How much appending an item adds: its size, and a paragraph break unless it comes first."""
        return size + (self.measure.join if starts_paragraph and self.items else 0)

    def cut(self, next_starts_paragraph: bool) -> None:
        """Write out the head of the sample and keep the rest (plus the overlap) as the next."""
        n = len(self.items)
        if not next_starts_paragraph:  # mid-paragraph: cut before the open paragraph if that is enough
            starts = [i for i, (_, _, p) in enumerate(self.items) if p and i > self.n_overlap]
            if starts and self.size_of(self.items[:starts[-1]]) * 2 >= self.limit:
                n = starts[-1]
        head, rest = self.items[:n], self.items[n:]
        text = render(head)
        size = self.measure.size(text) if self.measure.tokenizer else len(text)
        # Token counts of pieces add up only nearly to the count of their concatenation: move
        # sentences back to the next sample until the real count fits, or drop the overlap.
        while size > self.limit and len(head) > self.n_overlap + 1:
            rest.insert(0, head.pop())
            text = render(head)
            size = self.measure.size(text)
        if size > self.limit and self.n_overlap:
            text = render(head[self.n_overlap:])
            size = self.measure.size(text)
        self.emit(text, size)
        tail: list[tuple[str, int, bool]] = []
        for item in reversed(head):
            if self.size_of([item] + tail) > self.overlap:
                break
            tail.insert(0, item)
        self.items, self.n_overlap = tail + rest, len(tail)
        self.size = self.size_of(self.items)

    def emit(self, text: str, size: int) -> None:
        """Write a rendered sample of `size`; one that still does not fit (a lone piece whose
        count grew when joined) is cut to fit."""
        for piece in hard_split(text, self.limit, self.measure) if size > self.limit else [text]:
            if piece.strip():
                self.write(piece.strip())
                self.samples += 1

    def finish(self) -> None:
        """Write out what is left (unless it is only text repeated from the last sample)."""
        if len(self.items) > self.n_overlap:
            text = render(self.items)
            self.emit(text, self.measure.size(text))
        self.items, self.size, self.n_overlap = [], 0, 0


def render(items: list[tuple[str, int, bool]]) -> str:
    """A sample's text: paragraphs joined by a blank line, sentences as they were."""
    parts = []
    for index, (text, _, starts_paragraph) in enumerate(items):
        if index and starts_paragraph:
            parts.append(PARAGRAPH_JOIN)
        parts.append(text.lstrip() if index == 0 or starts_paragraph else text)
    return "".join(parts).strip()


def measured(stream: Iterator[tuple[str, bool]], measure: Measure, limit: int) -> Iterator[tuple[str, int, bool]]:
    """Sentences with their sizes, measured in batches (one tokenizer call per batch). A sentence
    with more characters than `limit` tokens can cover is not measured: it gets size limit + 1,
    which sends it to hard_split, where it is measured piece by piece."""
    certainly_over = limit * measure.longest_token
    batch: list[tuple[str, bool]] = []
    while True:
        batch.clear()
        chars = 0
        for item in stream:
            batch.append(item)
            chars += len(item[0])
            if len(batch) == MEASURE_BATCH or chars >= MEASURE_BATCH_CHARS:
                break
        if not batch:
            return
        short = [text for text, _ in batch if len(text) <= certainly_over]
        sizes = iter(measure.sizes(short))
        for text, starts_paragraph in batch:
            yield text, (next(sizes) if len(text) <= certainly_over else limit + 1), starts_paragraph


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="TXT", help="text file(s): .txt, .txt.gz, .txt.bz2")
    parser.add_argument("--out", type=Path, help="the JSONL to write (.jsonl or .jsonl.gz); "
                                                 "default training_data/<input name>.jsonl")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--max-chars", type=int, help=f"most characters per sample (default {DEFAULT_MAX_CHARS})")
    limit.add_argument("--max-tokens", type=int, help="most tokens per sample, counted with --tokenizer")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR,
                        help="the tokenizer folder for --max-tokens (default weight/tokenizer/)")
    parser.add_argument("--overlap", type=int, default=0,
                        help="repeat up to this much (whole sentences, same unit as the limit) of a sample at "
                             "the start of the next one (default 0)")
    parser.add_argument("--min-size", type=int, default=0,
                        help="drop samples smaller than this, same unit as the limit (default 0: keep all)")
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        tokenizer = None
        if args.max_tokens is not None:
            from model.tokenizer import load_tokenizer  # only token mode pays for the tokenizer
            tokenizer = load_tokenizer(args.tokenizer)
        limit = args.max_tokens if args.max_tokens is not None else args.max_chars or DEFAULT_MAX_CHARS
        flag = "--max-tokens" if tokenizer else "--max-chars"
        if limit <= 0:
            raise DataError(f"{flag} must be > 0, got {limit}")
        if not 0 <= args.overlap < limit:
            raise DataError(f"--overlap must be >= 0 and smaller than {flag} ({limit}), got {args.overlap}")
        if args.min_size < 0:
            raise DataError(f"--min-size must be >= 0, got {args.min_size}")
        out = args.out or default_output(args.inputs[0], ".jsonl")
        check_paths(args.inputs, [out])
        measure = Measure(tokenizer)
        print(f"cutting {', '.join(map(str, args.inputs))} into samples of at most {limit:,} {measure.unit}"
              + (f", overlap {args.overlap:,}" if args.overlap else "") + f" -> {out}")
        watch, bad = Stopwatch(), BadLines(args.skip_bad_lines, args.rejects)
        counts = {"samples written": 0, "samples dropped (--min-size)": 0, RUN_CUTS: 0}
        size = 0
        try:
            with Outputs() as outputs:
                output = outputs.open(out)

                def write(text: str) -> None:
                    if args.min_size and measure.size(text) < args.min_size:
                        counts["samples dropped (--min-size)"] += 1
                    else:
                        output.write_json({"text": text})
                        counts["samples written"] += 1

                packer = Packer(limit, args.overlap, measure, write)
                for path in args.inputs:
                    with Reader(path, progress=not args.no_progress) as reader:
                        for text, piece_size, starts_paragraph in measured(
                                sentences(reader, bad, limit * measure.longest_token, counts), measure, limit):
                            packer.add(text, piece_size, starts_paragraph)
                        packer.finish()
                        size += reader.size
        finally:
            bad.close()
        counts["sentences longer than a sample, cut"] = packer.hard_cuts
        print_summary(f"wrote {out}", list(counts.items()) + bad.summary_rows() + watch.rows(size))

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
