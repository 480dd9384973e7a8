"""The model of the best validation loss so far, kept beside the resume checkpoint.

Fine-tuning often overfits before its last step (the demo's SFT validation loss rises after
step 800 of 1,000), and users of training repositories expect the saved model to be the best
one, as transformers' `load_best_model_at_end` does. Whenever an evaluation beats every earlier
one, the trainer writes the model (the same files its out-dir would receive: a model folder, or
an adapter) into <out-dir>/best/ with best.json naming the step and loss; at the end of the run
those files are copied into the out-dir when they are better than the last step's. (Not inside
checkpoint/: that folder is replaced as a whole at every save.)

Resume stays exact: a best folder from a step after the checkpoint being resumed is discarded
(the resumed run reaches that step again and evaluates the same weights to the same loss).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config import read_json
from model.checkpoint import atomic_write, atomic_write_json

BEST_SUBDIR = "best"
BEST_FILE = "best.json"


class BestModel:
    """<out-dir>/best/: the lowest validation loss seen at a training step > 0, and its model."""

    def __init__(self, out_dir: Path):
        self.folder = Path(out_dir) / BEST_SUBDIR
        self.step: int | None = None
        self.val_loss = math.inf

    def restore(self, start_step: int, remove_stale: bool = True) -> None:
        """Take up the best of a resumed run; forget any best the resumed run has not reached
        (or everything, for a run starting at step 0). Only the writing rank removes files."""
        self.step, self.val_loss = None, math.inf
        record = self.folder / BEST_FILE
        if record.is_file():
            try:
                data = read_json(record, "best-model record")
                step, loss = int(data["step"]), float(data["val_loss"])
            except (ValueError, KeyError, TypeError):  # damaged: forgotten below, re-earned by the next evaluation
                step, loss = start_step + 1, math.inf
            if 0 < step <= start_step:
                self.step, self.val_loss = step, loss
                return
        if remove_stale and self.folder.exists():
            shutil.rmtree(self.folder)

    def offer(self, step: int, val_loss: float, save: Callable[[Path], Any] | None) -> bool:
        """Record an evaluation; when it is the best so far, write its model through
        `save(folder)` (None on ranks that do not write). Returns whether it was the best."""
        if step <= 0 or not val_loss < self.val_loss:  # also refuses NaN
            return False
        self.step, self.val_loss = step, val_loss
        if save is not None:
            record = self.folder / BEST_FILE
            record.unlink(missing_ok=True)  # while the files change, the folder is not a complete best
            save(self.folder)
            atomic_write_json(record, {"step": step, "val_loss": val_loss})
        return True

    def install(self, out_dir: Path) -> None:
        """Copy the best model's files into `out_dir`, each by an atomic rename."""
        for source in sorted(self.folder.iterdir()):
            if source.is_file() and source.name != BEST_FILE and not source.name.startswith("."):
                atomic_write(Path(out_dir) / source.name, lambda tmp, source=source: shutil.copyfile(source, tmp))
