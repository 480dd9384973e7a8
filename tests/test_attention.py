"""The blocked CPU causal attention (model/attention.py) against torch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

import model.attention as attention
from model.attention import causal_attention


def _inputs(batch, heads, kv_heads, length, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    def draw(h):
        return torch.randn(batch, h, length, dim, generator=generator).to(dtype).requires_grad_()
    return draw(heads), draw(kv_heads), draw(kv_heads), torch.randn(batch, heads, length, dim, generator=generator).to(dtype)


def _run(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    out.backward(grad_out)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return [out.detach()] + grads


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("shape", [
    (2, 4, 4, 16, 8),      # one block
    (2, 4, 2, 300, 16),    # grouped-query, a last block shorter than the others
    (3, 6, 2, 257, 8),     # three query heads per key/value head, one row past two blocks
    (1, 2, 1, 2, 4),       # the shortest causal sequence
])
def test_matches_sdpa_in_fp32(shape):
    q, k, v, grad_out = _inputs(*shape, torch.float32)
    ours, theirs = _run(causal_attention, q, k, v, grad_out), _run(_sdpa, q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"{name}: max diff {(a - b).abs().max()}"


def test_grouped_tiles_match_one_tile_per_row(monkeypatch):
    """Batch rows grouped into one matmul give what one row per matmul gives."""
    q, k, v, grad_out = _inputs(4, 4, 2, 40, 8, torch.float32)
    monkeypatch.setattr(attention, "BLOCK_ROWS", 16)
    monkeypatch.setattr(attention, "TILE_SCORES", 1 << 30)  # every batch row in one tile
    grouped = _run(causal_attention, q, k, v, grad_out)
    monkeypatch.setattr(attention, "TILE_SCORES", 1)        # one batch row per tile
    single = _run(causal_attention, q, k, v, grad_out)
    for a, b in zip(grouped, single):
        assert torch.allclose(a, b, atol=1e-6)


def test_recomputed_probabilities_give_the_same_bits(monkeypatch):
    """Over the memory budget the backward recomputes the probabilities: identical results."""
    q, k, v, grad_out = _inputs(2, 4, 2, 200, 16, torch.bfloat16)
    kept = _run(causal_attention, q, k, v, grad_out)
    monkeypatch.setattr(attention, "KEEP_PROBS_BYTES", 0)
    recomputed = _run(causal_attention, q, k, v, grad_out)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


def _eager_bf16(q, k, v):
    """transformers' eager attention recipe: matmul in the input dtype, softmax in fp32,
    probabilities back to the input dtype."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    length = q.shape[2]
    above = torch.ones(length, length, dtype=torch.bool).triu(1)
    return scores.float().masked_fill(above, float("-inf")).softmax(-1).to(q.dtype) @ v


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_error_lies_between_flash_and_eager_attention(seed):
    """In bf16 the scores are rounded before the softmax (flash keeps them in fp32), so the
    mean error against an fp32 reference is above flash's, within 2x of it, and no larger than
    that of the eager recipe (which rounds the scores and the output the same way)."""
    q, k, v, grad_out = _inputs(2, 4, 2, 256, 32, torch.bfloat16, seed=seed)
    reference = _run(_sdpa, *[t.detach().float().requires_grad_() for t in (q, k, v)], grad_out.float())
    results = {name: _run(fn, q, k, v, grad_out) for name, fn in
               (("ours", causal_attention), ("flash", _sdpa), ("eager", _eager_bf16))}
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        error = {impl: float((r[i].float() - reference[i]).abs().mean()) for impl, r in results.items()}
        assert results["ours"][i].dtype == torch.bfloat16
        assert error["ours"] <= 2 * error["flash"], f"{name}: {error}"
        assert error["ours"] <= 1.05 * error["eager"], f"{name}: {error}"


def test_no_probabilities_kept_without_gradients():
    q, k, v, _ = _inputs(1, 2, 2, 64, 8, torch.float32)
    with torch.no_grad():
        out = causal_attention(q, k, v)
    assert out.grad_fn is None
    assert torch.allclose(out, _sdpa(q, k, v).detach(), atol=2e-5)


def test_heads_that_do_not_share_evenly_are_refused():
    q, k, v, _ = _inputs(1, 3, 2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="3 query heads"):
        causal_attention(q, k, v[:, :2])


def test_autocast_runs_mixed_inputs_in_its_dtype():
    """A KV cache in fp32 under bf16 autocast hands fp32 keys to bf16 queries, as with SDPA."""
    q, k, v, _ = _inputs(1, 2, 2, 32, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_attention(q.bfloat16(), k, v)
        theirs = _sdpa(q.bfloat16(), k, v)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert (ours.float() - theirs.float()).abs().max() < 0.05
