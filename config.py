"""Etude LLM configuration: the model shape (EtudeConfig), the run settings (TrainConfig),
size presets and every default path.

This module imports nothing heavy (no torch) so that any script, test or tool can read a config
without paying for it. Precedence when a stage resolves its settings:

    stage defaults  <  preset  <  command-line flags
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent

WEIGHT_DIR = ROOT / "weight"
TOKENIZER_DIR = WEIGHT_DIR / "tokenizer"
PRETRAINED_DIR = WEIGHT_DIR / "etude_pretrained_model"
SFT_DIR = WEIGHT_DIR / "etude_sft_model"
LORA_DIR = WEIGHT_DIR / "lora"
DPO_DIR = WEIGHT_DIR / "etude_dpo_model"
GRPO_DIR = WEIGHT_DIR / "etude_grpo_model"
HF_DIR = WEIGHT_DIR / "etude_hf_model"
GGUF_DIR = WEIGHT_DIR / "etude_gguf"

DATA_DIR = ROOT / "training_data"
PRETRAIN_DATA = DATA_DIR / "pretrain.jsonl"
PRETRAIN_VAL_DATA = DATA_DIR / "pretrain.val.jsonl"
SFT_DATA = DATA_DIR / "sft.jsonl"
SFT_VAL_DATA = DATA_DIR / "sft.val.jsonl"
DPO_DATA = DATA_DIR / "dpo.jsonl"
DPO_VAL_DATA = DATA_DIR / "dpo.val.jsonl"
GRPO_DATA = DATA_DIR / "grpo.jsonl"

# Special tokens, in id order: they are the first ids of every tokenizer trained here.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

MODEL_TYPE = "etude"
CHECKPOINT_SUBDIR = "checkpoint"


class ConfigError(ValueError):
    """A configuration that cannot work; the message lists every problem found."""


def _reject_unknown(cls: type, data: dict[str, Any], what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{what}: unknown key(s) {unknown}. Known keys: {sorted(known)}. "
            "Remove or rename them (was the file written by another program or version?)."
        )


# The mixture-of-experts fields of EtudeConfig: they mean nothing unless use_moe is on.
MOE_FIELDS = ("n_experts", "top_k", "n_shared_experts", "aux_loss_coef", "norm_topk_prob")

# RoPE scaling (EtudeConfig.rope_scaling), named and parametrised as transformers names them
# (modeling_rope_utils.py): the keys each type takes besides rope_type. YaRN's optional keys
# default as in transformers: beta_fast 32, beta_slow 1, truncate true, attention_factor
# 0.1 * ln(factor) + 1 (or the mscale / mscale_all_dim ratio when both are given).
ROPE_SCALING_KEYS = {
    "linear": ("factor", "original_max_position_embeddings"),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "mscale", "mscale_all_dim", "truncate"),
}
ROPE_SCALING_REQUIRED = ("rope_type", "factor", "original_max_position_embeddings")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rope_scaling_problems(scaling: Any, max_seq_len: Any) -> list[str]:
    """Every reason `scaling` (an EtudeConfig.rope_scaling value) is not a valid RoPE scaling."""
    if scaling is None:
        return []
    fix = ('e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, '
           "or null for plain RoPE")
    if not isinstance(scaling, dict):
        return [f"rope_scaling must be a dict or null, got {scaling!r}: {fix}"]
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        hint = " (plain RoPE is rope_scaling null)" if kind in ("default", None, "none") else ""
        return [f"rope_scaling.rope_type must be one of {', '.join(ROPE_SCALING_KEYS)}, got {kind!r}{hint}: {fix}"]
    out = []
    missing = [key for key in ROPE_SCALING_REQUIRED if key not in scaling]
    if missing:
        out.append(f"rope_scaling ({kind}) is missing {missing}: {fix}")
    unknown = sorted(set(scaling) - {"rope_type", *ROPE_SCALING_KEYS[kind]})
    if unknown:
        out.append(f"rope_scaling ({kind}) does not take {unknown}; its keys are "
                   f"{['rope_type', *ROPE_SCALING_KEYS[kind]]}")
    factor = scaling.get("factor", 1.0)
    if not _is_number(factor) or factor < 1:
        out.append(f"rope_scaling.factor must be a number >= 1 (how many times the trained context to reach), "
                   f"got {factor!r}")
    original = scaling.get("original_max_position_embeddings", 1)
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        out.append(f"rope_scaling.original_max_position_embeddings must be a positive integer (the context "
                   f"length the model was trained at), got {original!r}")
    elif isinstance(max_seq_len, int) and original > max_seq_len:
        out.append(f"rope_scaling.original_max_position_embeddings ({original}) exceeds max_seq_len "
                   f"({max_seq_len}): scaling stretches the trained context, so max_seq_len should be "
                   "factor x original_max_position_embeddings")
    for key in ("beta_fast", "beta_slow", "attention_factor"):
        if key in scaling and not (_is_number(scaling[key]) and scaling[key] > 0):
            out.append(f"rope_scaling.{key} must be a number > 0, got {scaling[key]!r}")
    for key in ("mscale", "mscale_all_dim"):
        if key in scaling and not (_is_number(scaling[key]) and scaling[key] >= 0):
            out.append(f"rope_scaling.{key} must be a number >= 0, got {scaling[key]!r}")
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        out.append(f"rope_scaling.truncate must be true or false, got {scaling['truncate']!r}")
    fast, slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
    if _is_number(fast) and _is_number(slow) and fast <= slow:
        out.append(f"rope_scaling.beta_fast ({fast}) must be greater than beta_slow ({slow})")
    return out


def parse_rope_scaling(spec: str) -> tuple[str | None, float]:
    """'yarn:4' -> ("yarn", 4.0); 'none' -> (None, 1.0). The --rope-scaling flag's value."""
    kind, _, factor_text = spec.strip().lower().partition(":")
    if kind == "none" and not factor_text:
        return None, 1.0
    usage = (f"--rope-scaling must be TYPE:FACTOR with TYPE one of {', '.join(ROPE_SCALING_KEYS)} and FACTOR "
             f"a number >= 1 (e.g. yarn:4 for four times the trained context), or none; got {spec!r}")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(usage)
    try:
        factor = float(factor_text)
    except ValueError:
        raise ValueError(usage) from None
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(usage)
    return kind, factor


