"""LoRA: low-rank adapters on the linear layers of an Etude model, saved in the PEFT layout.

    names = apply_lora(model, r=8, alpha=16)     # wraps q/k/v/o/gate/up/down, freezes the rest
    ...train: only the lora_A / lora_B matrices have requires_grad...
    save_adapter(model, "weight/lora/identity", base_model="weight/etude_sft_model")
    load_adapter(fresh_model, resolve_adapter("identity"))   # unmerged, ready to chat
    merge_and_unload(model)                      # a plain EtudeModel again, adapter folded in

A LoRALinear keeps the frozen layer it wraps (`base_layer`) and adds scaling * B(A(x)) with
scaling = alpha / r. A is drawn like PEFT draws it (Kaiming-uniform), B starts at zero, so a
fresh adapter leaves the model's outputs exactly as they were. Targets are chosen by module
NAME (the last part of the qualified name), never by shape: under grouped-query attention k_proj
and v_proj are narrower than q_proj, and a shape filter would silently skip them.

On disk an adapter is what `peft` writes for our Hugging Face Llama export: adapter_config.json
(peft_type LORA, r, lora_alpha, lora_dropout, target_modules, base_model_name_or_path, ...) and
adapter_model.safetensors with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so
`PeftModel.from_pretrained(exported_llama, folder)` loads it as it is. The safetensors metadata
also records the base model's shape and a weight fingerprint, so an adapter is refused by a
model it was not trained on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from config import LORA_DIR, ROOT, read_json
from model.checkpoint import atomic_save_safetensors, atomic_write_json, load_safetensors
from model.model import EtudeModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's names for our Llama export: PeftModel (base_model) -> LoraModel (model) ->
# LlamaForCausalLM (model.) -> our module names.
PEFT_PREFIX = "base_model.model.model."
# The shape fields an adapter depends on; the recorded base must agree on every one.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size")
# Relative tolerance of the base-weight fingerprint: loose enough for a base cast to bf16/fp16
# (rounding moves a sum of squares by ~1e-5), tight enough to tell one fine-tune from another.
FINGERPRINT_RTOL = 1e-4

_UMASK = os.umask(0)
os.umask(_UMASK)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if base_layer.bias is not None:
            raise ValueError("LoRALinear supports bias-free layers only (Etude has no biases)")
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        weight = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # adapters_disabled(): the base layer alone (a DPO/GRPO reference)
        self.reset_lora_parameters(generator)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (merged or not), for code that reads `.weight` of a linear layer."""
        return self.base_layer.weight

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A as PEFT draws it (kaiming_uniform with a=sqrt(5), nn.Linear's default), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, computed in fp32: the change that merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (faster inference; the adapter stops acting on
        its own). A no-op when already merged."""
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (equal to the original up to rounding)."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}"


# ---- applying, merging ----------------------------------------------------------------------

def check_lora_settings(r: Any, alpha: Any, dropout: Any, targets: Any) -> list[str]:
    """Every problem with a set of LoRA settings (empty when they can work)."""
    problems = []
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"LoRA rank r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        problems.append(f"LoRA alpha must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        problems.append(f"LoRA targets must be a non-empty list of module names such as {list(DEFAULT_TARGETS)}, "
                        f"got {targets!r}")
    return problems


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of a model by qualified name (empty when none were applied)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def apply_lora(model: EtudeModel, targets: Iterable[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, seed: int | None = None) -> list[str]:
    """Wrap every nn.Linear whose own name (the last part of its qualified name) is in `targets`
    with a LoRALinear, and freeze every other parameter: afterwards only lora_A/lora_B train.
    `seed` draws the A matrices from a private generator (the same adapter for the same seed,
    whatever ran before); None uses torch's global one. Returns the wrapped modules' qualified
    names. A target that names no linear layer is an error."""
    targets = list(targets)
    problems = check_lora_settings(r, alpha, dropout, targets)
    if problems:
        raise ValueError("invalid LoRA settings:\n  - " + "\n  - ".join(problems))
    if lora_modules(model):
        raise ValueError("this model already has LoRA layers; apply an adapter to a plain model "
                         "(or merge_and_unload() the present one first)")
    linear = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = [name for name in linear if name.rsplit(".", 1)[-1] in targets]
    found = {name.rsplit(".", 1)[-1] for name in chosen}
    missing = [t for t in targets if t not in found]
    if missing:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"LoRA targets {missing} name no linear layer of this model; "
                         f"choose among {available}")
    if "lm_head" in found and getattr(model.config, "tie_embeddings", False):
        raise ValueError("lm_head shares its weight with embed_tokens in this model (tied embeddings); "
                         "LoRA on it is not supported, leave it out of the targets")
    for param in model.parameters():
        param.requires_grad_(False)
    generator = None
    if seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(linear[name], r, alpha, dropout, generator))
    return chosen


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes what its base does, every adapter switched off: the
    reference of a preference or RL stage that trains an adapter, with no second copy in memory."""
    modules = list(lora_modules(model).values())
    if any(module.merged for module in modules):
        raise ValueError("the adapters are merged into the base weights; unmerge them to switch them off")
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module in modules:
            module.disabled = False


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer into its base weight (the layers stay, marked merged)."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: the adapter acts on its own again."""
    for module in lora_modules(model).values():
        module.unmerge()


