"""Serve an Etude model over an OpenAI-compatible HTTP API, with a browser chat page.

    python inference/server.py                                    # weight/etude_sft_model on 127.0.0.1:8000
    python inference/server.py --model weight/etude_sft_model --lora identity --port 8080
    # then open http://127.0.0.1:8000/ in a browser, or use any OpenAI client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models,
GET /health, and the chat page at /. Binds 127.0.0.1 unless --host says otherwise; there is no
authentication, so do not expose it to a network you do not trust.

Requests: messages (roles system, developer (= system), user, assistant; text content), model
(optional; another name than the served one is a 404 model_not_found), temperature [0, 2],
top_p (0, 1], max_tokens / max_completion_tokens >= 1, stop (a string or up to 4), seed (same
seed, same text), n = 1 only, stream, stream_options.include_usage; and, as vLLM accepts them,
top_k, repetition_penalty and ignore_eos. Omitted sampling values take the server's flags.
Anything invalid or unsupported is a 400 with an OpenAI-style {"error": {...}} body.

A history longer than the context loses its oldest turns (a single over-long message keeps its
end), exactly as inference/inference.py trims it; the response then carries an X-Etude-Note header.
completion_tokens counts every token the model produced, the closing <|im_end|> included.

One worker thread runs the model, one request at a time in arrival order; at most --max-queue
requests wait behind it and any more get 429 at once. A client that disconnects (or presses stop
on the page) cancels its request: the worker drops it between two tokens, or before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import queue
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from config import PRETRAINED_DIR, SFT_DIR
from inference.inference import Chat, StreamDecoder, build_chat, resolve_model_folder
from model.tokenizer import CHAT_ROLES

WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_STOP_STRINGS = 4
# Request fields accepted and ignored (bookkeeping that does not change the answer).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


class RequestError(ValueError):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request parsing -------------------------------------------------------------------------

def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)}", name, "invalid_type")
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must be in {interval}, got {value}", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be {bound}, got {value}", name, "invalid_value")
    return value


def _text_content(content: Any, where: str) -> str:
    """OpenAI content is a string or a list of parts; only text parts mean anything here."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where}.content must be a string or a list of text parts "
                       '({"type": "text", "text": "..."}); this model reads text only', where + ".content")


def parse_messages(messages: Any) -> list[dict]:
    """The request's messages as {"role", "content"} dicts with our roles (developer -> system)."""
    if messages is None:
        raise RequestError('missing "messages": give a list of {"role": ..., "content": ...} objects',
                           "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects',
                           "messages", "invalid_value")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", where)
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"{where}.role {json.dumps(message.get('role'))} is not one of system, developer, "
                               "user, assistant (tool and function messages are not supported)", where + ".role")
        parsed.append({"role": role, "content": _text_content(message.get("content"), where)})
    return parsed


@dataclass
class Settings:
    """What one request asks for, validated; None means the server's default."""

    messages: list[dict]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(value)}", name, "invalid_type")
    return value


def parse_request(body: Any, model_name: str) -> Settings:
    """Validate a /v1/chat/completions body; raises RequestError naming the faulty field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    known = {"messages", "model", "stream", "stream_options", "temperature", "top_p", "top_k",
             "repetition_penalty", "max_tokens", "max_completion_tokens", "stop", "seed", "n",
             "ignore_eos", "frequency_penalty", "presence_penalty", "logprobs"} | IGNORED_FIELDS
    unknown = sorted(k for k in body if k not in known and body[k] is not None)
    if unknown:
        raise RequestError(f"unsupported parameter(s): {', '.join(unknown)}. Supported: {', '.join(sorted(known))}",
                           unknown[0], "unsupported_parameter")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"the model {json.dumps(model)} does not exist here; this server serves "
                           f"{json.dumps(model_name)} (see GET /v1/models)", "model", "model_not_found", status=404)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported (only 0); use repetition_penalty instead", name,
                               "unsupported_parameter")
    if body.get("logprobs") not in (None, False):
        raise RequestError("logprobs are not supported", "logprobs", "unsupported_parameter")
    if _integer(body, "n", 1) not in (None, 1):
        raise RequestError(f"n must be 1 (one answer per request), got {body['n']}", "n", "invalid_value")
    settings = Settings(messages=parse_messages(body.get("messages")))
    settings.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not settings.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError('stream_options must be {"include_usage": true|false}', "stream_options")
        settings.include_usage = _boolean(options, "include_usage")
    settings.temperature = _number(body, "temperature", 0, 2)
    settings.top_p = _number(body, "top_p", 0, 1, low_open=True)
    settings.top_k = _integer(body, "top_k", 0)
    settings.repetition_penalty = _number(body, "repetition_penalty", 0, 10, low_open=True)
    limit = _integer(body, "max_completion_tokens", 1)
    settings.max_tokens = limit if limit is not None else _integer(body, "max_tokens", 1)
    settings.seed = _integer(body, "seed", -2**63, 2**64 - 1)
    settings.ignore_eos = _boolean(body, "ignore_eos")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
                or len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                               "non-empty strings", "stop", "invalid_value")
        settings.stop = stops
    return settings


# ---- stop strings --------------------------------------------------------------------------

class StopMatcher:
    """Cuts streamed text at the first stop string. Text that could be the start of a stop
    string is held back until the next piece tells, so a stop string is never half-sent."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def push(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to send now, and whether a stop string was reached."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


