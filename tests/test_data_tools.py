"""The data tools (tool/extract_xml.py, cut_txt.py, cut_jsonl.py, cut_jsonl_sft.py) on small inputs
that the tests write: exact outputs, every bad line reported as file:line, compressed inputs and
outputs, and prepare_data.py taking what they write."""

from __future__ import annotations

import bz2
import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from config import ROOT
from model.tokenizer import load_tokenizer
from tool import cut_jsonl, cut_jsonl_sft, cut_txt, extract_xml
from tool.extract_xml import CATEGORY_NAMESPACES, FILE_NAMESPACES, clean_wikitext
from tool.prepare_data import main as prepare_data_main

TOOLS = ("extract_xml", "cut_txt", "cut_jsonl", "cut_jsonl_sft")


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# extract_xml


def page(title: str, ns: int, text: str, redirect: str | None = None, old_text: str | None = None) -> str:
    redirect_tag = f'<redirect title="{escape(redirect)}" />' if redirect else ""
    revisions = "".join(f'<revision><id>1</id><text xml:space="preserve">{escape(t)}</text></revision>'
                        for t in ([old_text] if old_text else []) + [text])
    return f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    {redirect_tag}{revisions}\n  </page>\n"


PARIS = """{{Short description|Capital of France}}
{{Infobox settlement
| name = Paris
| population = {{formatnum:2102650}} {{small|(2023)}}
}}
'''Paris''' ({{IPA|fr|paʁi|lang}}; ''French'') is the [[capital city|capital]] of [[France]].<ref name="insee">{{cite web|url=https://insee.fr|title=Population}}</ref> It lies on the [[Seine]].<ref name="insee" /><!-- a comment
over two lines -->
[[Datei:Paris Eiffel.jpg|thumb|The [[Eiffel Tower]] in [[Paris]]]]
The city has about 2.1&nbsp;million people, see [https://paris.fr the city site].

== History ==
Paris was founded by the ''Parisii''.{{sfn|Smith|2001|p=3}}
{| class="wikitable"
|-
! Year !! Population
|-
| 1900 || {{formatnum:2714068}}
|}

=== Middle Ages ===
{{Main|Paris in the Middle Ages}}

== See also ==
* {{Portal|France}}

== References ==
{{Reflist}}

[[Kategorie:Capitals in Europe]]
[[Category:Cities in France]]
"""

BEIJING = """{{Infobox 城市|名称=北京}}
'''北京市'''，简称“'''京'''”，是[[中华人民共和国]]的[[首都|首都]]。<ref>{{cite book|title=北京}}</ref>北京有很多-{zh-hans:计算机;zh-hant:電腦}-公司。
[[文件:Beijing.jpg|缩略图|北京的[[天安门]]]]

== 历史 ==
北京已有三千多年的建城史。

[[分类:中华人民共和国首都]]
"""

SITEINFO = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">
  <siteinfo>
    <sitename>Testwiki</sitename>
    <namespaces>
      <namespace key="-2" case="first-letter">Media</namespace>
      <namespace key="0" case="first-letter" />
      <namespace key="1" case="first-letter">Talk</namespace>
      <namespace key="6" case="first-letter">Datei</namespace>
      <namespace key="14" case="first-letter">Kategorie</namespace>
    </namespaces>
  </siteinfo>
