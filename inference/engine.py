"""Continuous batching: one decoder that many requests share, joining and leaving between steps.

    engine = Engine(model, tokenizer, max_batch=16)
    request = Request(prompt_ids, max_new_tokens=64, generator=torch.Generator().manual_seed(1),
                      emit=lambda kind, data: print(kind, data))
    engine.submit(request)
    while engine.step(): pass              # or engine.start() for a background thread (the server)

The engine owns the model and a key/value cache of `max_batch` slots, each as long as the context,
allocated once. Every step it
  1. drops the rows whose caller cancelled (Request.cancelled) and the cancelled waiting requests;
  2. admits waiting requests into free slots and prefills their prompts, each alone and in chunks
     of `prefill_chunk` tokens (at most about `prefill_chunk` prompt tokens per step, so a long
     prompt does not stall the rows that are decoding); a finished prefill samples the first token;
  3. runs ONE decoding step for all decoding rows, each at its own position (model/decode_step.py:
     per-row rotary positions, keys written at each row's own column, an attention mask over its
     own slot; eager, or compiled once with `compile=True`, the server's --compile), and samples
     every row with its own settings and its own torch.Generator;
  4. streams each row's new text to its caller (emit("delta", text)) and frees the row at its stop
     token, its stop string, its length limit, or when its caller cancels (emit("done", ...)).

Exactness. A row's tokens do not depend on what else runs: the decoding forward always has the
same shape (all `max_batch` slots, idle ones fed a dummy token that writes to a scratch column of
the cache; keys over the whole context, masked per row), and a CPU fp32 matmul gives a row the
same bits whatever the other rows of a fixed-shape batch hold (measured; tests/test_engine.py
checks it token for token). Prefill runs each prompt alone, so it does not depend on others either.
Against model.generate() (batch 1) the decoding matmuls differ in the last bits (a 1-row product
takes another BLAS kernel than a many-row one: up to ~1e-5 on the logits), so an answer equals
generate()'s unless two candidates tie within that; greedy answers of the test models are equal.
A mixture of experts is the exception: its expert matmuls depend on how many rows chose each
expert, so its rows may differ in the last bits with the batch.

Cost of the fixed shape: idle slots are computed too, so pick --max-batch near the concurrency
you expect; prefix reuse was measured and left out (see README, Serving).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.decode_step import DecodeStepper
from model.model import EtudeModel, sample_next
from model.tokenizer import EtudeTokenizer

PREFILL_CHUNK = 512  # prompt tokens per prefill forward (and about the prefill work per step)


class StreamDecoder:
    """Turns token ids into text as they arrive. A byte-level token may end inside a
    multi-byte character; such text is held back until the character is complete."""

    def __init__(self, tokenizer: EtudeTokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


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


@dataclass
class Request:
    """One generation: a prompt, how to sample it, and where its output goes. `emit(kind, data)`
    is called from the engine's thread with ("delta", text), then once: ("done", {"finish_reason",
    "prompt_tokens", "completion_tokens"}), ("error", message), or ("cancelled", None) when the
    engine dropped it after `cancelled` was set.
    `output_ids` holds the generated ids (the stop id included) when it is done."""

    prompt_ids: list[int]
    max_new_tokens: int
    generator: torch.Generator | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_ids: Sequence[int] = ()
    stop: list[str] = field(default_factory=list)
    emit: Callable[[str, Any], None] = lambda kind, data: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty)


@dataclass
class _Row:
    """A request in a slot: how far its prompt is prefilled and where its next token goes."""

    request: Request
    slot: int
    budget: int  # new tokens it may still produce in total
    length: int = 0  # cached positions
    next_id: int | None = None  # the sampled token to feed at position `length` (None while prefilling)
    decoder: StreamDecoder | None = None
    matcher: StopMatcher | None = None


def cache_bytes(model: EtudeModel, max_batch: int, context: int) -> int:
    """Bytes of the engine's key/value cache for `max_batch` slots of `context` positions."""
    cfg, itemsize = model.config, model.embed_tokens.weight.element_size()
    return 2 * cfg.n_layers * max_batch * cfg.n_kv_heads * (context + 1) * cfg.head_dim * itemsize


