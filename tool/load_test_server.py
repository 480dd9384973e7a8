"""Load check for inference/server.py: many concurrent streaming clients on loopback, the
continuous-batching engine against the one-at-a-time server, side by side in one run.

    python tool/load_test_server.py                              # 50 clients against weight/etude_sft_model
    python tool/load_test_server.py --model weight/etude_sft_model --clients 50 --max-tokens 64
    python tool/load_test_server.py --url http://127.0.0.1:8000  # a server you started yourself

Starts the server on a free loopback port twice (unless --url is given): with --max-batch 1 (one
request at a time, as the server was before the engine) and with --max-batch --clients (every
client decoded together). Against each, and for each --temperatures value (0 is greedy, others
sample with a seed per client), it sends --clients streaming chat requests at once, each with its
own prompt and seed, through the official `openai` async client (pip install -r
requirements-test.txt). Every stream must end with exactly one finish_reason, one usage record and
one id of its own. Then each request is replayed alone, without streaming, one by one: the same
seed must give the same text, so an answer that was lost, cut, duplicated or mixed with another
client's shows up as a mismatch. Prints tokens per second, latency and time to first token
(p50/p95) of both servers side by side, and how many answers the two servers gave alike (they may
differ in the last bits of fp32, see inference/engine.py); exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ROOT, SFT_DIR

TOPICS = ("the sky", "cats", "the sun", "dogs", "music", "rivers", "books", "the sea", "trees", "cities")


@dataclass
class Result:
    index: int
    text: str = ""
    ids: frozenset = frozenset()
    finishes: tuple = ()
    usage: object = None
    started: float = 0.0
    first_token: float | None = None
    ended: float = 0.0
    error: str | None = None


def request_for(index: int, args: argparse.Namespace, temperature: float) -> dict:
    """Client `index`'s request: a prompt and seed of its own."""
    prompt = f"Question {index}: tell me something about {TOPICS[index % len(TOPICS)]}."
    return {"model": args.model_name, "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature, "max_tokens": args.max_tokens, "seed": 1000 + index}


async def stream_one(client, index: int, args: argparse.Namespace, temperature: float,
                     start_line: asyncio.Event) -> Result:
    result = Result(index)
    await start_line.wait()
    result.started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                      **request_for(index, args, temperature))
        ids, finishes, pieces = set(), [], []
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage is not None:
                result.usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    if result.first_token is None:
                        result.first_token = time.perf_counter()
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        result.text, result.ids, result.finishes = "".join(pieces), frozenset(ids), tuple(finishes)
    except Exception as exc:  # report every failed client, not just the first
        result.error = f"{type(exc).__name__}: {exc}"
    result.ended = time.perf_counter()
    return result


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def run(args: argparse.Namespace, base_url: str, temperature: float) -> tuple[dict, list[str], list[str]]:
    """One round against one server: the figures, each client's text, and the problems found."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    if args.model_name is None:
        args.model_name = (await client.models.list()).data[0].id
    start_line = asyncio.Event()
    tasks = [asyncio.create_task(stream_one(client, i, args, temperature, start_line)) for i in range(args.clients)]
    await asyncio.sleep(0.1)
    began = time.perf_counter()
    start_line.set()
    results = await asyncio.gather(*tasks)
    wall = max(r.ended for r in results) - began

    problems = [f"client {r.index}: {r.error}" for r in results if r.error]
    done = [r for r in results if not r.error]
    for r in done:
        if len(r.finishes) != 1 or r.usage is None or len(r.ids) != 1:
            problems.append(f"client {r.index}: {len(r.finishes)} finish reasons, {len(r.ids)} ids, "
                            f"usage {'present' if r.usage else 'missing'} (expected one of each)")
    if len({next(iter(r.ids)) for r in done if len(r.ids) == 1}) != len(done):
        problems.append("two streams share a response id")
    print(f"  {len(done)}/{args.clients} streams finished in {wall:.2f} s; replaying each alone ...", file=sys.stderr)
    for r in done:  # one by one: the reference does not depend on the server's concurrency
        reply = await client.chat.completions.create(**request_for(r.index, args, temperature))
        if reply.choices[0].message.content != r.text:
            problems.append(f"client {r.index}: streamed text differs from its replay:\n"
                            f"  streamed {r.text!r}\n  replayed {reply.choices[0].message.content!r}")
        elif r.usage is not None and reply.usage.model_dump() != r.usage.model_dump():
            problems.append(f"client {r.index}: usage {r.usage} differs from the replay's {reply.usage}")
    await client.close()

    figures = {}
    if done:
        latency = [r.ended - r.started for r in done]
        first = [r.first_token - r.started for r in done if r.first_token is not None]
        tokens = sum(r.usage.completion_tokens for r in done if r.usage is not None)
        figures = {"completed": len(done), "completion_tokens": tokens, "wall_s": round(wall, 2),
                   "tokens_per_s": round(tokens / wall, 1),
                   "latency_p50_s": round(percentile(latency, 0.5), 2),
                   "latency_p95_s": round(percentile(latency, 0.95), 2),
                   "first_token_p50_s": round(percentile(first, 0.5), 2) if first else None,
                   "first_token_p95_s": round(percentile(first, 0.95), 2) if first else None}
    texts = [r.text if not r.error else None for r in results]
    return figures, texts, problems


def print_table(figures: dict[tuple[str, float], dict]) -> None:
    """Both servers' figures side by side, one column per (server, temperature)."""
    columns = list(figures)
    names = [f"{server} T={temperature:g}" for server, temperature in columns]
    rows = sorted({key for f in figures.values() for key in f}, key=list(next(iter(figures.values()))).index)
    width = max(len(n) for n in names) + 2
    print(f"{'':22}" + "".join(f"{n:>{width}}" for n in names))
    for key in rows:
        print(f"{key:22}" + "".join(f"{str(figures[c].get(key)):>{width}}" for c in columns))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "inference" / "server.py"), "--model", str(args.model), "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", str(args.clients), "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} (its messages are above)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("the server did not answer /health within 120 s")


