"""Serve an Etude model over an OpenAI-compatible HTTP API, with a browser chat page.

    python inference/server.py                                    # weight/etude_sft_model on 127.0.0.1:8000
    python inference/server.py --model weight/etude_sft_model --lora identity --port 8080
    ETUDE_API_KEY=secret python inference/server.py --host 0.0.0.0  # on a network: with a key
    # then open http://127.0.0.1:8000/ in a browser, or use any OpenAI client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models,
GET /health, and the chat page at /. Binds 127.0.0.1 unless --host says otherwise, and then
answers only requests addressed to this machine by name (Host header; DNS rebinding).

Who gets in: with --api-key, --api-key-file or $ETUDE_API_KEY every /v1 route wants
"Authorization: Bearer KEY" (401 otherwise; the chat page asks for the key). Bodies must be
Content-Type: application/json (415 otherwise), so no web page can post to the server with a plain
form. CORS is off; --allowed-origins opens it to the pages named.

Requests: messages (roles system, developer (= system), user, assistant (with tool_calls), tool;
text content), tools (function tools) and tool_choice ("auto", "none", "required" or a named
function; the model's calls come back as tool_calls with finish_reason "tool_calls", streamed as
OpenAI streams them; a malformed call comes back as text), chat_template_kwargs.enable_thinking
(false: answer without a <think> block; reasoning comes back as reasoning_content), model
(optional; another name than the served one is a 404 model_not_found), temperature 0 or
[1e-5, 2], top_p [1e-6, 1], max_tokens / max_completion_tokens >= 1, stop (a string or up to 4),
seed (same seed, same text), n = 1 only, stream, stream_options.include_usage; as vLLM accepts
them, top_k, repetition_penalty [0.01, 10] and ignore_eos; and truncation ("auto" or "disabled",
as OpenAI's Responses API names it). Omitted values take the server's flags. Anything invalid or
unsupported is a 4xx with an OpenAI-style {"error": {...}} body: 400, 404 (model), 408 (headers or
body too slow), 413 (body too large), 415, 429 (queue full), never a 500.

A prompt longer than the context is a 400 context_length_exceeded naming the sizes, unless
truncation is "auto" (--truncation auto, or per request; the chat page asks for it): then the
oldest turns are dropped, then the start of the last message, never the system message nor the
template's markers, exactly as inference/inference.py trims; the response carries an X-Etude-Note
header saying what was dropped. completion_tokens counts every token the model produced, the
closing <|im_end|> included.

A request is checked in this order, each check cheap before the next: headers (within
--header-timeout), size (--max-body-bytes, within --body-timeout), room in the queue (--max-queue;
429 at once). Then, in a worker thread so that the server keeps answering meanwhile: JSON, message
count (--max-messages) and characters (--max-chars), and only then tokenizing. The
continuous-batching engine (inference/engine.py) then decodes up to --max-batch requests together,
one token each per step, taking waiting requests in arrival order as slots free up; a seeded
request gives the same text whatever else is running. Its KV cache (--max-batch slots of the
whole context) is allocated at start-up, its size printed, and a setting that does not fit in
memory is refused. A client that disconnects (or presses stop on the page) cancels its request:
the engine drops it at its next step, or before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from starlette.middleware.cors import CORSMiddleware

from config import PRETRAINED_DIR, SFT_DIR
from inference.chat_request import (TRUNCATION, Limits, RequestError, Settings, decode_json, error_body,
                                    parse_request, prepare_prompt)
from inference.http_guard import API_KEY_ENV, ErrorResponse, Guard, header_timeout_protocol, is_loopback, read_body, \
    refusal, resolve_api_key
from inference.engine import Engine, Request as Generation, cache_bytes
from inference.inference import ROPE_SCALING_HELP, Chat, build_chat, resolve_model_folder, sampling_problems
from model.builtin_tools import tool_names
from model.chat_markup import ReplyStream

WEB_DIR = Path(__file__).resolve().parent / "web"


# ---- the waiting line in front of the engine -----------------------------------------------

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


class Admission:
    """The server's side of the continuous-batching engine: a bounded line (max_batch generating,
    max_queue more waiting) and the outcome counts. A request takes its place (reserve) before its
    prompt is prepared, so that a full line refuses it before any tokenizing; it then either
    submits its job or gives the place back."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.lock = threading.Lock()
        self.preparing = 0  # places reserved by requests whose prompt is being prepared
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0, "generated_tokens": 0}
        engine.start()

    def reserve(self) -> None:
        """A place in the line, or Overloaded when there is none."""
        with self.lock:
            line = self.engine.status()
            if self.preparing + line["waiting"] + line["active"] >= self.engine.max_batch + self.max_queue:
                self.counts["rejected"] += 1
                raise Overloaded(f"the server is busy: {line['active']} request(s) generating and "
                                 f"{line['waiting'] + self.preparing} waiting (--max-batch {self.engine.max_batch}, "
                                 f"--max-queue {self.max_queue}); retry shortly")
            self.preparing += 1

    def release(self) -> None:
        """Give back a reserved place whose request was refused while its prompt was prepared."""
        with self.lock:
            self.preparing -= 1

    def submit(self, job: Job) -> None:
        """Hand the job of a reserved place to the engine."""
        chat = job.chat

        def emit(kind: str, data: Any) -> None:
            if kind in ("done", "error", "cancelled"):
                outcome = {"done": "completed", "error": "failed", "cancelled": "cancelled"}[kind]
                with self.lock:
                    self.counts[outcome] += 1
                    self.counts["generated_tokens"] += len(request.output_ids)
            job.emit(kind, data)

        request = Generation(job.prompt_ids, chat.max_new_tokens, chat.generator, stop_ids=chat.stop_ids,
                             stop=job.stop, emit=emit, cancelled=job.cancelled, **chat.sampling)
        with self.lock:
            self.preparing -= 1
            self.engine.submit(request)

    def status(self) -> dict:
        with self.lock:
            line = self.engine.status()
            return {"active": line["active"], "running": line["active"], "waiting": line["waiting"] + self.preparing,
                    "max_batch": self.engine.max_batch, "max_queue": self.max_queue, **self.counts}

    def close(self) -> None:
        self.engine.close()


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
    # tool_choice "none": the model is not shown the tools, and nothing it writes is taken as a call
    chat.tools = settings.tools if settings.tool_choice != "none" else None
    chat.enable_thinking = settings.enable_thinking
    chat.reply_prefix = settings.reply_prefix
    return chat


