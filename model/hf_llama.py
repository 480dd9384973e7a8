"""Etude <-> Hugging Face (Llama, Mixtral, Qwen2-MoE): the one place that maps configs and
weight names both ways.

The Etude decoder is Llama by construction (pre-norm RMSNorm, rotate_half RoPE, GQA, SwiGLU,
no biases), so a model converts exactly: the config is a renaming of fields and the weights a
renaming of keys (`model.` in front of everything but `lm_head`). Which class a model becomes:

    dense                                          -> LlamaForCausalLM
    use_moe, no shared expert, norm_topk_prob      -> MixtralForCausalLM (Mixtral always renormalises)
    use_moe with a shared expert, or raw top-k     -> Qwen2MoeForCausalLM (its sigmoid-gated shared
                                                      expert is Etude's; shared width 0 when none)

Expert weights are written in the per-expert layout that the published checkpoints use and every
transformers version (4.x and 5.x, which fuses them into 3-D tensors while loading) reads:
Mixtral `block_sparse_moe.gate` / `block_sparse_moe.experts.{e}.w1|w2|w3` (gate|down|up),
Qwen2-MoE `mlp.gate` / `mlp.experts.{e}.{gate,up,down}_proj`. Import also takes the fused 3-D
form (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) that save_pretrained writes with
save_original_format=False.

What the target cannot express, or Etude cannot, is refused here with the field named, before
anything is written or loaded:

    import  -> Etude: attention_bias, mlp_bias, qkv_bias, a rope type other than default / linear /
            dynamic / yarn (or a partial rotary factor),
            head_dim != hidden_size / num_attention_heads, a hidden_act other than silu, a vocab_size
            bigger than the tokenizer beside it, sliding-window attention, dense layers between
            MoE layers (Qwen2-MoE decoder_sparse_step / mlp_only_layers), a shared expert whose
            width is not a multiple of the expert width

    hf = config_to_hf(model.config, token_ids, dtype="bf16")     # a config.json dict
    weights = state_to_hf(model.state_dict_for_save(), model.config)
    config = config_from_hf(json.load(open("config.json")), tokenizer_vocab_size=6400)
    state = state_from_hf(weights, config)                        # ready for load_saved_state

Only torch and config.py are imported: loading a Hugging Face folder never needs transformers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from config import MODEL_TYPE, ROPE_SCALING_KEYS, ConfigError, EtudeConfig, read_json

LLAMA_MODEL_TYPE = "llama"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
MIXTRAL_MODEL_TYPE = "mixtral"
MIXTRAL_ARCHITECTURE = "MixtralForCausalLM"
QWEN2_MOE_MODEL_TYPE = "qwen2_moe"
QWEN2_MOE_ARCHITECTURE = "Qwen2MoeForCausalLM"
ARCHITECTURES = {LLAMA_MODEL_TYPE: LLAMA_ARCHITECTURE, MIXTRAL_MODEL_TYPE: MIXTRAL_ARCHITECTURE,
                 QWEN2_MOE_MODEL_TYPE: QWEN2_MOE_ARCHITECTURE}
SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX_FILE = "model.safetensors.index.json"

# Export precisions: flag value -> (torch dtype, the name config.json gives it).
EXPORT_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "float32"),
    "bf16": (torch.bfloat16, "bfloat16"),
    "fp16": (torch.float16, "float16"),
}

# Each config class's own defaults, used for keys that a config.json leaves out, so a folder
# reads here exactly as transformers reads it.
_COMMON_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                    "tie_word_embeddings": False, "initializer_range": 0.02, "attention_dropout": 0.0,
                    "hidden_act": "silu"}
_DEFAULTS = {
    LLAMA_MODEL_TYPE: {**_COMMON_DEFAULTS, "num_key_value_heads": None},
    MIXTRAL_MODEL_TYPE: {**_COMMON_DEFAULTS, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                         "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
                         "num_experts_per_tok": 2, "num_local_experts": 8, "router_aux_loss_coef": 0.001},
    QWEN2_MOE_MODEL_TYPE: {**_COMMON_DEFAULTS, "num_key_value_heads": 16, "max_position_embeddings": 32768,
                           "qkv_bias": True, "use_sliding_window": False, "decoder_sparse_step": 1,
                           "mlp_only_layers": None, "moe_intermediate_size": 1408,
                           "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
                           "norm_topk_prob": False, "router_aux_loss_coef": 0.001},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def hf_model_type(config: EtudeConfig) -> str:
    """The transformers model_type that `config` exports to exactly (see the module docstring)."""
    if not config.use_moe:
        return LLAMA_MODEL_TYPE
    if config.n_shared_experts == 0 and config.norm_topk_prob:
        return MIXTRAL_MODEL_TYPE
    return QWEN2_MOE_MODEL_TYPE


def config_to_hf(config: EtudeConfig, token_ids: dict[str, int], dtype: str = "fp32") -> dict[str, Any]:
    """config.json of the equivalent transformers model (LlamaForCausalLM, MixtralForCausalLM or
    Qwen2MoeForCausalLM). token_ids holds "bos", "eos" and "pad" (the ids of <|endoftext|>,
    <|im_end|>, <|endoftext|> in the model's tokenizer).

    Etude's dropout (a training setting) becomes attention_dropout, the closest field; it plays
    no part in inference. transformers' balance loss is top_k times Etude's (it divides the
    expert counts by tokens, not by token-slots), so router_aux_loss_coef is aux_loss_coef /
    top_k: fine-tuning the export in transformers keeps the same pull toward balance."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose one of {sorted(EXPORT_DTYPES)}")
    model_type = hf_model_type(config)
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        **rope_fields_to_hf(config.max_seq_len, config.rope_theta, config.rope_scaling),
        "rms_norm_eps": config.norm_eps,
        "attention_dropout": config.dropout,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["pad"],
        "use_cache": True,
        "torch_dtype": EXPORT_DTYPES[dtype][1],
    }
    if model_type == LLAMA_MODEL_TYPE:
        hf.update(attention_bias=False, mlp_bias=False)
        return hf
    hf.update(num_experts_per_tok=config.top_k, output_router_logits=False,
              router_aux_loss_coef=config.aux_loss_coef / config.top_k)
    if model_type == MIXTRAL_MODEL_TYPE:
        hf.update(num_local_experts=config.n_experts, sliding_window=None, router_jitter_noise=0.0)
    else:
        hf.update(num_experts=config.n_experts, moe_intermediate_size=config.intermediate_size,
                  shared_expert_intermediate_size=config.n_shared_experts * config.intermediate_size,
                  norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                  qkv_bias=False, use_sliding_window=False, sliding_window=None)
    return hf