# ---- the worker ----------------------------------------------------------------------------

class Overloaded(Exception):
    pass


@dataclass
class Job:
    """One admitted request: its chat (model, settings, prompt) and the channel back to the handler."""

    chat: Chat
    prompt_ids: list[int]
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, data: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()


class Engine:
    """Runs jobs on one worker thread, first come first served, with a bounded waiting line."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0, "generated_tokens": 0}
        self.thread = threading.Thread(target=self._work, name="etude-generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting + self.running > self.max_queue:
                self.counts["rejected"] += 1
                raise Overloaded(f"the server is busy: {self.running} request generating and {self.waiting} "
                                 f"waiting (--max-queue {self.max_queue}); retry shortly")
            self.waiting += 1
        self.jobs.put(job)

    def status(self) -> dict:
        with self.lock:
            return {"running": self.running, "waiting": self.waiting, "max_queue": self.max_queue, **self.counts}

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            with self.lock:
                self.waiting -= 1
                self.running = 1
            outcome = "cancelled"
            try:
                if not job.cancelled.is_set():
                    outcome = self._generate(job)
            except Exception as exc:  # report it to the client; the worker must live on
                outcome = "failed"
                job.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
            with self.lock:
                self.running = 0
                self.counts[outcome] += 1

    def _generate(self, job: Job) -> str:
        chat = job.chat
        decoder, matcher = StreamDecoder(chat.tokenizer), StopMatcher(job.stop)
        produced, finish, cut = 0, "length", False
        tokens = chat.model.generate(job.prompt_ids, chat.max_new_tokens, stop_ids=chat.stop_ids,
                                     generator=chat.generator, **chat.sampling)
        try:
            for token in tokens:
                produced += 1
                with self.lock:
                    self.counts["generated_tokens"] += 1
                if job.cancelled.is_set():
                    return "cancelled"
                if token in chat.stop_ids:
                    finish = "stop"
                    break
                text, cut = matcher.push(decoder.push(token))
                if text:
                    job.emit("delta", text)
                if cut:
                    finish = "stop"
                    break
        finally:
            tokens.close()
        if not cut:  # the decoder's held-back bytes and the matcher's held-back text
            text, cut = matcher.push(decoder.flush())
            finish = "stop" if cut else finish
            text += "" if cut else matcher.flush()
            if text:
                job.emit("delta", text)
        job.emit("done", {"finish_reason": finish, "prompt_tokens": len(job.prompt_ids),
                          "completion_tokens": produced})
        return "completed"


# ---- the HTTP app --------------------------------------------------------------------------

def request_chat(base: Chat, settings: Settings) -> Chat:
    """A Chat for one request: the server's model and defaults, overridden by the request."""
    def choose(value: Any, default: Any) -> Any:
        return default if value is None else value
    sampling = base.sampling
    top_k = sampling["top_k"] if settings.top_k is None else (settings.top_k or None)
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    chat = Chat(base.model, base.tokenizer, max_new_tokens=choose(settings.max_tokens, base.max_new_tokens),
                temperature=choose(settings.temperature, sampling["temperature"]), top_k=top_k,
                top_p=choose(settings.top_p, sampling["top_p"]),
                repetition_penalty=choose(settings.repetition_penalty, sampling["repetition_penalty"]), seed=seed)
    if settings.ignore_eos:
        chat.stop_ids = ()
    return chat


