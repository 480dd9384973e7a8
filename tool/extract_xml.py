"""Turn a MediaWiki XML dump (Wikipedia's pages-articles) into pretraining text: JSONL, one
{"title": ..., "text": ...} per article.

    python tool/extract_xml.py enwiki-latest-pages-articles.xml.bz2
    python tool/extract_xml.py zhwiki-latest-pages-articles.xml.bz2 --out training_data/zhwiki.jsonl
    python tool/extract_xml.py dump.xml --min-chars 500 --max-pages 1000 --skip-bad-lines

Reads .xml, .xml.bz2, .xml.gz (and .xz) as a stream, one page at a time, so memory stays flat
however large the dump; UTF-8, or UTF-16/UTF-32 with a byte-order mark. Keeps articles only:
redirects and pages outside --namespaces (default 0, the articles) are skipped. Wikitext is
cleaned to plain text (tool/wikitext.py): templates {{...}} (nested), <ref> notes, tables
{| ... |}, files and images, categories, links to other languages, HTML comments, galleries,
formulas and other markup are removed; [[target|label]] becomes label, [[target]] target and
[url label] label, with brackets paired as MediaWiki pairs them (a file caption may hold links
and single brackets, as in Bicyclo[1.1.0]butane; a link label may hold a wikilink); <nowiki>
text stays as written; bold and italic marks go; headings stay as plain lines (those of sections
that end up empty are dropped). Broken markup costs at most its paragraph: an unclosed template
or file link takes the text up to the next blank line, an unclosed <ref> or link is left as
text, and no input makes the cleaning slower than linear. The names of the File and Category
namespaces are read from the dump itself, so localised dumps (e.g. Chinese) are cleaned the same
way; Chinese variant markup -{zh-hans:...;zh-hant:...}- keeps the simplified text. Articles
shorter than --min-chars after cleaning are dropped.

Writes --out (default training_data/<dump name>.jsonl, or .jsonl.gz), atomically, and prints
counts at the end. Feed it to `python tool/prepare_data.py --pretrain FILE`, or to
`python tool/cut_jsonl.py` first to de-duplicate, sample and split it.

Malformed XML (a cut-off download, say) stops with file:line and the column; with
--skip-bad-lines the pages read before it are kept and the next input goes on. Bytes that are not
UTF-8 (or UTF-16), or characters XML forbids, stop at their line too; with --skip-bad-lines only
the page holding them is skipped.
"""

from __future__ import annotations

import argparse
import codecs
import re
import sys
from pathlib import Path
from typing import Any
from xml.parsers import expat

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tool.textio import (COMPRESSED_ERRORS, BadLines, DataError, Outputs, Reader, Stopwatch, add_common_flags,
                         check_paths, default_output, print_summary, run_tool)
from tool.wikitext import clean_wikitext

CHUNK_BYTES = 1 << 20
DEFAULT_MIN_CHARS = 200
# Namespace names known without the dump's <siteinfo> (English and Chinese aliases); the dump's
# own names for namespaces 6 (File), 14 (Category) and -2 (Media) are added when read.
FILE_NAMESPACES = {"file", "image", "media", "文件", "檔案", "档案", "图像", "圖像", "媒体", "媒體"}
CATEGORY_NAMESPACES = {"category", "分类", "分類"}
DROPPED_NAMESPACE_KEYS = {"6", "14", "-2"}
REDIRECT = re.compile(r"\s*#\s*(?:redirect|重定向)", re.I)
# Characters XML 1.0 forbids; expat would stop the whole file at the first one.
XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# Bytes that are not UTF-8 and characters XML forbids are replaced by this noncharacter before
# parsing, so the page that held them can be told and skipped. Real text never contains it.
BAD_CHARACTER = "\U0010fffe"
MARK_ERRORS = "etude-mark-bad-bytes"
codecs.register_error(MARK_ERRORS, lambda exc: (BAD_CHARACTER, exc.end))