def is_hf_config(data: Any) -> bool:
    """Whether a config.json dict was written for transformers (any architecture), not by Etude."""
    return isinstance(data, dict) and ("architectures" in data or data.get("model_type", MODEL_TYPE) != MODEL_TYPE)


def rope_fields_to_hf(max_seq_len: int, rope_theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """The RoPE fields of config.json. transformers 4 reads rope_theta and rope_scaling,
    transformers 5 rope_parameters (or rope_scaling, which then wins): all are written, saying the
    same. transformers' dynamic scaling takes the trained length from max_position_embeddings, so
    a dynamic model exports that as max_position_embeddings; linear and YaRN export the usable
    context there (YaRN keeps the trained length in original_max_position_embeddings)."""
    theta = float(rope_theta)
    fields: dict[str, Any] = {"max_position_embeddings": max_seq_len, "rope_theta": theta}
    if scaling is None:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        return fields
    kind = scaling["rope_type"]
    # transformers' linear and dynamic take the factor alone (other keys draw a warning there)
    params = {k: v for k, v in scaling.items() if kind == "yarn" or k in ("rope_type", "factor")}
    if kind == "dynamic":
        fields["max_position_embeddings"] = scaling["original_max_position_embeddings"]
    fields["rope_scaling"] = params
    fields["rope_parameters"] = {**params, "rope_theta": theta}
    return fields


# The rope_scaling / rope_parameters keys that are not scaling parameters, or that transformers
# ignores for Llama ("finetuned" marks a YaRN checkpoint trained at the long length).
_ROPE_NON_PARAMETERS = {"rope_type", "type", "rope_theta", "finetuned"}


def _rope_from_hf(data: dict[str, Any], get, problems: list[str]) -> dict[str, Any]:
    """rope_theta, rope_scaling and max_seq_len of an EtudeConfig from config.json's RoPE fields,
    read as transformers reads them (see rope_fields_to_hf); what Etude cannot compute goes to problems."""
    rope_parameters = get("rope_parameters") or {}
    rope_scaling = get("rope_scaling") or {}
    rope_theta = get("rope_theta")
    if "rope_theta" in rope_parameters:
        if "rope_theta" in data and float(data["rope_theta"]) != float(rope_parameters["rope_theta"]):
            problems.append(f"rope_theta ({data['rope_theta']}) disagrees with rope_parameters.rope_theta "
                            f"({rope_parameters['rope_theta']})")
        rope_theta = rope_parameters["rope_theta"]
    out = {"rope_theta": rope_theta, "max_seq_len": get("max_position_embeddings"), "rope_scaling": None}

    def parameters(raw: dict[str, Any]) -> dict[str, Any]:
        kind = raw.get("rope_type", raw.get("type", "default"))
        return {"rope_type": kind, **{k: v for k, v in raw.items() if k not in _ROPE_NON_PARAMETERS}}

    scaling = parameters(rope_scaling or rope_parameters)  # transformers 5: rope_scaling wins
    if rope_scaling and rope_parameters and parameters(rope_parameters) != scaling:
        problems.append(f"rope_scaling {rope_scaling!r} and rope_parameters {rope_parameters!r} disagree; "
                        "keep one of them")
        return out
    kind = scaling["rope_type"]
    if kind == "default":
        if len(scaling) > 1:
            problems.append(f"rope_parameters is {rope_parameters or rope_scaling!r}: plain RoPE ('default') "
                            f"takes no parameters besides rope_theta")
        return out
    if kind not in ROPE_SCALING_KEYS:
        source = "rope_scaling" if rope_scaling else "rope_parameters"
        problems.append(f"{source} has rope type {kind!r} ({rope_scaling or rope_parameters!r}): Etude computes "
                        f"plain RoPE and the scalings {', '.join(ROPE_SCALING_KEYS)} only")
        return out
    if scaling.pop("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor is not 1: Etude rotates every dimension of a head")
    length = get("max_position_embeddings")
    if kind == "yarn":
        # transformers: the trained length defaults to max_position_embeddings, the factor to the ratio
        scaling.setdefault("original_max_position_embeddings", length)
        if scaling.get("factor") is None and isinstance(length, int):
            scaling["factor"] = length / scaling["original_max_position_embeddings"]
        scaling = {k: v for k, v in scaling.items() if v is not None}
    else:
        # transformers' linear and dynamic use the factor alone; dynamic takes the trained length
        # from max_position_embeddings, linear stretches it to max_position_embeddings.
        factor = scaling.get("factor")
        scaling = {"rope_type": kind, "factor": factor}
        if isinstance(length, int) and isinstance(factor, (int, float)) and factor >= 1:
            trained = length if kind == "dynamic" else max(1, int(length / factor))
            scaling["original_max_position_embeddings"] = trained
            out["max_seq_len"] = int(factor * length) if kind == "dynamic" else length
    out["rope_scaling"] = scaling
    return out


def hf_rope_scaling_fields(data: dict[str, Any], rope_type: str | None, factor: float = 1.0,
                           source: str = "config.json") -> dict[str, Any]:
    """The config.json fields (max_position_embeddings, rope_theta, rope_scaling, rope_parameters)
    that scale a Hugging Face model's RoPE `factor` times past its trained length, as the export
    writes them (inference/hf.py --rope-scaling). rope_type None: plain RoPE at the trained length."""
    problems: list[str] = []
    rope = _rope_from_hf(data, {**_DEFAULTS.get(data.get("model_type"), _COMMON_DEFAULTS), **data}.get, problems)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    trained = rope["rope_scaling"]["original_max_position_embeddings"] if rope["rope_scaling"] else rope["max_seq_len"]
    fields = rope_fields_to_hf(trained, rope["rope_theta"], None)
    if rope_type is not None:
        scaling = {"rope_type": rope_type, "factor": float(factor), "original_max_position_embeddings": trained}
        fields = rope_fields_to_hf(int(factor * trained), rope["rope_theta"], scaling)
    fields.setdefault("rope_scaling", None)
    return fields


def _moe_fields(model_type: str, data: dict[str, Any], get, problems: list[str]) -> dict[str, Any]:
    """The EtudeConfig MoE fields of a Mixtral / Qwen2-MoE config, noting what Etude cannot do."""
    if model_type == MIXTRAL_MODEL_TYPE:
        window = get("sliding_window")
        if window is not None and window < get("max_position_embeddings"):
            problems.append(f"sliding_window is {window}: Etude attends to the whole context (sliding_window null)")
        return dict(use_moe=True, n_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
                    intermediate_size=data["intermediate_size"], n_shared_experts=0, norm_topk_prob=True,
                    aux_loss_coef=float(get("router_aux_loss_coef")) * get("num_experts_per_tok"))
    if get("qkv_bias"):
        problems.append("qkv_bias is true: Etude layers have no biases")
    if get("use_sliding_window"):
        problems.append("use_sliding_window is true: Etude attends to the whole context")
    if get("decoder_sparse_step") != 1 or get("mlp_only_layers"):
        problems.append(f"decoder_sparse_step {get('decoder_sparse_step')} / mlp_only_layers "
                        f"{get('mlp_only_layers')}: every Etude layer is a MoE layer (step 1, no mlp_only_layers)")
    expert, shared = get("moe_intermediate_size"), get("shared_expert_intermediate_size")
    if isinstance(expert, int) and isinstance(shared, int) and expert > 0 and shared % expert:
        problems.append(f"shared_expert_intermediate_size {shared} is not a multiple of moe_intermediate_size "
                        f"{expert}: Etude's shared expert is n_shared_experts experts wide")
    return dict(use_moe=True, n_experts=get("num_experts"), top_k=get("num_experts_per_tok"),
                intermediate_size=expert, n_shared_experts=shared // expert if isinstance(shared, int)
                and isinstance(expert, int) and expert > 0 else shared,
                norm_topk_prob=bool(get("norm_topk_prob")),
                aux_loss_coef=float(get("router_aux_loss_coef")) * get("num_experts_per_tok"))


def config_from_hf(data: dict[str, Any], tokenizer_vocab_size: int | None = None,
                   source: str = "config.json") -> EtudeConfig:
    """The EtudeConfig of a Hugging Face Llama, Mixtral or Qwen2-MoE config.json. Everything
    that an Etude model cannot reproduce exactly is reported at once, each problem naming its
    field."""
    model_type = data.get("model_type")
    architectures = data.get("architectures") or [ARCHITECTURES.get(model_type, LLAMA_ARCHITECTURE)]
    if model_type not in ARCHITECTURES or ARCHITECTURES[model_type] not in architectures:
        raise ConfigError(f"{source}: model_type {model_type!r}, architectures {architectures}: only "
                          f"Llama checkpoints (model_type 'llama', {LLAMA_ARCHITECTURE}) and the mixtures of "
                          f"experts {MIXTRAL_ARCHITECTURE} ('mixtral') and {QWEN2_MOE_ARCHITECTURE} "
                          "('qwen2_moe') can become Etude models")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ConfigError(f"{source}: missing {missing}; a {ARCHITECTURES[model_type]} config.json names them all")
    get = {**_DEFAULTS[model_type], **data}.get
    problems = []
    if get("hidden_act") not in ("silu", "swish"):
        problems.append(f"hidden_act is {get('hidden_act')!r}: Etude's feed-forward is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if get(field):
            problems.append(f"{field} is true: Etude layers have no biases")
    rope = _rope_from_hf(data, get, problems)
    hidden, heads = data["hidden_size"], data["num_attention_heads"]
    head_dim = get("head_dim")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 \
            and head_dim * heads != hidden:
        problems.append(f"head_dim is {head_dim} but hidden_size / num_attention_heads = {hidden} / {heads}: "
                        "Etude's head size is always hidden_size / n_heads")
    vocab = data["vocab_size"]
    if tokenizer_vocab_size is not None and isinstance(vocab, int) and vocab > tokenizer_vocab_size:
        problems.append(f"vocab_size is {vocab} but the tokenizer beside it has {tokenizer_vocab_size} ids: "
                        "an Etude model's vocabulary is its tokenizer's (rows past the tokenizer could be "
                        "generated but never decoded); use a checkpoint whose vocab_size matches its tokenizer")
    fields = dict(intermediate_size=data["intermediate_size"])
    if model_type != LLAMA_MODEL_TYPE:
        fields = _moe_fields(model_type, data, get, problems)
    if problems:
        raise ConfigError(f"{source} describes a {ARCHITECTURES[model_type]} model that Etude cannot represent "
                          "exactly:\n  - " + "\n  - ".join(problems))
    try:
        return EtudeConfig(
            vocab_size=vocab, hidden_size=hidden, n_layers=data["num_hidden_layers"], n_heads=heads,
            n_kv_heads=get("num_key_value_heads") or heads, max_seq_len=rope["max_seq_len"],
            rope_theta=float(rope["rope_theta"]), rope_scaling=rope["rope_scaling"], norm_eps=float(get("rms_norm_eps")),
            tie_embeddings=bool(get("tie_word_embeddings")), dropout=float(get("attention_dropout")),
            initializer_range=float(get("initializer_range")), **fields)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


# Etude's name of a routed expert's projection -> Mixtral's (w1 gate, w2 down, w3 up).
_MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _layer_names(config: EtudeConfig, layer: int) -> list[str]:
    """Etude's weight names of one block (as state_dict_for_save has them)."""
    names = [f"self_attn.{p}_proj" for p in "qkvo"] + ["input_layernorm", "post_attention_layernorm"]
    if not config.use_moe:
        names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    else:
        names.append("mlp.gate")
        names += [f"mlp.experts.{e}.{p}" for e in range(config.n_experts) for p in ("gate_proj", "up_proj", "down_proj")]
        if config.n_shared_experts:
            names += ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                      "mlp.shared_expert_gate"]
    return [f"layers.{layer}.{name}.weight" for name in names]


def _to_hf_name(name: str, model_type: str) -> str:
    if name.startswith("lm_head."):
        return name
    if model_type == MIXTRAL_MODEL_TYPE and ".mlp." in name:
        name = name.replace(".mlp.", ".block_sparse_moe.")
        name = re.sub(r"(experts\.\d+)\.(gate_proj|up_proj|down_proj)",
                      lambda m: f"{m.group(1)}.{_MIXTRAL_EXPERT_NAMES[m.group(2)]}", name)
    return f"model.{name}"


def hf_weight_names(config: EtudeConfig) -> set[str]:
    """The tensor names of the transformers checkpoint that `config` converts to (a tied output
    layer is stored once, under the embedding's name)."""
    model_type = hf_model_type(config)
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for layer in range(config.n_layers):
        names.update(_to_hf_name(name, model_type) for name in _layer_names(config, layer))
    if model_type == QWEN2_MOE_MODEL_TYPE and not config.n_shared_experts:
        names.update(f"model.layers.{layer}.mlp.{part}.weight" for layer in range(config.n_layers)
                     for part in ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                                  "shared_expert_gate"))
    if not config.tie_embeddings:
        names.add("lm_head.weight")
    return names