def compare(args: argparse.Namespace) -> int:
    """Both servers, every temperature: the figures side by side and every check's problems."""
    servers = [("one-at-a-time", 1), ("engine", args.max_batch or args.clients)]
    if args.no_baseline:
        servers = servers[1:]
    figures, texts, problems = {}, {}, []
    for name, max_batch in servers:
        process, url = start_server(args, max_batch)
        try:
            for temperature in args.temperatures:
                print(f"{name} (--max-batch {max_batch}), temperature {temperature:g}:", file=sys.stderr)
                figures[name, temperature], texts[name, temperature], found = asyncio.run(run(args, url, temperature))
                problems += [f"{name} T={temperature:g} {p}" for p in found]
        finally:
            process.terminate()
            process.wait(timeout=30)
    print_table(figures)
    if len(servers) == 2:
        for temperature in args.temperatures:
            pairs = list(zip(texts["one-at-a-time", temperature], texts["engine", temperature]))
            alike = sum(a == b and a is not None for a, b in pairs)
            print(f"T={temperature:g}: {alike}/{len(pairs)} answers identical on both servers")
            engine, alone = figures["engine", temperature], figures["one-at-a-time", temperature]
            if engine and alone:
                print(f"T={temperature:g}: engine {engine['tokens_per_s'] / alone['tokens_per_s']:.1f}x the tokens/s, "
                      f"p95 latency {engine['latency_p95_s']} s vs {alone['latency_p95_s']} s")
    return report(problems)


def report(problems: list[str]) -> int:
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print("all responses complete, distinct and equal to their replays" if not problems
          else f"{len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SFT_DIR), help=f"model folder to serve (default {SFT_DIR})")
    parser.add_argument("--url", help="test this running server instead of starting one (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--model-name", help="model id to request (default: the first of GET /v1/models)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent streaming clients (default 50)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest answer per request (default 64)")
    parser.add_argument("--temperatures", default="0,0.8",
                        help="comma-separated; 0 is greedy, others sample with a seed per client (default 0,0.8)")
    parser.add_argument("--max-batch", type=int, help="the engine server's --max-batch (default: --clients)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time server")
    parser.add_argument("--threads", type=int, help="the started servers' --threads (default: torch's choice)")
    args = parser.parse_args(argv)
    try:
        args.temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        print(f"error: --temperatures must be comma-separated numbers, got {args.temperatures!r}", file=sys.stderr)
        return 2
    if args.clients < 1 or args.max_tokens < 1:
        print("error: --clients and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.url is None and not (Path(args.model) / "config.json").is_file():
        print(f"error: no model folder at {args.model}; build one with `python tool/demo.py` (or train/train_sft.py), "
              "pass --model FOLDER, or point --url at a running server", file=sys.stderr)
        return 2
    try:
        import openai  # noqa: F401  (checked here for a clear message)
    except ImportError:
        print("error: the openai client is missing: pip install -r requirements-test.txt", file=sys.stderr)
        return 2
    try:
        if args.url:
            results = [asyncio.run(run(args, args.url.rstrip("/"), t)) for t in args.temperatures]
            for temperature, (figures, _, _) in zip(args.temperatures, results):
                print(f"temperature {temperature:g}: {json.dumps(figures)}")
            return report([p for _, _, found in results for p in found])
        return compare(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