@dataclass
class EtudeConfig:
    """Shape of an Etude decoder. Saved as config.json beside the weights; the model is rebuilt
    from it alone."""

    vocab_size: int = 6400
    hidden_size: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    # SwiGLU width; None means 8/3 * hidden_size rounded up to a multiple of `multiple_of`.
    intermediate_size: int | None = None
    multiple_of: int = 64
    max_seq_len: int = 512
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    initializer_range: float = 0.02
    # Mixture of experts (model/model.py SparseMoE). With use_moe, intermediate_size is the width
    # of EACH expert: a token runs through top_k routed experts (+ the shared ones), so top_k *
    # intermediate_size matches a dense model's width at the same active parameters.
    # n_shared_experts > 0 adds one shared SwiGLU of n_shared_experts * intermediate_size for
    # every token, gated by sigmoid (Qwen2-MoE's design). aux_loss_coef scales the load-balancing
    # loss (a balanced router gives aux_loss = aux_loss_coef); norm_topk_prob renormalises the
    # top_k router weights to sum to 1.
    use_moe: bool = False
    n_experts: int = 4
    top_k: int = 2
    n_shared_experts: int = 0
    aux_loss_coef: float = 0.01
    norm_topk_prob: bool = True
    # RoPE scaling past the trained context (model/rope.py): None is plain RoPE, else a dict
    # {"rope_type": "linear" | "dynamic" | "yarn", "factor": F, "original_max_position_embeddings":
    # the length trained at, + YaRN's optional keys (ROPE_SCALING_KEYS)}, as transformers defines
    # them. max_seq_len is then the usable context, normally F x the trained length.
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict) and "type" in self.rope_scaling:
            # transformers 4's older spelling of rope_type
            scaling = dict(self.rope_scaling)
            kind = scaling.pop("type")
            if scaling.setdefault("rope_type", kind) != kind:
                raise ConfigError(f"invalid EtudeConfig:\n  - rope_scaling has type {kind!r} and rope_type "
                                  f"{scaling['rope_type']!r}; keep one (rope_type)")
            self.rope_scaling = scaling
        if self.intermediate_size is None and isinstance(self.multiple_of, int) and self.multiple_of > 0 \
                and isinstance(self.hidden_size, int):
            raw = int(8 * self.hidden_size / 3)
            self.intermediate_size = self.multiple_of * math.ceil(raw / self.multiple_of)
        problems = self.problems()
        if problems:
            raise ConfigError("invalid EtudeConfig:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every reason this config cannot build a model (empty when it can)."""
        out = []
        positive_ints = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                         "intermediate_size", "multiple_of", "max_seq_len", "n_experts", "top_k")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.n_shared_experts, bool) or not isinstance(self.n_shared_experts, int) \
                or self.n_shared_experts < 0:
            out.append(f"n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}")
        bad = {line.split()[0] for line in out}
        if not bad & {"hidden_size", "n_heads"}:
            if self.hidden_size % self.n_heads:
                out.append(f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads})")
            elif (self.hidden_size // self.n_heads) % 2:
                out.append(f"head size hidden_size/n_heads = {self.hidden_size // self.n_heads} must be even for RoPE")
        if not bad & {"n_heads", "n_kv_heads"} and self.n_heads % self.n_kv_heads:
            out.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.use_moe and not bad & {"top_k", "n_experts"} and self.top_k > self.n_experts:
            out.append(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            out.append(f"rope_theta must be > 0, got {self.rope_theta!r}")
        out += rope_scaling_problems(self.rope_scaling, self.max_seq_len)
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            out.append(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            out.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.initializer_range, (int, float)) and self.initializer_range > 0):
            out.append(f"initializer_range must be > 0, got {self.initializer_range!r}")
        if isinstance(self.aux_loss_coef, bool) or not isinstance(self.aux_loss_coef, (int, float)) \
                or not 0 <= self.aux_loss_coef < math.inf:
            out.append(f"aux_loss_coef must be a finite number >= 0 (0 turns the balance loss off), "
                       f"got {self.aux_loss_coef!r}")
        for name in ("tie_embeddings", "use_moe", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def trained_seq_len(self) -> int:
        """The context length the model was trained at: max_seq_len, or the original length that
        its RoPE scaling stretches."""
        return self.rope_scaling["original_max_position_embeddings"] if self.rope_scaling else self.max_seq_len

    def with_rope_scaling(self, rope_type: str | None, factor: float = 1.0) -> "EtudeConfig":
        """A copy whose RoPE is scaled `factor` times past the trained length (transformers'
        defaults for the type's other parameters), with max_seq_len = factor x that length: the
        model's usable context. rope_type None gives plain RoPE at the trained length. A model
        that is already scaled is re-scaled from its trained length, not compounded."""
        trained = self.trained_seq_len
        if rope_type is None:
            return dataclasses.replace(self, rope_scaling=None, max_seq_len=trained)
        scaling = {"rope_type": rope_type, "factor": float(factor), "original_max_position_embeddings": trained}
        return dataclasses.replace(self, rope_scaling=scaling, max_seq_len=int(factor * trained))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def applicable(self) -> dict[str, Any]:
        """The fields that shape this model, for printing: a dense model has no expert settings,
        a model with plain RoPE no rope_scaling."""
        return {k: v for k, v in self.to_dict().items()
                if (self.use_moe or k not in MOE_FIELDS) and (k != "rope_scaling" or v is not None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EtudeConfig":
        """Build from a dict (e.g. a model folder's config.json); unknown keys are an error."""
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"config has model_type {model_type!r}, expected {MODEL_TYPE!r}; "
                "a Hugging Face folder must be imported first (tool/convert_hf.py)."
            )
        _reject_unknown(cls, data, "EtudeConfig")
        return cls(**data)


# Where the scalars of metrics.jsonl may also go (train/tracking.py).
TRACKERS = ("none", "tensorboard", "wandb")


# Run settings. Values that are None are derived at start (e.g. eval batch size).
@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    stage: str = "pretrain"
    data: str = str(PRETRAIN_DATA)
    val_data: str | None = str(PRETRAIN_VAL_DATA)
    out_dir: str = str(PRETRAINED_DIR)
    init_from: str | None = None
    tokenizer_dir: str = str(TOKENIZER_DIR)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    # adamw: AdamW for everything. muon: torch.optim.Muon (at muon_lr, decoupled weight decay
    # muon_weight_decay) for the blocks' attention and MLP matrices, AdamW at lr for the rest.
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_weight_decay: float = 0.0
    # cosine: warmup, then cosine decay to lr * min_lr_ratio. wsd: warmup, then lr held until the
    # last cooldown_frac of the run, then a linear or 1-sqrt cool-down to lr * min_lr_ratio.
    # constant: warmup, then lr to the end.
    schedule: str = "cosine"
    cooldown_frac: float = 0.2
    cooldown: str = "linear"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    epochs: int = 3
    max_steps: int | None = None
    # End this invocation after this step with a checkpoint (the schedule still spans the whole
    # run); running again continues. Lets runs take turns on one machine (tool/compare_recipes.py).
    stop_at_step: int | None = None
    seq_len: int = 512
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    fsdp: bool = False
    resume: bool = True
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    log_every: int = 10
    seed: int = 42
    skip_bad_lines: bool = False
    # A step whose loss or gradient is NaN/inf is never applied: "skip" counts it and goes on
    # (10 in a row stop the run), "stop" ends the run at once; the last checkpoint is kept.
    on_nan: str = "skip"
    # Experiment tracking beside metrics.jsonl (train/tracking.py): none, tensorboard or wandb.
    tracker: str = "none"
    # Which model the out-dir receives at the end: "best", the evaluation with the lowest
    # validation loss (train/best_model.py), or "last", the final step's. Without validation
    # data both are the last step's.
    keep: str = "best"
    # No trailing space: byte-level BPE attaches a space to the word after it, so "The " ends in
    # a lone space token that the model has rarely seen.
    sample_prompt: str = "The"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training settings:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        out = []
        for name in ("batch_size", "grad_accum", "epochs", "seq_len", "eval_every", "eval_batches",
                     "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            out.append(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.stop_at_step is not None and (not isinstance(self.stop_at_step, int) or self.stop_at_step <= 0):
            out.append(f"stop_at_step must be a positive integer, got {self.stop_at_step!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            out.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            out.append(f"lr must be > 0, got {self.lr!r}")
        if self.optimizer not in ("adamw", "muon"):
            out.append(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if not (isinstance(self.muon_lr, (int, float)) and self.muon_lr > 0):
            out.append(f"muon_lr must be > 0, got {self.muon_lr!r}")
        if not (isinstance(self.muon_weight_decay, (int, float)) and self.muon_weight_decay >= 0):
            out.append(f"muon_weight_decay must be >= 0, got {self.muon_weight_decay!r}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            out.append(f"schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if not (isinstance(self.cooldown_frac, (int, float)) and 0 <= self.cooldown_frac <= 1):
            out.append(f"cooldown_frac must be in [0, 1], got {self.cooldown_frac!r}")
        if self.cooldown not in ("linear", "1-sqrt"):
            out.append(f"cooldown must be linear or 1-sqrt, got {self.cooldown!r}")
        if self.optimizer == "muon" and self.fsdp:
            out.append("optimizer muon cannot run with fsdp: Muon orthogonalises whole matrices and FSDP hands "
                       "each rank a shard; use --optimizer adamw with --fsdp, or DDP (drop --fsdp) with muon")
        if not (0 <= self.min_lr_ratio <= 1):
            out.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            out.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            out.append(f"beta1 and beta2 must be in [0, 1), got {self.beta1!r}, {self.beta2!r}")
        if self.grad_clip < 0:
            out.append(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not str(self.device).startswith("cuda:"):
            out.append(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            out.append(f"dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.on_nan not in ("skip", "stop"):
            out.append(f"on_nan must be skip or stop, got {self.on_nan!r}")
        if self.keep not in ("best", "last"):
            out.append(f"keep must be best or last, got {self.keep!r}")
        if self.tracker not in TRACKERS:
            out.append(f"tracker must be one of {', '.join(TRACKERS)}, got {self.tracker!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def applicable(self) -> dict[str, Any]:
        """The settings this run uses, for printing: Muon's only with --optimizer muon, the
        cool-down's only with --schedule wsd."""
        unused = set()
        if self.optimizer != "muon":
            unused |= {"muon_lr", "muon_weight_decay"}
        if self.schedule != "wsd":
            unused |= {"cooldown_frac", "cooldown"}
        if self.stop_at_step is None:
            unused.add("stop_at_step")
        return {k: v for k, v in self.to_dict().items() if k not in unused}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        _reject_unknown(cls, data, "TrainConfig")
        return cls(**data)


# Stage defaults: those of the original project (pretrain batch 16, lr 3e-4, 3 epochs;
# SFT batch 8, lr 3e-5, 3 epochs).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(stage="pretrain", data=str(PRETRAIN_DATA), val_data=str(PRETRAIN_VAL_DATA),
                     out_dir=str(PRETRAINED_DIR), init_from=None, batch_size=16, lr=3e-4, epochs=3,
                     sample_prompt="The"),
    "sft": dict(stage="sft", data=str(SFT_DATA), val_data=str(SFT_VAL_DATA), out_dir=str(SFT_DIR),
                init_from=str(PRETRAINED_DIR), batch_size=8, lr=3e-5, epochs=3, warmup_steps=20,
                sample_prompt="Hello! Who are you?"),
    "lora": dict(stage="lora", data=str(DATA_DIR / "lora_identity.jsonl"), val_data=None,
                 out_dir=str(LORA_DIR / "identity"), init_from=str(SFT_DIR), batch_size=8, lr=1e-3,
                 epochs=3, warmup_steps=10, weight_decay=0.0, sample_prompt="Who are you?"),
    # Preference and RL stages start from the chat model and move it a little: a low learning
    # rate, no weight decay (it would pull towards zero, not towards the starting model).
    "dpo": dict(stage="dpo", data=str(DPO_DATA), val_data=str(DPO_VAL_DATA), out_dir=str(DPO_DIR),
                init_from=str(SFT_DIR), batch_size=8, lr=5e-6, epochs=1, warmup_steps=10, weight_decay=0.0,
                sample_prompt="Hello! How are you today?"),
    # A GRPO "sample" is a prompt with a checkable answer (its group of completions is drawn at
    # each step from the model being trained).
    "grpo": dict(stage="grpo", data=str(GRPO_DATA), val_data=None, out_dir=str(GRPO_DIR), init_from=str(SFT_DIR),
                 batch_size=8, lr=1e-5, epochs=1, max_steps=200, warmup_steps=10, weight_decay=0.0,
                 schedule="constant",
                 sample_prompt="How many words are in this list: apple river garden? Answer with the number only."),
}

# A preset names a model shape and the run settings that suit it, per stage.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains meaningfully in minutes on a 2-core CPU.
    "tiny": {
        "model": dict(vocab_size=6400, hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      max_seq_len=256),
        # Muon for the blocks' matrices (AdamW at lr for embeddings and norms) with a
        # warmup-stable-decay schedule: lower validation bits per byte than AdamW + cosine at
        # equal tokens and at equal time on the demo corpus (docs/RECIPES.md).
        "pretrain": dict(seq_len=256, batch_size=16, lr=2e-3, epochs=1, max_steps=600, warmup_steps=30,
                         optimizer="muon", muon_lr=0.02, schedule="wsd", cooldown_frac=0.3, min_lr_ratio=0.0,
                         eval_every=100, eval_batches=8, save_every=100, log_every=5),
        "sft": dict(seq_len=256, batch_size=8, lr=1e-3, epochs=3, warmup_steps=10,
                    eval_every=100, eval_batches=8, save_every=100, log_every=5),
        # The demo LoRA set (160 identity chats among 960 rehearsed SFT chats) packs into ~220
        # windows: batch 4 and 3 epochs at 2e-3 teach the name in ~170 steps (about a minute on 2
        # idle CPU cores) and keep most trained answers (see tool/prepare_data.py LORA_REHEARSAL).
        "lora": dict(seq_len=256, batch_size=4, lr=2e-3, epochs=3, warmup_steps=10, eval_every=50,
                     eval_batches=4, save_every=50, log_every=5),
        "dpo": dict(seq_len=256, batch_size=8, lr=1e-4, epochs=2, warmup_steps=10, eval_every=50,
                    eval_batches=8, save_every=50, log_every=5),
        # 16 prompts x 8 completions per step at 2e-4 for 40 steps: on a counting-trained tiny SFT
        # model this raised held-out greedy accuracy 58% -> 68%, where 8 prompts per step at 5e-4
        # went 58% -> 66% after 40 steps and back to 57% after 80 (README, section 10).
        "grpo": dict(seq_len=256, batch_size=16, lr=2e-4, max_steps=40, warmup_steps=5, eval_every=50,
                     save_every=20, log_every=5),
    },
    # ~26M parameters: the size minimind users know.
    "small": {
        "model": dict(vocab_size=6400, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=2,
                      max_seq_len=512),
        # The tiny preset's recipe: measured here too, 8.9% lower bits per byte than the
        # original AdamW + cosine at equal tokens (docs/RECIPES.md).
        "pretrain": dict(seq_len=512, lr=2e-3, warmup_steps=30, optimizer="muon", muon_lr=0.02, schedule="wsd",
                         cooldown_frac=0.3, min_lr_ratio=0.0),
        "sft": dict(seq_len=512),
        "lora": dict(seq_len=512),
    },
    # ~105M parameters, for one GPU.
    "base": {
        "model": dict(vocab_size=6400, hidden_size=768, n_layers=16, n_heads=12, n_kv_heads=4,
                      max_seq_len=1024),
        "pretrain": dict(seq_len=1024, batch_size=32, lr=6e-4, eval_every=500, save_every=1000),
        "sft": dict(seq_len=1024, batch_size=16),
        "lora": dict(seq_len=1024),
    },
}

# Mixtures of experts with the active parameters of `tiny` / `small` (and their run settings): a
# token runs through top_k experts of intermediate_size each (tiny-moe: 2 x 352 = tiny's 704;
# small-moe: 2 x 448 routed + 448 shared = 1344 against small's 1408).
PRESETS["tiny-moe"] = {**PRESETS["tiny"], "model": {**PRESETS["tiny"]["model"], **dict(
    use_moe=True, n_experts=4, top_k=2, intermediate_size=352)}}
PRESETS["small-moe"] = {**PRESETS["small"], "model": {**PRESETS["small"]["model"], **dict(
    use_moe=True, n_experts=8, top_k=2, n_shared_experts=1, intermediate_size=448)}}


def preset_model_config(preset: str, **overrides: Any) -> EtudeConfig:
    """The EtudeConfig of a named preset, with keyword overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return EtudeConfig(**{**PRESETS[preset]["model"], **overrides})


def resolve_train_config(stage: str, preset: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Stage defaults, then the preset's settings for that stage, then explicit overrides
    (flags that the user gave; None values mean 'not given' and are ignored)."""
    if stage not in STAGE_DEFAULTS:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {sorted(STAGE_DEFAULTS)}")
    settings = dict(STAGE_DEFAULTS[stage])
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        settings.update(PRESETS[preset].get(stage, {}))
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "max_steps" not in given:
        settings["max_steps"] = None  # an explicit epoch count outranks a preset's step count
    settings.update(given)
    return TrainConfig(**settings)


def read_json(path: Path | str, what: str) -> Any:
    """Read a JSON file, naming the file and the fault when it is missing or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text ({exc.reason}); the file is corrupted") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                         "the file is corrupted or truncated") from None


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]

