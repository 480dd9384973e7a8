"""Inputs as real downloads bring them: Wikipedia markup that the simple cases do not show (file
captions with square brackets, wikilinks inside external-link labels, nowiki, unclosed notes and
brackets), and text files in UTF-16 or with a byte-order mark, for every data tool."""

from __future__ import annotations

import codecs
import gzip
import json
import time

import pytest

from tool import cut_jsonl, cut_txt, extract_xml
from tool.extract_xml import CATEGORY_NAMESPACES, FILE_NAMESPACES
from tool.wikitext import clean_wikitext

from tests.test_data_tools import EXPECTED_ARTICLES, SITEINFO, crafted_dump, page, read_jsonl

DROPPED = FILE_NAMESPACES | CATEGORY_NAMESPACES


def clean(wikitext: str) -> str:
    return clean_wikitext(wikitext, DROPPED)


# ---------------------------------------------------------------------------------------------
# Wikipedia markup, case by case (each as found in real articles)

@pytest.mark.parametrize("wikitext, expected", [
    # a file caption with single square brackets: a chemical name, an editor's [above]
    ("Strained rings.\n[[File:Bicyclobutane.svg|thumb|upright=0.8|Structure of [[bicyclo[1.1.0]butane]] "
     "(see [above])]]\nIt is strained.", "Strained rings.\nIt is strained."),
    ("A [[Image:Cubane.png|thumb|left|Cubane, C<sub>8</sub>H<sub>8</sub>, and [[Bicyclo[1.1.0]butane|its "
     "cousin]] [[Bicyclo[2.2.2]octane]]]] B.", "A B."),
    ("[[File:Map.png|thumb|A map [2] of [[Paris|the city]] ([[File:Icon.svg|10px]] [http://x.org source])]]"
     "Kept.", "Kept."),
    # an external link whose label holds a wikilink
    ("Smith, J. [http://x.org/r.pdf The [[Foo]] report], 2001) and [https://y.org [[Bar|bar]] data].",
     "Smith, J. The Foo report, 2001) and bar data."),
    ("[[Paris|see [http://paris.fr the site]]] and [http://a.org/x] and [mailto:a@b.org write] and "
     "[//c.org protocol-relative]", "see the site and and write and protocol-relative"),
    # single brackets that are text
    ("The interval [0, 1] and [sic] stay; Bicyclo[1.1.0]butane too.",
     "The interval [0, 1] and [sic] stay; Bicyclo[1.1.0]butane too."),
    # nested templates with links and brackets in their arguments
    ("X{{Infobox|a=[[A]]|b={{nowrap|[1]}}|c=[http://x.org y]}}Y {{cite|{{a|{{b}}}}}} Z.", "XY Z."),
    # a table, with links and brackets in its cells, then text
    ("{| class=\"wikitable\"\n|-\n! [[A|a]] !! [b]\n|-\n| [[File:x.png|20px]] || [http://x.org c]\n|}\nAfter.",
     "After."),
    # notes: named, self-closing, with a template, and one never closed (its text stays, and
    # the next note does not swallow what lies between)
    ("One.<ref name=\"a\">{{cite web|url=http://x.org|title=[[T]]}}</ref> Two.<ref name=\"a\" /> Three.<ref>"
     "unclosed note. Four.<ref group=n>Closed.</ref> Five.", "One. Two. Three.unclosed note. Four. Five."),
    # comments, galleries, formulas, code
    ("A<!-- [[File:x.png|thumb|[hidden]]] -->B <gallery>\nFile:a.jpg|[[x]] [y\n</gallery>C "
     "<math>[a, b] \\cup \\{c\\}</math>D <syntaxhighlight lang=c>a[i] = {0};</syntaxhighlight>E",
     "AB C D E"),
    # nowiki: its text as written, markup and all
    ("Write <nowiki>[[Paris]], {{template}} and ''quotes''</nowiki> like that.<nowiki/>",
     "Write [[Paris]], {{template}} and ''quotes'' like that."),
    # unbalanced: stray closers, an unclosed link, an unclosed file link (its paragraph only),
    # an unclosed external link (its label), brackets over a line end
    ("Stray ]] and ] here.\nAn [[unclosed link goes on.\n\nA [[File:x.png|thumb|cut off caption\n\n"
     "Next paragraph. [http://x.org cut label\nand [a\nline]", "Stray and ] here.\nAn unclosed link goes on.\nA\n"
     "Next paragraph. cut label\nand [a\nline]"),
    ("[[A|b [c]] d", "b [c d"),
    # links to the same article in other languages show nothing; [[:fr:...]] and labelled ones do
    ("Text.\n[[fr:Paris]]\n[[zh-yue:巴黎]]\n[[:fr:Paris]], [[wikt:word|word]]", "Text.\nfr:Paris, word"),
])
def test_real_markup_leaves_no_debris(wikitext, expected):
    assert clean(wikitext) == expected


