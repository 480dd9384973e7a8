"""Causal self-attention on the CPU, computed in blocks of query rows with batched matmuls.

Why not `F.scaled_dot_product_attention` on the CPU: its flash kernel runs its score and value
products as many small matrix products with a scalar-ish softmax around them. Measured on the
2-core AVX-512-BF16 CPU this repository is developed on, at batch 8 x 8 heads x 512 positions x
64 (tool/PERFORMANCE.md, round 4), bf16 forward + backward took 83 ms there against 32 ms here,
and fp32 94 ms against 59 ms — a third of a bf16 training step was that kernel.

What this does instead, for each block of BLOCK_ROWS query rows (over a group of batch rows
sized to stay in cache):
  - scores = scale * q_block @ k[:end].T in one batched matmul (`baddbmm`, the scale applied in
    fp32 inside it), only against the keys the block can see (causal: a block never reads keys
    after its last row, so about half of the full T x T work is skipped);
  - the block's own diagonal square gets -inf above the diagonal, then torch's softmax kernel
    (fp32 inside, output in the input dtype);
  - out_block = probs @ v[:end].
The backward uses torch's fused softmax backward (probs * (dp - rowsum(dp * probs))), and sums
the key and value gradients of the blocks in fp32. The probabilities are kept for the backward
when they fit in KEEP_PROBS_BYTES per layer, else recomputed, which gives exactly the same
values (the same matmul and softmax on the same inputs), so the choice never changes a result.

Numerics: under bf16 the scores are rounded to bf16 before the softmax (as transformers' eager
attention does); flash keeps them in fp32. The errors against an fp32 reference are of the same
size as flash's (tests/test_attention.py). Grouped-query attention stacks the query heads that
share a key/value head along the rows of one matmul, so keys and values are never repeated.
"""

from __future__ import annotations

import functools

import torch

# Query rows per block: 128 was the fastest of 64 / 128 / 256 at 256 and 512 positions.
BLOCK_ROWS = 128
# Score elements per batched matmul (query rows x visible keys x heads x batch rows): 1M bf16
# scores are 2 MiB, about one core's L2 cache here; batch rows are grouped up to this.
TILE_SCORES = 1 << 20
# Keep the probabilities for the backward up to this many bytes per call (one layer), else
# recompute them there (~25% more backward time measured at the issue-11 shape). Probabilities
# grow with T^2: 21 MB at batch 8 x 8 heads x 512 in bf16, 450 MB at batch 32 x 12 x 1024.
KEEP_PROBS_BYTES = 64 << 20


