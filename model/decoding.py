"""Copies of a trained EtudeModel made for decoding: merged projections and int8 weights.

At batch 1 a decoding step multiplies one row through every weight, so its cost is the weight
bytes streamed from memory plus a fixed cost per operator call (microseconds on a CPU, a kernel
launch on a GPU). merge_projections makes fewer, wider calls: q/k/v become one matmul, gate/up
another, and the rotary embedding turns q and k in one pass (33 matmuls per token instead of 57
at the issue-11 shape): on the 2-core CPU, alternating, 6.37 -> 5.69 ms per bf16 token and, with
quantize_int8 (every matmul weight of the merged copy in int8), 3.74 -> 2.81 ms
(tool/PERFORMANCE.md, round 4).

Both return copies for inference only: the training model, its parameter names (those of Hugging
Face Llama, which the checkpoints and exports use) and LoRA adapters by name stay as they are.

    fast = merge_projections(model.to(torch.bfloat16))
    for token in fast.generate(prompt_ids): ...
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from model.model import Attention, EtudeModel, FeedForward


def pick_inference_device(name: str) -> torch.device:
    """--device for inference and evaluation: auto means CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def inference_dtype(device: torch.device, name: str) -> torch.dtype:
    """Decoding reads every weight per token: on CUDA bf16 halves that. On CPU it depends on the
    chip: single-row bf16 matmuls were measured slower than fp32 on an Intel AMX machine, while
    an AMD Zen 5 one decoded bf16 twice as fast (tool/PERFORMANCE.md, round 4), so the CPU default
    stays fp32 (exact, the same everywhere) and --dtype bf16 or --int8 are the faster choices."""
    if name != "auto":
        try:
            return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        except KeyError:
            raise ValueError(f"--dtype {name!r} is not one of auto, fp32, bf16, fp16") from None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _concat(layers: list[nn.Linear]) -> nn.Linear:
    """One bias-free linear layer whose outputs are those of `layers`, in order."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    merged = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    merged.weight = nn.Parameter(weight, requires_grad=False)
    return merged


def merge_projections(model: EtudeModel) -> EtudeModel:
    """A copy of `model` for decoding whose attention computes q, k and v with one matmul
    (`qkv_proj`) and whose feed-forward layers compute gate and up with one (`gate_up_proj`),
    every expert of a mixture included. Layers wrapped by a LoRA adapter stay separate (merge
    the adapter first to merge them too). Outputs equal the model's up to the rounding of the
    wider matmuls (fp32: ~1e-6). Not trainable, not saveable."""
    merged = copy.deepcopy(model).eval()
    for module in merged.modules():
        if isinstance(module, Attention) and all(type(layer) is nn.Linear for layer in
                                                 (module.q_proj, module.k_proj, module.v_proj)):
            module.qkv_proj = _concat([module.q_proj, module.k_proj, module.v_proj])
            del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, FeedForward) and all(type(layer) is nn.Linear for layer in
                                                     (module.gate_proj, module.up_proj)):
            module.gate_up_proj = _concat([module.gate_proj, module.up_proj])
            del module.gate_proj, module.up_proj
    merged.requires_grad_(False)
    merged.decoding_copy = True
    return merged


class Int8Linear(nn.Module):
    """Weight-only int8 stand-in for a bias-free nn.Linear, for decoding on CPU. Each output row
    is stored as int8 with one bf16 scale (symmetric: the row's largest |weight| maps to 127);
    the input goes in as bf16 and the result comes back in the input's dtype.

    Why: at batch 1 a decoding step reads every weight once and does little else with it, so its
    cost is the bytes read. PyTorch's CPU kernel for this layout (_weight_int8pack_mm) ran a
    1 x 512 @ 512 x 1408 product in 44 us against 92 us in fp32 and 115 us in bf16 on an Intel AMX
    CPU, and 11 us against 39 / 37 us on an AMD Zen 5 one."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear replaces bias-free layers only (Etude has no biases)")
        weight = linear.weight.detach().float()
        # The scale is rounded to bf16 before quantizing, so the int8 values are chosen against
        # the scale the kernel will really multiply by.
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        quantized = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", quantized)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_int8(model: EtudeModel) -> EtudeModel:
    """A copy of `model` for decoding on CPU whose every linear layer (the output layer too; a
    tied one gets its own int8 copy, the embedding table stays as it is) holds int8 weights with
    per-row scales: a quarter of the fp32 bytes that batch-1 decoding has to read. Its projections
    are merged first (merge_projections). The copy is for generate()/forward without gradients;
    it is neither trainable nor saveable (merge LoRA adapters before quantizing). Greedy continuations can differ from the fp32 model's after a
    while: the logits move by about the int8 rounding (~0.5% of a row's scale)."""
    device = model.embed_tokens.weight.device
    if device.type != "cpu":
        raise ValueError(f"weight-only int8 decoding runs on the CPU; the model is on {device}. "
                         "On a GPU decode in bf16 instead (model.to(torch.bfloat16))")
    quantized = merge_projections(model)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    for param in quantized.parameters():
        param.requires_grad_(False)
    return quantized


