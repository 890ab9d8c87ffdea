"""Temperature scaling: one number T that divides a model's scores before the softmax, chosen
so that its probabilities on held-out images are as likely as they can be (Guo et al., 2017).

T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the predicted
class never changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

log = logging.getLogger(__name__)

# The temperatures searched. A held-out set the model gets all right with a margin pushes T to
# the lower end: the fit says so in the log rather than sharpening without limit.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def negative_log_likelihood(scores: np.ndarray, columns: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean negative log probability of the true class under softmax(scores / temperature).

    ``scores`` has one column per class, or one for the binary case (the second class's score
    against 0); ``columns`` holds each row's true column.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] == 1:
        scores = np.hstack([np.zeros_like(scores), scores])
    log_probabilities = log_softmax(scores / temperature, axis=1)
    return float(-log_probabilities[np.arange(len(columns)), columns].mean())


def fit_temperature(scores: np.ndarray, columns: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature within ``bounds`` that minimises ``negative_log_likelihood``.

    The likelihood is convex in 1/T, so a bounded one-dimensional search over 1/T finds the
    optimum. With no held-out rows the scores are left as they are (T = 1).
    """
    if len(columns) == 0:
        return 1.0
    low, high = bounds
    result = minimize_scalar(lambda inverse: negative_log_likelihood(scores, columns,
                                                                     1.0 / inverse),
                             bounds=(1.0 / high, 1.0 / low), method="bounded",
                             options={"xatol": 1e-5})
    return float(1.0 / result.x)


def label_columns(classes: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which labels of ``y`` the model knows (a mask) and, for those, the score column of each
    (``classes`` sorted, as scikit-learn keeps them)."""
    seen = np.isin(y, classes)
    return seen, np.searchsorted(classes, y[seen])


@dataclass(frozen=True)
class Calibration:
    """A temperature fitted on held-out scores, and what it did to their log loss."""

    temperature: float
    log_loss_uncalibrated: float
    log_loss: float
    all_right: bool  # every held-out image classified right: no temperature fitted

    @property
    def at_bound(self) -> bool:
        low, high = TEMPERATURE_BOUNDS
        return not low * 1.01 < self.temperature < high * 0.99


def calibrate(scores: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> Calibration | None:
    """The temperature for untempered held-out ``scores`` (columns in ``classes`` order) of
    images labelled ``labels``; images of classes the model never saw are left out. None when
    no image is left.

    When every image is classified right their log loss only falls as T shrinks, so they say
    nothing about how confident the model should be: T stays 1. (Sharpened to the bound, a
    head that got its 238 validation images right scored a test log loss of 0.29 instead of
    0.05 on the cats-and-dogs photos of docs/defaults.md.)
    """
    seen, columns = label_columns(classes, labels)
    if not len(columns):
        return None
    scores = scores[seen]
    predicted = np.argmax(scores, axis=1) if scores.shape[1] > 1 else (scores[:, 0] > 0)
    all_right = bool(np.all(predicted == columns))
    temperature = 1.0 if all_right else fit_temperature(scores, columns)
    return Calibration(temperature, negative_log_likelihood(scores, columns),
                       negative_log_likelihood(scores, columns, temperature), all_right)


def report(calibration: Calibration | None, model: str, held_out: str) -> dict:
    """Log what the temperature fit on ``held_out`` did for ``model`` (the head, the fine-tuned
    model) and return what its metrics record of it."""
    if calibration is None:
        log.warning("no held-out image of a class the %s knows: temperature left at 1", model)
        return {"temperature": 1.0, "held_out": held_out}
    if calibration.all_right:
        log.warning("every image of the %s is classified right: they cannot tell how "
                    "confident the %s should be, so its temperature stays 1", held_out, model)
    else:
        if calibration.at_bound:
            log.warning("temperature %.3g is at the end of its range %s",
                        calibration.temperature, TEMPERATURE_BOUNDS)
        log.info("%s: temperature %.3f fitted on the %s: held-out log loss %.4f -> %.4f", model,
                 calibration.temperature, held_out, calibration.log_loss_uncalibrated,
                 calibration.log_loss)
    return {"temperature": calibration.temperature, "held_out": held_out,
            "log_loss_uncalibrated": calibration.log_loss_uncalibrated,
            "log_loss": calibration.log_loss}
