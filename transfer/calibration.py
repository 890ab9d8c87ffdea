"""Temperature scaling: one number T that divides a model's scores before the softmax, chosen
so that its probabilities on held-out images are as likely as they can be (Guo et al., 2017).

T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the predicted
class never changes. T is the most probable one given the held-out images under a log-normal
prior centred on 1 (the scores as the model gives them): many held-out images move it where
they say, a few mistakes among them only part of the way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

log = logging.getLogger(__name__)

# The temperatures searched.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# The prior on log T: normal around 0 (T = 1), with this standard deviation. Chosen by
# measurement (docs/defaults.md, "The temperature"): fitted by likelihood alone on the few
# mistakes that an easy set's validation split holds, T made the log loss of other images worse
# on average; with this prior it did better than without in every case measured.
TEMPERATURE_PRIOR_SD = 0.5


def negative_log_likelihood(scores: np.ndarray, columns: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean negative log probability of the true class under softmax(scores / temperature).

    ``scores`` has one column per class, or one for the binary case (the second class's score
    against 0); ``columns`` holds each row's true column.
    """
    return float(image_log_losses(scores, columns, temperature).mean())


def image_log_losses(scores: np.ndarray, columns: np.ndarray,
                     temperature: float = 1.0) -> np.ndarray:
    """Each row's negative log probability of its true class (``negative_log_likelihood``
    before the mean)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] == 1:
        scores = np.hstack([np.zeros_like(scores), scores])
    log_probabilities = log_softmax(scores / temperature, axis=1)
    return -log_probabilities[np.arange(len(columns)), columns]


def fit_temperature(scores: np.ndarray, columns: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                    prior_sd: float = TEMPERATURE_PRIOR_SD) -> float:
    """The temperature within ``bounds`` that maximises the likelihood of the held-out rows
    times the log-normal prior with standard deviation ``prior_sd`` centred on T = 1.

    A bounded one-dimensional search over log T. With no held-out rows the scores are left as
    they are (T = 1).
    """
    n = len(columns)
    if n == 0:
        return 1.0
    low, high = bounds
    variance = prior_sd * prior_sd

    def negative_log_posterior(log_t: float) -> float:
        return n * negative_log_likelihood(scores, columns, math.exp(log_t)) + \
            log_t * log_t / (2.0 * variance)

    result = minimize_scalar(negative_log_posterior, bounds=(math.log(low), math.log(high)),
                             method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


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
