"""The Etude decoder: a Llama-shaped transformer in one file.

Pre-norm RMSNorm, rotary position embeddings in the Hugging Face `rotate_half` convention,
multi-head / grouped-query attention through `scaled_dot_product_attention` (on the CPU, causal
attention through the faster blocked kernel of model/attention.py), a SwiGLU
feed-forward, no biases, optionally tied input/output embeddings. Parameter names are those of
Hugging Face Llama (without its `model.` prefix), so exporting is a renaming at most.

With use_moe every block's feed-forward is a SparseMoE (MoERouter + routed SwiGLU experts, each
`intermediate_size` wide, + an optional gated shared expert), named as Qwen2-MoE names them:
`mlp.gate.weight` (router), `mlp.experts.{e}.{gate,up,down}_proj`, `mlp.shared_expert.*`,
`mlp.shared_expert_gate`. The forward's aux_loss is then the load-balancing loss.

    model = EtudeModel(EtudeConfig(...))
    logits, loss, aux_loss = model(input_ids, labels=labels)
    for token_id in model.generate(prompt_ids, max_new_tokens=64): ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import EtudeConfig
from model.attention import causal_attention
from model.rope import dynamic_inv_freq, rope_inv_freq

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as Llama does: under bf16 autocast the
        # statistics keep full precision while the activations stay narrow.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * normed


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary embeddings, Hugging Face layout: the frequencies are repeated
    as [f0..f(d/2-1), f0..f(d/2-1)] and paired with `rotate_half`. `scaling` is the config's
    rope_scaling (model/rope.py): linear and YaRN change the frequencies (YaRN also scales cos
    and sin), dynamic NTK recomputes them when a forward reaches past the trained length and the
    longest one so far (transformers' rule, see _dynamic_frequencies)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.head_dim, self.theta = head_dim, theta
        self.dynamic = scaling if scaling is not None and scaling["rope_type"] == "dynamic" else None
        if self.dynamic:  # transformers' state: the longest length seen, and its frequencies
            self._dynamic_len = self.dynamic["original_max_position_embeddings"]
            self._dynamic_inv_freq: torch.Tensor | None = None
        self.max_seq_len = max_seq_len
        self._build(max_seq_len)

    def _cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions[..., None].float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        if self.attention_factor == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        cos, sin = self._cos_sin(positions, self.inv_freq)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def _dynamic_frequencies(self, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """Dynamic NTK: the frequencies for a forward that reaches position seq_len - 1, or None
        where the plain tables apply. Kept as transformers keeps them (its dynamic_rope_update):
        a forward longer than any before (and than the trained length) recomputes them for its
        own length; later, shorter forwards reuse them until one ends within the trained length,
        which goes back to plain RoPE. See model/rope.py dynamic_inv_freq."""
        original = self.dynamic["original_max_position_embeddings"]
        if seq_len > self._dynamic_len:  # growth
            self._dynamic_len = seq_len
            self._dynamic_inv_freq = dynamic_inv_freq(self.head_dim, self.theta, self.dynamic, seq_len, device)
        elif seq_len < original < self._dynamic_len:  # back within the trained length: reset
            self._dynamic_len, self._dynamic_inv_freq = original, None
        return None if self._dynamic_inv_freq is None else self._dynamic_inv_freq.to(device)

    def _dynamic(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions, inv_freq)
        return cos.to(self.cos_table.dtype), sin.to(self.cos_table.dtype)

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(torch.arange(start, start + length)) as slices of the tables: the same values,
        without reading a position back from the tensor (which torch.compile cannot trace)."""
        end = start + length
        inv_freq = self._dynamic_frequencies(end, self.cos_table.device) if self.dynamic else None
        if inv_freq is not None:
            cos, sin = self._dynamic(torch.arange(start, end, device=self.cos_table.device), inv_freq)
            return cos[None, None], sin[None, None]
        if end > self.cos_table.shape[0]:
            self._build(max(end, 2 * self.cos_table.shape[0]))
        return self.cos_table[start:end][None, None], self.sin_table[start:end][None, None]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions: (T,) -> (1, 1, T, d) or (B, T) -> (B, 1, T, d).
        With dynamic scaling the largest position of the whole batch counts, as in transformers."""
        needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
        inv_freq = self._dynamic_frequencies(needed, position_ids.device) if self.dynamic and needed else None
        if inv_freq is not None:
            cos, sin = self._dynamic(position_ids, inv_freq)
        else:
            if needed > self.cos_table.shape[0]:
                self._build(max(needed, 2 * self.cos_table.shape[0]))
            cos, sin = self.cos_table[position_ids], self.sin_table[position_ids]
        if position_ids.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class KVCache:
    """Preallocated key/value buffers for every layer; `length` is how many positions are
    filled. Appending writes in place, so decoding allocates nothing per token."""

    def __init__(self, config: EtudeConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v of the new positions for `layer`; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: EtudeConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout
        # Decoding copies (model/decoding.py merge_projections) replace q/k/v by one layer.
        self.qkv_proj: nn.Linear | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int,
                kv_cache: KVCache | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        if self.qkv_proj is not None:
            # One matmul for q, k and v, and one rotary pass over the q and k heads together.
            heads = self.n_heads + self.n_kv_heads
            qk, v = self.qkv_proj(x).split([heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
            qk = apply_rotary(qk.view(batch, length, heads, self.head_dim).transpose(1, 2), cos, sin)
            q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)
        else:
            q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            v = self.v_proj(x)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(layer_idx, k, v)
        # A causal mask is only right when queries and keys start at the same position; with
        # earlier positions cached the caller passes an explicit mask (or none for one query).
        is_causal = attn_mask is None and k.shape[2] == length and length > 1
        dropout = self.dropout if self.training else 0.0
        if is_causal and dropout == 0.0 and q.device.type == "cpu" and not torch.compiler.is_compiling():
            # torch's CPU flash kernel is 2-3x slower than this blocked one (model/attention.py);
            # a compiled graph keeps SDPA, which Inductor lowers as a whole.
            out = causal_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        # Decoding copies (model/decoding.py merge_projections) replace gate/up by one layer.
        self.gate_up_proj: nn.Linear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class MoERouter(nn.Module):
    """Linear router (no bias): softmax over the experts in fp32, then the top_k experts of
    each token. Their weights are renormalised to sum to 1 when norm_topk_prob (Mixtral), else
    the raw softmax probabilities are used (Qwen2-MoE's norm_topk_prob false)."""

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default; EtudeModel re-draws it

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> weights (N, top_k) fp32, experts (N, top_k) long, probs (N, E) fp32."""
        # The routing decision is computed in fp32 even under autocast: a bf16 logit can flip
        # which expert wins, and the matrix is only n_experts wide, so fp32 costs nothing.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, probs


# Expert row counts are rounded up to a multiple of this for bf16/fp16 matmuls on CPU (see SparseMoE).
CPU_ROW_BUCKET = 64


class _GatherSlots(torch.autograd.Function):
    """rows = flat[token_of_row]: each token copied to the rows of its top_k slots, in expert
    order. The gradient is gathered back through row_of_slot (the rows of the slots, token-major)
    and summed over a token's slots, instead of index_select's scatter-add backward (slower on
    CPU, nondeterministic on GPU). Rows that no slot owns (padding) get no gradient."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, token_of_row: torch.Tensor, row_of_slot: torch.Tensor,
                top_k: int) -> torch.Tensor:
        ctx.save_for_backward(row_of_slot)
        ctx.top_k = top_k
        return flat.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (row_of_slot,) = ctx.saved_tensors
        per_slot = grad.index_select(0, row_of_slot)
        return per_slot.view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class SparseMoE(nn.Module):
    """Mixture-of-experts feed-forward: each token goes through its top_k routed experts
    (SwiGLU, `intermediate_size` wide each), weighted by the router; with n_shared_experts > 0 a
    shared SwiGLU of n_shared_experts * intermediate_size, scaled per token by
    sigmoid(shared_expert_gate(x)), is added for every token (Qwen2-MoE's shared expert, so the
    model exports to Qwen2MoeForCausalLM exactly).

    Dispatch is by expert, not by token: the (token, slot) pairs are sorted by expert id, the
    tokens gathered in that order, each expert runs one matmul chain over its contiguous slice,
    and the weighted results are added back into their tokens with one index_add.

    After each forward `last_counts` (assignments per expert) and `last_probs` (router
    probabilities) hold detached statistics for logging (EtudeModel.routing_stats), and
    `last_aux_loss` the unscaled load-balancing loss of that forward."""

    def __init__(self, config: EtudeConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        self.gate = MoERouter(config.hidden_size, config.n_experts, config.top_k, config.norm_topk_prob)
        self.experts = nn.ModuleList(FeedForward(config.hidden_size, config.intermediate_size)
                                     for _ in range(config.n_experts))
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.n_shared_experts > 0:
            self.shared_expert = FeedForward(config.hidden_size, config.n_shared_experts * config.intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.last_counts: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def router_entropy(self) -> torch.Tensor | None:
        """Mean entropy (nats) of the last forward's router distributions."""
        if self.last_probs is None:
            return None
        probs = self.last_probs.float()
        return -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts, probs = self.gate(flat)
        flat_experts = experts.reshape(-1)                       # (N * top_k,), token-major
        order = flat_experts.argsort(stable=True)                # slots grouped by expert
        counts = torch.bincount(flat_experts, minlength=self.n_experts)
        rows = counts
        if flat.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or flat.dtype != torch.float32):
            # oneDNN builds a bf16/fp16 CPU matmul per new shape, and the experts' row counts change
            # every step (measured: tiny-moe bf16 steps 2.2x dense instead of ~1.1x). Rounding each
            # expert's rows up to a multiple of CPU_ROW_BUCKET keeps the shapes few; the padding rows
            # read token 0 and carry weight 0, so they add exactly nothing.
            rows = (counts + CPU_ROW_BUCKET - 1) // CPU_ROW_BUCKET * CPU_ROW_BUCKET
        shift = (rows.cumsum(0) - rows) - (counts.cumsum(0) - counts)
        row_of_rank = torch.arange(order.numel(), device=order.device) + shift[flat_experts[order]]
        n_rows = int(rows.sum())  # the one host sync (the split sizes below need it anyway)
        token_of_row = torch.zeros(n_rows, dtype=torch.long, device=flat.device)
        token_of_row[row_of_rank] = order // self.top_k
        row_weights = weights.new_zeros(n_rows)
        row_weights[row_of_rank] = weights.reshape(-1)[order]
        row_of_slot = torch.empty_like(order)
        row_of_slot[order] = row_of_rank
        routed = _GatherSlots.apply(flat, token_of_row, row_of_slot, self.top_k)
        # A loop over experts (few), never over tokens: one SwiGLU per expert on its slice.
        outputs = [expert(chunk) for expert, chunk in zip(self.experts, routed.split(rows.tolist()))]
        expert_out = torch.cat(outputs) * row_weights.unsqueeze(-1).to(outputs[0].dtype)
        out = torch.zeros((flat.shape[0], expert_out.shape[-1]), dtype=expert_out.dtype, device=flat.device)
        out = out.index_add(0, token_of_row, expert_out)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * shared
        self.last_aux_loss = load_balancing_loss(probs, counts, self.top_k)
        self.last_counts, self.last_probs = counts.detach(), probs.detach()
        return out.reshape(shape[:-1] + (out.shape[-1],))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) logits against (N,) targets (IGNORE_INDEX rows skipped), computed
    in fp32 over row chunks of the logits, whatever their dtype: only one chunk is ever upcast. The
    gradient (softmax - one-hot) / count is written in the forward, in the logits' dtype, and
    scaled by the incoming gradient in the backward, so no fp32 copy of the full logits, of their
    log-softmax or of their gradient exists (F.cross_entropy on `logits.float()` makes all three)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_rows):
            rows = slice(start, start + chunk_rows)
            part = logits[rows].float()
            keep = valid[rows]
            target = targets[rows].clamp(min=0)[:, None]  # an ignored row picks column 0, then is masked out
            lse = torch.logsumexp(part, dim=-1)
            total += ((lse - part.gather(1, target).squeeze(1)) * keep).sum()
            if want_grad:
                probs = (part - lse[:, None]).exp_()
                probs.scatter_add_(1, target, -keep[:, None].float())
                grad[rows] = probs.mul_(keep[:, None] / count)
        ctx.save_for_backward(grad)
        return total / count  # 0/0 = nan when every target is ignored, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 1 << 22) -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX) (mean over the kept
    targets) without materialising fp32 copies of the full (N, V) logits; see _ChunkedCrossEntropy.
    chunk_bytes bounds the fp32 chunk (4 MiB: a few hundred rows at a 6,400-token vocabulary)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"chunked_cross_entropy takes (N, V) logits and (N,) targets, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.dtype == torch.float16:
        # fp16 has too little range to hold the unscaled gradient (a GradScaler scales it only in
        # the backward): keep torch's path, whose gradient stays fp32 until after the scaling.
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    chunk_rows = max(1, chunk_bytes // (4 * logits.shape[1]))
    return _ChunkedCrossEntropy.apply(logits, targets, chunk_rows)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one MoE layer, unscaled:
    n_experts * sum_e f_e * P_e, where f_e is the fraction of the (token, slot) assignments that
    went to expert e (counts / (tokens * top_k), so f sums to 1 for any top_k) and P_e the mean
    router probability of e. A perfectly balanced router gives 1; a collapsed one n_experts.

    transformers' Mixtral load_balancing_loss_func divides the counts by tokens only, so for
    one layer it returns exactly top_k times this value (tests/test_moe.py checks it)."""
    n_tokens, n_experts = probs.shape
    fraction = counts.to(probs.dtype) / max(n_tokens * top_k, 1)
    return n_experts * (fraction * probs.mean(dim=0)).sum()


class Block(nn.Module):
    def __init__(self, config: EtudeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SparseMoE(config) if config.use_moe else FeedForward(config.hidden_size, config.intermediate_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, self.layer_idx, kv_cache, attn_mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class EtudeModel(nn.Module):
    """Decoder-only language model. forward(input_ids, labels=None, kv_cache=None)
    returns (logits, loss, aux_loss); loss is None without labels, aux_loss is a zero
    scalar for dense models."""

    def __init__(self, config: EtudeConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # True in the copies model/decoding.py makes (merged or int8 weights): never saved.
        self.decoding_copy = False

    def set_rope_scaling(self, rope_type: str | None, factor: float = 1.0) -> None:
        """Scale RoPE `factor` times past the trained length from now on (EtudeConfig.
        with_rope_scaling: linear, dynamic or yarn; None for plain RoPE); max_seq_len, the usable
        context, becomes factor x the trained length. The weights are untouched."""
        self.config = self.config.with_rope_scaling(rope_type, factor)
        self.rotary = RotaryEmbedding(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta,
                                      self.config.rope_scaling).to(self.embed_tokens.weight.device)

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix; the projections that write into the
        residual stream (o_proj, down_proj) are scaled by 1/sqrt(2 * n_layers) so the stream's
        variance does not grow with depth (GPT-2's rule)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoERouter):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    # ---- forward -------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                kv_cache: KVCache | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """input_ids (B, T) -> logits (B, T, V) (or (B, 1, V) with last_only).

        labels (B, T) are the targets of each position (already shifted; IGNORE_INDEX = -100 is
        not trained). With a kv_cache the new tokens continue the cached positions. (Rows at
        different positions decode together in inference/engine.py.)"""
        length = input_ids.shape[1]
        start = kv_cache.length if kv_cache is not None else 0
        if start + length > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds max_seq_len "
                             f"{self.config.max_seq_len}; truncate the input")
        attn_mask = None
        if kv_cache is not None and start > 0 and length > 1:
            # New queries see every cached key and the new keys up to their own position.
            device = input_ids.device
            key_pos = torch.arange(start + length, device=device)
            attn_mask = key_pos[None, :] <= torch.arange(start, start + length, device=device)[:, None]
        cos, sin = self.rotary.span(start, length)  # positions = start .. start + length - 1
        x = self.dropout(self.embed_tokens(input_ids))
        for block in self.layers:
            x = block(x, cos, sin, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.length += length
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        aux_loss = logits.new_zeros((), dtype=torch.float32)
        if self.config.use_moe:
            # Mean over the MoE layers of each layer's own balance loss (so a balanced router
            # gives aux_loss_coef whatever the depth), times the coefficient.
            layer_losses = [block.mlp.last_aux_loss for block in self.layers]
            aux_loss = self.config.aux_loss_coef * torch.stack(layer_losses).mean()
        return logits, loss, aux_loss

    # ---- bookkeeping ---------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied output layer counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def matmul_parameters(self) -> int:
        """Weights one token is multiplied through: every matmul weight, the output layer included
        (a tied one counted as lm_head), only top_k of a mixture's routed experts."""
        matmul_params = self.num_parameters(exclude_embeddings=True)
        if self.config.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        cfg = self.config
        if cfg.use_moe:  # a token runs through top_k of the n_experts routed experts only
            per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
            matmul_params -= cfg.n_layers * (cfg.n_experts - cfg.top_k) * per_expert
        return matmul_params

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, the output layer
        included, plus attention's score and value products (PaLM appendix B)."""
        matmul_params, cfg = self.matmul_parameters(), self.config
        attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
        # Forward 2 and the input gradient 2 per weight; the weight gradient 2 more, but only for
        # weights that train (a LoRA run freezes the base: its few adapter weights are counted
        # whole, every expert's included, a slight over-count for a mixture of experts).
        if all(p.requires_grad for p in self.parameters()):
            return 6 * matmul_params + attention
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad and p is not self.embed_tokens.weight)
        if cfg.tie_embeddings and self.embed_tokens.weight.requires_grad:
            trainable += self.lm_head.weight.numel()
        return 4 * matmul_params + 2 * trainable + attention

    def estimate_mfu(self, tokens_per_second: float, seq_len: int, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""
        return tokens_per_second * self.flops_per_token(seq_len) / peak_flops

    def routing_stats(self) -> dict[str, list[float]] | None:
        """Routing of the last forward, per MoE layer, for logging (None for a dense model):
        each expert's share of the (token, slot) assignments and the mean router entropy in
        nats (log(n_experts) is uniform routing; near 0 means each token is sure of its experts;
        a share near 0 means a starved expert). Reading them costs one small device sync."""
        layers = [block.mlp for block in self.layers if isinstance(block.mlp, SparseMoE)]
        if not layers or layers[0].last_counts is None:
            return None
        counts = torch.stack([moe.last_counts for moe in layers]).float().cpu()
        shares = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
        entropy = torch.stack([moe.router_entropy() for moe in layers]).float().cpu()
        return {"expert_share": [[round(v, 4) for v in row] for row in shares.tolist()],
                "router_entropy": [round(v, 4) for v in entropy.tolist()]}

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: matrices of the blocks (and an untied output layer) decay;
        norms and the embedding table do not."""
        embedding = self.embed_tokens.weight
        decay, no_decay = [], []
        for param in self.parameters():
            if not param.requires_grad:
                continue
            (decay if param.dim() >= 2 and param is not embedding else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """The weights as saved on disk: contiguous, one copy of a tied matrix (under its
        embedding name, as Hugging Face does)."""
        if self.decoding_copy:
            raise ValueError("this is a decoding copy (merged projections / int8 weights, model/decoding.py): "
                             "save the model it was made from instead")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def load_saved_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load weights saved by state_dict_for_save, strictly: a missing or unexpected key, or a
        shape that differs, stops with a message naming them."""
        expected = {k: v.shape for k, v in self.state_dict_for_save().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(f"{k}: saved {tuple(state[k].shape)}, model {tuple(expected[k])}"
                             for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
        if missing or unexpected or wrong_shape:
            def show(items):
                return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
            parts = []
            if missing:
                parts.append(f"missing: {show(missing)}")
            if unexpected:
                parts.append(f"unexpected: {show(unexpected)}")
            if wrong_shape:
                parts.append(f"wrong shape: {show(wrong_shape)}")
            raise ValueError(f"weights in {source} do not fit this model ({'; '.join(parts)}). "
                             "Was it saved from a different architecture or preset?")
        self.load_state_dict(state, strict=not self.config.tie_embeddings)

    # ---- generation ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (),
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 compile: bool = False) -> Iterator[int]:
        """Yield new token ids one at a time for a single prompt. temperature 0 is greedy.
        Stops after a stop id (which is yielded), after max_new_tokens, or at max_seq_len.

        With the cache (the default) the prompt is prefilled once and every new token is one
        fixed-shape step of model/decode_step.py; `compile` runs that step through torch.compile
        for answers of at least COMPILE_MIN_TOKENS tokens (eager below that, or if compiling fails).
        use_cache=False recomputes the whole sequence per token (the reference the tests hold the
        cached steps to)."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("generate() needs at least one prompt token")
        device = self.embed_tokens.weight.device
        ids = ids.to(device)
        budget = min(max_new_tokens, self.config.max_seq_len - ids.numel())
        if budget <= 0:
            return
        stop = set(int(s) for s in stop_ids)
        if not use_cache:
            generated = ids
            for _ in range(budget):
                logits, _, _ = self(generated[None], last_only=True)
                next_id = sample_next(logits[0, -1].float(), generated, temperature, top_k, top_p,
                                      repetition_penalty, generator)
                generated = torch.cat((generated, next_id.view(1)))
                token = int(next_id)
                yield token
                if token in stop:
                    return
            return
        from model.decode_step import COMPILE_MIN_TOKENS, DecodeStepper, bucket_length

        prompt_len = ids.numel()
        length = bucket_length(prompt_len + budget, self.config.max_seq_len)
        stepper = DecodeStepper(self, 1, length, compile=compile and budget >= COMPILE_MIN_TOKENS)
        logits = stepper.prefill(ids)
        # The repetition penalty's set of seen tokens, kept as a mask and updated per token (no
        # torch.unique of a growing history each step).
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
            seen[ids] = True
        position = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        for index in range(budget):
            next_id = sample_next(logits.float(), seen, temperature, top_k, top_p, repetition_penalty, generator)
            token = int(next_id)
            yield token
            if token in stop or index + 1 == budget:
                return
            if seen is not None:
                seen[next_id] = True
            logits = stepper.step(next_id.view(1), position)[0]
            position += 1


def sample_next(logits: torch.Tensor, history: torch.Tensor | None, temperature: float, top_k: int | None,
                top_p: float | None, repetition_penalty: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next id from one row of logits (V,). Repetition penalty follows the CTRL /
    transformers rule (divide positive, multiply negative logits of tokens already seen); `history`
    is the ids seen so far, or a bool mask (V,) of them (generate() keeps one)."""
    if repetition_penalty != 1.0 and history is not None and history.numel():
        if history.dtype == torch.bool:
            penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(history, penalised, logits)
        else:
            seen = torch.unique(history)
            scores = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
    if temperature <= 0:
        return logits.argmax()
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
