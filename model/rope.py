"""Rotary frequencies: plain RoPE and the three ways of stretching it past the trained context
(EtudeConfig.rope_scaling), computed as transformers' Llama computes them
(transformers/modeling_rope_utils.py), so that a scaled model exports with the same logits:

    linear    every frequency divided by factor: position p looks like p / factor (position
              interpolation). Fine for long contexts, a little worse inside the trained one.
    dynamic   NTK-aware: plain RoPE up to the trained length L; a forward whose last position
              is past it (seq_len = last position + 1 > L) uses the base
              theta * (factor * seq_len / L - (factor - 1)) ** (d / (d - 2)), recomputed when
              seq_len grows past the longest seen so far (see dynamic_inv_freq).
    yarn      YaRN: high frequencies (many turns within L) kept, low ones divided by factor, a
              linear ramp between (beta_fast / beta_slow turns mark its ends), and cos/sin
              multiplied by attention_factor (0.1 * ln(factor) + 1 by default), which sharpens
              attention by its square.

The arithmetic follows transformers step by step (the same operations in the same float
precision), not just the same formulas: parity tests compare logits to 1e-5.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE: theta ** (-2i / d) for i < d / 2, fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """What YaRN multiplies cos and sin by: attention_factor if given, else the ratio of the
    mscale and mscale_all_dim corrections when both are set (DeepSeek's form), else
    0.1 * ln(factor) + 1."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension_of(turns: float) -> float:
        """The (fractional) frequency index that turns `turns` times over the trained length."""
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the frequency is kept (extrapolated), 0: divided by factor (interpolated)
    wavelengths = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    kept, interpolated = 1.0 / wavelengths, 1.0 / (factor * wavelengths)
    return interpolated * (1 - keep) + kept * keep


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (d/2,) fp32, factor that cos and sin are multiplied by) for a
    config's rope_scaling. For dynamic scaling these are the frequencies up to the trained
    length; past it see dynamic_inv_freq."""
    if scaling is None:
        return default_inv_freq(head_dim, theta), 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return default_inv_freq(head_dim, theta) / scaling["factor"], 1.0
    if kind == "dynamic":
        # transformers computes the initial table with the dynamic formula at seq_len = L in
        # Python floats: theta times 1.0 ** (d / (d - 2)), i.e. plain RoPE for any factor whose
        # arithmetic is exact.
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        base = theta * ((factor * original / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return default_inv_freq(head_dim, base), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling), yarn_attention_factor(scaling)
    raise ValueError(f"unknown rope_scaling type {kind!r}")


def dynamic_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any], seq_len: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Dynamic NTK frequencies for a forward whose last position is seq_len - 1 (> the trained
    length L): base theta * (factor * seq_len / L - (factor - 1)) ** (d / (d - 2)), in fp32
    tensor arithmetic as transformers does it (it holds seq_len as a tensor there).

    As in transformers, every position of that forward gets these frequencies, and keys already
    in the KV cache keep the rotation of the forward that computed them: during cached decoding
    each new token is rotated with the base of its own length, so a cached generation and a full
    recomputation of the same text differ slightly past L. Which length counts is transformers'
    rule too (model.RotaryEmbedding keeps its state): the longest forward so far, until a forward
    ends within L, which goes back to plain RoPE. So under dynamic scaling a model's output past
    L depends on what it computed before (as a transformers model's does), and a batch's rows
    share the frequencies of its longest row; linear and YaRN scaling depend on nothing but the
    positions."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    length = torch.tensor(seq_len, dtype=torch.int64, device=device)
    base = theta * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float) / head_dim
    return 1.0 / (base ** exponents)
