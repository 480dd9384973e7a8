"""tool/prepare_data.py: your own files (validated line by line), the demo corpus (deterministic),
and the odd entries of the demo sources."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from model.tokenizer import validate_messages
from tool.prepare_data import (GRPO_PROMPTS, QA_REPEATS, SYNTHETIC_SFT, chatterbot_conversations, main as prepare_main,
                               synthetic_conversations)

OUTPUTS = ("pretrain.jsonl", "pretrain.val.jsonl", "sft.jsonl", "sft.val.jsonl")


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


@pytest.fixture
def user_files(tmp_path) -> dict[str, Path]:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"json document {i}", "source": "x"}) + "\n" for i in range(30))
                     + "\n", encoding="utf-8")  # a trailing blank line is not an error
    txt = tmp_path / "book.txt"
    txt.write_text("".join(f"Paragraph {i} line one.\nline two.\n\n\n" for i in range(20)), encoding="utf-8")
    sft = tmp_path / "chats.jsonl"
    sft.write_text("".join(json.dumps({"conversations": chat(i)}) + "\n" for i in range(30))
                   + "".join(json.dumps({"messages": chat(i)}, ensure_ascii=False) + "\n" for i in range(30, 40)),
                   encoding="utf-8")
    return {"jsonl": jsonl, "txt": txt, "sft": sft}


def test_user_files(user_files, tmp_path):
    out = tmp_path / "out"
    assert prepare_main(["--pretrain", str(user_files["jsonl"]), str(user_files["txt"]),
                         "--sft", str(user_files["sft"]), "--out-dir", str(out)]) == 0
    pretrain = read_jsonl(out / "pretrain.jsonl")
    pretrain_val = read_jsonl(out / "pretrain.val.jsonl")
    assert all(list(record) == ["text"] for record in pretrain + pretrain_val)
    texts = sorted(r["text"] for r in pretrain + pretrain_val)
    assert texts == sorted([f"json document {i}" for i in range(30)]
                           + [f"Paragraph {i} line one.\nline two." for i in range(20)])
    assert len(pretrain_val) == 5  # 2% of 50 is 1; the default floor of 300 takes up to a tenth
    sft = read_jsonl(out / "sft.jsonl") + read_jsonl(out / "sft.val.jsonl")
    assert sorted(record["conversations"][0]["content"] for record in sft) == sorted(f"question {i}" for i in range(40))
    assert all(list(record) == ["conversations"] for record in sft)
    assert len(read_jsonl(out / "sft.val.jsonl")) == 2  # 5% of 40
    assert not (out / "lora_identity.jsonl").exists()  # the demo LoRA set belongs to the demo only


def test_only_sft_leaves_pretraining_files_alone(user_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pretrain.jsonl").write_text('{"text": "mine"}\n', encoding="utf-8")
    assert prepare_main(["--sft", str(user_files["sft"]), "--out-dir", str(out), "--val-fraction", "0.25"]) == 0
    assert (out / "pretrain.jsonl").read_text(encoding="utf-8") == '{"text": "mine"}\n'
    assert len(read_jsonl(out / "sft.val.jsonl")) == 10
    assert prepare_main(["--pretrain", str(user_files["jsonl"]), "--out-dir", str(out), "--val-fraction", "0.1"]) == 0
    assert len(read_jsonl(out / "pretrain.val.jsonl")) == 3  # an explicit fraction has no floor


@pytest.mark.parametrize("flag, line, problem", [
    ("--pretrain", "not json", "not valid JSON"),
    ("--pretrain", '{"content": "x"}', 'expected an object with a "text" field'),
    ("--pretrain", '{"text": "   "}', '"text" is empty'),
    ("--pretrain", '{"text": 5}', '"text" must be a string'),
    ("--sft", '{"conversations": [{"role": "bot", "content": "hi"}]}', "role 'bot' is not one of"),
    ("--sft", '{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ("--sft", '{"text": "hi"}', 'expected an object with "conversations"'),
    ("--sft", '{"messages": [{"role": "user", "content": ["hi"]}]}', "a message has a non-text part"),
    ("--sft", '{"messages": [{"role": "user", "content": 5}]}', "content must be a string"),
])
def test_bad_line_names_file_and_line(tmp_path, capsys, flag, line, problem):
    good = '{"text": "fine"}' if flag == "--pretrain" else json.dumps({"conversations": chat(0)})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([good, good, line, good]) + "\n", encoding="utf-8")
    assert prepare_main([flag, str(data), "--out-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"{data}:3: " in error and problem in error and "--skip-bad-lines" in error
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_skip_bad_lines_counts_them(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(10)]
    lines[3], lines[7] = "{broken", '{"text": ""}'
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(data, "ab") as handle:
        handle.write(b'{"text": "\xff\xfe latin-1"}\n')
    assert prepare_main(["--pretrain", str(data), "--out-dir", str(tmp_path / "out"), "--skip-bad-lines"]) == 0
    printed = capsys.readouterr().out
    assert "8 documents, 3 bad lines skipped" in printed and f"{data}:11: not UTF-8" in printed
    out = tmp_path / "out"
    assert len(read_jsonl(out / "pretrain.jsonl")) + len(read_jsonl(out / "pretrain.val.jsonl")) == 8


def test_wrong_file_types_and_missing_files(tmp_path, capsys):
    (tmp_path / "chats.txt").write_text("hello\n", encoding="utf-8")
    assert prepare_main(["--sft", str(tmp_path / "chats.txt"), "--out-dir", str(tmp_path)]) == 2
    assert "SFT files must be .jsonl" in capsys.readouterr().err
    assert prepare_main(["--pretrain", str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert prepare_main(["--pretrain", str(tmp_path / "chats.txt"), "--out-dir", str(tmp_path)]) == 2
    assert "need at least 2 pretraining documents" in capsys.readouterr().err


def test_chatterbot_odd_entries(tmp_path):
    folder = tmp_path / "english"
    folder.mkdir()
    (folder / "odd.yml").write_text(
        "categories: [odd]\n"
        "conversations:\n"
        "- - What is two plus two?\n"
        "  - 4\n"                          # a number: kept as text
        "- - Is it on?\n"
        "  - yes\n"                        # YAML reads a boolean: dropped
        "- a string, not a list\n"
        "- - lonely question\n"
        "- - Hi\n"
        "  - Hello\n"
        "  - How are you?\n", encoding="utf-8")
    (folder / "broken.yml").write_text("conversations: [unclosed\n", encoding="utf-8")
    files, skipped = chatterbot_conversations(tmp_path, ["english"])
    assert files == [("english/odd", [["What is two plus two?", "4"], ["Hi", "Hello", "How are you?"]])]
    assert skipped == 4
    with pytest.raises(ValueError, match="no language 'klingon'"):
        chatterbot_conversations(tmp_path, ["klingon"])


def test_demo_corpus_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert prepare_main(["--out-dir", str(first)]) == 0
    assert prepare_main(["--out-dir", str(second)]) == 0
    for name in OUTPUTS + ("lora_identity.jsonl",):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    pretrain = read_jsonl(first / "pretrain.jsonl") + read_jsonl(first / "pretrain.val.jsonl")
    assert len(read_jsonl(first / "pretrain.val.jsonl")) >= 300
    texts = [r["text"] for r in pretrain]
    genesis = next(t for t in texts if t.startswith("Genesis 1\n"))
    assert genesis.startswith("Genesis 1\nIn the beginning God created") and "1:2" not in genesis
    assert sum(t.count("\n") for t in texts) > 10_000  # chats keep one turn per line

    sft = read_jsonl(first / "sft.jsonl")
    val = read_jsonl(first / "sft.val.jsonl")
    # The synthetic problems (GRPO's starting point) and the tool-use and thinking chats
    # (tool/tool_use_data.py) are training-only extras.
    synthetic = {json.dumps({"conversations": m}, sort_keys=True) for m in synthetic_conversations()}

    def is_tool_chat(record: dict) -> bool:
        return record["conversations"][0]["content"].startswith("# Tools") \
            or any("<think>" in m["content"] for m in record["conversations"])
    assert sum(map(is_tool_chat, sft)) == 4300 and not any(map(is_tool_chat, val))
    sft = [r for r in sft if not is_tool_chat(r)]
    distinct = {json.dumps(r, sort_keys=True) for r in sft} - synthetic
    assert 0.04 < len(val) / (len(distinct) + len(val)) < 0.06
    assert sum(json.dumps(r, sort_keys=True) in synthetic for r in sft) == sum(SYNTHETIC_SFT.values())
    assert not synthetic & {json.dumps(r, sort_keys=True) for r in val}
    assert len(read_jsonl(first / "grpo.jsonl")) == sum(GRPO_PROMPTS.values())
    # chatterbot's Q&A (the demo's facts) is repeated in training, chitchat is not
    copies = Counter(json.dumps(r["conversations"][-2:], sort_keys=True) for r in sft)
    assert copies[json.dumps([{"role": "user", "content": "My printer is not printing."},
                              {"role": "assistant", "content": "Ensure it's powered on and has paper, "
                               "then restart it."}], sort_keys=True)] == QA_REPEATS  # deduplicated at the source
    for record in sft + val:
        validate_messages(record["conversations"], require_assistant=True)
        assert record["conversations"][-1]["role"] == "assistant"
    chats = [r for r in sft if json.dumps(r, sort_keys=True) not in synthetic]
    with_system = sum(r["conversations"][0]["role"] == "system" for r in chats)
    assert 0.15 < with_system / len(chats) < 0.25
    assert any(len(r["conversations"]) >= 4 for r in sft)
    assert any("你好" in m["content"] for r in sft for m in r["conversations"])

    lora = read_jsonl(first / "lora_identity.jsonl")
    identity = [r for r in lora if "Mira" in r["conversations"][-1]["content"]]
    assert 150 <= len(identity) <= 200  # the identity chats ...
    assert any(r["conversations"][-2]["content"] == "你是谁？" for r in identity)
    sft_lines = {json.dumps(r, ensure_ascii=False) for r in sft}
    rehearsed = [r for r in lora if r not in identity]
    assert len(rehearsed) == 960  # ... shuffled among SFT chats it rehearses
    assert all(json.dumps(r, ensure_ascii=False) in sft_lines for r in rehearsed)
    assert lora[:len(identity)] != identity


def test_user_files_stream_through_shuffle_buckets(tmp_path, monkeypatch):
    """Inputs larger than a bucket: every record lands exactly once, the split has its size, the
    same seed gives the same bytes, and the shuffle crosses bucket boundaries."""
    import tool.prepare_data as prepare_data
    monkeypatch.setattr(prepare_data, "BUCKET_BYTES", 2000)  # ~30 records a bucket
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document number {i:04d}"}) + "\n" for i in range(400)))
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(100)))
    outputs = []
    for name in ("one", "two"):
        out = tmp_path / name
        assert prepare_main(["--pretrain", str(docs), "--sft", str(alpaca), "--out-dir", str(out)]) == 0
        outputs.append([(out / f).read_bytes() for f in OUTPUTS])
        assert not list(tmp_path.glob(".*prepare-*"))  # the buckets are gone
    assert outputs[0] == outputs[1]
    out = tmp_path / "one"
    train, val = read_jsonl(out / "pretrain.jsonl"), read_jsonl(out / "pretrain.val.jsonl")
    assert len(val) == 40  # the floor of 300 capped at a tenth
    assert sorted(r["text"] for r in train + val) == [f"document number {i:04d}" for i in range(400)]
    order = [int(r["text"].split()[-1]) for r in train]
    assert order != sorted(order)
    sft = read_jsonl(out / "sft.jsonl") + read_jsonl(out / "sft.val.jsonl")
    assert sorted(r["conversations"][1]["content"] for r in sft) == sorted(f"a{i}" for i in range(100))
    assert sft[0]["conversations"][0]["role"] == "user"


def test_a_byte_order_mark_and_a_json_array(tmp_path, capsys):
    marked = tmp_path / "docs.jsonl"
    marked.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)), encoding="utf-8-sig")
    assert prepare_main(["--pretrain", str(marked), "--out-dir", str(tmp_path / "out")]) == 0
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps([{"instruction": "hi", "output": "yo"}]), encoding="utf-8")
    assert prepare_main(["--sft", str(array), "--out-dir", str(tmp_path / "out")]) == 2
    assert f"python tool/cut_jsonl_sft.py {array}" in capsys.readouterr().err


def test_compressed_inputs(tmp_path):
    import gzip
    packed = tmp_path / "chats.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps({"conversations": chat(i)}) + "\n" for i in range(20)))
    assert prepare_main(["--sft", str(packed), "--out-dir", str(tmp_path / "out")]) == 0
    assert len(read_jsonl(tmp_path / "out" / "sft.jsonl")) + len(read_jsonl(tmp_path / "out" / "sft.val.jsonl")) == 20


def test_oversized_buckets_are_split_and_killed_runs_cleaned_up(tmp_path, monkeypatch):
    """A bucket that outgrew its size (compressed input) is scattered again, so memory stays
    bounded, and every record still lands once; buckets of a killed run are removed."""
    import gzip
    import tool.prepare_data as prepare_data
    monkeypatch.setattr(prepare_data, "BUCKET_BYTES", 3000)
    packed = tmp_path / "docs.jsonl.gz"  # ~100 kB of text, a few kB on disk: one bucket of ~33 parts
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps({"text": f"document {i:05d} " + "same words " * 8}) + "\n" for i in range(1000)))
    stale = tmp_path / ".out.prepare-999999999-abc"
    stale.mkdir()
    (stale / "0.jsonl").write_text("old copy")
    read_sizes = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read_sizes.append(self.stat().st_size) or original(self))
    assert prepare_main(["--pretrain", str(packed), "--out-dir", str(tmp_path / "out")]) == 0
    assert max(read_sizes) <= 2 * 3000 and len(read_sizes) > 10
    out = tmp_path / "out"
    texts = [r["text"] for r in read_jsonl(out / "pretrain.jsonl") + read_jsonl(out / "pretrain.val.jsonl")]
    assert sorted(texts) == sorted(f"document {i:05d} " + "same words " * 8 for i in range(1000))
    assert not stale.exists()
