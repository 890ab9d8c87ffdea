"""The learning-rate range test behind ``finetune.lr: auto`` (Smith, 2017; fastai's ``lr_find``).

Training runs for a bounded number of steps while the rate grows exponentially from
``MIN_LR`` to ``MAX_LR``; the training loss is smoothed (a debiased moving average) and the
test stops once it diverges. The rate chosen is a tenth of the rate at the lowest smoothed
loss: well below the divergence, where the loss still fell fast. Nothing here imports torch:
``transfer.training`` runs the steps and feeds the losses in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transfer.errors import PipelineError

MIN_LR, MAX_LR = 1e-7, 1.0
# A few hundred steps at most, and on small sets about two epochs, but never so few that the
# curve has no shape.
MIN_STEPS, MAX_STEPS, EPOCHS_OF_STEPS = 30, 100, 2
SMOOTHING = 0.9  # weight of the past in the moving average of the loss
DIVERGED = 4.0   # the test stops when the smoothed loss exceeds this times its lowest value
BELOW_MINIMUM = 10.0  # the rate chosen: the rate at the lowest smoothed loss, divided by this


def range_test_steps(steps_per_epoch: int) -> int:
    """How many steps the test may take on a training set of ``steps_per_epoch`` batches."""
    return max(MIN_STEPS, min(MAX_STEPS, EPOCHS_OF_STEPS * steps_per_epoch))


@dataclass
class RangeTest:
    """The rates to try, step by step, and the smoothed losses seen at them."""

    steps: int
    min_lr: float = MIN_LR
    max_lr: float = MAX_LR

    def __post_init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []  # smoothed
        self._average = 0.0
        self.diverged_at: float | None = None

    def rate(self, step: int) -> float:
        """The rate of step ``step`` (0-based): exponential from ``min_lr`` to ``max_lr``."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / max(1, self.steps - 1))

    def record(self, lr: float, loss: float) -> bool:
        """Note the training loss of a step at ``lr``; False once the loss has diverged."""
        if not math.isfinite(loss):
            self.diverged_at = lr
            return False
        self._average = SMOOTHING * self._average + (1 - SMOOTHING) * loss
        smoothed = self._average / (1 - SMOOTHING ** (len(self.losses) + 1))
        self.lrs.append(lr)
        self.losses.append(smoothed)
        if smoothed > DIVERGED * min(self.losses):
            self.diverged_at = lr
            return False
        return True

    def result(self) -> LrRange:
        """The curve and the rate chosen; one error line when no rate is usable."""
        how = (f"the loss diverged at {self.diverged_at:.3g}" if self.diverged_at is not None
               else f"it never diverged up to {self.max_lr:.3g}")
        if not self.losses:
            raise PipelineError(f"finetune.lr: auto: the learning-rate range test found no "
                                f"usable rate: {how}, at its first step; set finetune.lr to a "
                                "number")
        lowest = min(range(len(self.losses)), key=self.losses.__getitem__)
        chosen = self.lrs[lowest] / BELOW_MINIMUM
        if chosen < self.min_lr:
            raise PipelineError(
                f"finetune.lr: auto: the learning-rate range test found no usable rate: the "
                f"loss was lowest at {self.lrs[lowest]:.3g}, too near the start of the range "
                f"({self.min_lr:.3g}) for a rate {BELOW_MINIMUM:g}x below it, and {how}; set "
                "finetune.lr to a number")
        return LrRange(chosen, self.lrs, self.losses, self.diverged_at)


@dataclass
class LrRange:
    """A range test's outcome: the rate chosen and the curve (rate, smoothed loss)."""

    lr: float
    lrs: list[float]
    losses: list[float]
    diverged_at: float | None



def curve_text(found: LrRange | None) -> str:
    """The curve as CSV, ``lr,loss``; the header alone when no test ran."""
    rows = zip(found.lrs, found.losses, strict=True) if found is not None else ()
    return "lr,loss\n" + "".join(f"{lr!r},{loss!r}\n" for lr, loss in rows)