class DumpReader:
    """Parses a MediaWiki export with expat, page by page. Only the fields needed are kept and
    each page is forgotten once handled, so memory holds one page at a time. (expat directly,
    rather than ElementTree.iterparse, because it tells the line where each page starts.)"""

    def __init__(self, path: Path, on_page: Any, bad: BadLines):
        self.path, self.on_page, self.bad = path, on_page, bad
        self.dropped_prefixes = set(FILE_NAMESPACES | CATEGORY_NAMESPACES)
        self.namespace_keys: dict[str, str] = {}  # lower-cased name -> key, from <siteinfo>
        self.parser = expat.ParserCreate()
        self.parser.buffer_text = True
        self.parser.buffer_size = 1 << 16
        self.parser.StartElementHandler = self.start
        self.parser.EndElementHandler = self.end
        self.parser.CharacterDataHandler = self.characters
        self.stack: list[str] = []
        self.page: dict[str, Any] | None = None
        self.field: str | None = None
        self.buffer: list[str] = []
        self.namespace_key: str | None = None
        self.encoding = "UTF-8"  # the dump's, for reports (set by feed)

    def start(self, name: str, attrs: dict[str, str]) -> None:
        name = name.rpartition(":")[2]
        parent = self.stack[-1] if self.stack else ""
        self.stack.append(name)
        if name == "page":
            self.page = {"line": self.parser.CurrentLineNumber, "title": "", "ns": None, "text": "",
                         "redirect": False}
        elif self.page is not None:
            if name == "redirect":
                self.page["redirect"] = True
            elif (name in ("title", "ns") and parent == "page") or (name == "text" and parent == "revision"):
                self.field, self.buffer = name, []
        elif name == "namespace" and parent == "namespaces":
            self.namespace_key, self.buffer = attrs.get("key", ""), []

    def characters(self, data: str) -> None:
        if self.field is not None or self.namespace_key is not None:
            self.buffer.append(data)

    def end(self, name: str) -> None:
        name = name.rpartition(":")[2]
        self.stack.pop()
        if self.field == name and self.page is not None:
            self.page[name] = "".join(self.buffer)  # the last revision's text wins in a history dump
            self.field, self.buffer = None, []
        elif name == "namespace" and self.namespace_key is not None:
            namespace = "".join(self.buffer).strip().lower()
            if namespace:
                self.namespace_keys[namespace] = self.namespace_key
                if self.namespace_key in DROPPED_NAMESPACE_KEYS:
                    self.dropped_prefixes.add(namespace)
            self.namespace_key, self.buffer = None, []
        elif name == "page" and self.page is not None:
            page, self.page = self.page, None
            if page["ns"] is None:  # very old dumps have no <ns>: read it off the title
                prefix, colon, _ = page["title"].partition(":")
                page["ns"] = self.namespace_keys.get(prefix.strip().lower(), "0") if colon else "0"
            if BAD_CHARACTER in page["title"] or BAD_CHARACTER in page["text"]:
                self.bad(self.path, page["line"], f"page {page['title'].strip()!r} holds bytes that are not "
                                                  f"{self.encoding} or characters that XML does not allow")
            else:
                self.on_page(page, self.dropped_prefixes)

    def feed(self, reader: Reader, stop: Any) -> None:
        """Parse the whole stream, or until stop() says enough."""
        # The reader hands over UTF-8 whatever the file's encoding (a UTF-16 dump is converted).
        decoder = codecs.getincrementaldecoder("utf-8")(errors=MARK_ERRORS)
        self.encoding = reader.encoding
        line = 1
        while not stop():
            try:
                chunk = reader.stream.read(CHUNK_BYTES)
            except COMPRESSED_ERRORS as exc:
                return self.bad.cut_off(self.path, line, exc)
            reader.tick()
            text = XML_FORBIDDEN.sub(BAD_CHARACTER, decoder.decode(chunk, final=not chunk))
            at = text.find(BAD_CHARACTER)
            if at >= 0 and not self.bad.skip:
                self.bad(self.path, line + text.count("\n", 0, at),
                         f"bytes that are not {self.encoding}, or a character that XML does not allow")
            try:
                self.parser.Parse(text, not chunk)
            except expat.ExpatError as exc:
                self.bad(self.path, exc.lineno, "malformed XML", f"{expat.ErrorString(exc.code)} at column "
                         f"{exc.offset + 1}" + ("; the pages before it are kept" if self.bad.skip else ""))
                return
            line += text.count("\n")
            if not chunk:
                return


