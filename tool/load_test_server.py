"""Load check for inference/server.py: many concurrent streaming clients on loopback.

    python tool/load_test_server.py                              # 50 clients against weight/etude_sft_model
    python tool/load_test_server.py --model weight/etude_sft_model --clients 50 --max-tokens 64
    python tool/load_test_server.py --url http://127.0.0.1:8000  # a server you started yourself

Starts the server on a free loopback port (unless --url is given), then sends --clients streaming
chat requests at once, each with its own prompt and seed, through the official `openai` async client
(pip install -r requirements-test.txt). Every stream must end with exactly one finish_reason, one
usage record and one id of its own. Then each request is replayed without streaming, one by one:
the same seed must give the same text, so an answer that was lost, cut, duplicated or mixed with
another client's shows up as a mismatch. Prints latency and time to first token (p50/p95) and
the total generated tokens per second; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
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


def request_for(index: int, args: argparse.Namespace) -> dict:
    """Client `index`'s request: a prompt and seed of its own."""
    prompt = f"Question {index}: tell me something about {TOPICS[index % len(TOPICS)]}."
    return {"model": args.model_name, "messages": [{"role": "user", "content": prompt}],
            "temperature": args.temperature, "max_tokens": args.max_tokens, "seed": 1000 + index}


async def stream_one(client, index: int, args: argparse.Namespace, start_line: asyncio.Event) -> Result:
    result = Result(index)
    await start_line.wait()
    result.started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                      **request_for(index, args))
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


async def run(args: argparse.Namespace, base_url: str) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    if args.model_name is None:
        args.model_name = (await client.models.list()).data[0].id
    start_line = asyncio.Event()
    tasks = [asyncio.create_task(stream_one(client, i, args, start_line)) for i in range(args.clients)]
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
    print(f"{len(done)}/{args.clients} streams finished in {wall:.2f} s; replaying each without streaming ...",
          file=sys.stderr)
    for r in done:  # one by one: the reference does not depend on the server's concurrency
        reply = await client.chat.completions.create(**request_for(r.index, args))
        if reply.choices[0].message.content != r.text:
            problems.append(f"client {r.index}: streamed text differs from its replay:\n"
                            f"  streamed {r.text!r}\n  replayed {reply.choices[0].message.content!r}")
        elif r.usage is not None and reply.usage.model_dump() != r.usage.model_dump():
            problems.append(f"client {r.index}: usage {r.usage} differs from the replay's {reply.usage}")
    await client.close()

    if done:
        latency = [r.ended - r.started for r in done]
        first = [r.first_token - r.started for r in done if r.first_token is not None]
        tokens = sum(r.usage.completion_tokens for r in done if r.usage is not None)
        figures = {"clients": args.clients, "completed": len(done), "max_tokens": args.max_tokens,
                   "completion_tokens": tokens, "wall_s": round(wall, 3),
                   "latency_p50_s": round(percentile(latency, 0.5), 3),
                   "latency_p95_s": round(percentile(latency, 0.95), 3),
                   "first_token_p50_s": round(percentile(first, 0.5), 3) if first else None,
                   "first_token_p95_s": round(percentile(first, 0.95), 3) if first else None,
                   "tokens_per_s": round(tokens / wall, 1),
                   "mean_completion_tokens": round(statistics.mean(
                       r.usage.completion_tokens for r in done if r.usage is not None), 1)}
        print(json.dumps(figures, indent=2))
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print("all responses complete, distinct and equal to their replays" if not problems
          else f"{len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "inference" / "server.py"), "--model", str(args.model), "--port", str(port),
               "--max-queue", str(args.clients), "--log-level", "warning"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SFT_DIR), help=f"model folder to serve (default {SFT_DIR})")
    parser.add_argument("--url", help="test this running server instead of starting one (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--model-name", help="model id to request (default: the first of GET /v1/models)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent streaming clients (default 50)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest answer per request (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; each client has its own seed (default 0.8)")
    parser.add_argument("--threads", type=int, help="the started server's --threads (default: torch's choice)")
    args = parser.parse_args(argv)
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
    process = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            process, url = start_server(args)
        return asyncio.run(run(args, url))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
