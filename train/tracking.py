"""Optional experiment tracking: the scalars of metrics.jsonl also sent to TensorBoard or
Weights & Biases (`--tracker tensorboard|wandb`, default none).

Neither package is a dependency: asking for one that is not installed stops the run at its start
with the pip command that installs it. Only rank 0 tracks; every other rank, and every run
without --tracker, gets the do-nothing Tracker.

    --tracker tensorboard   event files in <out-dir>/tensorboard/  (tensorboard --logdir <out-dir>)
    --tracker wandb         a W&B run named after <out-dir>, its files in <out-dir>/wandb/;
                            WANDB_MODE=offline keeps everything on disk (`wandb sync` uploads it later)

On resume, TensorBoard hides the events of steps after the checkpoint that an interrupted run had
already written (purge_step), so each step shows once, as in metrics.jsonl; W&B continues the same
run (its id is kept in <out-dir>/wandb/etude_run_id) and ignores steps it has already seen, which
an exact resume computes again to the same values.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from config import ConfigError
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def check_tracker(kind: str) -> None:
    """Stop with the install command when the package behind `kind` is missing (without
    importing it: wandb takes a second to import)."""
    if kind != "none" and importlib.util.find_spec(kind) is None:
        raise ConfigError(f"--tracker {kind} needs the {kind} package, which is not installed; install it with "
                          f"`{INSTALL[kind]}`, or drop --tracker")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, without its step."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Tracker:
    """Tracking turned off (and on every rank but 0): every call does nothing."""

    def log(self, record: dict[str, Any]) -> None:
        """Send the scalars of one metrics.jsonl record, at its step."""

    def close(self) -> None:
        """Write out what is buffered and let go of the files."""


class TensorBoardTracker(Tracker):
    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # Events at and after purge_step that earlier writers left are hidden when TensorBoard
        # reads the folder: after a resume, those of steps past the checkpoint (they are run
        # again); on a fresh start, all of an older run's.
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else 0)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    RUN_ID_FILE = "etude_run_id"

    def __init__(self, out_dir: Path, start_step: int, run_config: dict[str, Any]):
        import wandb
        folder = out_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / self.RUN_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if start_step and id_file.is_file() else None
        try:
            self.run = wandb.init(project="etude", name=out_dir.name, dir=str(out_dir), config=run_config,
                                  id=run_id, resume="allow" if run_id else None)
        except wandb.errors.Error as exc:
            raise ConfigError(f"--tracker wandb could not start a run ({exc}); log in with `wandb login`, or set "
                              "WANDB_MODE=offline to keep the run on disk (upload it later with `wandb sync`), "
                              "or drop --tracker") from None
        id_file.write_text(self.run.id + "\n", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        # W&B wants finite numbers or it logs a warning per value; a skipped step's NaN gradient
        # norm is left out (metrics.jsonl keeps it).
        values = {name: value for name, value in scalars(record).items() if math.isfinite(value)}
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, out_dir: Path, start_step: int, run_config: dict[str, Any], is_main: bool) -> Tracker:
    """The tracker a run asked for, opened for a run that starts at `start_step` (0: fresh)."""
    if kind == "none" or not is_main:
        return Tracker()
    check_tracker(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(out_dir, start_step)
    return WandbTracker(out_dir, start_step, run_config)
