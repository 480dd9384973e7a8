"""Probe inference/server.py as an attacker would, and print the figures of issue 27.

    python tool/probe_server.py                                  # weight/etude_sft_model
    python tool/probe_server.py --model weight/etude_sft_model --big-mb 500

Starts the server on a free loopback port (twice: with its default limits, then with limits
raised so that huge requests reach prompt preparation), and measures: how long 2,001 and 100,000
messages, one 5 MB message and a body of 33,000 text parts take to be answered (max_tokens 1, with and without "truncation":
"auto") and the slowest GET /health meanwhile; a --big-mb body (declared, then chunked): status and
the server's peak memory growth; text/plain and form bodies; a wrong and a missing API key; and
50 connections sending their headers at 4 bytes a second. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ROOT, SFT_DIR

RELAXED = ["--max-body-bytes", str(64 << 20), "--max-messages", "200000", "--max-chars", "10000000"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(model: str, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "inference" / "server.py"), "--model", model, "--port",
                                str(port), "--threads", "1", "--log-level", "warning", *flags])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, port
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the server exited") from None
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 120) -> tuple[int, bytes]:
    """One request on a fresh connection; the status and body of the answer (0 if none came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head + body)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    reply = b"".join(chunks)
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
    return status, reply.partition(b"\r\n\r\n")[2]


def post(port: int, body: bytes, content_type: bytes = b"application/json", extra: bytes = b"") -> tuple[int, bytes]:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: "
            + content_type + b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body))
    return exchange(port, head, body)


def health_ms(port: int) -> float:
    started = time.perf_counter()
    status, _ = exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout=60)
    assert status == 200
    return (time.perf_counter() - started) * 1000


def while_polling_health(port: int, work) -> tuple[object, float, float]:
    """Run work() in a thread; (its result, its seconds, the slowest /health meanwhile in ms)."""
    result, latencies = {}, []

    def run():
        started = time.perf_counter()
        result["value"] = work()
        result["seconds"] = time.perf_counter() - started

    worker = threading.Thread(target=run)
    worker.start()
    while worker.is_alive():
        latencies.append(health_ms(port))
    worker.join()
    return result["value"], round(result["seconds"], 3), round(max(latencies), 1)


def conversations() -> dict[str, list[dict]]:
    def history(n):
        return [{"role": "system", "content": "You are helpful."}] + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"word{i}"} for i in range(n - 1)]
    parts = [{"type": "text", "text": "a"}] * 33_000  # just under 1 MiB of small objects: the slowest to parse
    return {"2001 messages": history(2001), "100000 messages": history(100_000),
            "5 MB message": [{"role": "user", "content": "word " * 1_000_000}],
            "1 MiB of text parts": [{"role": "user", "content": parts}]}


def probe_sizes(port: int) -> dict:
    figures = {}
    for name, messages in conversations().items():
        for truncation in ("disabled", "auto"):
            body = json.dumps({"messages": messages, "max_tokens": 1, "truncation": truncation}).encode()
            (status, reply), seconds, slowest = while_polling_health(port, lambda: post(port, body))
            code = json.loads(reply)["error"]["code"] if status != 200 else "ok"
            figures[f"{name}, truncation {truncation}"] = {"body_mb": round(len(body) / 1e6, 2), "status": status,
                                                           "code": code, "seconds": seconds, "health_max_ms": slowest}
    return figures


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe_big_body(port: int, pid: int, megabytes: int) -> dict:
    figures = {}
    chunk = b"x" * (1 << 20)
    for mode in ("declared", "chunked"):
        before = peak_rss_mb(pid)
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            length = b"Content-Length: %d\r\n" % (megabytes << 20) if mode == "declared" else b"Transfer-Encoding: chunked\r\n"
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + length + b"\r\n")
            sent = 0
            try:
                for _ in range(megabytes):
                    sock.sendall(chunk if mode == "declared" else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += 1
            except OSError:
                pass
            try:
                reply = sock.recv(65536)
            except OSError:
                reply = b""
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        figures[mode] = {"status": status, "mb_sent_before_close": sent, "seconds": round(time.perf_counter() - started, 2),
                         "peak_rss_growth_mb": round(peak_rss_mb(pid) - before, 1)}
    return figures


def probe_media_types(port: int) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    return {kind.decode(): post(port, body, kind)[0]
            for kind in (b"text/plain", b"application/x-www-form-urlencoded", b"application/json")}


def probe_slowloris(port: int, connections: int = 50, seconds: float = 30) -> dict:
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    for sock in sockets:
        sock.setblocking(False)
    started, open_now, latencies, closed_after = time.monotonic(), set(range(connections)), [], {}
    header = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 4000
    offset = 0
    while open_now and time.monotonic() - started < seconds:
        piece = header[offset:offset + 4]
        offset += 4
        for index in list(open_now):
            try:
                sockets[index].send(piece)
                sockets[index].recv(4096)  # data (a 408) or b"" (closed): either way the server let go
            except BlockingIOError:
                continue  # still open, nothing to read
            except OSError:
                pass
            open_now.discard(index)
            closed_after[index] = time.monotonic() - started
        latencies.append(health_ms(port))
        time.sleep(max(0.0, 1 - (time.monotonic() - started) % 1))
    for sock in sockets:
        sock.close()
    return {"connections": connections, "bytes_per_second": 4, "still_open": len(open_now),
            "all_closed_within_s": round(max(closed_after.values()), 1) if closed_after else None,
            "health_max_ms": round(max(latencies), 1)}


def probe_key(model: str) -> dict:
    process, port = start(model, "--api-key", "probe-key")
    try:
        def models(extra: bytes) -> int:
            return exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + extra
                            + b"\r\n")[0]
        return {"missing": models(b""), "wrong": models(b"Authorization: Bearer nope\r\n"),
                "right": models(b"Authorization: Bearer probe-key\r\n")}
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SFT_DIR), help=f"model folder to serve (default {SFT_DIR})")
    parser.add_argument("--big-mb", type=int, default=500, help="size of the oversized body in MB (default 500)")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: no model folder at {args.model}; pass --model FOLDER", file=sys.stderr)
        return 2
    report = {}
    process, port = start(args.model)
    try:
        report["defaults"] = probe_sizes(port)
        report["media_types"] = probe_media_types(port)
        report["big_body"] = probe_big_body(port, process.pid, args.big_mb)
        report["slowloris"] = probe_slowloris(port)
    finally:
        process.terminate()
        process.wait(timeout=30)
    process, port = start(args.model, *RELAXED)
    try:
        report["raised_limits " + " ".join(RELAXED)] = probe_sizes(port)
    finally:
        process.terminate()
        process.wait(timeout=30)
    report["api_key"] = probe_key(args.model)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