def state_to_hf(state: dict[str, torch.Tensor], config: EtudeConfig) -> dict[str, torch.Tensor]:
    """Etude weights (as from state_dict_for_save) under their transformers names. Every name
    must land on a tensor of the target class: anything else (an adapter) stops the export.
    A Qwen2-MoE export of a model without shared expert gets a zero-width shared expert and a
    zero gate, which add exactly nothing."""
    model_type = hf_model_type(config)
    renamed = {_to_hf_name(name, model_type): tensor for name, tensor in state.items()}
    if model_type == QWEN2_MOE_MODEL_TYPE and not config.n_shared_experts:
        hidden, like = config.hidden_size, state["embed_tokens.weight"]
        for layer in range(config.n_layers):
            prefix = f"model.layers.{layer}.mlp."
            renamed[prefix + "shared_expert.gate_proj.weight"] = like.new_zeros(0, hidden)
            renamed[prefix + "shared_expert.up_proj.weight"] = like.new_zeros(0, hidden)
            renamed[prefix + "shared_expert.down_proj.weight"] = like.new_zeros(hidden, 0)
            renamed[prefix + "shared_expert_gate.weight"] = like.new_zeros(1, hidden)
    expected = hf_weight_names(config)
    extra, missing = sorted(set(renamed) - expected), sorted(expected - set(renamed))
    if extra or missing:
        raise ConfigError(f"these weights do not form a {ARCHITECTURES[model_type]} model: unexpected {extra[:6]}, "
                          f"missing {missing[:6]}")
    return renamed


