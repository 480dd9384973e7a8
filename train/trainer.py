"""THE training loop, shared by every stage (pretraining, SFT, LoRA, DPO, GRPO).

A stage hands `Trainer` a model, its training (and validation) windows, a TrainConfig and, when it
minimises something other than next-token cross-entropy, an `Objective` (the loss of a batch: DPO's
preference loss, GRPO's policy-gradient loss); the trainer owns everything else: device and
precision, distributed data parallel under torchrun, gradient accumulation, the learning-rate
schedule, clipping, evaluation (loss and bits per byte, or the objective's own figures), logging
(tqdm bar + metrics.jsonl, and TensorBoard or W&B through train/tracking.py), checkpoints and
exact resume, and Ctrl-C handling.

Exact resume: the data order is a pure function of (seed, epoch) and the position is the step
number, so a resumed run draws the same batches in the same order; weights and optimizer state
are saved in fp32, so on CPU the resumed losses equal the uninterrupted run's to the last bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import CHECKPOINT_SUBDIR, TrainConfig, read_json
from model.checkpoint import (atomic_save_safetensors, atomic_write, atomic_write_json, load_safetensors,
                              save_model_folder)
from model.model import IGNORE_INDEX, EtudeModel
from train.best_model import BestModel
from train.optim import build_optimizer
from train.progress import Progress, evaluations_between
from train.tracking import Tracker, check_tracker, open_tracker

_UMASK = os.umask(0)
os.umask(_UMASK)


class Windows(Protocol):
    """What the trainer needs of a dataset: a size and batches by window index. A batch is what
    the run's Objective takes: (inputs, targets) for the default one."""

    num_samples: int

    def get_batch(self, indices: list[int]) -> Any: ...