def unload_lora(model: EtudeModel) -> EtudeModel:
    """Put the plain nn.Linear layers back, dropping the adapters (a merged one stays folded
    into its weight): an ordinary model whose state dict has the usual names. Parameters become
    trainable again, as in any freshly loaded model."""
    for name, module in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.base_layer)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def merge_and_unload(model: EtudeModel) -> EtudeModel:
    """Merge every adapter into its weight and unload the LoRA layers: a plain dense model that
    computes what the adapted one did (what a merged export writes)."""
    merge_lora(model)
    return unload_lora(model)


# ---- the PEFT layout ------------------------------------------------------------------------

def adapter_settings(model: nn.Module) -> dict[str, Any]:
    """r, alpha, dropout and targets of a model's LoRA layers (one setting for all)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers to save; apply_lora() or load_adapter() first")
    shapes = {(m.r, m.alpha, m.dropout_p) for m in modules.values()}
    if len(shapes) > 1:
        raise ValueError(f"LoRA layers with different r/alpha/dropout {sorted(shapes)} cannot be saved as one "
                         "PEFT config; apply one setting to all")
    r, alpha, dropout = shapes.pop()
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules}, key=_target_order)
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}


def _target_order(name: str) -> tuple[int, str]:
    return (DEFAULT_TARGETS.index(name) if name in DEFAULT_TARGETS else len(DEFAULT_TARGETS), name)


def peft_adapter_config(r: int, alpha: float, dropout: float, targets: list[str],
                        base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as peft's LoraConfig writes it, for a plain LoRA on a causal LM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "revision": None, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def base_fingerprint(model: nn.Module, module_names: Iterable[str]) -> float:
    """Sum of squares (float64) of the base weights the adapter targets: cheap, independent of
    the device and nearly so of the dtype, different for any other fine-tune of the same shape."""
    total = 0.0
    for name in module_names:
        module = model.get_submodule(name)
        weight = module.base_layer.weight if isinstance(module, LoRALinear) else module.weight
        if isinstance(module, LoRALinear) and module.merged:
            weight = weight.float() - module.delta_weight()
        total += float(weight.detach().double().pow(2).sum())
    return total


def display_path(path: Path | str | None) -> str | None:
    """A path relative to the repository root when it lies inside it (portable), else absolute."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names, fp32, on the CPU."""
    return {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(module, part).weight.detach().float().cpu().contiguous()
            for name, module in lora_modules(model).items() for part in ("lora_A", "lora_B")}


def _write_adapter_files(model: nn.Module, folder: Path, base_model: str | None) -> None:
    settings = adapter_settings(model)
    names = list(lora_modules(model))
    metadata = {"format": "pt",
                "etude_base_config": json.dumps({k: model.config.to_dict()[k] for k in SHAPE_FIELDS}),
                "etude_base_fingerprint": repr(base_fingerprint(model, names)),
                "etude_base_model": base_model or ""}
    atomic_save_safetensors(folder / ADAPTER_WEIGHTS_FILE, lora_state_dict(model), metadata=metadata)
    # The config last: a folder with an adapter_config.json is complete.
    atomic_write_json(folder / ADAPTER_CONFIG_FILE,
                      peft_adapter_config(settings["r"], settings["alpha"], settings["dropout"],
                                          settings["targets"], base_model))


