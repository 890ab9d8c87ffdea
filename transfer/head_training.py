"""Fitting the head ``head.kind`` names: its regularisation, given or chosen on held-out
images (``auto``), then its temperature on the same held-out images.

Each kind is one ``HeadTrainer`` subclass and one entry in ``HEAD_TRAINERS``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence

import numpy as np

from transfer.calibration import calibrate, report
from transfer.head_search import (
    ALPHA_GRID,
    C_GRID,
    Fitted,
    HeldOut,
    choose_held_out,
    search_logistic,
    search_mlp,
)
from transfer.heads import Head, LogisticHead, MLPHead
from transfer.params import HeadParams
from transfer.streamed_logistic import StreamedLogisticHead, standardized_gb

log = logging.getLogger(__name__)

# Threads of the BLAS and OpenMP pools while a head is fitted: a fixed number, so that the head's
# bytes are the same on every machine; one, the fastest here (docs/extraction-scale.md: the
# logistic fit on monkeys10 took 0.06 s on one thread, 1.7-2.7 s on two).
FIT_THREADS = 1


class HeadTrainer(abc.ABC):
    """How one ``head.kind`` is fitted from ``HeadParams``: its regularisation, searched or
    given, and what its metrics add."""

    parameter = ""  # the regularisation key under head.*
    unit = ""  # what n_iter counts
    auto_grid: Sequence[float] = ()  # the values auto tries, strongest regularisation first

    def __init__(self, params: HeadParams, seed: int, class_names: Sequence[str]) -> None:
        self.params, self.seed, self.class_names = params, seed, class_names

    @abc.abstractmethod
    def fit(self, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
            val_y: np.ndarray) -> Fitted:
        """The head fitted at its given or chosen regularisation, with its search."""

    def extra_metrics(self, head: Head) -> dict:
        return {}

    def grid(self) -> tuple[Sequence[float], bool]:
        """The values to try: the whole grid for ``auto``, else the one given; and whether
        auto."""
        value = getattr(self.params, self.parameter)
        return (self.auto_grid, True) if value == "auto" else ((float(value),), False)


class LogisticTrainer(HeadTrainer):
    parameter, unit, auto_grid = "C", "iterations", C_GRID

    def fit(self, train_x, train_y, val_x, val_y) -> Fitted:
        grid, auto = self.grid()
        kind = LogisticHead
        needed = standardized_gb(train_x)
        if needed > self.params.in_memory_gb:
            log.info("the standardized training matrix would take %.2f GB, more than "
                     "head.in_memory_gb=%g: the logistic head is fitted streamed, reading the "
                     "cache once per L-BFGS iteration", needed, self.params.in_memory_gb)
            kind = StreamedLogisticHead
        head = kind(C=grid[0], max_iter=self.params.max_iter,
                    class_weight=self.params.class_weight, random_state=self.seed)
        held_out = choose_held_out(train_y, len(val_y), self.class_names, "head.C")
        return search_logistic(head, train_x, train_y, val_x, val_y, grid, held_out, auto)

    def extra_metrics(self, head: LogisticHead) -> dict:
        return {"streamed": head.streamed}


class MLPTrainer(HeadTrainer):
    parameter, unit, auto_grid = "alpha", "epochs", ALPHA_GRID

    def fit(self, train_x, train_y, val_x, val_y) -> Fitted:
        grid, auto = self.grid()
        head = MLPHead(hidden_units=self.params.hidden_units, alpha=grid[0],
                       max_epochs=self.params.max_iter, patience=self.params.patience,
                       class_weight=self.params.class_weight, random_state=self.seed)
        return search_mlp(head, train_x, train_y, val_x, val_y, grid, auto)

    def extra_metrics(self, head: MLPHead) -> dict:
        return {"best_epoch": head.best_epoch_}


# One trainer per head kind (the kinds a saved head can have are transfer.heads.HEAD_KINDS).
HEAD_TRAINERS: dict[str, type[HeadTrainer]] = {"logistic": LogisticTrainer, "mlp": MLPTrainer}


def log_search(trainer: HeadTrainer, fitted: Fitted) -> None:
    search, key = fitted.search, f"head.{trainer.parameter}"
    held_out: HeldOut = search.held_out
    what = f"{key} chosen" if search.auto else f"{key}={search.chosen:g} scored"
    (log.warning if held_out.fallback else log.info)(
        "%s, and the temperature fitted, on the %s: %s", what, held_out.description,
        held_out.reason)
    if not search.auto:
        return
    chosen = search.points[[p.value for p in search.points].index(search.chosen)]
    best = min(search.points, key=lambda p: p.val_log_loss)
    calibrated = " after its temperature" if search.calibrated else ""
    # The logistic walk fits loosely (head_search.WALK_TOLERANCE) and the head is then fitted
    # from scratch: the calibration line after this one gives the head's own held-out scores.
    walked = "on the walk, " if trainer.parameter == "C" else ""
    log.info("%s: auto chose %g of %d values tried (%sheld-out log loss%s %.4f, accuracy %.4f)%s%s",
             key, search.chosen, len(search.points), walked, calibrated, chosen.val_log_loss,
             chosen.val_accuracy,
             "" if best is chosen else
             f", the strongest within one standard error of the lowest loss ({key}={best.value:g}:"
             f" {best.val_log_loss:.4f} ± {best.val_log_loss_se:.4f})",
             "; stopped once the loss had risen" if search.stopped_early else "")
    if search.chosen in (trainer.auto_grid[0], trainer.auto_grid[-1]):
        log.warning("%s: auto chose %g, an end of its grid; a value beyond it may be better "
                    "(set %s to a number to try one)", key, search.chosen, key)


def calibrate_head(fitted: Fitted) -> dict:
    """Fit the head's temperature on the held-out scores its search kept; returns what the
    metrics record of it."""
    head = fitted.head
    calibration = calibrate(fitted.held_out_scores, head.classes_, fitted.held_out_labels)
    if calibration is not None:
        head.temperature_ = calibration.temperature
    return report(calibration, "head", fitted.search.held_out.description)