def free_memory(device: torch.device) -> int | None:
    """Bytes that a new allocation can take on `device` (None when unknown): CUDA's free memory,
    or Linux's MemAvailable (free memory plus the page cache it can drop)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class Engine:
    """The continuous-batching scheduler (see the module docstring). submit() and status() may be
    called from any thread; step() from one thread only (the caller's, or start()'s)."""

    def __init__(self, model: EtudeModel, tokenizer: EtudeTokenizer | None, max_batch: int,
                 context: int | None = None, prefill_chunk: int = PREFILL_CHUNK, compile: bool = False):
        context = context or model.config.max_seq_len
        if max_batch < 1 or not 1 <= context <= model.config.max_seq_len or prefill_chunk < 1:
            raise ValueError(f"max_batch must be >= 1, context in [1, {model.config.max_seq_len}] and "
                             f"prefill_chunk >= 1; got {max_batch}, {context}, {prefill_chunk}")
        device = model.embed_tokens.weight.device
        needed, free = cache_bytes(model, max_batch, context), free_memory(device)
        if free is not None and needed > 0.9 * free:
            raise ValueError(f"the KV cache for --max-batch {max_batch} at a {context}-token context needs "
                             f"{needed / 2**20:,.0f} MiB, but {device} has {free / 2**20:,.0f} MiB free; "
                             "lower --max-batch")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.context, self.prefill_chunk = max_batch, context, prefill_chunk
        # The cache has one column more than the context: the scratch column where idle slots write.
        self.stepper = DecodeStepper(model, max_batch, context + 1, compile=compile)
        # Per slot, the tokens its text holds so far (prompt and answer), for the repetition penalty.
        self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=device)
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        self.steps = 0

    # ---- the callers' side ---------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; it is admitted at a step when a slot is free."""
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        with self.lock:
            self.waiting.append(request)
            self.lock.notify()

    def status(self) -> dict:
        with self.lock:
            return {"active": sum(row is not None for row in self.rows), "waiting": len(self.waiting),
                    "max_batch": self.max_batch}

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Generate for every request on the calling thread; returns them when all are done."""
        for request in requests:
            self.submit(request)
        while self.step():
            pass
        return list(requests)

    def start(self) -> None:
        """Step on a background thread, sleeping while there is nothing to do."""
        self.thread = threading.Thread(target=self._serve, name="etude-engine", daemon=True)
        self.thread.start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()

    def _serve(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.waiting and all(row is None for row in self.rows):
                    self.lock.wait()
                if self.closed:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug or an out-of-memory: every row hears of it, the engine lives on
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")

    # ---- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Cancel, admit, prefill, decode once. Returns whether any request is left."""
        self.steps += 1
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        with self.lock:
            return bool(self.waiting) or any(row is not None for row in self.rows)

    def _drop_cancelled(self) -> None:
        with self.lock:
            dropped = [r for r in self.waiting if r.cancelled.is_set()]
            self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())
        for row in self.rows:
            if row is not None and row.request.cancelled.is_set():
                self.rows[row.slot] = None
                dropped.append(row.request)
        for request in dropped:
            request.emit("cancelled", None)

    def _admit(self) -> None:
        admitted = []
        with self.lock:
            for slot in range(self.max_batch):
                if self.rows[slot] is None and self.waiting:
                    request = self.waiting.popleft()
                    budget = min(request.max_new_tokens, self.context - len(request.prompt_ids))
                    self.rows[slot] = _Row(request, slot, budget)
                    admitted.append(self.rows[slot])
        for row in admitted:  # outside the lock: emit() may take a lock of the caller's
            prompt = row.request.prompt_ids
            if self.tokenizer is not None:
                row.decoder, row.matcher = StreamDecoder(self.tokenizer), StopMatcher(row.request.stop)
            if row.budget <= 0:  # as generate(): a prompt that fills the context gets nothing
                self._finish(row, "length")
            else:
                self.seen[row.slot] = False
                self.seen[row.slot, torch.as_tensor(prompt, device=self.seen.device)] = True

    def _prefill(self) -> None:
        spent = 0
        for row in list(self.rows):
            if row is None or row.next_id is not None or spent >= self.prefill_chunk:
                continue
            prompt = row.request.prompt_ids
            chunk = prompt[row.length:row.length + self.prefill_chunk]
            ids = torch.as_tensor(chunk, device=self.seen.device)[None]
            logits, _, _ = self.model(ids, kv_cache=self.stepper.cache.row(row.slot, row.length, self.context),
                                      last_only=True)
            row.length += len(chunk)
            spent += len(chunk)
            if row.length == len(prompt):
                self._accept(row, self._sample(row, logits[0, -1]))

    def _decode(self) -> None:
        decoding = [row for row in self.rows if row is not None and row.next_id is not None]
        if not decoding:
            return
        device = self.seen.device
        ids = torch.zeros(self.max_batch, dtype=torch.long)
        rotary = torch.zeros(self.max_batch, dtype=torch.long)
        columns = torch.full((self.max_batch,), self.context, dtype=torch.long)
        for row in decoding:
            ids[row.slot], rotary[row.slot], columns[row.slot] = row.next_id, row.length, row.length
        logits = self.stepper.step(ids.to(device), rotary.to(device), columns.to(device))
        for row in decoding:
            row.length += 1
            self._accept(row, self._sample(row, logits[row.slot]))

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        request = row.request
        return int(sample_next(logits.float(), self.seen[row.slot], generator=request.generator, **request.sampling()))

    def _accept(self, row: _Row, token: int) -> None:
        """Record a sampled token, stream its text and finish the row if it is done."""
        request = row.request
        request.output_ids.append(token)
        self.seen[row.slot, token] = True
        if token in request.stop_ids:
            return self._finish(row, "stop")
        if row.decoder is not None:
            text, cut = row.matcher.push(row.decoder.push(token))
            if text:
                request.emit("delta", text)
            if cut:
                return self._finish(row, "stop", cut=True)
        if len(request.output_ids) >= row.budget:
            return self._finish(row, "length")
        row.next_id = token

    def _finish(self, row: _Row, reason: str, cut: bool = False) -> None:
        request = row.request
        if row.decoder is not None and not cut:  # the decoder's and the matcher's held-back text
            text, cut = row.matcher.push(row.decoder.flush())
            reason = "stop" if cut else reason
            text += "" if cut else row.matcher.flush()
            if text:
                request.emit("delta", text)
        request.finish_reason = reason
        self.rows[row.slot] = None
        request.emit("done", {"finish_reason": reason, "prompt_tokens": len(request.prompt_ids),
                              "completion_tokens": len(request.output_ids)})

    def _fail_all(self, message: str) -> None:
        for row in self.rows:
            if row is not None:
                self.rows[row.slot] = None
                row.request.emit("error", message)