class Extractor:
    """Decides what becomes of each page and counts it."""

    def __init__(self, output: Any, namespaces: set[str], min_chars: int, max_pages: int | None):
        self.output, self.namespaces, self.min_chars, self.max_pages = output, namespaces, min_chars, max_pages
        self.counts = {"pages": 0, "articles written": 0, "skipped: redirect": 0, "skipped: other namespace": 0,
                       "skipped: shorter than --min-chars": 0}
        self.chars = 0

    def done(self) -> bool:
        return self.max_pages is not None and self.counts["pages"] >= self.max_pages

    def __call__(self, page: dict[str, Any], dropped_prefixes: set[str]) -> None:
        if self.done():
            return
        self.counts["pages"] += 1
        if page["ns"].strip() not in self.namespaces:
            self.counts["skipped: other namespace"] += 1
        elif page["redirect"] or REDIRECT.match(page["text"]):
            self.counts["skipped: redirect"] += 1
        else:
            text = clean_wikitext(page["text"], dropped_prefixes)
            if len(text) < self.min_chars:
                self.counts["skipped: shorter than --min-chars"] += 1
            else:
                self.output.write_json({"title": page["title"].strip(), "text": text})
                self.counts["articles written"] += 1
                self.chars += len(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="DUMP",
                        help="MediaWiki XML dump(s): .xml, .xml.bz2, .xml.gz or .xml.xz")
    parser.add_argument("--out", type=Path,
                        help="the JSONL to write (.jsonl or .jsonl.gz); default training_data/<dump name>.jsonl")
    parser.add_argument("--min-chars", type=int, default=DEFAULT_MIN_CHARS,
                        help=f"drop articles shorter than this after cleaning (default {DEFAULT_MIN_CHARS})")
    parser.add_argument("--namespaces", nargs="+", default=["0"], metavar="KEY",
                        help="namespace numbers to keep (default 0: articles)")
    parser.add_argument("--max-pages", type=int, help="stop after this many pages (a quick look at a big dump)")
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.min_chars < 0:
            raise DataError(f"--min-chars must be >= 0, got {args.min_chars}")
        if args.max_pages is not None and args.max_pages <= 0:
            raise DataError(f"--max-pages must be > 0, got {args.max_pages}")
        out = args.out or default_output(args.inputs[0], ".jsonl")
        check_paths(args.inputs, [out])
        print(f"extracting articles (namespaces {', '.join(args.namespaces)}) from "
              f"{', '.join(map(str, args.inputs))} -> {out}")
        watch, bad = Stopwatch(), BadLines(args.skip_bad_lines, args.rejects)
        size = 0
        try:
            with Outputs() as outputs:
                extractor = Extractor(outputs.open(out), {k.strip() for k in args.namespaces}, args.min_chars,
                                      args.max_pages)
                for path in args.inputs:
                    if extractor.done():
                        break
                    with Reader(path, progress=not args.no_progress) as reader:
                        DumpReader(path, extractor, bad).feed(reader, extractor.done)
                        size += reader.size
        finally:
            bad.close()
        print_summary(f"wrote {out}", list(extractor.counts.items()) + bad.summary_rows()
                      + [("characters written", extractor.chars)] + watch.rows(size))

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