class Objective:
    """What a stage minimises over a batch. This default is next-token cross-entropy over the
    trained tokens (pretraining, SFT, LoRA); DPO and GRPO supply their own subclass. Models that
    the objective holds besides the trained one (a frozen reference) are neither optimised nor
    saved: the trainer only knows the model it was given."""

    def units(self, batch: Any) -> int:
        """How many things the batch's loss is a mean over (trained tokens; pairs; completions).
        Micro-batches and ranks are weighted by it, so a step's loss is the mean over the global
        batch however it is split."""
        _, targets = batch
        return int((targets != IGNORE_INDEX).sum())

    def describe_batch(self, samples: int, seq_len: int) -> str:
        """A global batch of `samples` samples in words, for the start line."""
        return f"{samples} windows x {seq_len} tokens"

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss: the mean over the batch's units, auxiliary loss added as it is, metrics: means
        over the units, logged with the loss)."""
        inputs, targets = batch
        _, loss, aux_loss = model(inputs, labels=targets)
        return loss, aux_loss, {}


def batch_to(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a tuple, list or dict of them and other values) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: batch_to(value, device) for key, value in batch.items()}
    return batch


# ---- device, precision, peak FLOP/s ------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU; an explicit name that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps was asked for but Apple MPS is not available; use --device auto or cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX-512 BF16), where bf16 matmuls run
    several times faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """Training precision: bf16 autocast where the hardware runs it fast, else fp32."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name != "auto":
        return named[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


# Dense bf16/fp16 tensor-core peaks by device name (FLOP/s); fp32 runs are measured instead.
_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """The FLOP/s that MFU is measured against: the datasheet peak for known GPUs in bf16/fp16,
    otherwise a matmul ceiling measured here and now on an accelerator. None on a CPU: its
    ceiling moves with whatever else the machine runs, so a figure measured once at start-up
    gave MFUs above 100% when the load dropped later (tool/benchmark.py measures MFU side by side
    instead)."""
    if device.type == "cpu":
        return None, "no MFU on a CPU: its peak moves with the machine's other load"
    if device.type == "cuda" and dtype != torch.float32:
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAKS.items():
            if key in name:
                return value, f"{name} datasheet"
    size = 2048
    # A private generator: measuring must not move the global RNG that a resumed run restores.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size ** 3 / best, f"measured {size}^3 matmul"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---- distributed --------------------------------------------------------------------------------

class Dist:
    """Rank and world size; initialises torch.distributed (NCCL on CUDA, gloo on CPU) when
    launched by torchrun. `launched` is true under torchrun even with one process, which FSDP
    needs; `enabled` only when there is more than one rank to talk to."""

    def __init__(self, device: torch.device):
        self.device = device
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
        self.enabled = self.world_size > 1
        if self.launched and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


# ---- the learning-rate schedule -----------------------------------------------------------------

def lr_at(step: int, total_steps: int, cfg: TrainConfig, warmup_steps: int) -> float:
    """The learning rate of a step (0-based): linear warmup to cfg.lr, then by cfg.schedule
    cosine: cosine decay towards cfg.lr * min_lr_ratio at the last step;
    wsd: cfg.lr held, then over the last cooldown_frac of the run a linear (or 1-sqrt)
    cool-down towards cfg.lr * min_lr_ratio; constant: cfg.lr to the end."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        cooldown_steps = round(cfg.cooldown_frac * total_steps)
        start = max(warmup_steps, total_steps - cooldown_steps)
        if step < start or cooldown_steps == 0:
            return cfg.lr
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        fraction_left = 1 - math.sqrt(progress) if cfg.cooldown == "1-sqrt" else 1 - progress
        return floor + (cfg.lr - floor) * fraction_left
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ---- resume state -------------------------------------------------------------------------------

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "model.safetensors"


def save_resume_state(folder: Path, model: EtudeModel, optimizer: torch.optim.Optimizer,
                      state: dict[str, Any]) -> None:
    """Write checkpoint/ as a whole: built in a temporary folder, then swapped in, so a crash
    at any moment leaves a complete checkpoint (the new one, or the previous one in
    checkpoint.old/, which load_resume_state falls back to)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Staging folders left by a save that was killed (only one process saves at a time).
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700; checkpoint/ is an ordinary folder
        weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict_for_save().items()}
        atomic_save_safetensors(staging / WEIGHTS_FILE, weights)
        with open(staging / OPTIMIZER_FILE, "wb") as handle:
            torch.save(optimizer.state_dict(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        atomic_write_json(staging / STATE_FILE, state)
        _swap_in(staging, folder)
    except OSError as exc:  # a full disk, a quota, a vanished mount: say so, keep the old checkpoint
        shutil.rmtree(staging, ignore_errors=True)
        kept = find_resume_state(folder)
        message = (f"cannot write the checkpoint {folder} ({exc.strerror or exc}); "
                   + (f"the previous checkpoint in {kept} is kept" if kept else "no earlier checkpoint exists")
                   + ". Free disk space (or fix the folder's permissions) and run the same command again to resume.")
        raise (OSError(exc.errno, message) if exc.errno is not None else OSError(message)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace `folder` by the complete `staging` folder; the old one stays in <folder>.old/
    until the new one is in place."""
    previous = folder.with_name(folder.name + ".old")
    if folder.exists():  # complete (it only ever appears by a rename), so an older .old can go
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(folder, previous)
    # else a save was killed between the two renames: previous is the only complete checkpoint
    # and stays until the new one is in place.
    os.replace(staging, folder)
    shutil.rmtree(previous, ignore_errors=True)


# FSDP checkpoints: every rank writes its own shards through torch.distributed.checkpoint
# (DCP) into checkpoint.tmp/, then rank 0 adds trainer_state.json and swaps the folder in. DCP
# reshards on load, so such a checkpoint resumes on any number of ranks.
FSDP_FORMAT = "dcp-fsdp"


def save_sharded_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       state: dict[str, Any], is_main: bool) -> None:
    """Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    staging = folder.with_name(folder.name + ".tmp")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(staging))
    dist.barrier()
    if is_main:
        atomic_write_json(staging / STATE_FILE, {**state, "format": FSDP_FORMAT})
        _swap_in(staging, folder)
    dist.barrier()


def load_sharded_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank loads its own shards of the weights and optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    wanted = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(wanted, checkpoint_id=str(folder))
    except Exception as exc:  # DCP wraps every failure; all mean the checkpoint cannot be used
        raise ValueError(f"cannot read the sharded checkpoint in {folder}: {exc}. It is damaged or from "
                         "another model; start over with --no-resume.") from None
    set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optimizer"])


def find_resume_state(folder: Path) -> Path | None:
    """The checkpoint folder to resume from, if any (checkpoint/, or checkpoint.old/ when a
    crash came between the two renames of a save)."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_resume_state(folder: Path, model: EtudeModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights, optimizer state and trainer state; every file is checked and named when
    it is unreadable."""
    state = read_json(folder / STATE_FILE, "trainer state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{folder / STATE_FILE} has no step count; the checkpoint is damaged. "
                         "Start over with --no-resume.")
    model.load_saved_state(load_safetensors(folder / WEIGHTS_FILE), source=str(folder / WEIGHTS_FILE))
    try:
        # weights_only: the optimizer state is tensors and numbers; nothing on disk may run code.
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(optimizer_state)
    except FileNotFoundError:
        raise FileNotFoundError(f"optimizer state missing: {folder / OPTIMIZER_FILE}. "
                                "Start over with --no-resume.") from None
    except Exception as exc:  # torch raises many kinds for a damaged file; all mean the same
        raise ValueError(f"cannot read optimizer state {folder / OPTIMIZER_FILE}: {exc}. The file is "
                         "corrupted or from another run; start over with --no-resume.") from None
    return state


# --on-nan skip: this many non-finite steps in a row mean the run has diverged; it stops.
MAX_NONFINITE_STREAK = 10


class NonFiniteLossError(ValueError):
    """Training stopped on a non-finite loss or gradient (the update was not applied)."""


# Settings that fix the data order: a resumed run must share them. Others (the run's length,
# the learning rate) may change on resume; the change is reported.
RESUME_KEYS = ("data", "seq_len", "seed")
NOTED_KEYS = ("epochs", "max_steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
              "muon_lr", "muon_weight_decay", "schedule", "cooldown_frac", "cooldown")


def _tokenizer_fingerprint(folder: str | None) -> str | None:
    """The fingerprint of the run's tokenizer, None when it cannot be read (toy runs without one)."""
    from model.tokenizer import load_tokenizer
    try:
        return load_tokenizer(folder).fingerprint() if folder else None
    except (OSError, ValueError):
        return None


# ---- the trainer --------------------------------------------------------------------------------

class Trainer:
    """Runs `cfg` on `model` over `train_data`; `fit()` returns a summary dict.

    save_model(model, out_dir) writes the final model (default: a model folder with the
    tokenizer copied in); sample_ids, when given, is a prompt whose continuation is printed at
    each evaluation."""

    def __init__(self, model: EtudeModel, cfg: TrainConfig, train_data: Windows,
                 val_data: Windows | None = None, token_bytes: torch.Tensor | None = None,
                 save_model: Callable[[EtudeModel, Path], Any] | None = None,
                 sample_ids: list[int] | None = None, decode: Callable[[list[int]], str] | None = None,
                 stop_ids: tuple[int, ...] = (), objective: Objective | None = None):
        self.cfg = cfg
        self.objective = objective or Objective()
        self.step_metrics: dict[str, float] = {}
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(self.device, cfg.dtype)
        self.dist = Dist(self.device)
        self.model = model.to(self.device)
        self.train_data, self.val_data = train_data, val_data
        self.token_bytes = token_bytes.to(self.device) if token_bytes is not None else None
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / CHECKPOINT_SUBDIR
        self.best = BestModel(self.out_dir)
        self.save_model = save_model or (lambda m, folder: save_model_folder(m, folder, cfg.tokenizer_dir))
        self.sample_ids, self.decode, self.stop_ids = sample_ids, decode, stop_ids
        self.tokenizer_fingerprint = _tokenizer_fingerprint(cfg.tokenizer_dir)

        world = self.dist.world_size
        self.grad_accum = self._grad_accum_for(world)
        self.global_batch = cfg.batch_size * self.grad_accum * world
        self.steps_per_epoch = train_data.num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training data has {train_data.num_samples} windows of {cfg.seq_len} tokens, fewer "
                f"than one global batch of {self.global_batch} (batch {cfg.batch_size} x grad_accum "
                f"{self.grad_accum} x {world} ranks); lower --batch-size or --seq-len, or add data")
        # --max-steps, when given, is the run's length (it may end mid-epoch or run past the
        # last epoch; the data order is defined for every epoch).
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.warmup_steps = min(cfg.warmup_steps, max(1, self.total_steps // 5))

        self.fsdp = cfg.fsdp
        self._skeleton: EtudeModel | None = None
        if self.fsdp:
            self._shard_model()
        # Fused AdamW on plain tensors; FSDP's sharded parameters take the foreach kernels.
        fused = self.device.type in ("cuda", "cpu") and not self.fsdp
        self.optimizer = build_optimizer(model, cfg, fused=fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step_model: torch.nn.Module = self.model
        if cfg.compile:
            self.step_model = torch.compile(self.model)
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel
            self.step_model = DistributedDataParallel(
                self.step_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._order_cache: tuple[int, list[int]] | None = None
        self._stop_signal: str | None = None
        self.skipped_steps = 0
        self.nonfinite_streak = 0
        check_tracker(cfg.tracker)  # a missing package stops the run before it starts
        self.tracker = Tracker()  # the real one opens in fit(), once the start step is known

    def _grad_accum_for(self, world: int) -> int:
        """Gradient accumulation for this run. A run resumed on another number of ranks keeps
        the checkpoint's global batch (so the data order continues exactly): accumulation
        adjusts to global batch / (batch size x ranks)."""
        found = find_resume_state(self.checkpoint_dir) if self.cfg.resume else None
        asked = self.cfg.grad_accum
        if found is None:
            return asked
        try:
            saved = int(read_json(found / STATE_FILE, "trainer state")["global_batch"])
        except Exception:  # a damaged state file is reported, with its name, by _resume
            return asked
        per_micro_step = self.cfg.batch_size * world
        if saved == per_micro_step * asked:
            return asked
        if saved % per_micro_step:
            raise ValueError(
                f"the checkpoint in {found} was trained with a global batch of {saved} windows, which "
                f"{world} rank(s) x batch {self.cfg.batch_size} cannot make up; pick --batch-size so that "
                f"batch x ranks divides {saved}, or pass --no-resume to start over")
        accum = saved // per_micro_step
        self._log(f"note: resuming a global batch of {saved} on {world} rank(s) x batch "
                  f"{self.cfg.batch_size}: gradient accumulation {asked} -> {accum}")
        return accum

    def _shard_model(self) -> None:
        """FSDP2: shard every block, then the rest (embeddings, final norm, head) as the root.
        Rank 0 keeps an unsharded copy on the CPU to write the final model folder into."""
        if not self.dist.launched:
            raise ValueError("--fsdp shards the model across processes started by torchrun; launch with "
                             "`torchrun --nproc_per_node N train/...py --fsdp ...` (N may be 1)")
        from torch.distributed.fsdp import fully_shard
        if self.dist.is_main:
            import copy
            self._skeleton = copy.deepcopy(self.model).cpu()
        for block in self.model.layers:
            fully_shard(block)
        fully_shard(self.model)

    def _unsharded_model(self) -> EtudeModel | None:
        """Collective under FSDP: the full weights gathered into rank 0's CPU copy (None on
        the other ranks). Without FSDP, the model itself."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self._skeleton is None:
            return None
        self._skeleton.load_state_dict(full)
        return self._skeleton

    # -- data order ---------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of windows for an epoch: a function of (seed, epoch) alone."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._order_cache = (epoch, torch.randperm(self.train_data.num_samples, generator=generator).tolist())
        return self._order_cache[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (window indices) for an optimizer step. The global batch of
        a step is fixed; ranks and accumulation only decide who computes which part."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chosen = order[within * self.global_batch:(within + 1) * self.global_batch]
        per_micro = self.cfg.batch_size
        world, rank = self.dist.world_size, self.dist.rank
        return [chosen[(m * world + rank) * per_micro:(m * world + rank + 1) * per_micro]
                for m in range(self.grad_accum)]

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean loss and bits per byte on the first eval_batches * batch_size validation windows
        (a fixed set, so evaluations are comparable across a run)."""
        if self.val_data is None:
            return None
        if type(self.objective) is not Objective:
            return self._evaluate_objective()
        self.model.eval()
        count = min(self.val_data.num_samples, self.cfg.eval_batches * self.cfg.batch_size)
        total_nats = torch.zeros((), dtype=torch.float64, device=self.device)
        total_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        total_bytes = torch.zeros((), dtype=torch.float64, device=self.device)
        batch, world = self.cfg.batch_size, self.dist.world_size
        starts = list(range(0, count, batch))
        if self.fsdp:  # sharded forwards are collective: every rank runs as many
            starts += [None] * (-len(starts) % world)
        for start in starts[self.dist.rank::world]:
            counted = start is not None
            start = start or 0
            inputs, targets = self.val_data.get_batch(list(range(start, min(start + batch, count))))
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                _, loss, _ = self.model(inputs, labels=targets)
            if not counted:
                continue
            valid = targets != IGNORE_INDEX
            n_valid = valid.sum()
            total_nats += loss.double() * n_valid
            total_tokens += n_valid
            if self.token_bytes is not None:
                total_bytes += self.token_bytes[targets[valid]].sum()
        self.model.train()
        total_nats, total_tokens, total_bytes = (self.dist.sum(t) for t in (total_nats, total_tokens, total_bytes))
        result = {"val_loss": float(total_nats / total_tokens.clamp(min=1))}
        if self.token_bytes is not None and float(total_bytes) > 0:
            result["val_bpb"] = float(total_nats / math.log(2) / total_bytes)
        return result

    def _evaluate_objective(self) -> dict[str, float]:
        """A stage's own objective on the first eval_batches * batch_size validation samples: its
        loss and metrics as means over their units, prefixed val_."""
        self.model.eval()
        count = min(self.val_data.num_samples, self.cfg.eval_batches * self.cfg.batch_size)
        totals: dict[str, torch.Tensor] = {}
        units = torch.zeros((), dtype=torch.float64, device=self.device)
        batch_size, world = self.cfg.batch_size, self.dist.world_size
        for start in list(range(0, count, batch_size))[self.dist.rank::world]:
            batch = batch_to(self.val_data.get_batch(list(range(start, min(start + batch_size, count)))), self.device)
            n = self.objective.units(batch)
            with self._autocast():
                loss, _, metrics = self.objective(self.model, batch)
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0) + value.detach().double() * n
            units += n
        self.model.train()
        units = self.dist.sum(units).clamp(min=1)
        return {f"val_{key}": float(self.dist.sum(total) / units) for key, total in totals.items()}

    def sample_text(self) -> str | None:
        """The sample prompt and the model's continuation, decoded as one text (decoding the two
        apart prints a prompt that ends in a space, and a continuation that starts with one, as
        a double space)."""
        if not self.sample_ids or self.decode is None:
            return None
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        with self._autocast():
            new_ids = list(self.model.generate(self.sample_ids, max_new_tokens=48, temperature=0.8, top_k=40,
                                               stop_ids=self.stop_ids, generator=generator))
        self.model.train()
        return self.decode(list(self.sample_ids) + new_ids)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # -- checkpoints ----------------------------------------------------------------------------

    def _state(self, step: int) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state().tolist()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device).tolist()
        return {"step": step, "epoch": step // self.steps_per_epoch, "total_steps": self.total_steps,
                "global_batch": self.global_batch, "samples_seen": step * self.global_batch,
                "tokens_seen": step * self.global_batch * self.cfg.seq_len, "skipped_steps": self.skipped_steps,
                "rng": rng, "train_config": self.cfg.to_dict(), "model_config": self.model.config.to_dict(),
                "tokenizer": self.tokenizer_fingerprint}

    def save_checkpoint(self, step: int) -> None:
        if self.fsdp:
            save_sharded_state(self.checkpoint_dir, self.model, self.optimizer, self._state(step), self.dist.is_main)
            return
        if self.dist.is_main:
            save_resume_state(self.checkpoint_dir, self.model, self.optimizer, self._state(step))
        self.dist.barrier()

    def _resume(self) -> int:
        """Restore the latest checkpoint when resuming is on; returns the step to start at."""
        found = find_resume_state(self.checkpoint_dir) if self.cfg.resume else None
        if found is None:
            return 0
        try:
            state = read_json(found / STATE_FILE, "trainer state")
        except ValueError as exc:
            raise ValueError(f"{exc}. Start over with --no-resume.") from None
        if not isinstance(state, dict):
            raise ValueError(f"{found / STATE_FILE} has no step count; the checkpoint is damaged. "
                             "Start over with --no-resume.")
        saved_shape = state.get("model_config")
        changed = ""
        if isinstance(saved_shape, dict):
            now = self.model.config.to_dict()
            # Only fields both know: one added to EtudeConfig later must not orphan old checkpoints.
            changed = "; ".join(f"{k}: {saved_shape[k]!r} -> {now[k]!r}" for k in sorted(set(now) & set(saved_shape))
                                if saved_shape[k] != now[k])
        if isinstance(saved_shape, dict) and changed:
            raise ValueError(f"the checkpoint in {found} is of another model ({changed}); resume with the "
                             "--preset/--model-config it was made with, or pass --no-resume to start over")
        sharded = state.get("format") == FSDP_FORMAT
        if sharded != self.fsdp:
            written, needs = ("an FSDP run", "add --fsdp (under torchrun, any number of ranks)") if sharded else (
                "a run without FSDP", "drop --fsdp")
            raise ValueError(f"the checkpoint in {found} was written by {written}; to resume it, {needs}, "
                             "or pass --no-resume to start over")
        saved_tokenizer = state.get("tokenizer")
        if saved_tokenizer and self.tokenizer_fingerprint and saved_tokenizer != self.tokenizer_fingerprint:
            where = "put the one it started with back into that folder" if self.cfg.init_from else \
                "pass the one it started with as --tokenizer-dir"
            raise ValueError(f"the checkpoint in {found} was trained with another tokenizer than the one in "
                             f"{self.cfg.tokenizer_dir} (other tokens or merges); {where}, or pass --no-resume "
                             "to start over")
        saved_run = state.get("train_config")
        saved_optimizer = saved_run.get("optimizer", "adamw") if isinstance(saved_run, dict) else self.cfg.optimizer
        if saved_optimizer != self.cfg.optimizer:  # so saved_run is the run's settings
            # Name the run's whole recipe: a preset whose default changed since would otherwise
            # continue the old optimizer at the new learning rate and schedule.
            keys = ["lr", *(["muon_lr"] if saved_optimizer == "muon" else []), "schedule", "warmup_steps",
                    "min_lr_ratio", *(["cooldown_frac"] if saved_run.get("schedule") == "wsd" else [])]
            recipe = [f"--optimizer {saved_optimizer}"] + [f"--{k.replace('_', '-')} {saved_run[k]}"
                                                          for k in keys if k in saved_run]
            raise ValueError(f"the checkpoint in {found} was trained with another optimizer; resume with its "
                             f"recipe ({' '.join(recipe)}), or pass --no-resume to start over")
        if sharded:
            load_sharded_state(found, self.model, self.optimizer)
        else:
            state = load_resume_state(found, self.model, self.optimizer)
        saved = state.get("train_config", {})
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_KEYS
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        if state.get("global_batch", self.global_batch) != self.global_batch:
            changed.append(f"global batch: {state['global_batch']} -> {self.global_batch}")
        if changed:
            raise ValueError(f"the checkpoint in {found} was made with other settings ({'; '.join(changed)}); "
                             "run with the same settings to resume, or pass --no-resume to start over")
        noted = [f"{k}: {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in NOTED_KEYS
                 if k in saved and saved[k] != getattr(self.cfg, k)]
        if noted:
            self._log(f"note: resuming with changed settings ({'; '.join(noted)})")
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(state["rng"]["cuda"], dtype=torch.uint8), self.device)
        self.skipped_steps = state.get("skipped_steps", 0)
        self._log(f"resuming from {found} at step {state['step']}/{self.total_steps}")
        return state["step"]

    # -- logging --------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def _metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.tracker.log(record)

    def _trim_metrics(self, start_step: int) -> None:
        """Forget metrics of steps after the resume point (they will be run again)."""
        path = self.out_dir / "metrics.jsonl"
        if not self.dist.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    # -- signals --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """First Ctrl-C (or SIGTERM) asks the loop to stop at the end of the current step and
        save; a second Ctrl-C interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, _frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            self._log(f"\n{self._stop_signal} received: saving a checkpoint after this step "
                      "(press Ctrl-C again to quit without saving)")

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        start_step = self._resume()
        self._trim_metrics(start_step)
        self.tracker = open_tracker(self.cfg.tracker, self.out_dir, start_step, self.cfg.to_dict(), self.dist.is_main)
        try:
            return self._fit_from(start_step)
        finally:
            self.tracker.close()
            self.tracker = Tracker()

    def _fit_from(self, start_step: int) -> dict[str, Any]:
        cfg = self.cfg
        n_params = self.model.num_parameters()
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        peak, peak_source = peak_flops(self.device, self.dtype)
        against = f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})" if peak else peak_source
        self._log(f"{cfg.stage}: {n_params / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable) on "
                  f"{self.device} in {str(self.dtype).replace('torch.', '')}, {self.dist.world_size} rank(s); "
                  f"{self.total_steps} steps x {self.objective.describe_batch(self.global_batch, cfg.seq_len)} "
                  f"({self.steps_per_epoch} steps/epoch); {against}")
        summary: dict[str, Any] = {"start_step": start_step, "total_steps": self.total_steps}
        progress = Progress()
        self.best.restore(start_step, remove_stale=self.dist.is_main)
        self.dist.barrier()
        if start_step == 0:
            started = time.perf_counter()
            first = self.evaluate()
            if first:
                progress.evaluation(time.perf_counter() - started)
                summary["first_eval"] = first
                self._metrics({"step": 0, **first})
                self._log("step 0: " + _fmt(first))
        if start_step >= self.total_steps:
            self._log(f"already trained for {start_step} of {self.total_steps} steps; nothing to do "
                      "(raise --max-steps or --epochs to train further, or --no-resume to start over)")
            summary["status"] = "complete"
            return summary

        tokens_per_step = self.global_batch * cfg.seq_len
        bar = tqdm(total=self.total_steps, initial=start_step, desc=cfg.stage, dynamic_ncols=True,
                   disable=not (self.dist.is_main and sys.stderr.isatty()))
        self.model.train()
        last = None
        step = start_step
        paused = False
        with self._stop_on_signals():
            while step < self.total_steps:
                if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
                    paused = True
                    break
                if self.dist.any(self._stop_signal is not None):
                    self._stop_signal = self._stop_signal or "a signal to another rank"
                    break
                started = time.perf_counter()
                loss, grad_norm, lr = self._train_step(step)  # returns floats: the step has finished
                progress.step(time.perf_counter() - started)
                step += 1
                tokens_per_sec = tokens_per_step / progress.seconds_per_step
                record = {"step": step, "loss": loss, **self.step_metrics, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_sec": round(tokens_per_sec, 1)}
                speed = {"tok_s": f"{tokens_per_sec:,.0f}"}
                if peak:
                    mfu = self.model.estimate_mfu(tokens_per_sec, cfg.seq_len, peak)
                    record["mfu"] = round(mfu, 4)
                    speed["mfu"] = f"{mfu:.1%}"
                self._metrics(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **speed)
                if step % cfg.log_every == 0 or step == self.total_steps:
                    evals_left = evaluations_between(step, self.total_steps, cfg.eval_every) if self.val_data else 0
                    eta = progress.eta(self.total_steps - step, evals_left)
                    self._log(f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                              f"{tokens_per_sec:,.0f} tok/s" + (f" | MFU {speed['mfu']}" if peak else "")
                              + f" | ETA {_duration(eta)}")
                    routing = routing_metrics(self.model)
                    if routing:
                        self._metrics({"step": step, **routing})
                if step % cfg.eval_every == 0 or step == self.total_steps:
                    started = time.perf_counter()
                    last = self.evaluate()
                    if last:
                        best = self._offer_best(step, last["val_loss"])
                        self._metrics({"step": step, **last})
                        self._log(f"step {step}: " + _fmt(last) + (" (best so far)" if best else ""))
                    # Sharded generation is collective; every rank draws the same tokens.
                    sample = self.sample_text() if self.dist.is_main or self.fsdp else None
                    if sample is not None:
                        self._log(f"sample: {sample}")
                    if last:
                        progress.evaluation(time.perf_counter() - started)
                if step % cfg.save_every == 0 and step < self.total_steps:
                    self.save_checkpoint(step)
        bar.close()
        self.save_checkpoint(step)
        summary.update(end_step=step, last_eval=last, skipped_steps=self.skipped_steps)
        if self.skipped_steps:
            self._log(f"{self.skipped_steps} step(s) had a non-finite loss or gradient and were skipped "
                      "(--on-nan skip)")
        if paused and not self._stop_signal:
            self._log(f"paused at step {step} (--stop-at-step); checkpoint saved in {self.checkpoint_dir}. "
                      "Run again without --stop-at-step (or with a later one) to continue.")
            summary["status"] = "paused"
            return summary
        if self._stop_signal:
            self._log(f"stopped at step {step}; checkpoint saved in {self.checkpoint_dir}. "
                      "Run the same command again to resume.")
            summary["status"] = "interrupted"
            return summary
        self._save_final(step, last, summary)
        summary["status"] = "complete"
        return summary

    def _offer_best(self, step: int, val_loss: float) -> bool:
        """Keep the model of an evaluation that beats every earlier one (--keep best)."""
        if self.cfg.keep != "best":
            return False
        better = step > 0 and val_loss < self.best.val_loss
        model = self._unsharded_model() if better else None  # collective under FSDP
        saved = self.best.offer(step, val_loss, (lambda folder: self.save_model(model, folder))
                                if self.dist.is_main else None)
        self.dist.barrier()
        return saved

    def _save_final(self, step: int, last: dict[str, float] | None, summary: dict[str, Any]) -> None:
        """The out-dir receives the last step's model, or with --keep best the best evaluation's
        when an earlier one was better than the last."""
        last_loss = last["val_loss"] if last else math.inf
        use_best = self.cfg.keep == "best" and self.best.step is not None and self.best.step != step \
            and self.best.val_loss < last_loss
        summary["saved_step"] = self.best.step if use_best else step
        if use_best:
            if self.dist.is_main:
                self.best.install(self.out_dir)
                self._log(f"saved {self.out_dir}: the model of step {self.best.step}, whose validation loss "
                          f"{self.best.val_loss:.4f} is the run's best (the last step, {step}, had {last_loss:.4f}); "
                          "--keep last saves the last step's model instead")
            self.dist.barrier()
            return
        final = self._unsharded_model()
        if self.dist.is_main:
            self.save_model(final, self.out_dir)
            self._log(f"saved {self.out_dir} (the model of step {step})")
        self.dist.barrier()

    def _train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm, lr).
        The loss is the mean over every trained token of the global batch, however the batch
        is split across micro-batches and ranks."""
        lr = lr_at(step, self.total_steps, self.cfg, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches = [self.train_data.get_batch(indices) for indices in self.micro_batches(step)]
        local_units = sum(self.objective.units(batch) for batch in batches)
        global_units = float(self.dist.sum(torch.tensor(float(local_units), device=self.device)))
        total_loss = torch.zeros((), device=self.device)
        totals: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(batches):
            batch = batch_to(batch, self.device)
            share = self.objective.units(batch) * self.dist.world_size / max(global_units, 1.0)
            syncing = index == len(batches) - 1 or not self.dist.enabled
            if self.fsdp:  # FSDP2 reduce-scatters only after the last micro-batch
                self.model.set_requires_gradient_sync(syncing)
            with (contextlib.nullcontext() if syncing or self.fsdp else self.step_model.no_sync()):
                with self._autocast():
                    loss, aux_loss, metrics = self.objective(self.step_model, batch)
                    scaled = (loss * share + aux_loss / len(batches))
                self.scaler.scale(scaled).backward()
            total_loss += loss.detach() * share / self.dist.world_size
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value.detach().float() * share / self.dist.world_size
        self.step_metrics = {key: float(self.dist.sum(total)) for key, total in totals.items()}
        loss_value = float(self.dist.sum(total_loss))
        if not math.isfinite(loss_value):
            return self._skip_nonfinite(step, f"the loss is {loss_value}", loss_value, lr)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        # fp16's GradScaler skips overflowing steps itself (and lowers its scale); elsewhere a
        # non-finite gradient would turn every weight it touches into NaN.
        if not self.scaler.is_enabled() and not math.isfinite(float(grad_norm)):
            return self._skip_nonfinite(step, f"the gradient norm is {float(grad_norm)}", loss_value, lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak = 0
        return loss_value, float(grad_norm), lr

    def _skip_nonfinite(self, step: int, what: str, loss_value: float, lr: float) -> tuple[float, float, float]:
        """A non-finite loss or gradient: the update is not applied. With --on-nan skip the step
        is counted and the run goes on (until MAX_NONFINITE_STREAK in a row); with stop, or after
        that many, the run ends without saving, so the last good checkpoint stays as it is."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.nonfinite_streak += 1
        if self.cfg.on_nan == "skip" and self.nonfinite_streak < MAX_NONFINITE_STREAK:
            self._log(f"step {step + 1}: {what}; update skipped ({self.skipped_steps} so far)")
            return loss_value, float("nan"), lr
        found = find_resume_state(self.checkpoint_dir)
        try:
            kept = f"the last checkpoint, {found} (step {read_json(found / STATE_FILE, 'trainer state')['step']}), is kept"
        except Exception:  # no checkpoint yet, or one that cannot be read: say so
            kept = "no checkpoint had been saved yet"
        why = "(--on-nan stop)" if self.cfg.on_nan == "stop" else f"({self.nonfinite_streak} steps in a row)"
        raise NonFiniteLossError(
            f"step {step + 1}: {what}; training stopped without applying the update {why}; {kept}. Lower --lr "
            "or raise --warmup-steps, train in --dtype fp32 or bf16 rather than fp16, or check the data, then run "
            "again to resume; --on-nan skip skips such steps instead")


def routing_metrics(model: EtudeModel) -> dict[str, Any]:
    """A mixture of experts' routing in the last micro-batch of this rank (per MoE layer: each
    expert's share of the assignments and the router entropy), so collapse shows in
    metrics.jsonl; empty for a dense model."""
    stats = model.routing_stats() if hasattr(model, "routing_stats") else None
    return stats or {}


def _fmt(metrics: dict[str, float]) -> str:
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
