"""Etude -> GGUF (llama.cpp's file format), written with the `gguf` package, llama.cpp's own writer.

Which llama.cpp architecture a model becomes (gguf_arch), each verified against llama.cpp:

    dense                                               -> llama
    use_moe, renormalised top-k, no shared expert       -> llama with stacked experts (Mixtral's shape)
    use_moe, raw top-k weights and a shared expert      -> qwen2moe (softmax, no renormalising, the
                                                           sigmoid-gated shared expert: Qwen2-MoE's shape)
    use_moe, the two other combinations                 -> refused: no llama.cpp graph computes them
    (qwen2moe needs a shared expert, and a zero one is no way out: llama.cpp computes its gate's
    sigmoid as silu(x) / x, which is 0/0 for a zero gate)

Experts are stored stacked as 3-D tensors (`ffn_{gate,up,down}_exps`). Two more things differ from
the Hugging Face layout (model/hf_llama.py):
- rotary embeddings: Etude (like transformers) rotates the two halves of each head, llama.cpp's
  `llama` graph rotates adjacent pairs; the rows of q_proj and k_proj are reordered per head so
  that the pairs llama.cpp rotates are the ones we rotate (the same dot products come out).
  `qwen2moe` rotates halves (NeoX style) like us: its rows stay as they are;
- the tokenizer travels inside the file: the byte-level BPE tokens as `tokenizers` spells them,
  the merges, token types, special ids, `tokenizer.ggml.pre = "gpt-2"` (the GPT-2 split regex,
  exactly what `tokenizers`' ByteLevel pre-tokenizer applies with use_regex and no prefix space)
  and the ChatML template.

    path = write_gguf(model, tokenizer, "model-q8_0.gguf", "q8_0", name="etude_sft_model")
    reference = rounded_model(model, "q8_0")   # the fp32 model with the weights the file holds

Imports torch, numpy and `gguf` (pure Python); llama.cpp itself is only needed to verify
(tool/convert_gguf.py --verify).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from config import ENDOFTEXT, IM_END, SPECIAL_TOKENS, ConfigError, EtudeConfig
from model.model import EtudeModel
from model.tokenizer import CHAT_TEMPLATE, TRAIN_TOKENIZER_COMMAND, EtudeTokenizer

try:
    import gguf
except ImportError:  # a clear message at the point of use, not at import (tests import this module)
    gguf = None

# --type value -> (tensor type of the matrices, general.file_type). Norms, the router and any
# matrix whose rows do not split into whole blocks are stored otherwise (see tensor_type).
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),  # the 4-bit type whose quantizer the gguf package implements
}
LLAMA_ARCH = "llama"
QWEN2MOE_ARCH = "qwen2moe"
PRE_TOKENIZER = "gpt-2"


def require_gguf():
    if gguf is None:
        raise FileNotFoundError("GGUF export needs the gguf package: pip install gguf")
    return gguf


# ---- tokenizer ---------------------------------------------------------------------------------

def tokenizer_refusal(tokenizer: EtudeTokenizer) -> str | None:
    """Why llama.cpp would split text differently from this tokenizer (None when it splits the
    same). llama.cpp's "gpt-2" pre-tokenizer is the GPT-2 regex on raw text followed by
    byte-level BPE applied merge by merge: anything else in tokenizer.json (a normaliser, a
    prefix space, a pre-tokenizer of another kind, merges skipped for whole-word vocabulary
    entries, added tokens other than ours) would give other ids."""
    data = json.loads(tokenizer.to_str())
    pre, model = data.get("pre_tokenizer") or {}, data.get("model") or {}
    problems = []
    if data.get("normalizer"):
        problems.append(f"it has a normalizer ({data['normalizer'].get('type')})")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append(f"its pre-tokenizer is {json.dumps(pre)}, not ByteLevel with the GPT-2 regex and "
                        "add_prefix_space false")
    if model.get("type") != "BPE" or model.get("ignore_merges") or model.get("dropout") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        problems.append("its model is not plain byte-level BPE (type BPE without dropout, ignore_merges, "
                        "subword prefixes or byte fallback)")
    added = {t["content"] for t in data.get("added_tokens") or []}
    if added - set(SPECIAL_TOKENS):
        problems.append(f"it has added tokens beyond {', '.join(SPECIAL_TOKENS)}: {sorted(added - set(SPECIAL_TOKENS))[:5]}")
    if not problems:
        return None
    return (f"the tokenizer in {tokenizer.path} cannot be written to GGUF so that llama.cpp tokenizes exactly "
            f"as it does: {'; '.join(problems)}. Retrain it with `{TRAIN_TOKENIZER_COMMAND}` (and the model "
            "on it), or export to Hugging Face format with tool/convert_hf.py instead.")


def gguf_vocab(tokenizer: EtudeTokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (byte-level spelling, by id), token types and merges ("a b") for the GGUF. A model
    vocabulary wider than the tokenizer's is padded with unused placeholder tokens."""
    g = require_gguf()
    data = json.loads(tokenizer.to_str())
    by_id = {token_id: token for token, token_id in data["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in data.get("added_tokens") or []})
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id in by_id:
            tokens.append(by_id[token_id])
            types.append(g.TokenType.CONTROL if by_id[token_id] in SPECIAL_TOKENS else g.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{token_id}]")
            types.append(g.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges") or []]
    return tokens, [int(t) for t in types], merges


# ---- weights -----------------------------------------------------------------------------------

def gguf_arch(config: EtudeConfig) -> str:
    """The llama.cpp architecture that computes `config`'s model exactly (see the module
    docstring); a model that none computes is refused, before any work, naming why."""
    if not config.use_moe or (config.norm_topk_prob and not config.n_shared_experts):
        return LLAMA_ARCH
    if not config.norm_topk_prob and config.n_shared_experts:
        return QWEN2MOE_ARCH
    shape = ("a shared expert and renormalised top-k weights (norm_topk_prob true)" if config.n_shared_experts
             else "raw top-k weights (norm_topk_prob false) and no shared expert")
    raise ConfigError(
        f"this mixture of experts has {shape}: llama.cpp's `llama` graph renormalises and has no shared expert, "
        "its `qwen2moe` graph never renormalises and needs a shared expert, so no GGUF would compute what the "
        "model does. Export it to Hugging Face format with tool/convert_hf.py, or train a GGUF-ready shape: "
        "n_shared_experts 0 with norm_topk_prob true, or a shared expert with norm_topk_prob false")


def rope_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of q_proj / k_proj (n_heads * head_dim, hidden) from the rotate-half
    layout to the adjacent-pairs layout: within each head, output rows (i, i + head_dim/2)
    become rows (2i, 2i + 1)."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(model: EtudeModel) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """GGUF tensor name -> (fp32 tensor, the Etude weight names it is made of)."""
    config = model.config
    arch = gguf_arch(config)
    state = model.state_dict_for_save()
    out: dict[str, tuple[torch.Tensor, list[str]]] = {}
    # Only llama.cpp's `llama` graph rotates adjacent pairs (see the module docstring).
    q_rows = (lambda w: rope_pairs(w, config.n_heads)) if arch == LLAMA_ARCH else None
    k_rows = (lambda w: rope_pairs(w, config.n_kv_heads)) if arch == LLAMA_ARCH else None

    def put(gguf_name: str, etude_name: str, transform=None):
        tensor = state[etude_name].float()
        out[gguf_name + ".weight"] = (transform(tensor) if transform else tensor, [etude_name])

    put("token_embd", "embed_tokens.weight")
    for i in range(config.n_layers):
        layer, blk = f"layers.{i}.", f"blk.{i}."
        put(blk + "attn_norm", layer + "input_layernorm.weight")
        put(blk + "attn_q", layer + "self_attn.q_proj.weight", q_rows)
        put(blk + "attn_k", layer + "self_attn.k_proj.weight", k_rows)
        put(blk + "attn_v", layer + "self_attn.v_proj.weight")
        put(blk + "attn_output", layer + "self_attn.o_proj.weight")
        put(blk + "ffn_norm", layer + "post_attention_layernorm.weight")
        if not config.use_moe:
            for part in ("gate", "up", "down"):
                put(f"{blk}ffn_{part}", f"{layer}mlp.{part}_proj.weight")
            continue
        put(blk + "ffn_gate_inp", layer + "mlp.gate.weight")
        for part in ("gate", "up", "down"):
            names = [f"{layer}mlp.experts.{e}.{part}_proj.weight" for e in range(config.n_experts)]
            out[f"{blk}ffn_{part}_exps.weight"] = (torch.stack([state[n].float() for n in names]), names)
        if arch == QWEN2MOE_ARCH:
            for part in ("gate", "up", "down"):
                put(f"{blk}ffn_{part}_shexp", f"{layer}mlp.shared_expert.{part}_proj.weight")
            put(blk + "ffn_gate_inp_shexp", layer + "mlp.shared_expert_gate.weight", lambda w: w.reshape(-1))
    put("output_norm", "norm.weight")
    if not config.tie_embeddings:
        put("output", "lm_head.weight")
    elif arch == QWEN2MOE_ARCH:  # `llama` reuses token_embd when output is absent, `qwen2moe` needs it
        put("output", "embed_tokens.weight")
    return out


def tensor_type(name: str, tensor: torch.Tensor, type_name: str):
    """The GGML type one tensor is stored in for --type `type_name`: 1-D tensors (norms) and the
    router in f32, as llama.cpp's own converter keeps them; a matrix whose rows are not whole
    blocks of the quantized type falls back to f16."""
    g = require_gguf()
    if tensor.dim() == 1 or name.endswith("ffn_gate_inp.weight"):
        return g.GGMLQuantizationType.F32
    qtype = g.GGMLQuantizationType[GGUF_TYPES[type_name][0]]
    block = g.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block:
        return g.GGMLQuantizationType.F16
    return qtype


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    return gguf.quants.quantize(tensor.numpy(), qtype)


def rounded_model(model: EtudeModel, type_name: str) -> EtudeModel:
    """A copy of `model` (fp32) whose weights are exactly what a GGUF of `type_name` stores,
    read back: what llama.cpp should compute, so a comparison with it checks the file and
    not the rounding. Rounding is per row, so it commutes with the rope row reordering."""
    require_gguf()
    if type_name == "f32":
        return model
    rounded = copy.deepcopy(model)
    params = dict(rounded.named_parameters())
    done = set()  # a tied matrix stored twice (qwen2moe's output) is rounded once, alike both times
    with torch.no_grad():
        for name, (tensor, sources) in gguf_tensors(model).items():
            qtype = tensor_type(name, tensor, type_name)
            for source in set(sources) - done:
                done.add(source)
                weight = params[source]
                stored = gguf.quants.dequantize(_encode(weight.detach().float(), qtype), qtype)
                weight.copy_(torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32)).view_as(weight))
    return rounded


# ---- the file ----------------------------------------------------------------------------------

def write_gguf(model: EtudeModel, tokenizer: EtudeTokenizer, path: Path | str, type_name: str,
               name: str) -> Path:
    """Write `model` with its tokenizer to the GGUF file `path` (type f32|f16|bf16|q8_0|q4_0)."""
    g = require_gguf()
    config = model.config
    arch = gguf_arch(config)
    refusal = tokenizer_refusal(tokenizer)
    if refusal:
        raise ConfigError(refusal)
    if type_name not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {type_name!r}; choose one of {', '.join(GGUF_TYPES)}")
    writer = g.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(int(g.LlamaFileType[GGUF_TYPES[type_name][1]]))
    if type_name in ("q8_0", "q4_0"):
        writer.add_quantization_version(g.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    if config.use_moe:
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.top_k)
    if arch == QWEN2MOE_ARCH:
        writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_expert_shared_feed_forward_length(config.n_shared_experts * config.intermediate_size)

    tokens, types, merges = gguf_vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # As in the Hugging Face export: <|endoftext|> is bos and pad, <|im_end|> ends generation.
    writer.add_bos_token_id(SPECIAL_TOKENS.index(ENDOFTEXT))
    writer.add_eos_token_id(SPECIAL_TOKENS.index(IM_END))
    writer.add_eot_token_id(SPECIAL_TOKENS.index(IM_END))
    writer.add_pad_token_id(SPECIAL_TOKENS.index(ENDOFTEXT))
    writer.add_add_bos_token(False)  # our prompts start without one
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for tensor_name, (tensor, _) in gguf_tensors(model).items():
        qtype = tensor_type(tensor_name, tensor, type_name)
        writer.add_tensor(tensor_name, _encode(tensor.contiguous(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def modelfile(gguf_name: str, config: EtudeConfig, temperature: float = 0.7, top_k: int = 40,
              top_p: float = 0.9, repeat_penalty: float = 1.1) -> str:
    """An Ollama Modelfile for the GGUF `gguf_name` in the same folder: the ChatML template in
    Ollama's Go-template syntax, both end tokens as stops, and inference/inference.py's default
    sampling (Ollama's repeat penalty looks back over the last 64 tokens, ours over all of them)."""
    template = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                '{{ end }}<|im_start|>assistant\n')
    return "\n".join([
        "# Ollama: ollama create etude -f Modelfile && ollama run etude",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        f'PARAMETER stop "{IM_END}"',
        f'PARAMETER stop "{ENDOFTEXT}"',
        f"PARAMETER num_ctx {config.max_seq_len}",
        f"PARAMETER temperature {temperature}",
        f"PARAMETER top_k {top_k}",
        f"PARAMETER top_p {top_p}",
        f"PARAMETER repeat_penalty {repeat_penalty}",
        "",
    ])
