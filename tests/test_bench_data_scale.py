"""tool/bench_data_scale.py and what it stands on: the synthetic data (valid lines of the asked
size, the same bytes for the same seed), the child measurement (peak memory seen, runaway children
killed), the table's growth figures, and a small run end to end. Nothing here asserts a speed."""

from __future__ import annotations

import json
import sys

import pytest

from tool.bench_data_scale import format_table, main as bench_main, with_growth
from tool.measure import run_measured
from tool.synthetic_data import KINDS, main as synthetic_main, write_jsonl

ROLES = {"system", "user", "assistant"}


def check_pretrain_line(obj: dict) -> None:
    assert list(obj) == ["text"] and isinstance(obj["text"], str) and obj["text"].strip()


def check_sft_line(obj: dict) -> None:
    assert list(obj) == ["conversations"]
    turns = obj["conversations"]
    if turns[0]["role"] == "system":
        turns = turns[1:]
    assert turns and len(turns) % 2 == 0
    for index, message in enumerate(turns):
        assert set(message) == {"role", "content"} and message["content"].strip()
        assert message["role"] == ("user", "assistant")[index % 2]


@pytest.mark.parametrize("kind", KINDS)
def test_generated_lines_are_valid_and_of_the_asked_size(tmp_path, kind):
    target = 600_000
    report = write_jsonl(tmp_path / "a.jsonl", kind, target, seed=3)
    data = (tmp_path / "a.jsonl").read_bytes()
    lines = data.decode("utf-8").splitlines()
    assert report["bytes"] == len(data) <= target and report["lines"] == len(lines)
    assert target - len(data) < max(len(line.encode("utf-8")) for line in lines) + 1  # the next line did not fit
    objects = [json.loads(line) for line in lines]
    for obj in objects:
        (check_pretrain_line if kind == "pretrain" else check_sft_line)(obj)
    text = data.decode("utf-8")
    assert any(ord(char) > 127 for char in text), "some non-ASCII text"
    assert '\\"' in text and "\\n" in text, "JSON escapes are exercised"
    if kind == "sft":
        conversations = [obj["conversations"] for obj in objects]
        assert any(c[0]["role"] == "system" for c in conversations)
        assert any(len(c) == 2 for c in conversations) and any(len(c) > 4 for c in conversations)
    else:
        lengths = sorted(len(obj["text"]) for obj in objects)
        assert lengths[-1] > 4 * lengths[len(lengths) // 2], "a long tail of document lengths"


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_a_function_of_the_seed(tmp_path, kind):
    write_jsonl(tmp_path / "a.jsonl", kind, 300_000, seed=1)
    write_jsonl(tmp_path / "b.jsonl", kind, 300_000, seed=1)
    write_jsonl(tmp_path / "big.jsonl", kind, 700_000, seed=1)
    write_jsonl(tmp_path / "other.jsonl", kind, 300_000, seed=2)
    small = (tmp_path / "a.jsonl").read_bytes()
    assert small == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "big.jsonl").read_bytes().startswith(small), "a smaller file is a prefix of a larger one"
    assert small != (tmp_path / "other.jsonl").read_bytes()
    assert not (tmp_path / "a.jsonl.part").exists()


def test_synthetic_cli_refuses_a_bad_size(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synthetic_main(["pretrain", str(tmp_path / "x.jsonl"), "--mb", "0"])
    assert "--mb 0: give a size above 0" in capsys.readouterr().err


def test_run_measured_sees_the_peak_and_kills_runaways(tmp_path):
    grow = "import time; block = bytearray(120_000_000); block[::4096] = b'x' * len(block[::4096]); time.sleep(0.5)"
    result = run_measured([sys.executable, "-c", grow], tmp_path / "a.log")
    assert result["rc"] == 0 and not result["stopped"] and result["cpu_seconds"] > 0
    assert result["peak_rss_mb"] >= result["polled_hwm_mb"] > 110
    killed = run_measured([sys.executable, "-c", grow.replace("0.5", "30")], tmp_path / "b.log", kill_above_mb=60)
    assert killed["rc"] != 0 and "memory limit" in killed["stopped"] and killed["seconds"] < 20
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "c.log", timeout_s=0.5)
    assert slow["rc"] != 0 and "time limit" in slow["stopped"]


