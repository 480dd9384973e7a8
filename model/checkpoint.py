"""Model folders: save and load an Etude model without any training code.

A model folder holds `config.json` (EtudeConfig + "model_type"), `model.safetensors`,
`generation_config.json` and a copy of the tokenizer files. Saving never leaves a half-written
file in place: every file is written under a temporary name, flushed to disk and renamed over
the old one; a folder that does not exist yet is built under a temporary name and renamed into
place whole. `config.json` is written last, so a folder with a config.json is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from config import IM_END, ENDOFTEXT, MODEL_TYPE, ConfigError, EtudeConfig, read_json
from model.hf_llama import config_from_hf, hf_weight_files, is_hf_config, state_from_hf
from model.model import EtudeModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, write: Any) -> None:
    """Write a file through `write(tmp_path)` under a temporary name in the same folder, fsync
    it, then rename it over `path`. A crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and some writers) make 0600; ordinary permissions
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path | str, data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: Path | str, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(path: Path | str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming the file when it is missing or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read weights {path}: {exc}. The file is corrupted or truncated; "
                         "re-run the stage that wrote it (or start over with --no-resume).") from None


def generation_config(tokenizer_vocab: dict[str, int] | None) -> dict[str, Any]:
    """Hugging Face generation_config.json: generation ends at <|im_end|> (end of an assistant
    turn) or <|endoftext|> (end of a document)."""
    ids = tokenizer_vocab or {ENDOFTEXT: 0, IM_END: 2}
    return {"bos_token_id": ids[ENDOFTEXT], "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT], "do_sample": False}


def _tokenizer_vocab(tokenizer_dir: Path) -> dict[str, int] | None:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = read_json(path, "tokenizer file")
    vocab = dict(data.get("model", {}).get("vocab", {}))
    for token in data.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
    return vocab


def tokenizer_vocab_size(tokenizer_dir: Path | str) -> int | None:
    vocab = _tokenizer_vocab(Path(tokenizer_dir))
    return None if vocab is None else max(vocab.values()) + 1


def _write_folder_files(model: EtudeModel, folder: Path, tokenizer_dir: Path | None,
                        extra: dict[str, Any] | None) -> None:
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict_for_save().items()}
    atomic_save_safetensors(folder / WEIGHTS_FILE, {k: v.cpu() for k, v in state.items()},
                            metadata={"format": "pt"})
    vocab = None
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = tokenizer_dir / name
            if source.is_file():
                atomic_write(folder / name, lambda tmp, s=source: shutil.copyfile(s, tmp))
        vocab = _tokenizer_vocab(tokenizer_dir)
    atomic_write_json(folder / GENERATION_CONFIG_FILE, generation_config(vocab))
    config = {"model_type": MODEL_TYPE, **model.config.to_dict(), **(extra or {})}
    atomic_write_json(folder / CONFIG_FILE, config)


def save_model_folder(model: EtudeModel, folder: Path | str, tokenizer_dir: Path | str | None = None,
                      extra_config: dict[str, Any] | None = None) -> Path:
    """Save weights (fp32), config, generation config and a copy of the tokenizer files."""
    folder = Path(folder)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer_dir is not None and tokenizer_dir.resolve() == folder.resolve():
        tokenizer_dir = None  # the tokenizer files are already there
    if folder.exists():
        for stale in folder.glob(".*.tmp"):  # files of a save that was killed half-way
            if stale.is_file():
                stale.unlink(missing_ok=True)
        _write_folder_files(model, folder, tokenizer_dir, extra_config)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the folder is an ordinary one
        _write_folder_files(model, staging, tokenizer_dir, extra_config)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(folder.parent)
    return folder


def read_model_config(folder: Path | str) -> EtudeConfig:
    """The EtudeConfig stored in a model folder (or implied by a Hugging Face Llama folder's
    config.json), with a clear message when the folder is neither."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    data = read_json(folder / CONFIG_FILE, "model config")
    if not isinstance(data, dict):
        raise ValueError(f"{folder / CONFIG_FILE} must hold a JSON object")
    if is_hf_config(data):  # a Hugging Face Llama folder loads as it is (model/hf_llama.py)
        return config_from_hf(data, tokenizer_vocab_size(folder), source=str(folder / CONFIG_FILE))
    try:
        return EtudeConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{folder / CONFIG_FILE}: {exc}") from None


def load_model_folder(folder: Path | str, device: str | torch.device = "cpu",
                      check_tokenizer: bool = True) -> EtudeModel:
    """Rebuild a model from a folder's config.json and load its weights strictly. A Hugging Face
    Llama folder (single or sharded safetensors) loads too, converted to fp32 Etude weights."""
    folder = Path(folder)
    config = read_model_config(folder)
    if check_tokenizer:
        vocab = tokenizer_vocab_size(folder)
        if vocab is not None and vocab > config.vocab_size:
            raise ValueError(f"the tokenizer in {folder} has {vocab} ids but the model only "
                             f"{config.vocab_size}: they do not belong together")
    model = EtudeModel(config)
    if is_hf_config(read_json(folder / CONFIG_FILE, "model config")):
        state: dict[str, torch.Tensor] = {}
        for path in hf_weight_files(folder):  # one file, or the shards of an index
            state.update(load_safetensors(path))
        model.load_saved_state(state_from_hf(state, config, source=str(folder)), source=str(folder))
    else:
        model.load_saved_state(load_safetensors(folder / WEIGHTS_FILE), source=str(folder / WEIGHTS_FILE))
    return model.to(device)
