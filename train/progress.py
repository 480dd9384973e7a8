"""Training speed and time left, smoothed so that the log reads steadily.

A log line's tokens/s and ETA used to come from the few steps since the previous line, with any
evaluation that fell among them counted as training time: one slow step or one evaluation made
the estimate jump (0:21 -> 2:04 -> 0:34 on consecutive lines). Here the two kinds of time are
kept apart: seconds per training step are an exponential moving average over about `span`
steps, and the evaluations still to come are priced at the mean of the ones measured so far
(the step-0 evaluation gives the first figure before training starts).
"""

from __future__ import annotations


class Progress:
    """Smoothed seconds per step and the time left of a run.

    `step(seconds)` records one optimizer step (the first one of a process warms up caches and
    kernels, so it is left out of the average unless it is the only one); `evaluation(seconds)`
    records one evaluation. The average is bias-corrected, as Adam's moments are, so the first
    steps already give an unbiased figure rather than one pulled toward zero."""

    def __init__(self, span: int = 50):
        if span < 1:
            raise ValueError(f"span must be >= 1, got {span}")
        self.decay = 1 - 2 / (span + 1)
        self._average = 0.0
        self._weight = 0.0  # 1 - decay**n: the bias correction
        self._first: float | None = None
        self.steps = 0
        self._eval_total = 0.0
        self.evaluations = 0

    def step(self, seconds: float) -> None:
        self.steps += 1
        if self.steps == 1:
            self._first = seconds
            return
        self._average = self.decay * self._average + (1 - self.decay) * seconds
        self._weight = self.decay * self._weight + (1 - self.decay)

    def evaluation(self, seconds: float) -> None:
        self._eval_total += seconds
        self.evaluations += 1

    @property
    def seconds_per_step(self) -> float | None:
        """The smoothed time of one training step, or None before any step."""
        if self._weight > 0:
            return self._average / self._weight
        return self._first

    @property
    def seconds_per_evaluation(self) -> float:
        return self._eval_total / self.evaluations if self.evaluations else 0.0

    def eta(self, steps_left: int, evaluations_left: int = 0) -> float | None:
        """Seconds until the run ends: the steps left at the smoothed step time, plus the
        evaluations left at their mean cost."""
        per_step = self.seconds_per_step
        if per_step is None:
            return None
        return steps_left * per_step + evaluations_left * self.seconds_per_evaluation


def evaluations_between(step: int, total_steps: int, every: int) -> int:
    """How many evaluations a run evaluating every `every` steps and at its last step still
    makes after `step`."""
    if step >= total_steps:
        return 0
    regular = total_steps // every - step // every
    return regular + (0 if total_steps % every == 0 else 1)