@pytest.mark.parametrize("wikitext, tail", [
    ("[a " * 50_000 + "\n\nEnd.", "End."),
    ("[[a " * 50_000 + "\n\nEnd.", "End."),
    ("[[File:x.png|" * 20_000 + "\n\nEnd.", "End."),
    ("]]" * 100_000 + "End.", "End."),
    ("[" * 100_001 + "x" + "]" * 100_001 + " End.", "End."),
    ("[[a|" * 30_000 + "]]" * 30_000 + " End.", "End."),
    ("{{" * 50_000 + "\n\nEnd.", "End."),
    ("{{a\n\n" * 5_000 + "End.", "End."),  # each unclosed template takes its paragraph only
    ("{|\n\n" * 5_000 + "End.", "End."),
    ("<ref>" * 50_000 + "End.", "End."),
    ("<nowiki>" * 50_000 + "End.", "End."),
    ("-{" * 50_000 + " End.", "End."),
])
def test_pathological_brackets_terminate_quickly_and_keep_what_follows(wikitext, tail):
    start = time.perf_counter()
    text = clean(wikitext)
    assert time.perf_counter() - start < 5  # linear: well under a second on an idle core
    assert text.endswith(tail)


def test_file_links_with_bracketed_captions_in_a_dump(tmp_path):
    """The cases from a real enwiki dump, end to end: nothing of the file links shows."""
    article = ("'''Bicyclobutane''' is a [[bicyclic molecule]].\n"
               "[[File:Bicyclo-1.1.0-butane.svg|thumb|Skeletal formula of bicyclo[1.1.0]butane [above]]]\n"
               "It was first made in 1959.<ref>Wiberg, K. [http://doi.org/x The [[strain]] of rings], 1959)</ref> "
               "See [http://example.org The [[Wiberg]] papers], 2001).\n")
    dump = tmp_path / "enwiki.xml"
    dump.write_text(SITEINFO + page("Bicyclobutane", 0, article) + "</mediawiki>\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "0", "--no-progress"]) == 0
    assert read_jsonl(out) == [{"title": "Bicyclobutane", "text": "Bicyclobutane is a bicyclic molecule.\n"
                                "It was first made in 1959. See The Wiberg papers, 2001)."}]


# ---------------------------------------------------------------------------------------------
# byte-order marks and UTF-16

ENCODINGS = [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
             ("utf-8", codecs.BOM_UTF8), ("utf-32-le", codecs.BOM_UTF32_LE)]


def encode(text: str, encoding: str, mark: bytes) -> bytes:
    return mark + text.encode(encoding)


@pytest.mark.parametrize("encoding, mark", ENCODINGS)
def test_extract_xml_reads_dumps_with_a_byte_order_mark(tmp_path, encoding, mark):
    xml = crafted_dump()
    if encoding != "utf-8":  # as such a dump declares itself
        xml = f'<?xml version="1.0" encoding="{encoding.upper()[:6]}"?>\n' + xml
    for name in ("wiki.xml", "wiki.xml.gz"):
        data = encode(xml, encoding, mark)
        dump = tmp_path / name
        dump.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        out = tmp_path / "out.jsonl"
        assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "20", "--no-progress"]) == 0
        assert read_jsonl(out) == EXPECTED_ARTICLES


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_mark_is_recognised_by_its_zero_bytes(tmp_path, encoding):
    dump = tmp_path / "wiki.xml"
    dump.write_bytes(crafted_dump().encode(encoding))
    out = tmp_path / "out.jsonl"
    assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "20", "--no-progress"]) == 0
    assert read_jsonl(out) == EXPECTED_ARTICLES
    lines = tmp_path / "docs.jsonl"
    lines.write_bytes('{"text": "ünïcode 中文"}\n'.encode(encoding))
    assert cut_jsonl.main([str(lines), "--out-dir", str(tmp_path), "--name", "kept", "--no-progress"]) == 0
    assert read_jsonl(tmp_path / "kept.jsonl") == [{"text": "ünïcode 中文"}]


