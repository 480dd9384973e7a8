"""The decoding step shared by generate() and the server's engine: one token per row, fixed shapes.

A decoding step feeds one new token per row, each row at its own position, through every layer,
writing each row's new key and value into a preallocated cache at its own column and attending
over the whole cache through a mask (`key position <= the row's column`). Nothing in the step
depends on a Python number that changes from token to token, so its shapes are the same at every
step: it runs eagerly, or once compiled (`torch.compile`, fullgraph, static shapes) it runs as one
generated program per (model, batch, cache length) with no Python or dispatcher work per layer.

Where the time of a batch-1 step went before this (issue 28, `python tool/profile_decode.py`):
per layer some forty small operator calls around the seven matmuls (norm statistics and casts,
the rotary halves, cache slicing, the attention kernel's setup), a new `torch.cat` of the history
and a `torch.unique` of it per token for the repetition penalty. The eager step here keeps the
operator count of the model's forward (it *is* Block.forward) but allocates nothing per token
beyond activations; the compiled step fuses the pointwise work between the matmuls.

Compiling costs tens of seconds on a small CPU (measured in tool/profile_decode.py and stated in
the README), so it is used only when asked for (`compile=True`, the chat's and server's
`--compile`) and, even then, only for answers of at least COMPILE_MIN_TOKENS tokens. Inductor's
on-disk cache keeps what it can, but the program is frozen (specialised to the weights, so they
can be prepacked), so a new process pays most of the compilation again (measured 64-219 s per
precision on the loaded 2-core machine, 17-68 s in quieter minutes; README, Performance). If
compilation fails (no C++ compiler, an unsupported module) the step falls back to eager with a
warning, once.

    stepper = DecodeStepper(model, batch_size=1, length=bucket_length(needed, model.config.max_seq_len))
    logits = stepper.prefill(prompt_ids)                 # (V,) logits after the prompt, row 0
    logits = stepper.step(next_ids, positions)           # (B, V) for one new token per row
"""

from __future__ import annotations

import logging
import time

import torch

from model.model import EtudeModel, KVCache

logger = logging.getLogger(__name__)

# Answers shorter than this never wait for a compilation (it costs tens of seconds on a CPU, and
# saves about a millisecond per token there).
COMPILE_MIN_TOKENS = 64
# Cache lengths are rounded up to a power of two from this, so a compiled step serves many prompt
# and answer lengths (one compilation per bucket), and eager attention reads at most twice the
# columns it needs.
MIN_BUCKET = 128


def bucket_length(needed: int, limit: int) -> int:
    """The cache length for `needed` positions: the next power of two >= MIN_BUCKET, at most `limit`
    (the model's context, or more when the caller asks for a scratch column)."""
    length = MIN_BUCKET
    while length < needed:
        length *= 2
    return max(min(length, limit), needed)


class StepCache(KVCache):
    """A KVCache for fixed-shape decoding steps. Outside a step it is the ordinary cache (prefill
    appends positions length.. through the model's forward); inside one (`decoding` True) every row
    writes its new key/value at its own column, `columns[row]`, and attention sees the whole cache
    under a per-row mask."""

    def __init__(self, model: EtudeModel, batch_size: int, length: int):
        weight = model.embed_tokens.weight
        super().__init__(model.config, batch_size, length, weight.device, weight.dtype)
        self.rows = torch.arange(batch_size, device=weight.device)
        self.columns = torch.zeros(batch_size, dtype=torch.long, device=weight.device)
        self.key_positions = torch.arange(length, device=weight.device)
        self.decoding = False

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoding:
            return super().append(layer, k, v)
        # The cache keeps its dtype: under autocast (the trainer's sample) k and v come narrower.
        self.keys[layer][self.rows, :, self.columns] = k[:, :, 0].to(self.keys[layer].dtype)
        self.values[layer][self.rows, :, self.columns] = v[:, :, 0].to(self.values[layer].dtype)
        return self.keys[layer], self.values[layer]

    def row(self, index: int, length: int, max_len: int | None = None) -> KVCache:
        """A batch-1 KVCache over row `index`'s first `max_len` columns, filled to `length`: a
        prompt is prefilled through the model's own forward on it."""
        view = KVCache.__new__(KVCache)
        max_len = self.max_len if max_len is None else max_len
        view.keys = [k[index:index + 1, :, :max_len] for k in self.keys]
        view.values = [v[index:index + 1, :, :max_len] for v in self.values]
        view.max_len, view.length = max_len, length
        return view