def create_app(base: Chat, model_name: str, max_queue: int = 16) -> FastAPI:
    """The FastAPI app serving `base` (its model, tokenizer and default sampling) as `model_name`."""
    engine = Engine(max_queue)
    created = int(time.time())

    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="Etude LLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    def refuse(exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}; this server has POST /v1/chat/completions, "
                   "GET /v1/models, GET /health and the chat page at /") if exc.status_code in (404, 405) \
            else str(exc.detail)
        return JSONResponse(error_body(message, kind, None, str(exc.status_code)), status_code=exc.status_code)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **engine.status()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "etude",
                                            "max_model_len": base.model.config.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return refuse(RequestError(f"the request body is not valid JSON ({exc})", code="invalid_json"))
        try:
            settings = parse_request(body, model_name)
            chat = request_chat(base, settings)
            ids, note = chat.prompt_ids(settings.messages)
        except RequestError as exc:
            return refuse(exc)
        except ValueError as exc:  # what validate_messages and the prompt fitting refuse
            return refuse(RequestError(str(exc), "messages"))
        job = Job(chat, ids, settings.stop, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except Overloaded as exc:
            return JSONResponse(error_body(str(exc), "rate_limit_exceeded", None, "server_busy"),
                                status_code=429, headers={"Retry-After": "1"})
        headers = {"X-Etude-Note": note} if note else {}
        reply_id, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if settings.stream:
            events = sse_events(job, reply_id, stamp, model_name, settings.include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        async def watch_client() -> None:  # tokens may flow without a pause, so a task of its own
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)
            job.cancelled.set()
            job.events.put_nowait(("disconnected", None))

        watcher = asyncio.create_task(watch_client())
        pieces = []
        try:
            while (event := await job.events.get())[0] == "delta":
                pieces.append(event[1])
        finally:
            watcher.cancel()
        kind, data = event
        if kind == "disconnected":  # nobody reads this; nginx's code for it
            return JSONResponse(error_body("the client closed the connection"), status_code=499)
        if kind == "error":
            return JSONResponse(error_body(data, "server_error"), status_code=500)
        message = {"role": "assistant", "content": "".join(pieces)}
        return JSONResponse({"id": reply_id, "object": "chat.completion", "created": stamp, "model": model_name,
                             "choices": [{"index": 0, "message": message, "logprobs": None,
                                          "finish_reason": data["finish_reason"]}],
                             "usage": usage(data)}, headers=headers)

    return app


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


async def sse_events(job: Job, reply_id: str, stamp: int, model_name: str,
                     include_usage: bool) -> AsyncIterator[str]:
    """The job's output as OpenAI chat.completion.chunk events, then `data: [DONE]`. Leaving
    early (the client went away, so the server cancels this generator) cancels the job."""
    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if delta is not None else []
        payload = {"id": reply_id, "object": "chat.completion.chunk", "created": stamp, "model": model_name,
                   "choices": choices, **({"usage": None} if include_usage else {}), **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, data = await job.events.get()
            if kind == "delta":
                yield chunk({"content": data})
            elif kind == "error":
                yield f"data: {json.dumps(error_body(data, 'server_error'))}\n\n"
                return
            else:
                yield chunk({}, data["finish_reason"])
                if include_usage:
                    yield chunk(None, usage=usage(data))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled.set()  # no effect on a finished job; stops one still generating or waiting


# ---- command line --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", help=f"model folder (default {SFT_DIR}, else {PRETRAINED_DIR})")
    add("--lora", metavar="NAME", help="apply a LoRA adapter: a name under weight/lora/ or an adapter folder")
    add("--model-name", help="the model id clients use (default: the folder's name, +NAME with --lora)")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    add("--port", type=int, default=8000, help="port to listen on (default 8000)")
    add("--max-queue", type=int, default=16,
        help="requests that may wait while one generates; more get 429 at once (default 16)")
    add("--threads", type=int, help="torch CPU threads for generation (default: torch's choice)")
    add("--temperature", type=float, default=0.7, help="default when a request gives none; 0 is greedy (0.7)")
    add("--top-p", type=float, default=0.9, help="default nucleus sampling mass (0.9)")
    add("--top-k", type=int, default=40, help="default: sample among the k most likely tokens; 0 for all (40)")
    add("--repetition-penalty", type=float, default=1.1, help="default; > 1 discourages repeats (1.1)")
    add("--max-new-tokens", type=int, default=256, help="default longest answer in tokens (256)")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    add("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="auto: bf16 on CUDA, fp32 on CPU")
    add("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
        help="uvicorn's log level (default info: one line per request)")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        problems.append(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.temperature <= 2:
        problems.append(f"--temperature must be in [0, 2], got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0 or args.repetition_penalty <= 0 or args.max_new_tokens < 1:
        problems.append("--top-k must be >= 0, --repetition-penalty > 0 and --max-new-tokens >= 1")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = check_args(args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seed = None  # build_chat's field; each request seeds its own generator
    try:
        folder = resolve_model_folder(args.model)
        args.model = str(folder)
        base = build_chat(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.model_name or folder.name + (f"+{Path(args.lora).name}" if args.lora else "")
    app = create_app(base, name, args.max_queue)
    print(f"serving {folder} as {name!r} ({base.model.num_parameters() / 1e6:.1f}M parameters) on "
          f"http://{args.host}:{args.port}/ (chat page at /, API at /v1)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