def test_utf16_converted_in_pieces_that_split_characters(tmp_path, monkeypatch):
    """UTF-16 is converted to UTF-8 a piece at a time: pieces of 7 bytes split code units and
    surrogate pairs (the emoji), and the text still comes out whole."""
    monkeypatch.setattr("tool.textio.TRANSCODE_BYTES", 7)
    text = "First 😀 sentence. 中文句子。\n\nSecond paragraph, é and 🎉.\n"
    source = tmp_path / "book.txt"
    source.write_bytes(encode(text, "utf-16-be", codecs.BOM_UTF16_BE))
    out = tmp_path / "out.jsonl"
    assert cut_txt.main([str(source), "--out", str(out), "--no-progress"]) == 0
    assert [r["text"] for r in read_jsonl(out)] == [text.strip()]


@pytest.mark.parametrize("encoding, mark", ENCODINGS)
def test_cut_txt_and_cut_jsonl_read_byte_order_marks(tmp_path, encoding, mark):
    book = tmp_path / "book.txt"
    book.write_bytes(encode("Line one. 中文。\r\n\r\nLine two 😀.\n", encoding, mark))
    out = tmp_path / "samples.jsonl"
    assert cut_txt.main([str(book), "--out", str(out), "--no-progress"]) == 0
    assert [r["text"] for r in read_jsonl(out)] == ["Line one. 中文。\n\nLine two 😀."]

    records = [{"text": "héllo 中文"}, {"text": "second"}]
    lines = tmp_path / "docs.jsonl"
    lines.write_bytes(encode("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding, mark))
    array = tmp_path / "docs.json"
    array.write_bytes(encode(json.dumps(records, ensure_ascii=False, indent=1), encoding, mark))
    for source in (lines, array):
        assert cut_jsonl.main([str(source), "--out-dir", str(tmp_path), "--name", "kept", "--no-progress"]) == 0
        assert read_jsonl(tmp_path / "kept.jsonl") == records  # written as UTF-8


def test_bad_utf16_is_reported_at_its_line(tmp_path, capsys):
    lone_surrogate = b"\x00\xd8"  # a high surrogate with no low one after it
    data = (codecs.BOM_UTF16_LE + "Good line.\n".encode("utf-16-le") + lone_surrogate + "bad\n".encode("utf-16-le")
            + "\nAnother paragraph.\n".encode("utf-16-le"))
    source = tmp_path / "book.txt"
    source.write_bytes(data)
    out = tmp_path / "out.jsonl"
    assert cut_txt.main([str(source), "--out", str(out), "--no-progress"]) == 2
    assert f"error: {source}:2: not UTF-16-LE (an unpaired surrogate" in capsys.readouterr().err
    assert cut_txt.main([str(source), "--out", str(out), "--no-progress", "--skip-bad-lines"]) == 0
    assert [r["text"] for r in read_jsonl(out)] == ["Good line.\n\nAnother paragraph."]

    good = page("Good", 0, "A good article that is long enough.")
    dump = tmp_path / "bad.xml"
    dump.write_bytes(codecs.BOM_UTF16_LE + (SITEINFO + good).encode("utf-16-le")
                     + page("Broken", 0, "Text @ here.").encode("utf-16-le").replace("@".encode("utf-16-le"),
                                                                                     lone_surrogate)
                     + "</mediawiki>\n".encode("utf-16-le"))
    assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "0", "--no-progress"]) == 2
    assert "bytes that are not UTF-16-LE" in capsys.readouterr().err
    assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "0", "--no-progress",
                             "--skip-bad-lines"]) == 0
    assert [r["title"] for r in read_jsonl(out)] == ["Good"]