_FUSED_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_MIXTRAL_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts\.\d+)\.(w1|w2|w3)\.weight$")


def _unfuse_experts(name: str, tensor: torch.Tensor, config: EtudeConfig) -> dict[str, torch.Tensor]:
    """transformers 5's fused 3-D expert tensors, split into Etude's per-expert matrices:
    gate_up_proj (E, 2I, H) holds gate then up; down_proj is (E, H, I)."""
    match = _FUSED_EXPERTS.match(name)
    prefix = f"layers.{match.group(1)}.mlp.experts"
    width = config.intermediate_size
    out = {}
    for expert, matrix in enumerate(tensor.unbind(0)):
        if match.group(2) == "down_proj":
            out[f"{prefix}.{expert}.down_proj.weight"] = matrix.contiguous()
        else:
            out[f"{prefix}.{expert}.gate_proj.weight"] = matrix[:width].contiguous()
            out[f"{prefix}.{expert}.up_proj.weight"] = matrix[width:].contiguous()
    return out


def state_from_hf(state: dict[str, torch.Tensor], config: EtudeConfig,
                  source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Llama / Mixtral / Qwen2-MoE weights under their Etude names. Rotary frequency buffers
    that older checkpoints stored are dropped (Etude recomputes them); a tied checkpoint that
    also stores lm_head must store the embedding itself there; fused 3-D expert tensors are
    split per expert; the zero-width shared expert of a Qwen2-MoE without one is dropped."""
    mixtral_names = {v: k for k, v in _MIXTRAL_EXPERT_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        name = name[len("model."):] if name.startswith("model.") else name
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if config.use_moe and not config.n_shared_experts and ".mlp.shared_expert" in name:
            if tensor.numel() and bool(tensor.any()) and "shared_expert_gate" not in name:
                raise ConfigError(f"{source}: {name} is not empty although the shared expert has width 0")
            continue
        if _FUSED_EXPERTS.match(name.removesuffix(".weight")):
            out.update(_unfuse_experts(name.removesuffix(".weight"), tensor, config))
            continue
        mixtral = _MIXTRAL_EXPERT.match(name)
        if mixtral:
            name = f"{mixtral.group(1)}.{mixtral_names[mixtral.group(2)]}.weight"
        out[name] = tensor
    if config.tie_embeddings and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        embedding = out.get("embed_tokens.weight")
        if embedding is None or not torch.equal(head, embedding):
            raise ConfigError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                              "embed_tokens.weight; set tie_word_embeddings to false in config.json")
    return out


def hf_weight_files(folder: Path | str) -> list[Path]:
    """The safetensors files of a Hugging Face folder: model.safetensors, or the shards that
    model.safetensors.index.json lists."""
    folder = Path(folder)
    if (folder / SINGLE_WEIGHTS_FILE).is_file():
        return [folder / SINGLE_WEIGHTS_FILE]
    if (folder / SHARDED_INDEX_FILE).is_file():
        index = read_json(folder / SHARDED_INDEX_FILE, "sharded weights index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{folder / SHARDED_INDEX_FILE} has no \"weight_map\"; the index is corrupted")
        return [folder / name for name in sorted(set(weight_map.values()))]
    if any(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{folder} holds pickled pytorch_model*.bin weights, which are not loaded here (unpickling "
            "can run code). Convert them once with transformers: AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder) writes safetensors.")
    raise FileNotFoundError(f"no weights in {folder}: expected {SINGLE_WEIGHTS_FILE} or {SHARDED_INDEX_FILE}")
