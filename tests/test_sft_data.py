"""SFT data at scale: the token cache (built, reused, rebuilt when it must be), the packing
(every conversation in exactly one window, never split, masks right), the dataset shapes read on
the fly, JSON array files redirected, byte-order marks decoded."""

import codecs
import json
import subprocess
import sys

import numpy as np
import pytest

from config import ROOT
from model.chat_formats import to_conversation
from model.model import IGNORE_INDEX
from model.tokenizer import load_tokenizer
from train.data import DataError, build_token_cache
from train.sft_data import PackedConversations, build_sft_cache, load_sft_data, pack_windows, sft_cache_dir

CHATS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
     {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": "\n\nleading newlines"}, {"role": "assistant", "content": "\n  indented reply"}],
    [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "one two three four five " * 9}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def write_chats(path, chats, repeat=1):
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(repeat):
            for messages in chats:
                handle.write(json.dumps({"conversations": messages}) + "\n")


def reference_render(tokenizer, messages):
    """The mask rule token by token, as render_chat once computed it: a token is trained when it
    belongs to an assistant message and reaches past "assistant\\n"."""
    ids, mask = [], []
    for message in messages:
        text = f"{message['role']}\n{message['content']}"
        encoding = tokenizer._tokenizer.encode(text, add_special_tokens=False)
        trained = int(message["role"] == "assistant")
        ids.append(tokenizer.im_start_id)
        mask.append(0)
        for token, (_, end) in zip(encoding.ids, encoding.offsets):
            ids.append(token)
            mask.append(trained if end > len(message["role"]) + 1 else 0)
        ids += [tokenizer.im_end_id] + tokenizer.encode("\n")
        mask += [trained] + [0] * len(tokenizer.encode("\n"))
    return ids, mask


def test_batched_rendering_equals_the_token_by_token_rule(tokenizer):
    assert tokenizer.render_chats(CHATS) == [reference_render(tokenizer, m) for m in CHATS]
    assert [tokenizer.render_chat(m) for m in CHATS] == [reference_render(tokenizer, m) for m in CHATS]


@pytest.mark.parametrize("seed", range(4))
def test_packing_puts_every_conversation_in_one_window_whole(seed):
    rng = np.random.default_rng(seed)
    width = 64
    lengths = np.concatenate([rng.integers(1, width + 1, 500), rng.integers(width + 1, 3 * width, 10)])
    rng.shuffle(lengths)
    members, starts = pack_windows(lengths, width)
    assert sorted(members.tolist()) == list(range(len(lengths)))  # each exactly once
    for w in range(len(starts) - 1):
        inside = members[starts[w]:starts[w + 1]]
        assert len(inside) and list(inside) == sorted(inside)  # file order within a window
        used = np.minimum(lengths[inside], width).sum()
        assert used <= width
        assert len(inside) == 1 or (lengths[inside] <= width).all()  # a truncated one is alone
    # near-optimal: within a few windows of the volume bound
    bound = int(np.ceil(np.minimum(lengths, width).sum() / width))
    assert len(starts) - 1 <= bound * 1.05 + 2


def test_windows_hold_whole_conversations_with_their_masks(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    write_chats(path, CHATS, repeat=30)
    data = load_sft_data(path, tokenizer, seq_len=96, verbose=False)
    rendered = [tokenizer.render_chat(m) for m in CHATS]
    seen = []
    for w in range(len(data)):
        ids, labels = data.window(w)
        cursor = 0
        for conversation in data.members[data.starts[w]:data.starts[w + 1]]:
            want_ids, want_mask = rendered[conversation % len(CHATS)]
            n = min(len(want_ids), 97)
            assert ids[cursor:cursor + n].tolist() == want_ids[:n]
            want_labels = [t if m else IGNORE_INDEX for t, m in zip(want_ids[:n], want_mask[:n])]
            assert labels[cursor:cursor + n].tolist() == want_labels
            cursor += n
            seen.append(int(conversation))
        assert (ids[cursor:] == tokenizer.pad_id).all() and (labels[cursor:] == IGNORE_INDEX).all()
    assert sorted(seen) == list(range(4 * 30))
    inputs, targets = data.get_batch([0, len(data) - 1])
    assert inputs.shape == targets.shape == (2, 96)
    assert (inputs[0] == data.window(0)[0][:-1]).all() and (targets[0] == data.window(0)[1][1:]).all()


def test_cache_is_reused_then_rebuilt_when_source_tokenizer_or_files_change(tokenizer, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    write_chats(path, CHATS, repeat=5)
    first = build_sft_cache(path, tokenizer)
    assert "rendered chats.jsonl: 20 conversations" in capsys.readouterr().out
    folder = sft_cache_dir(path)
    assert {p.name for p in folder.iterdir()} >= {"ids.bin", "mask.bin", "lengths.bin", "trained.bin", "meta.json"}
    assert not list(tmp_path.glob("*.tmp-*"))
    build_sft_cache(path, tokenizer)
    assert "rendered" not in capsys.readouterr().out  # reused
    load_sft_data(path, tokenizer, seq_len=64, verbose=False)
    [pack] = folder.glob("pack-v*-64.npz")
    pack.write_bytes(b"PK damaged")  # a damaged packing plan is made again, not a crash
    assert len(load_sft_data(path, tokenizer, seq_len=64, verbose=False)) > 0
    assert pack.stat().st_size > 100

    write_chats(path, CHATS, repeat=6)  # the source grew
    assert len(build_sft_cache(path, tokenizer)) == 24
    assert "rendered" in capsys.readouterr().out

    (folder / "ids.bin").write_bytes(b"\0\0")  # a damaged cache is rebuilt, never read
    again = build_sft_cache(path, tokenizer)
    assert np.array_equal(np.asarray(again.ids[:first.offsets[4]]), np.asarray(first.ids[:first.offsets[4]]))

    meta = json.loads((folder / "meta.json").read_text())
    meta["tokenizer"] = "another"  # as if built with another tokenizer
    (folder / "meta.json").write_text(json.dumps(meta))
    build_sft_cache(path, tokenizer)
    assert "rendered" in capsys.readouterr().out
    assert json.loads((folder / "meta.json").read_text())["tokenizer"] != "another"


def test_a_killed_build_leaves_the_old_cache_and_its_staging_is_cleared(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    write_chats(path, CHATS, repeat=2)
    build_sft_cache(path, tokenizer, verbose=False)
    stale = sft_cache_dir(path).with_name(sft_cache_dir(path).name + ".tmp-99999")
    stale.mkdir()
    (stale / "ids.bin").write_bytes(b"half")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("not json\n")
    with pytest.raises(DataError, match="chats.jsonl:9: not valid JSON"):
        build_sft_cache(path, tokenizer, verbose=False)
    assert not stale.exists() and (sft_cache_dir(path) / "meta.json").is_file()
    assert len(build_sft_cache(path, tokenizer, skip_bad_lines=True, verbose=False)) == 8


SHAPES = {
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello!"}]},
                 [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]),
    "openai": ({"messages": [{"role": "developer", "content": "Answer in French."},
                             {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                             {"role": "assistant", "content": "Bonjour"}]},
               [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Bonjour"}]),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_common_dataset_shapes_train_as_they_are(tokenizer, tmp_path, shape):
    record, messages = SHAPES[shape]
    assert to_conversation(record) == messages
    path = tmp_path / f"{shape}.jsonl"
    path.write_text((json.dumps(record) + "\n") * 3, encoding="utf-8")
    data = load_sft_data(path, tokenizer, seq_len=64, verbose=False)
    ids, _ = tokenizer.render_chat(messages)
    assert data.window(0)[0][:len(ids)].tolist() == ids


def test_a_json_array_file_names_the_converter(tokenizer, tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([SHAPES["alpaca"][0]] * 2, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"alpaca_data.json:1: this file is one JSON array.*"
                                        r"python tool/cut_jsonl_sft.py .*alpaca_data.json --out .*alpaca_data.sft.jsonl"):
        load_sft_data(path, tokenizer, 64, verbose=False)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_text_with_a_byte_order_mark_is_decoded(tokenizer, tmp_path, encoding):
    chats = "".join(json.dumps({"conversations": m}, ensure_ascii=False) + "\n" for m in CHATS).replace("Paris", "Paris ✓")
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text(chats, encoding="utf-8")
    marked.write_text(chats, encoding=encoding)
    assert marked.read_bytes()[:2] in (codecs.BOM_UTF8[:2], codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    assert np.array_equal(np.asarray(build_sft_cache(marked, tokenizer, verbose=False).ids),
                          np.asarray(build_sft_cache(plain, tokenizer, verbose=False).ids))
    for suffix, text in ((".txt", "First document, café.\r\nSecond line.\r\n\r\nSecond document.\r\n"),
                         (".jsonl", '{"text": "one document"}\n{"text": "two ✓"}\n')):
        plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
        plain.write_bytes(text.encode("utf-8"))
        marked.write_bytes(text.encode(encoding))
        want, meta = build_token_cache(plain, tokenizer, verbose=False)
        got, _ = build_token_cache(marked, tokenizer, verbose=False)
        assert got.tolist() == want.tolist() and meta["n_documents"] == 2


def test_ranks_building_one_cache_at_once_wait_for_each_other(tiny_tokenizer_dir, tmp_path):
    """torchrun starts a process per rank and each loads the data: one builds, the others wait
    and map the same cache."""
    path = tmp_path / "chats.jsonl"
    write_chats(path, CHATS, repeat=400)
    code = ("import sys; from model.tokenizer import load_tokenizer; from train.sft_data import build_sft_cache\n"
            f"tokens = build_sft_cache({str(path)!r}, load_tokenizer({str(tiny_tokenizer_dir)!r}), verbose=False)\n"
            "print(len(tokens), int(tokens.lengths.sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    assert len({out for out, _ in results}) == 1 and results[0][0].split()[0] == "1600"
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_text_that_is_not_text_is_named_in_every_shape(tokenizer, tmp_path, shape):
    record = json.loads(json.dumps(SHAPES[shape][0]).replace("Hello", "\\ud800Hello").replace("5", "\\ud8005"))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SHAPES[shape][0]) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*lone surrogate"):
        load_sft_data(path, tokenizer, 64, verbose=False)
    assert len(build_sft_cache(path, tokenizer, skip_bad_lines=True, verbose=False)) == 1


def test_unigram_baseline_in_chunks_read_from_the_cache_file(tmp_path, monkeypatch):
    """The whole-stream statistic gives the same figure when read in pieces from the file as when
    computed on the stream in memory at once."""
    import train.data as data
    rng = np.random.default_rng(0)
    token_bytes = rng.integers(0, 6, 300).astype(np.float64)
    train, val = rng.zipf(1.5, 50_000).clip(0, 299).astype(np.uint16), rng.integers(0, 300, 5_000).astype(np.uint16)
    counts = np.bincount(train, minlength=300) + 1.0
    log_probs = np.log2(counts / counts.sum())
    want = -log_probs[val].sum() / token_bytes[val].sum()
    path = tmp_path / "tokens.bin"
    train.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r", shape=(len(train),))
    monkeypatch.setattr(data, "STATISTICS_CHUNK", 7_001)
    assert [len(c) for c in data.stream_chunks(mapped, 20_000)] == [20_000, 20_000, 10_000]
    assert data.unigram_bits_per_byte(mapped, val, token_bytes) == pytest.approx(want, rel=1e-12)