def _tiles(batch: int, heads: int, length: int) -> list[tuple[int, int, int, int]]:
    """(first batch row, last batch row + 1, first query row, last query row + 1) of each tile,
    in the order both passes walk them."""
    tiles = []
    for start in range(0, length, BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, length)
        rows_per_tile = max(1, TILE_SCORES // (heads * (end - start) * end))
        for first in range(0, batch, rows_per_tile):
            tiles.append((first, min(first + rows_per_tile, batch), start, end))
    return tiles


class BlockCausalAttention(torch.autograd.Function):
    """softmax(scale * q k^T + causal mask) v for q (B, H, T, D) and k, v (B, Hkv, T, D), H a
    multiple of Hkv. Returns (B, H, T, D)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        q = q.contiguous().view(batch, kv_heads, group, length, dim)
        k, v = k.contiguous(), v.contiguous()
        # The output is written in (B, T, H, D) memory and returned as a (B, H, T, D) view, so the
        # caller's transpose back to (B, T, H * D) for the output projection costs no copy.
        out = q.new_empty(batch, length, kv_heads, group, dim)
        tiles = _tiles(batch, heads, length)
        kept_bytes = heads * q.element_size() * sum((last - first) * (end - start) * end
                                                     for first, last, start, end in tiles)
        keep = any(ctx.needs_input_grad) and kept_bytes <= KEEP_PROBS_BYTES
        kept = []
        # The inputs already are in the compute dtype; autocast must not move the softmax to fp32.
        with torch.autocast(q.device.type, enabled=False):
            for first, last, start, end in tiles:
                q_tile = _query_tile(q, first, last, start, end)
                probs = _probs(q_tile, k, first, last, start, end, scale)
                values = v[first:last, :, :end].reshape(-1, end, dim)
                result = torch.bmm(probs, values).view(last - first, kv_heads, group, end - start, dim)
                out[first:last, start:end] = result.permute(0, 3, 1, 2, 4)
                if keep:
                    kept.append(probs)
        ctx.save_for_backward(q, k, v, *kept)
        ctx.scale = scale
        return out.view(batch, length, heads, dim).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, *kept = ctx.saved_tensors
        batch, kv_heads, group, length, dim = q.shape
        grad_out = grad_out.view(batch, kv_heads, group, length, dim)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        tiles = _tiles(batch, kv_heads * group, length)  # the forward's, in the same order
        # Autocast off as in the forward, so recomputed probabilities are the forward's bit for bit.
        with torch.autocast(q.device.type, enabled=False):
            for index, (first, last, start, end) in enumerate(tiles):
                rows = last - first
                q_tile = _query_tile(q, first, last, start, end)
                probs = kept[index] if kept else _probs(q_tile, k, first, last, start, end, ctx.scale)
                grad_tile = _query_tile(grad_out, first, last, start, end)
                keys = k[first:last, :, :end].reshape(-1, end, dim)
                values = v[first:last, :, :end].reshape(-1, end, dim)
                grad_v[first:last, :, :end] += torch.bmm(probs.transpose(1, 2), grad_tile).view(
                    rows, kv_heads, end, dim)
                grad_probs = torch.bmm(grad_tile, values.transpose(1, 2))
                grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
                grad_q[first:last, :, :, start:end] = torch.baddbmm(
                    grad_scores.new_empty(()), grad_scores, keys, beta=0, alpha=ctx.scale
                ).view(rows, kv_heads, group, end - start, dim)
                grad_k[first:last, :, :end] += torch.baddbmm(
                    grad_scores.new_empty(()), grad_scores.transpose(1, 2), q_tile, beta=0, alpha=ctx.scale
                ).view(rows, kv_heads, end, dim)
        heads = kv_heads * group
        return (grad_q.view(batch, heads, length, dim), grad_k.to(k.dtype), grad_v.to(v.dtype), None)


def _query_tile(q: torch.Tensor, first: int, last: int, start: int, end: int) -> torch.Tensor:
    """Rows start:end of batch rows first:last of q (B, Hkv, G, T, D) as (rows * Hkv, G * n, D):
    the query heads sharing a key/value head stacked along the rows."""
    rows, kv_heads, group, _, dim = q[first:last].shape
    return q[first:last, :, :, start:end].reshape(rows * kv_heads, group * (end - start), dim)


@functools.lru_cache(maxsize=16)
def _above_diagonal(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool, True where a key comes after its query (read only)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _probs(q_tile: torch.Tensor, k: torch.Tensor, first: int, last: int, start: int, end: int,
           scale: float) -> torch.Tensor:
    """Softmax probabilities of one tile, (rows * Hkv, G * n, end), in q's dtype."""
    keys = k[first:last, :, :end].reshape(-1, end, k.shape[-1])
    scores = torch.baddbmm(q_tile.new_empty(()), q_tile, keys.transpose(1, 2), beta=0, alpha=scale)
    n = end - start
    # Only the block's own square has keys after some of its queries.
    own_square = scores.view(scores.shape[0], -1, n, end)[..., start:end]
    own_square.masked_fill_(_above_diagonal(n, q_tile.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) starting at the same position,
    without dropout, on the CPU; see the module docstring."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not share {k.shape[1]} key/value heads evenly")
    # As autocast does for SDPA: under it everything runs in its dtype (a KV cache may hold fp32
    # keys for bf16 queries); without it the three must agree.
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return BlockCausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
