"""Etude <-> Hugging Face Llama: the one place that maps configs and weight names both ways.

The Etude decoder is Llama by construction (pre-norm RMSNorm, rotate_half RoPE, GQA, SwiGLU,
no biases), so a dense model converts exactly: the config is a renaming of fields and the
weights a renaming of keys (`model.` in front of everything but `lm_head`). What Llama cannot
express is refused here, with the field named, before anything is written or loaded:

    export  Etude -> Llama: use_moe (a mixture of experts has no Llama form)
    import  Llama -> Etude: attention_bias, mlp_bias, rope_scaling / a non-default rope type,
            head_dim != hidden_size / num_attention_heads, a hidden_act other than silu,
            a vocab_size bigger than the tokenizer beside it

    hf = config_to_hf(model.config, token_ids, dtype="bf16")     # a config.json dict
    weights = state_to_hf(model.state_dict_for_save(), model.config)
    config = config_from_hf(json.load(open("config.json")), tokenizer_vocab_size=6400)
    state = state_from_hf(weights, config)                        # ready for load_saved_state

Only torch and config.py are imported: loading a Llama folder never needs transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config import MODEL_TYPE, ConfigError, EtudeConfig, read_json

LLAMA_MODEL_TYPE = "llama"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
SINGLE_WEIGHTS_FILE = "model.safetensors"
SHARDED_INDEX_FILE = "model.safetensors.index.json"

# Export precisions: flag value -> (torch dtype, the name config.json gives it).
EXPORT_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "float32"),
    "bf16": (torch.bfloat16, "bfloat16"),
    "fp16": (torch.float16, "float16"),
}

# LlamaConfig's own defaults, used for keys that a Llama config.json leaves out, so a folder
# reads here exactly as transformers reads it.
_LLAMA_DEFAULTS = {"num_key_value_heads": None, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                   "rope_theta": 10000.0, "tie_word_embeddings": False, "initializer_range": 0.02,
                   "attention_dropout": 0.0, "hidden_act": "silu"}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def llama_problems(config: EtudeConfig) -> list[str]:
    """Every reason this Etude config has no exact Llama form (empty when it has one)."""
    problems = []
    if config.use_moe:
        problems.append("use_moe is true: a mixture-of-experts model has no Llama form (Llama has one "
                        "feed-forward per layer). Export a dense model (use_moe false).")
    return problems


def config_to_hf(config: EtudeConfig, token_ids: dict[str, int], dtype: str = "fp32") -> dict[str, Any]:
    """config.json of the equivalent LlamaForCausalLM. token_ids holds "bos", "eos" and "pad"
    (the ids of <|endoftext|>, <|im_end|>, <|endoftext|> in the model's tokenizer).

    Etude's dropout (a training setting) becomes attention_dropout, the closest Llama field;
    it plays no part in inference."""
    problems = llama_problems(config)
    if problems:
        raise ConfigError("this model cannot be written in Llama format:\n  - " + "\n  - ".join(problems))
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose one of {sorted(EXPORT_DTYPES)}")
    return {
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": LLAMA_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 4 reads rope_theta, transformers 5 rope_parameters: write both.
        "rope_theta": float(config.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.dropout,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["pad"],
        "use_cache": True,
        "torch_dtype": EXPORT_DTYPES[dtype][1],
    }


def is_hf_config(data: Any) -> bool:
    """Whether a config.json dict was written for transformers (any architecture), not by Etude."""
    return isinstance(data, dict) and ("architectures" in data or data.get("model_type", MODEL_TYPE) != MODEL_TYPE)


def config_from_hf(data: dict[str, Any], tokenizer_vocab_size: int | None = None,
                   source: str = "config.json") -> EtudeConfig:
    """The EtudeConfig of a Hugging Face Llama config.json. Everything that an Etude model cannot
    reproduce exactly is reported at once, each problem naming its field."""
    model_type = data.get("model_type")
    architectures = data.get("architectures") or [LLAMA_ARCHITECTURE]
    if model_type != LLAMA_MODEL_TYPE or LLAMA_ARCHITECTURE not in architectures:
        raise ConfigError(f"{source}: model_type {model_type!r}, architectures {architectures}: only "
                          f"Llama checkpoints (model_type 'llama', {LLAMA_ARCHITECTURE}) can become Etude models")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ConfigError(f"{source}: missing {missing}; a Llama config.json names them all")
    get = {**_LLAMA_DEFAULTS, **data}.get
    problems = []
    if get("hidden_act") not in ("silu", "swish"):
        problems.append(f"hidden_act is {get('hidden_act')!r}: Etude's feed-forward is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if get(field):
            problems.append(f"{field} is true: Etude layers have no biases")
    if get("rope_scaling"):
        problems.append(f"rope_scaling is {get('rope_scaling')!r}: Etude uses plain RoPE (rope_scaling null)")
    rope_parameters = get("rope_parameters") or {}
    rope_theta = get("rope_theta")
    if rope_parameters:
        if rope_parameters.get("rope_type", "default") != "default" or \
                set(rope_parameters) - {"rope_type", "rope_theta"}:
            problems.append(f"rope_parameters is {rope_parameters!r}: Etude uses plain RoPE "
                            "(rope_type 'default', no scaling)")
        if "rope_theta" in rope_parameters:
            if "rope_theta" in data and float(data["rope_theta"]) != float(rope_parameters["rope_theta"]):
                problems.append(f"rope_theta ({data['rope_theta']}) disagrees with rope_parameters.rope_theta "
                                f"({rope_parameters['rope_theta']})")
            rope_theta = rope_parameters["rope_theta"]
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
    if problems:
        raise ConfigError(f"{source} describes a Llama model that Etude cannot represent exactly:\n  - "
                          + "\n  - ".join(problems))
    try:
        return EtudeConfig(
            vocab_size=vocab, hidden_size=hidden, n_layers=data["num_hidden_layers"], n_heads=heads,
            n_kv_heads=get("num_key_value_heads") or heads, intermediate_size=data["intermediate_size"],
            max_seq_len=get("max_position_embeddings"), rope_theta=float(rope_theta),
            norm_eps=float(get("rms_norm_eps")), tie_embeddings=bool(get("tie_word_embeddings")),
            dropout=float(get("attention_dropout")), initializer_range=float(get("initializer_range")))
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def hf_weight_names(config: EtudeConfig) -> set[str]:
    """The tensor names of the LlamaForCausalLM that `config` converts to (a tied output layer
    is stored once, under the embedding's name)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    per_layer = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    for layer in range(config.n_layers):
        names.update(f"model.layers.{layer}.{part}.weight" for part in per_layer)
    if not config.tie_embeddings:
        names.add("lm_head.weight")
    return names


def state_to_hf(state: dict[str, torch.Tensor], config: EtudeConfig) -> dict[str, torch.Tensor]:
    """Etude weights (as from state_dict_for_save) under their Llama names. Every name must land
    on a Llama tensor: anything else (an adapter, an expert) stops the export."""
    problems = llama_problems(config)
    if problems:
        raise ConfigError("this model cannot be written in Llama format:\n  - " + "\n  - ".join(problems))
    renamed = {name if name.startswith("lm_head.") else f"model.{name}": tensor for name, tensor in state.items()}
    expected = hf_weight_names(config)
    extra, missing = sorted(set(renamed) - expected), sorted(expected - set(renamed))
    if extra or missing:
        raise ConfigError(f"these weights do not form a Llama model: unexpected {extra[:6]}, missing {missing[:6]}")
    return renamed


def state_from_hf(state: dict[str, torch.Tensor], config: EtudeConfig,
                  source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Llama weights under their Etude names. Rotary frequency buffers that older checkpoints
    stored are dropped (Etude recomputes them); a tied checkpoint that also stores lm_head
    must store the embedding itself there."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        out[name[len("model."):] if name.startswith("model.") else name] = tensor
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