def decode_logits(model: EtudeModel, cache: StepCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One fixed-shape step: ids (B,) at rotary positions (B,), keys written at cache.columns;
    returns logits (B, V). The function that is compiled."""
    mask = (cache.key_positions[None, :] <= cache.columns[:, None])[:, None, None, :]
    if model.rotary.dynamic:  # dynamic NTK: frequencies follow the longest position (model/model.py)
        cos, sin = model.rotary(positions[:, None])
    else:
        cos = model.rotary.cos_table.index_select(0, positions)[:, None, None]
        sin = model.rotary.sin_table.index_select(0, positions)[:, None, None]
    x = model.embed_tokens(ids[:, None])
    cache.decoding = True
    try:
        for block in model.layers:
            x = block(x, cos, sin, cache, mask)
    finally:
        cache.decoding = False
    return model.lm_head(model.norm(x))[:, 0]


class DecodeStepper:
    """A StepCache and the step that decodes on it, eager or compiled, for one model, batch size
    and cache length. Make one per generation (its cache is its own): the compiled program is the
    process's, shared by every stepper of the same model and shapes (a new cache of the same shapes
    does not recompile; tests/test_decode_step.py checks it)."""

    def __init__(self, model: EtudeModel, batch_size: int, length: int, compile: bool = False):
        self.model, self.batch_size, self.length = model, batch_size, length
        self.cache = StepCache(model, batch_size, length)
        if model.rotary.cos_table.shape[0] < length:
            model.rotary.span(0, length)  # the step indexes the tables, which must cover the cache
        self.compiled = compile and can_compile(model)
        self._step = _compiled_step() if self.compiled else decode_logits
        self.compile_seconds: float | None = None

    def prefill(self, prompt_ids: torch.Tensor, row: int = 0, start: int = 0) -> torch.Tensor:
        """Run prompt_ids (T,) through row `row` from position `start`; logits (V,) of the last."""
        view = self.cache.row(row, start)
        logits, _, _ = self.model(prompt_ids[None], kv_cache=view, last_only=True)
        return logits[0, -1]

    def step(self, ids: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) of one token per row: ids (B,) at rotary positions (B,), each row's key and
        value written at `columns` (default: its position), attending to the columns up to it."""
        self.cache.columns.copy_(positions if columns is None else columns)
        if self.compiled:
            try:
                return self._timed_compiled(ids, positions)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: decode eagerly instead
                _COMPILE_BROKEN["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                logger.warning("torch.compile of the decoding step failed (%s); decoding eagerly",
                               _COMPILE_BROKEN["reason"])
                self.compiled, self._step = False, decode_logits
        return decode_logits(self.model, self.cache, ids, positions)

    def _timed_compiled(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.compile_seconds is not None:
            return self._step(self.model, self.cache, ids, positions)
        start = time.perf_counter()
        logits = self._step(self.model, self.cache, ids, positions)
        self.compile_seconds = time.perf_counter() - start
        return logits


_COMPILE_BROKEN: dict[str, str] = {}
_COMPILED: list = []


def _compiled_step():
    """One torch.compile wrapper of decode_logits for the process (Dynamo keys its graphs on the
    model, cache and shapes it meets, so every stepper shares it)."""
    if not _COMPILED:
        import torch._dynamo
        # One graph per (model, batch, length, dtype): a chat or server meets a handful.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # freezing: the weights are constants of the program, which lets Inductor prepack them for
        # oneDNN's matmuls (bf16 single-row products ~2x faster measured) and fold the casts.
        _COMPILED.append(torch.compile(decode_logits, fullgraph=True, dynamic=False, options={"freezing": True}))
    return _COMPILED[0]


def can_compile(model: EtudeModel) -> bool:
    """Whether compiling the step is worth trying: not after a failure in this process, not for a
    mixture of experts (its dispatch sizes depend on the routing, a host sync per layer), not with
    dynamic RoPE scaling (its frequencies depend on the longest position, read on the host)."""
    return not _COMPILE_BROKEN and not model.config.use_moe and not model.rotary.dynamic


def compile_failure() -> str | None:
    """Why compiled decoding was given up in this process, or None."""
    return _COMPILE_BROKEN.get("reason")