def row(stage: str, size_mb: float, seconds: float, **extra) -> dict:
    return {"stage": stage, "size_mb": size_mb, "mb": size_mb, "seconds": seconds, "cpu_seconds": seconds / 2,
            "mb_per_s": size_mb / seconds,
            "peak_rss_mb": 100.0, "polled_hwm_mb": 99.0, "rc": 0, "stopped": "", "over_limit": False, "ok": True,
            "log": "x.log", **extra}


def test_growth_is_time_ratio_over_size_ratio():
    rows = [row("a", 4, 16.0), row("a", 1, 2.0), row("a", 2, 4.0), row("b", 1, 1.0),
            row("b", 3, 3.0, rc=1, ok=False), row("b", 6, 9.0)]
    growth = {(r["stage"], r["size_mb"]): r["growth"] for r in with_growth(rows)}
    assert growth[("a", 1)] is None
    assert growth[("a", 2)] == pytest.approx(1.0)  # twice the data, twice the time: linear
    assert growth[("a", 4)] == pytest.approx(2.0)  # twice the data, four times the time
    assert [r["cpu_growth"] for r in with_growth(rows) if r["stage"] == "a"][1:] == pytest.approx([1.0, 2.0])
    assert growth[("b", 3)] is None and growth[("b", 6)] is None  # no ratio against a failed run


def test_table_lists_every_run_with_its_problem():
    rows = [row("prepare --sft", 2, 4.0), row("prepare --sft", 1, 2.0),
            row("sft cold", 1, 5.0, peak_rss_mb=5000.0, over_limit=True, ok=False),
            {"stage": "sft cold", "size_mb": 2, "skipped": "skipped: failed at 1 MB", "ok": False}]
    lines = format_table(rows, max_rss_mb=4000).splitlines()
    assert lines[0].split()[:4] == ["stage", "size", "MB", "input"]
    assert [line.split()[0] for line in lines[1:]] == ["prepare", "prepare", "sft", "sft"]
    assert lines[1].split()[2] == "1" and lines[2].split()[-2:] == ["1.00", "1.00"]
    assert "peak RSS over --max-rss-mb 4000" in lines[3]
    assert "skipped: failed at 1 MB" in lines[4]


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        bench_main(["--sizes-mb", "0", "5", "5", "--max-rss-mb", "-1"])
    err = capsys.readouterr().err
    assert "every size must be above 0" in err and "lists a size twice" in err and "--max-rss-mb -1" in err


def test_small_run_end_to_end(tmp_path, capsys):
    """Two sizes through prepare_data: a row per stage and size; then with a memory limit no child
    can meet, the first size fails and the larger one is not run."""
    out = tmp_path / "scale.json"
    code = bench_main(["--sizes-mb", "0.3", "0.15", "--stages", "prepare", "--work-dir", str(tmp_path / "work"),
                       "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["ok"] and report["complete"] and report["sizes_mb"] == [0.15, 0.3]
    assert [(r["stage"], r["size_mb"]) for r in report["rows"]] == [
        ("prepare --pretrain", 0.15), ("prepare --sft", 0.15), ("prepare --pretrain", 0.3), ("prepare --sft", 0.3)]
    for r in report["rows"]:
        assert r["rc"] == 0 and r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak_rss_mb"] > 0
        assert 0.1 < r["mb"] <= r["size_mb"]
    assert report["rows"][2]["growth"] > 0
    assert "growth" in capsys.readouterr().out
    assert not (tmp_path / "work" / "runs").exists(), "outputs go away after the run"

    code = bench_main(["--sizes-mb", "0.15", "0.3", "--stages", "prepare", "--work-dir", str(tmp_path / "work"),
                       "--max-rss-mb", "1", "--kill-rss-mb", "0", "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert not report["ok"] and report["rows"][0]["over_limit"]
    assert report["rows"][2]["skipped"] == "skipped: failed at 0.15 MB"
    assert all(item["reused"] for item in report["generation"]), "generated inputs are kept and reused"


@pytest.mark.slow
def test_every_stage_runs_at_a_small_size(tmp_path):
    out = tmp_path / "scale.json"
    code = bench_main(["--sizes-mb", "0.3", "--work-dir", str(tmp_path / "work"), "--tokenizer-slice-mb", "0.3",
                       "--vocab-size", "512", "--device", "cpu", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report
    assert [r["stage"] for r in report["rows"]] == ["prepare --pretrain", "prepare --sft", "tokenizer",
                                                    "pretrain cold", "pretrain warm", "sft cold", "sft warm"]