def reply_reader(settings: Settings) -> ReplyStream:
    """What takes a reply apart (thinking, content, tool calls) for this request; the text of a
    forced call's opening (Settings.reply_prefix) is pushed into it first."""
    reader = ReplyStream(tool_names(settings.tools) if settings.tools else None,
                         parse_calls=bool(settings.tools) and settings.tool_choice != "none",
                         thinking=settings.enable_thinking is not False and not settings.reply_prefix)
    reader.push(settings.reply_prefix)
    return reader


def openai_calls(calls: list) -> list[dict]:
    """ToolCalls as OpenAI's tool_calls, each with an id of its own."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for call in calls]


def create_app(base: Chat, model_name: str, max_queue: int = 16, limits: Limits = Limits(),
               api_key: str | None = None, check_host: bool = False, allowed_origins: tuple[str, ...] = (),
               truncation: str = "disabled", max_batch: int = 8) -> FastAPI:
    """The FastAPI app serving `base` (its model, tokenizer and default sampling) as `model_name`,
    decoding up to `max_batch` requests together. `check_host` (for a server bound to loopback)
    refuses a Host header that names another machine; `truncation` is what a request that does not
    say gets for a prompt longer than the context. Raises ValueError when the KV cache of
    `max_batch` slots would not fit in memory."""
    engine = Admission(Engine(base.model, base.tokenizer, max_batch, compile=base.compile), max_queue)
    # One thread prepares prompts (tokenizing), so that the event loop keeps answering meanwhile
    # and admitted requests reach the engine in the order they came.
    preparing = ThreadPoolExecutor(1, thread_name_prefix="etude-prompt")
    created = int(time.time())

    async def lifespan(app):
        yield
        engine.close()
        preparing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Etude LLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    app.add_middleware(Guard, api_key=api_key, check_host=check_host)
    if allowed_origins:  # outermost: answers preflights, and adds its headers to the Guard's refusals too
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Etude-Note"])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path[:100]}; this server has POST /v1/chat/completions, "
                   "GET /v1/models, GET /health and the chat page at /") if exc.status_code in (404, 405) \
            else str(exc.detail)
        return ErrorResponse(error_body(message, kind, None, str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug of ours: still JSON
        return ErrorResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

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

    def prepare(raw: bytes) -> tuple[Settings, Chat, list[int], str | None]:
        """From body bytes to prompt ids: parsing, then tokenizing (both in the preparing thread)."""
        settings = parse_request(decode_json(raw), model_name, limits)
        chat = request_chat(base, settings)
        return settings, chat, *prepare_prompt(chat, settings, truncation)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            raw = await read_body(request, limits)
        except RequestError as exc:  # a client that is too big or too slow does not keep the connection
            return refusal(exc, {"Connection": "close"} if exc.status in (408, 413) else None)
        try:  # before any parsing, so that an overloaded server refuses at once
            engine.reserve()
        except Overloaded as exc:
            return JSONResponse(error_body(str(exc), "rate_limit_exceeded", None, "server_busy"),
                                status_code=429, headers={"Retry-After": "1"})
        try:
            settings, chat, ids, note = await asyncio.get_running_loop().run_in_executor(preparing, prepare, raw)
        except RequestError as exc:
            engine.release()
            return refusal(exc)
        except BaseException:  # cancelled (the client left) or a bug: the place goes back either way
            engine.release()
            raise
        job = Job(chat, ids, settings.stop, asyncio.get_running_loop())
        engine.submit(job)
        headers = {"X-Etude-Note": note} if note else {}
        reply_id, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if settings.stream:
            events = sse_events(job, reply_id, stamp, model_name, settings.include_usage, reply_reader(settings))
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
        reader = reply_reader(settings)
        events = reader.push("".join(pieces)) + reader.finish()
        content = "".join(text for kind, text in events if kind == "content")
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if reader.calls else "")}
        reasoning = [text for kind, text in events if kind == "reasoning"]
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        finish = data["finish_reason"]
        if reader.calls:
            message["tool_calls"], finish = openai_calls(reader.calls), "tool_calls"
        return JSONResponse({"id": reply_id, "object": "chat.completion", "created": stamp, "model": model_name,
                             "choices": [{"index": 0, "message": message, "logprobs": None,
                                          "finish_reason": finish}],
                             "usage": usage(data)}, headers=headers)

    return app


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


async def sse_events(job: Job, reply_id: str, stamp: int, model_name: str,
                     include_usage: bool, reader: ReplyStream | None = None) -> AsyncIterator[str]:
    """The job's output as OpenAI chat.completion.chunk events, then `data: [DONE]`. Leaving
    early (the client went away, so the server cancels this generator) cancels the job.

    Through `reader`, reasoning goes out as `reasoning_content` deltas and each tool call as
    OpenAI streams them: a delta with its index, id, type and name (arguments ""), then one with
    its arguments; the last chunk's finish_reason is then "tool_calls"."""
    reader = reader or ReplyStream(parse_calls=False)
    n_calls = 0

    def deltas(events: list) -> Iterator[str]:
        nonlocal n_calls
        for kind, data in events:
            if kind == "tool_call":
                call = openai_calls([data])[0]
                yield chunk({"tool_calls": [{"index": n_calls, "id": call["id"], "type": "function",
                                             "function": {"name": data.name, "arguments": ""}}]})
                yield chunk({"tool_calls": [{"index": n_calls, "function": {"arguments": data.arguments}}]})
                n_calls += 1
            else:
                yield chunk({"reasoning_content" if kind == "reasoning" else "content": data})

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
                for event in deltas(reader.push(data)):
                    yield event
            elif kind == "error":
                yield f"data: {json.dumps(error_body(data, 'server_error'))}\n\n"
                return
            else:
                for event in deltas(reader.finish()):
                    yield event
                yield chunk({}, "tool_calls" if n_calls else data["finish_reason"])
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
    limits = Limits()
    add("--model", help=f"model folder (default {SFT_DIR}, else {PRETRAINED_DIR})")
    add("--lora", metavar="NAME", help="apply a LoRA adapter: a name under weight/lora/ or an adapter folder")
    add("--model-name", help="the model id clients use (default: the folder's name, +NAME with --lora)")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    add("--port", type=int, default=8000, help="port to listen on (default 8000)")
    add("--max-batch", type=int, default=8,
        help="requests decoded together (KV-cache slots, allocated at start-up; default 8)")
    add("--max-queue", type=int, default=16,
        help="requests that may wait while --max-batch generate; more get 429 at once (default 16)")
    add("--threads", type=int, help="torch CPU threads for generation (default: torch's choice)")
    add("--temperature", type=float, default=0.7, help="default when a request gives none; 0 is greedy (0.7)")
    add("--top-p", type=float, default=0.9, help="default nucleus sampling mass (0.9)")
    add("--top-k", type=int, default=40, help="default: sample among the k most likely tokens; 0 for all (40)")
    add("--repetition-penalty", type=float, default=1.1, help="default; > 1 discourages repeats (1.1)")
    add("--max-new-tokens", type=int, default=256, help="default longest answer in tokens (256)")
    add("--truncation", choices=TRUNCATION, default="disabled",
        help="a prompt longer than the context: disabled = 400 context_length_exceeded (default), auto = drop "
             "the oldest turns (never the system message); a request's own \"truncation\" field wins")
    add("--api-key", help=f"require this key (Authorization: Bearer KEY) on every /v1 route; also --api-key-file "
        f"or ${API_KEY_ENV}, which keep it out of the process list")
    add("--api-key-file", help="read the API key from the first line of this file")
    add("--allowed-origins", default="",
        help="comma-separated web origins (e.g. https://app.example.com) whose pages may call the API "
             "(CORS); * for any. Default: none (CORS off)")
    add("--max-body-bytes", type=int, default=limits.max_body_bytes,
        help=f"largest request body; larger ones get 413 unread (default {limits.max_body_bytes})")
    add("--max-messages", type=int, default=limits.max_messages,
        help=f"most messages in one request (default {limits.max_messages})")
    add("--max-chars", type=int, default=limits.max_chars,
        help=f"most characters in one request's messages (default {limits.max_chars})")
    add("--header-timeout", type=float, default=limits.header_timeout,
        help=f"seconds a client may take to send a request's headers (default {limits.header_timeout:g})")
    add("--body-timeout", type=float, default=limits.body_timeout,
        help=f"seconds a client may take to send a request's body (default {limits.body_timeout:g})")
    add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    add("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
        help="auto: bf16 on CUDA, fp32 on CPU")
    add("--rope-scaling", metavar="TYPE:FACTOR", help=ROPE_SCALING_HELP)
    add("--compile", action=argparse.BooleanOptionalAction, default=False,
        help="run the engine's decoding step through torch.compile: faster per token, after a one-time "
             "compilation (tens of seconds on a CPU) at the first request (default off)")
    add("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
        help="uvicorn's log level (default info: one line per request)")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        problems.append(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 0:
        problems.append(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    problems += sampling_problems(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for flag in ("max_body_bytes", "max_messages", "max_chars", "header_timeout", "body_timeout"):
        if not getattr(args, flag) > 0:
            problems.append(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = check_args(args)
    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
    except ValueError as exc:
        problems.append(str(exc))
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
    limits = Limits(args.max_body_bytes, args.max_messages, args.max_chars, args.header_timeout, args.body_timeout)
    loopback = is_loopback(args.host)
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    model = base.model
    print(f"KV cache: {args.max_batch} slots x {model.config.max_seq_len} positions, "
          f"{cache_bytes(model, args.max_batch, model.config.max_seq_len) / 2**20:,.1f} MiB "
          f"({model.embed_tokens.weight.dtype}, {model.embed_tokens.weight.device})", file=sys.stderr, flush=True)
    try:
        app = create_app(base, name, args.max_queue, limits, api_key=api_key, check_host=loopback,
                         allowed_origins=origins, truncation=args.truncation, max_batch=args.max_batch)
    except ValueError as exc:  # the KV cache does not fit
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not loopback and api_key is None:
        print(f"warning: binding {args.host} without an API key: anyone who can reach this port can use the "
              f"model. Set one with --api-key-file FILE or ${API_KEY_ENV}.", file=sys.stderr, flush=True)
    print(f"serving {folder} as {name!r} ({base.model.num_parameters() / 1e6:.1f}M parameters) on "
          f"http://{args.host}:{args.port}/ (chat page at /, API at /v1"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            http=header_timeout_protocol(args.header_timeout))
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
