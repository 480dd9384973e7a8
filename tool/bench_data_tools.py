"""Benchmark the data tools on large generated inputs: throughput and peak memory of each.

    python tool/bench_data_tools.py                      # ~520 MB per input, in /tmp/etude_bench_data
    python tool/bench_data_tools.py --size-mb 100 --clean

Generates (once; later runs reuse them) a MediaWiki XML dump, a plain-text book, a pretraining
JSONL (5% exact duplicates) and a mixed-format SFT JSONL, each of --size-mb, then runs every tool
on them in its own subprocess and prints, per run: input MB, seconds, MB/s and the peak resident
memory of the tool's process, two ways: ru_maxrss from os.wait4 (the kernel's high-water mark,
which on Linux also counts what the child inherited from this process at fork, so this process
stays small and its own peak is printed as the floor) and VmHWM polled from /proc every 50 ms.
cut_jsonl runs with and without --dedup (no shuffle, so that nothing else differs), and the
difference gives the memory that the duplicate filter holds per million lines. With a tokenizer
in weight/tokenizer/, cut_txt's token mode runs too, on the first --token-mb of the book.

Exits 1 when a tool fails or its peak memory passes --max-rss-mb (default 300).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ROOT, TOKENIZER_DIR
from tool.measure import own_peak_mb, run_measured

WORDS = ("the of and a to in is was for on that with as by at from his an were are which this be also has had "
         "first one their its new after who they two her she been other when there all during into school time "
         "may years more most only over city three up some world would where later city river music team").split()
CJK = (0x4E00, 0x9FA5)  # the common CJK ideographs
PAGE = """{{{{Infobox settlement|name={title}|population={{{{formatnum:{n}}}}}|note={{{{small|{{{{nowrap|({n})}}}}}}}}}}}}
'''{title}''' {s0}<ref name="r{n}">{{{{cite web|url=https://example.org/{n}|title={s1}}}}}</ref> {s2} [[{w0}|{w1}]] {s3}<!-- editor note -->
[[File:Picture {n}.jpg|thumb|{s4} [[{w2}]]]]

== {w0} ==
{s5}{{{{sfn|Author|2001|p={n}}}}} {s6} [https://example.org/{n} {w1}] {s7}
{{| class="wikitable"
|-
! {w0} !! {w1}
|-
| {{{{formatnum:{n}}}}} || {w2}
|}}
* {s8}
* {s9}

== References ==
{{{{Reflist}}}}

[[Category:{w1}]]
"""


def sentences(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        if rng.random() < 0.25:
            out.append("".join(chr(rng.randint(*CJK)) for _ in range(rng.randint(8, 40))) + rng.choice("。！？"))
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 28))).capitalize() + rng.choice(".!?"))
    return out


class ChunkWriter:
    """Appends text to a file in large writes until the file reaches `target` bytes."""

    def __init__(self, path: Path, target: int):
        self.handle, self.target, self.size, self.parts, self.pending = open(path, "wb"), target, 0, [], 0

    def add(self, text: str) -> bool:
        data = text.encode("utf-8")
        self.parts.append(data)
        self.pending += len(data)
        if self.pending >= 8 << 20:
            self.flush()
        return self.size + self.pending < self.target

    def flush(self) -> None:
        self.handle.write(b"".join(self.parts))
        self.size += self.pending
        self.parts, self.pending = [], 0

    def close(self) -> None:
        self.flush()
        self.handle.close()


def generate(path: Path, target: int, kind: str) -> None:
    """One benchmark input of about `target` bytes (kept for later runs)."""
    if path.exists() and path.stat().st_size >= target:
        return
    print(f"generating {path} ({target / 1e6:,.0f} MB)", flush=True)
    rng = random.Random(kind)
    pool = sentences(rng, 20000)
    tmp = path.with_suffix(path.suffix + ".part")
    writer = ChunkWriter(tmp, target)
    i = 0
    if kind == "xml":
        writer.add('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">\n'
                   '<siteinfo><sitename>Bench</sitename><namespaces><namespace key="0" />'
                   '<namespace key="6">File</namespace><namespace key="14">Category</namespace>'
                   '</namespaces></siteinfo>\n')
        bodies = [escape(PAGE.format(title="{title}", n=n, w0=rng.choice(WORDS), w1=rng.choice(WORDS),
                                     w2=rng.choice(WORDS), **{f"s{k}": rng.choice(pool) for k in range(10)}))
                  for n in range(2000)]
        while True:
            title = f"Page {i}"
            if i % 10 == 9:
                text, ns = f"#REDIRECT [[Page {i - 1}]]", 0
            else:
                text, ns = bodies[i % len(bodies)].replace("{title}", title), 1 if i % 20 == 7 else 0
            more = writer.add(f"<page><title>{title}</title><ns>{ns}</ns><id>{i}</id><revision><id>{i}</id>"
                              f'<text xml:space="preserve">{text}</text></revision></page>\n')
            i += 1
            if not more:
                break
        writer.add("</mediawiki>\n")
    elif kind == "txt":
        while writer.add(" ".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) + "\n\n"):
            i += 1
            if i == 50000:  # one 8 MB line without a sentence end: held text must stay bounded
                writer.add(" ".join(rng.choice(WORDS) for _ in range(1_600_000)) + "\n\n")
    elif kind == "jsonl":
        recent: list[str] = []
        while True:
            if i % 20 == 19:
                line = rng.choice(recent)  # an exact duplicate
            else:
                line = json.dumps({"text": " ".join(rng.choice(pool) for _ in range(rng.randint(2, 10))) + f" #{i}"},
                                  ensure_ascii=False)
                recent = (recent + [line])[-1000:]
            i += 1
            if not writer.add(line + "\n"):
                break
    elif kind == "sft":
        while True:
            q, a = rng.choice(pool), " ".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))
            shape = i % 4
            if shape == 0:
                record = {"instruction": q, "input": rng.choice(pool) if i % 3 else "", "output": a}
            elif shape == 1:
                record = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a},
                                            {"from": "human", "value": rng.choice(pool)},
                                            {"from": "gpt", "value": rng.choice(pool)}]}
            elif shape == 2:
                record = {"messages": [{"role": "system", "content": "You are helpful."},
                                       {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            else:
                record = {"question": q, "answer": a}
            i += 1
            if not writer.add(json.dumps(record, ensure_ascii=False) + "\n"):
                break
    writer.close()
    tmp.replace(path)


def measure(name: str, command: list[str], input_bytes: int, log: Path) -> dict:
    """Run one tool; its wall time and peak resident memory (tool/measure.py says how)."""
    print(f"running {name}: {' '.join(command[1:])}", flush=True)
    result = run_measured(command, log, cwd=ROOT)
    return {"name": name, "mb": input_bytes / 1e6, "mb_per_s": input_bytes / 1e6 / result["seconds"], **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=520, help="size of each generated input (default 520)")
    parser.add_argument("--token-mb", type=int, default=50,
                        help="MB of the book cut in token mode (0: skip; default 50)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/etude_bench_data"),
                        help="where inputs and outputs go (default /tmp/etude_bench_data)")
    parser.add_argument("--max-rss-mb", type=float, default=300, help="peak memory allowed per tool (default 300)")
    parser.add_argument("--clean", action="store_true", help="delete the work folder at the end")
    args = parser.parse_args(argv)
    work, out = args.work_dir, args.work_dir / "out"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    target = args.size_mb * 1_000_000
    inputs = {kind: work / f"bench.{kind if kind != 'sft' else 'sft.jsonl'}" for kind in ("xml", "txt", "jsonl", "sft")}
    for kind, path in inputs.items():  # in a child, so this process stays small (see measure)
        subprocess.run([sys.executable, "-c", f"from tool.bench_data_tools import generate; from pathlib import Path; "
                        f"generate(Path({str(path)!r}), {target}, {kind!r})"], cwd=ROOT, check=True)
    python, tool = sys.executable, str(ROOT / "tool")
    runs = [
        ("extract_xml", [f"{tool}/extract_xml.py", str(inputs["xml"]), "--out", str(out / "wiki.jsonl")], "xml"),
        ("cut_txt --max-chars 2000 --overlap 200",
         [f"{tool}/cut_txt.py", str(inputs["txt"]), "--out", str(out / "book.jsonl"), "--overlap", "200"], "txt"),
        ("cut_jsonl --min-chars 100",
         [f"{tool}/cut_jsonl.py", str(inputs["jsonl"]), "--out-dir", str(out), "--name", "plain", "--min-chars",
          "100"], "jsonl"),
        ("cut_jsonl --min-chars 100 --dedup",
         [f"{tool}/cut_jsonl.py", str(inputs["jsonl"]), "--out-dir", str(out), "--name", "dedup", "--min-chars",
          "100", "--dedup"], "jsonl"),
        ("cut_jsonl --dedup --shuffle --val-fraction 0.01 --shard-lines 200000",
         [f"{tool}/cut_jsonl.py", str(inputs["jsonl"]), "--out-dir", str(out), "--name", "all", "--dedup",
          "--shuffle", "--val-fraction", "0.01", "--shard-lines", "200000"], "jsonl"),
        ("cut_jsonl_sft", [f"{tool}/cut_jsonl_sft.py", str(inputs["sft"]), "--out", str(out / "sft.jsonl")], "sft"),
    ]
    if args.token_mb and (TOKENIZER_DIR / "tokenizer.json").is_file():
        head = work / f"bench.head{args.token_mb}.txt"
        with open(inputs["txt"], "rb") as source, open(head, "wb") as target_file:
            for line in source:  # line by line: this process's memory is every child's floor
                target_file.write(line)
                if target_file.tell() >= args.token_mb * 1_000_000:
                    break
        runs.append((f"cut_txt --max-tokens 512 ({args.token_mb} MB)",
                     [f"{tool}/cut_txt.py", str(head), "--out", str(out / "book_tokens.jsonl"), "--max-tokens", "512"],
                     head))
    results = []
    for index, (name, command, source) in enumerate(runs):
        path = inputs[source] if isinstance(source, str) else source
        results.append(measure(name, [python, *command, "--no-progress"], path.stat().st_size,
                               out / f"run{index}.log"))
        print(Path(results[-1]["log"]).read_text(), flush=True)

    print(f"\nthis process: {own_peak_mb():.0f} MB at its peak (the floor of ru_maxrss below)")
    print(f"{'tool':<66} {'MB':>6} {'s':>6} {'MB/s':>6} {'peak RSS MB':>11} {'VmHWM MB':>9}")
    failed = False
    for r in results:
        over = r["peak_rss_mb"] > args.max_rss_mb or r["rc"] != 0
        failed |= over
        print(f"{r['name']:<66} {r['mb']:>6.0f} {r['seconds']:>6.1f} {r['mb_per_s']:>6.1f} {r['peak_rss_mb']:>11.0f} "
              f"{r['polled_hwm_mb']:>9.0f}" + ("  <- FAILED" if r["rc"] else "  <- over the limit" if over else ""))
    plain, dedup = results[2], results[3]  # the dedup filter's memory, all else equal
    lines = sum(1 for _ in open(inputs["jsonl"], "rb"))
    extra = dedup["polled_hwm_mb"] - plain["polled_hwm_mb"]
    print(f"\n--dedup: +{extra:.0f} MB peak (VmHWM) for {lines / 1e6:.2f} M lines (~{extra / (lines / 1e6):.0f} MB "
          "per million lines)")
    if args.clean:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