"""

EXPECTED_ARTICLES = [
    {"title": "Paris",
     "text": "Paris (French) is the capital of France. It lies on the Seine.\n"
             "The city has about 2.1 million people, see the city site.\n"
             "History\n"
             "Paris was founded by the Parisii."},
    {"title": "北京",
     "text": "北京市，简称“京”，是中华人民共和国的首都。北京有很多计算机公司。\n历史\n北京已有三千多年的建城史。"},
]


def crafted_dump() -> str:
    """Nested templates, refs, a table, a file with a linked caption, localised File/Category
    names (from <siteinfo>), two redirects (element and #重定向), a talk page, Chinese text and
    variant markup, a stub under --min-chars, and an older revision before the current one."""
    return (SITEINFO
            + page("Paris", 0, PARIS, old_text="An old revision of the article, long enough to be kept if read.")
            + page("Paris, France", 0, "#REDIRECT [[Paris]]", redirect="Paris")
            + page("北京市", 0, "#重定向 [[北京]]")
            + page("Talk:Paris", 1, "This talk page is long enough to pass the length filter, but is not an article.")
            + page("北京", 0, BEIJING)
            + page("Tiny", 0, "'''Tiny''' is short.")
            + "</mediawiki>\n")


def test_extract_xml_crafted_dump_exact(tmp_path, capsys):
    dump = tmp_path / "testwiki.xml"
    dump.write_text(crafted_dump(), encoding="utf-8")
    out = tmp_path / "articles.jsonl"
    assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "20", "--no-progress"]) == 0
    assert read_jsonl(out) == EXPECTED_ARTICLES
    summary = capsys.readouterr().out
    for name, count in (("pages", 6), ("articles written", 2), ("skipped: redirect", 2),
                        ("skipped: other namespace", 1), ("skipped: shorter than --min-chars", 1)):
        assert re.search(rf"^  {re.escape(name)} +{count}$", summary, re.M), (name, summary)


def test_extract_xml_compressed_dumps_and_namespaces(tmp_path):
    xml = crafted_dump().encode("utf-8")
    (tmp_path / "w.xml.bz2").write_bytes(bz2.compress(xml))
    (tmp_path / "w.xml.gz").write_bytes(gzip.compress(xml))
    for name in ("w.xml.bz2", "w.xml.gz"):
        out = tmp_path / f"{name}.jsonl.gz"
        assert extract_xml.main([str(tmp_path / name), "--out", str(out), "--min-chars", "20", "--no-progress"]) == 0
        assert read_jsonl(out) == EXPECTED_ARTICLES
    # the talk namespace on its own; --max-pages stops early
    out = tmp_path / "talk.jsonl"
    assert extract_xml.main([str(tmp_path / "w.xml.gz"), "--out", str(out), "--namespaces", "1", "--min-chars", "0",
                             "--no-progress"]) == 0
    assert [r["title"] for r in read_jsonl(out)] == ["Talk:Paris"]
    assert extract_xml.main([str(tmp_path / "w.xml.gz"), "--out", str(out), "--max-pages", "1", "--min-chars", "0",
                             "--no-progress"]) == 0
    assert [r["title"] for r in read_jsonl(out)] == ["Paris"]


@pytest.mark.parametrize("wikitext, expected", [
    ("A {{outer|x={{inner|{{deep}}}}|y}} B", "A B"),
    ("Start {{broken template\n| never closed\n\nThe next paragraph stays.", "Start\nThe next paragraph stays."),
    ("[[Paris (band)|]] and [[:Category:Cities|the cities]] and [[:Category:Towns]][[Category:Hidden]]",
     "Paris and the cities and Category:Towns"),
    ("[[File:a.jpg|thumb|caption with [[link]] and [http://x.org ext]]] after", "after"),
    ("'''''both''''' ''italic'' '''bold''' l'homme", "both italic bold l'homme"),
    ("== Kept ==\ntext\n=== Empty ===\n== Also kept ==\n=== Sub ===\nmore\n== Trailing ==\n{{reflist}}",
     "Kept\ntext\nAlso kept\nSub\nmore"),
    ("* one\n# two\n: three\n----\nx &amp; y&nbsp;z &lt;b&gt;", "one\ntwo\nthree\nx & y z <b>"),
    ("a<br/>b <span class=\"x\">c</span><sup>1</sup> <math>x^2</math><gallery>\nFile:a.jpg\n</gallery>",
     "a\nb c1"),
    ("{| class=t\n| {| nested\n| x\n|}\n| y\n|}\nAfter.<!-- note -->", "After."),
    ("-{H|zh-hans:计算机;zh-hant:電腦}-电脑-{zh-hant:軟體;zh-hans:软件}-（{{lang|en|x}}；英语）",
     "电脑软件（英语）"),
])
def test_clean_wikitext(wikitext, expected):
    assert clean_wikitext(wikitext, FILE_NAMESPACES | CATEGORY_NAMESPACES) == expected


def test_extract_xml_bad_bytes_and_broken_xml(tmp_path, capsys):
    good = page("Good", 0, "A good article that is long enough.")
    bad_page = page("Broken", 0, "Text with a bad byte: @ here.").encode("utf-8").replace(b"@", b"\xff")
    dump = tmp_path / "bad.xml"
    dump.write_bytes(SITEINFO.encode() + good.encode() + bad_page + good.encode().replace(b"Good", b"Also good")
                     + b"</mediawiki>\n")
    bad_line = SITEINFO.count("\n") + good.count("\n") + 4  # the <revision> line of the broken page
    out = tmp_path / "out.jsonl"
    assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "0", "--no-progress"]) == 2
    assert f"error: {dump}:{bad_line}: bytes that are not UTF-8" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written
    assert extract_xml.main([str(dump), "--out", str(out), "--min-chars", "0", "--no-progress",
                             "--skip-bad-lines"]) == 0
    assert [r["title"] for r in read_jsonl(out)] == ["Good", "Also good"]
    page_line = SITEINFO.count("\n") + good.count("\n") + 1
    assert f"skipped {dump}:{page_line}: page 'Broken' holds bytes that are not UTF-8" in capsys.readouterr().err

    cut = tmp_path / "cut.xml"  # a download cut off inside the second page
    text = SITEINFO + good + good.replace("Good", "Second")
    cut.write_text(text[:-40], encoding="utf-8")
    assert extract_xml.main([str(cut), "--out", str(out), "--min-chars", "0", "--no-progress"]) == 2
    assert re.search(rf"error: {re.escape(str(cut))}:\d+: malformed XML \(no element found", capsys.readouterr().err)
    assert extract_xml.main([str(cut), "--out", str(out), "--min-chars", "0", "--no-progress",
                             "--skip-bad-lines"]) == 0
    assert [r["title"] for r in read_jsonl(out)] == ["Good"]


# ---------------------------------------------------------------------------------------------
# cut_txt

BOOK = """First paragraph has two sentences. This is the second one!

Second paragraph. It is short.
It wraps over a line.

这是中文段落。它有两个句子！还有第三个？

A long sentence without any end A long sentence without any end A long sentence without any end
"""


def run_cut_txt(tmp_path: Path, text: str | bytes, *flags: str, name: str = "book.txt") -> list[str]:
    source = tmp_path / name
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    source.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    out = tmp_path / "samples.jsonl"
    assert cut_txt.main([str(source), "--out", str(out), "--no-progress", *flags]) == 0
    return [r["text"] for r in read_jsonl(out)]


def test_cut_txt_paragraphs_then_sentences_exact(tmp_path):
    assert run_cut_txt(tmp_path, BOOK, "--max-chars", "80") == [
        "First paragraph has two sentences. This is the second one!",
        "Second paragraph. It is short.\nIt wraps over a line.\n\n这是中文段落。它有两个句子！还有第三个？",
        "A long sentence without any end A long sentence without any end A long sentence",
        "without any end"]
    # 40 characters: paragraphs are cut at sentence ends; at "还有第三个？" the sample is cut before
    # the open paragraph (the head fills half a sample), so the Chinese paragraph stays whole
    assert run_cut_txt(tmp_path, BOOK, "--max-chars", "40") == [
        "First paragraph has two sentences.", "This is the second one!",
        "Second paragraph. It is short.", "It wraps over a line.", "这是中文段落。它有两个句子！还有第三个？",
        "A long sentence without any end A long", "sentence without any end A long", "sentence without any end"]
    assert run_cut_txt(tmp_path, "这是一个没有空格的很长的句子" * 3 + "\n", "--max-chars", "16") == [
        "这是一个没有空格的很长的句子这是", "一个没有空格的很长的句子这是一个", "没有空格的很长的句子"]


def test_cut_txt_cuts_at_a_paragraph_only_when_that_fills_half_a_sample(tmp_path):
    long_paragraph = "Sentence one is here. Sentence two is here. Sentence three is here.\n"
    # "Short one." is 10 of 60 characters: cutting after it would waste the sample
    assert run_cut_txt(tmp_path, "Short one.\n\n" + long_paragraph, "--max-chars", "60") == [
        "Short one.\n\nSentence one is here. Sentence two is here.", "Sentence three is here."]
    # here the paragraph before fills 34 of 60, so the cut goes between the paragraphs
    assert run_cut_txt(tmp_path, "A first paragraph of some length.\n\n" + long_paragraph, "--max-chars", "60") == [
        "A first paragraph of some length.", "Sentence one is here. Sentence two is here.",
        "Sentence three is here."]


def test_cut_txt_overlap_exact(tmp_path):
    assert run_cut_txt(tmp_path, BOOK, "--max-chars", "60", "--overlap", "30") == [
        "First paragraph has two sentences. This is the second one!",
        "This is the second one!\n\nSecond paragraph. It is short.",
        "Second paragraph. It is short.\nIt wraps over a line.",
        "It wraps over a line.\n\n这是中文段落。它有两个句子！还有第三个？",
        "A long sentence without any end A long sentence without any",
        "end A long sentence without any end"]


def test_cut_txt_loses_and_repeats_nothing(tmp_path, monkeypatch):
    """Random text of English and Chinese sentences, cut at several limits while read in 7-byte
    pieces (multi-byte characters split across reads): every sample fits, and the samples put
    back together are the text."""
    monkeypatch.setattr(cut_txt, "LINE_CHUNK", 7)
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran far away".split()
    paragraphs = []
    for _ in range(40):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.3:
                sentences.append("".join(rng.choice("天气很好我们学习中文") for _ in range(rng.randint(3, 30)))
                                 + rng.choice("。！？"))
            else:
                sentences.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 25))).capitalize()
                                 + rng.choice(".!?"))
        paragraphs.append(" ".join(sentences))
    text = "\n\n".join(paragraphs) + "\n"
    for limit in (30, 100, 500):
        samples = run_cut_txt(tmp_path, text, "--max-chars", str(limit))
        assert max(map(len, samples)) <= limit
        assert re.sub(r"\s+", "", "".join(samples)) == re.sub(r"\s+", "", text)


def test_cut_txt_tokens(tmp_path, tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    text = BOOK * 3
    samples = run_cut_txt(tmp_path, text, "--max-tokens", "24", "--tokenizer", str(tiny_tokenizer_dir))
    assert max(len(tokenizer.encode(s)) for s in samples) <= 24
    assert re.sub(r"\s+", "", "".join(samples)) == re.sub(r"\s+", "", text)
    assert len(samples) > len(run_cut_txt(tmp_path, text, "--max-chars", "2000"))
    # runs without a sentence end or a space, where a cut may fall inside a multi-token character
    text = "很长的中文句子没有标点符号" * 40 + "\n\n" + "word" * 300 + "\n"
    samples = run_cut_txt(tmp_path, text, "--max-tokens", "16", "--tokenizer", str(tiny_tokenizer_dir))
    assert max(len(tokenizer.encode(s)) for s in samples) <= 16 and len(samples) > 40
    assert re.sub(r"\s+", "", "".join(samples)) == re.sub(r"\s+", "", text)


def test_cut_txt_bad_bytes_crlf_and_gzip(tmp_path, capsys):
    data = b"Good line one.\r\nBad \xff\xfe line.\r\n\r\nLast paragraph here.\r\n"
    source = tmp_path / "bad.txt"
    source.write_bytes(data)
    assert cut_txt.main([str(source), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    assert f"error: {source}:2: not UTF-8 (byte 0xff)" in capsys.readouterr().err
    assert run_cut_txt(tmp_path, data, "--skip-bad-lines", name="bad.txt.gz") == [
        "Good line one.\n\nLast paragraph here."]
    assert "bad.txt.gz:2: not UTF-8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# cut_jsonl


def docs(n: int) -> list[dict]:
    return [{"text": f"document {i} " + "word " * (i % 7), "id": i} for i in range(n)]


def test_cut_jsonl_filters_and_dedup_keep_order(tmp_path, capsys):
    records = docs(10) + [{"text": "document 3 " + "word " * 3, "id": "copy"},  # same text as id 3
                          {"conversations": [{"role": "user", "content": "hi"}]}]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    with open(source, "a", encoding="utf-8") as handle:
        handle.write('{"text": "no closing quote}\n[1, 2]\n')
    out = tmp_path / "out"
    assert cut_jsonl.main([str(source), "--out-dir", str(out), "--no-progress"]) == 2
    assert f"error: {source}:13: not valid JSON" in capsys.readouterr().err
    assert cut_jsonl.main([str(source), "--out-dir", str(out), "--dedup", "--min-chars", "12", "--max-chars", "30",
                           "--skip-bad-lines", "--no-progress"]) == 0
    kept = [r["id"] for r in read_jsonl(out / "in.jsonl")]
    assert kept == [1, 2, 3, 8, 9]  # 11 + 5 * (id % 7) characters in [12, 30]; "copy" repeats id 3
    summary = capsys.readouterr().out
    assert re.search(r"dropped: duplicate +1$", summary, re.M)
    assert re.search(r"skipped: not valid JSON +1$", summary, re.M)
    assert re.search(r"skipped: not a JSON object +1$", summary, re.M)
    # raw lines go out exactly as they came in
    lines = source.read_text(encoding="utf-8").splitlines()
    assert (out / "in.jsonl").read_text(encoding="utf-8").splitlines() == [lines[i] for i in kept]
    assert re.search(r"dropped: shorter than --min-chars +3$", summary, re.M)  # ids 0, 7 and the chat
    assert re.search(r"dropped: longer than --max-chars +3$", summary, re.M)  # ids 4, 5, 6


def test_cut_jsonl_shuffle_sample_split_shards(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", docs(1000))
    out = tmp_path / "out"
    flags = [str(source), "--out-dir", str(out), "--name", "pretrain", "--shuffle", "--sample", "700",
             "--val-lines", "50", "--shard-lines", "200", "--seed", "3", "--no-progress"]
    assert cut_jsonl.main(flags) == 0
    shards = sorted(out.glob("pretrain-*.jsonl"))
    assert [p.name for p in shards] == [f"pretrain-{i:05d}.jsonl" for i in range(4)]
    train = [r["id"] for p in shards for r in read_jsonl(p)]
    val = [r["id"] for r in read_jsonl(out / "pretrain.val-00000.jsonl")]
    assert [len(read_jsonl(p)) for p in shards] == [200, 200, 200, 50]
    assert len(val) == 50 and not set(train) & set(val) and len(set(train + val)) == 700
    assert train != sorted(train)  # shuffled
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cut_jsonl.main(flags) == 0  # the same seed gives the same bytes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # without --shuffle the sample keeps the input order; gzip in and out
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(source.read_bytes()))
    assert cut_jsonl.main([str(gz), "--out-dir", str(out), "--sample", "100", "--val-fraction", "0.1", "--gzip",
                           "--no-progress"]) == 0
    train = [r["id"] for r in read_jsonl(out / "in.jsonl.gz")]
    val = [r["id"] for r in read_jsonl(out / "in.val.jsonl.gz")]
    assert len(train) == 90 and len(val) == 10 and train == sorted(train) and val == sorted(val)


def test_bucket_shuffle_spills_again_when_a_bucket_is_too_big(tmp_path):
    path = tmp_path / "bucket"
    lines = [f"line {i}".encode() for i in range(2000)]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    out = list(cut_jsonl.shuffled(path, 1000, random.Random(0)))  # ~17 KB through a 1 KB buffer
    assert sorted(out) == sorted(lines) and out != lines
    assert list(tmp_path.iterdir()) == []


def test_selection_sampling_is_exact_and_uniform():
    rng = random.Random(0)
    hits = [0] * 10
    for _ in range(2000):
        flags = list(cut_jsonl.select(10, 3, rng))
        assert sum(flags) == 3
        hits = [h + f for h, f in zip(hits, flags)]
    assert all(abs(h / 2000 - 0.3) < 0.05 for h in hits)


def test_cut_jsonl_refuses_bad_flags_and_overwriting_its_input(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", docs(5))
    assert cut_jsonl.main([str(source), "--out-dir", str(tmp_path), "--no-progress"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert cut_jsonl.main([str(source), "--sample", "0", "--val-fraction", "1.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--sample must be >= 1, got 0" in err and "--val-fraction must be in [0, 1), got 1.5" in err
    assert source.read_text(encoding="utf-8").count("\n") == 5


# ---------------------------------------------------------------------------------------------
# cut_jsonl_sft

SFT_INPUT = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "hello", "output": "bonjour", "system": "You translate.",
     "history": [["Hi", "Hello!"]]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Bye?"}], "system": ""},
    {"messages": [{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Why "}, {"type": "text", "text": "so?"}]},
                  {"role": "assistant", "content": "Because."}]},
    {"conversations": [{"role": "system", "content": ""}, {"role": "user", "content": "你好"},
                       {"role": "assistant", "content": "你好！"}]},
    {"question": "2+2?", "answer": "4"},
    {"prompt": "Name a colour.", "completion": "Blue."},
    # the rejected ones
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "x"}]},
    {"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None}]},
    {"messages": [{"role": "user", "content": "look"}, {"role": "tool", "content": "{}"}]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                  {"role": "system", "content": "late"}]},
    {"instruction": "only a question"},
    {"messages": [{"role": "user", "content": "unanswered"}]},
]
SFT_EXPECTED = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "You translate."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Translate to French.\n\nhello"},
     {"role": "assistant", "content": "bonjour"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why so?"},
     {"role": "assistant", "content": "Because."}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]
SFT_REJECTS = [
    "8: two user messages in a row (message 1)",
    "9: starts with an assistant message (message 0; the first turn must be the user's)",
    "10: a message has no text content (message 1: content is NoneType (a tool call?))",
    "11: unsupported role 'tool' (message 1; supported: system, developer, user, assistant)",
    "12: an empty assistant message (message 1)",
    "13: a system message after the start (message 2)",
    "14: unknown shape (keys instruction; expected alpaca (instruction/output), sharegpt (conversations with "
    "from/value), openai (messages) or a question/answer pair)",
    "15: no assistant reply",
    "16: not UTF-8 (byte 0xff at column 11)",
]


def test_cut_jsonl_sft_converts_every_format_exactly(tmp_path, capsys):
    source = write_jsonl(tmp_path / "mixed.jsonl", SFT_INPUT)
    with open(source, "ab") as handle:
        handle.write(b'{"text": "\xff"}\n')
    out, rejects = tmp_path / "sft.jsonl", tmp_path / "rejects.txt"
    assert cut_jsonl_sft.main([str(source), "--out", str(out), "--no-progress"]) == 2
    assert f"error: {source}:{SFT_REJECTS[0]}" in capsys.readouterr().err
    assert not out.exists()
    assert cut_jsonl_sft.main([str(source), "--out", str(out), "--skip-bad-lines", "--rejects", str(rejects),
                               "--no-progress"]) == 0
    assert [r["conversations"] for r in read_jsonl(out)] == SFT_EXPECTED
    assert rejects.read_text(encoding="utf-8").splitlines() == [f"{source}:{r}" for r in SFT_REJECTS]
    summary = capsys.readouterr().out
    for name, count in (("conversations written", 7), ("from alpaca", 2), ("from openai", 1), ("from sharegpt", 1),
                        ("from etude", 1), ("from qa", 2), ("unanswered last user message removed", 1),
                        ("empty system message removed", 1), ("skipped: no assistant reply", 1)):
        assert re.search(rf"^  {re.escape(name)} +{count}$", summary, re.M), (name, summary)


def test_cut_jsonl_sft_system_prompt_and_forced_format(tmp_path, capsys):
    source = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": "Hello."},
                                                  {"q": "Own?", "a": "Yes.", "system": "Own prompt."}])
    out = tmp_path / "out.jsonl"
    assert cut_jsonl_sft.main([str(source), "--out", str(out), "--system", "Be kind.", "--no-progress"]) == 0
    assert [r["conversations"][0]["content"] for r in read_jsonl(out)] == ["Be kind.", "Own prompt."]
    assert cut_jsonl_sft.main([str(source), "--out", str(out), "--format", "alpaca", "--no-progress"]) == 2
    assert f'{source}:1: "instruction" is missing or not a string (keys present: a, q)' in capsys.readouterr().err


def test_json_array_files_are_streamed_element_by_element(tmp_path, capsys, monkeypatch):
    """Alpaca and ShareGPT data often come as one JSON array; read in 5-byte pieces here, so that
    elements, numbers and multi-byte characters straddle reads."""
    monkeypatch.setattr("tool.textio.ARRAY_READ_BYTES", 5)
    records = [SFT_INPUT[0], SFT_INPUT[1], 12345, {"q": "两个字？", "a": "好。"}]
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert cut_jsonl_sft.main([str(source), "--out", str(out), "--no-progress"]) == 2
    number_line = json.dumps(records, indent=2).splitlines().index("  12345,") + 1
    assert f"error: {source}:{number_line}: not a JSON object (got int: 12345)" in capsys.readouterr().err
    assert cut_jsonl_sft.main([str(source), "--out", str(out), "--skip-bad-lines", "--no-progress"]) == 0
    assert [r["conversations"] for r in read_jsonl(out)] == SFT_EXPECTED[:2] + [
        [{"role": "user", "content": "两个字？"}, {"role": "assistant", "content": "好。"}]]
    # cut_jsonl turns an array into JSONL (compact, one element per line), gzip in
    packed = tmp_path / "packed.json.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    assert cut_jsonl.main([str(packed), "--out-dir", str(tmp_path), "--name", "lines", "--skip-bad-lines",
                           "--no-progress"]) == 0
    assert (tmp_path / "lines.jsonl").read_text(encoding="utf-8").splitlines() == [
        json.dumps(r, ensure_ascii=False) for r in records if isinstance(r, dict)]
    # an array cut off inside its third element: the first two are kept, the break is reported
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records[:1] + records[3:] * 2, indent=2, ensure_ascii=False)[:-25], encoding="utf-8")
    assert cut_jsonl_sft.main([str(broken), "--out", str(out), "--skip-bad-lines", "--no-progress"]) == 0
    assert len(read_jsonl(out)) == 2
    assert re.search(rf"{re.escape(str(broken))}:\d+: not valid JSON \(.* in the element starting at line \d+; "
                     r"the rest of the array cannot be read\)", capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# together


def test_prepare_data_takes_every_tool_output(tmp_path, capsys):
    """A wiki dump and a book to pretraining text, mixed SFT data to conversations, through
    cut_jsonl, then into prepare_data.py unchanged."""
    dump = tmp_path / "wiki.xml.bz2"
    dump.write_bytes(bz2.compress(crafted_dump().encode("utf-8")))
    assert extract_xml.main([str(dump), "--out", str(tmp_path / "wiki.jsonl"), "--min-chars", "20",
                             "--no-progress"]) == 0
    (tmp_path / "book.txt").write_text(BOOK, encoding="utf-8")
    assert cut_txt.main([str(tmp_path / "book.txt"), "--out", str(tmp_path / "book.jsonl"), "--max-chars", "80",
                         "--no-progress"]) == 0
    assert cut_jsonl.main([str(tmp_path / "wiki.jsonl"), str(tmp_path / "book.jsonl"), "--out-dir",
                           str(tmp_path / "cut"), "--name", "mixed", "--dedup", "--shuffle", "--no-progress"]) == 0
    source = write_jsonl(tmp_path / "chats.jsonl", SFT_INPUT[:7])
    assert cut_jsonl_sft.main([str(source), "--out", str(tmp_path / "chats.sft.jsonl"), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "training_data"
    assert prepare_data_main(["--pretrain", str(tmp_path / "cut" / "mixed.jsonl"), "--sft",
                              str(tmp_path / "chats.sft.jsonl"), "--out-dir", str(out), "--val-fraction", "0.2"]) == 0
    pretrain = read_jsonl(out / "pretrain.jsonl") + read_jsonl(out / "pretrain.val.jsonl")
    assert sorted(r["text"] for r in pretrain) == sorted([a["text"] for a in EXPECTED_ARTICLES] + [
        "First paragraph has two sentences. This is the second one!",
        "Second paragraph. It is short.\nIt wraps over a line.\n\n这是中文段落。它有两个句子！还有第三个？",
        "A long sentence without any end A long sentence without any end A long sentence",
        "without any end"])
    sft = read_jsonl(out / "sft.jsonl") + read_jsonl(out / "sft.val.jsonl")
    assert sorted(json.dumps(r["conversations"]) for r in sft) == sorted(json.dumps(c) for c in SFT_EXPECTED)


def test_cut_off_compressed_inputs_are_reported_not_crashed_on(tmp_path, capsys):
    """A download that stopped early: each tool names the file and the line where it breaks; with
    --skip-bad-lines what came before is kept."""
    records = docs(3000)
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    source = tmp_path / "cut.jsonl.gz"
    source.write_bytes(whole[:len(whole) // 2])
    out = tmp_path / "out"
    assert cut_jsonl.main([str(source), "--out-dir", str(out), "--no-progress"]) == 2
    assert re.search(rf"error: {re.escape(str(source))}:\d+: compressed data is corrupt or cut off",
                     capsys.readouterr().err)
    assert not out.exists() or not list(out.iterdir())
    assert cut_jsonl.main([str(source), "--out-dir", str(out), "--skip-bad-lines", "--no-progress"]) == 0
    kept = read_jsonl(out / "cut.jsonl")
    assert 0 < len(kept) < 3000 and kept == records[:len(kept)]

    book = tmp_path / "book.txt.bz2"
    book.write_bytes(bz2.compress(("A sentence here. " * 20 + "\n\n").encode() * 500)[:-100])
    assert cut_txt.main([str(book), "--out", str(tmp_path / "b.jsonl"), "--no-progress"]) == 2
    assert f"error: {book}:" in capsys.readouterr().err
    dump = tmp_path / "wiki.xml.gz"
    dump.write_bytes(gzip.compress(crafted_dump().encode())[:-60])
    assert extract_xml.main([str(dump), "--out", str(tmp_path / "w.jsonl"), "--no-progress"]) == 2
    assert re.search(rf"error: {re.escape(str(dump))}:\d+: (compressed data is corrupt or cut off|malformed XML)",
                     capsys.readouterr().err)
    assert cut_jsonl.main([str(source), "--rejects", str(tmp_path / "r.txt"), "--no-progress"]) == 2
    assert "--rejects lists the lines that --skip-bad-lines skips" in capsys.readouterr().err


def test_missing_input_and_progress_bar(tmp_path, capsys):
    for tool in (extract_xml, cut_txt, cut_jsonl, cut_jsonl_sft):
        assert tool.main([str(tmp_path / "nothing.jsonl"), "--no-progress"]) == 2
        assert f"error: input file not found: {tmp_path / 'nothing.jsonl'}" in capsys.readouterr().err
    (tmp_path / "wrong.jsonl.gz").write_text("{}\n")
    assert cut_jsonl.main([str(tmp_path / "wrong.jsonl.gz"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "the name ends in .gz but the file is not gz-compressed" in capsys.readouterr().err
    source = write_jsonl(tmp_path / "in.jsonl", [{"q": "Hi?", "a": "Hello."}])
    assert cut_jsonl_sft.main([str(source), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert re.search(r"in\.jsonl: .*/28.0 .*B/s", capsys.readouterr().err)  # the bar names the file and counts bytes


@pytest.mark.parametrize("tool", TOOLS)
def test_help_from_its_own_folder(tool):
    result = subprocess.run([sys.executable, f"{tool}.py", "--help"], cwd=ROOT / "tool", capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--skip-bad-lines", "--rejects", "--no-progress"):
        assert flag in result.stdout