def save_adapter(model: nn.Module, folder: Path | str, base_model: Path | str | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors). `base_model` is recorded as base_model_name_or_path (relative to
    the repository when inside it). Atomic: files are renamed into place; a new folder appears
    whole. Other files in an existing folder (checkpoint/, metrics.jsonl) are left alone."""
    folder = Path(folder)
    base = display_path(base_model) if base_model is not None else None
    if folder.exists():
        _write_adapter_files(model, folder, base)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700; an adapter folder is an ordinary one
        _write_adapter_files(model, staging, base)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def resolve_adapter(name_or_path: str) -> Path:
    """The adapter folder for --lora: a bare name means config.LORA_DIR / name, anything with a
    path separator (or ~, ., ..) is used as a path. Missing: FileNotFoundError saying how to train it."""
    text = str(name_or_path).strip()
    if not text:
        raise ValueError("the LoRA adapter name is empty; give a name under weight/lora/ or a folder")
    bare = "/" not in text and os.sep not in text and text not in (".", "..") and not text.startswith("~")
    folder = LORA_DIR / text if bare else Path(text).expanduser()
    if not (folder / ADAPTER_CONFIG_FILE).is_file():
        name = text if bare else folder.name
        raise FileNotFoundError(
            f"no LoRA adapter {text!r}: {folder / ADAPTER_CONFIG_FILE} does not exist. Train one with "
            f"`python train/train_lora.py --lora-name {name}` (it writes {LORA_DIR / name}), or pass the "
            "folder of an existing adapter")
    return folder


def read_adapter_config(folder: Path | str) -> dict[str, Any]:
    """adapter_config.json, checked: a plain LoRA (no DoRA, rsLoRA, biases or per-layer
    patterns, which this module does not implement)."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    data = read_json(path, "LoRA adapter config")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    problems = []
    if data.get("peft_type") != "LORA":
        problems.append(f"peft_type is {data.get('peft_type')!r}, only 'LORA' is supported")
    targets = data.get("target_modules")
    if isinstance(targets, str):
        problems.append(f"target_modules is the pattern {targets!r}; a list of module names is needed")
        targets = DEFAULT_TARGETS
    problems += check_lora_settings(data.get("r"), data.get("lora_alpha"), data.get("lora_dropout", 0.0),
                                    targets)
    unsupported = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                   "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                   "modules_to_save": None, "lora_bias": False}
    for key, plain in unsupported.items():
        value = data.get(key)
        if not (value is None or value == plain or (not value and plain in (None, {}))):
            problems.append(f"{key} = {value!r} is not supported (only {plain!r})")
    if problems:
        raise ValueError(f"{path} describes an adapter this program cannot apply:\n  - " + "\n  - ".join(problems))
    return data


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # a damaged file: load_safetensors below names it properly
        return {}


def load_adapter(model: EtudeModel, folder: Path | str) -> EtudeModel:
    """Apply the adapter saved in `folder` to `model`, unmerged (merge_lora() or
    merge_and_unload() fold it in). Refuses, before changing the model, an adapter made for
    another base: a different shape (layers, widths), tensors that do not fit, or other base
    weights than those it was trained on. Returns the model."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    tensors = load_safetensors(weights_path)
    metadata = _metadata(weights_path)
    recorded = metadata.get("etude_base_model") or config.get("base_model_name_or_path") or "unknown"

    if "etude_base_config" in metadata:
        base_shape = json.loads(metadata["etude_base_config"])
        ours = model.config.to_dict()
        differ = [f"{k}: adapter {base_shape[k]}, model {ours[k]}" for k in SHAPE_FIELDS
                  if k in base_shape and base_shape[k] != ours[k]]
        if differ:
            raise ValueError(f"the LoRA adapter in {folder} was trained on another base model ({recorded}): "
                             f"{'; '.join(differ)}. Use it with the model it was made for, or train an "
                             "adapter for this one with `python train/train_lora.py --init-from MODEL`")

    targets = list(config["target_modules"])
    expected: dict[str, tuple[int, ...]] = {}
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [name for name in linear if name.rsplit(".", 1)[-1] in targets]
    r = config["r"]
    for name in names:
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, linear[name].in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (linear[name].out_features, r)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: adapter {tuple(tensors[k].shape)}, model {expected[k]}"
                   for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(items[:4])}" + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise ValueError(f"the LoRA adapter in {folder} does not fit this model ({'; '.join(parts)}); it was "
                         f"made for another base model ({recorded}). Use it with that model, or train an "
                         "adapter for this one with `python train/train_lora.py --init-from MODEL`")

    if "etude_base_fingerprint" in metadata:
        want = float(metadata["etude_base_fingerprint"])
        got = base_fingerprint(model, names)
        if abs(got - want) > FINGERPRINT_RTOL * abs(want):
            raise ValueError(f"the LoRA adapter in {folder} was trained on other weights ({recorded}) than "
                             "this model's (same shape, different values: another training run or stage). "
                             "Chat with the model it was trained on (--model), or train an adapter for this "
                             "one with `python train/train_lora.py --init-from MODEL`")

    apply_lora(model, targets, r=r, alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0))
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                layer = getattr(module, part)
                layer.weight.copy_(tensors[f"{PEFT_PREFIX}{name}.{part}.weight"].to(layer.weight))
    return model
