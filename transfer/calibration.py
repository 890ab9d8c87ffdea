"""Temperature scaling: one number T that divides a model's scores before the softmax, chosen
so that its probabilities on held-out images are as likely as they can be (Guo et al., 2017).

T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the predicted
class never changes. T is the most probable one given the held-out images under a log-normal
prior centred on 1 (the scores as the model gives them): many held-out images move it where
they say, a few mistakes among them only part of the way. When every held-out image is right,
their likelihood only grows as T shrinks; what they do say is how high the accuracy is, at
least: a model less confident on them than the accuracy n right of n vouch for at 95% is
sharpened to it, and a more confident one is left as it is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_softmax, softmax

log = logging.getLogger(__name__)

# The temperatures searched.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# The prior on log T: normal around 0 (T = 1), with this standard deviation. Chosen by
# measurement (docs/defaults.md, "The temperature"): fitted by likelihood alone on the few
# mistakes that an easy set's validation split holds, T made the log loss of other images worse
# on average; with this prior it did better than without in every case measured.
TEMPERATURE_PRIOR_SD = 0.5
# When all n held-out images are right: the one-sided confidence level of the accuracy they
# vouch for, ALL_RIGHT_LEVEL ** (1 / n) (the exact lower bound; about 1 - 3 / n, the "rule of
# three"), which a less confident model's mean confidence on them is raised to. Measured
# (docs/defaults.md, "Every held-out image right"): on the cat and dog photos the temperature
# it gave a fine-tuned network was within a tenth of the one the test photos would have
# chosen, where T = 1 left that network's test log loss 1.7 times as high.
ALL_RIGHT_LEVEL = 0.05


def negative_log_likelihood(scores: np.ndarray, columns: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean negative log probability of the true class under softmax(scores / temperature).

    ``scores`` has one column per class, or one for the binary case (the second class's score
    against 0); ``columns`` holds each row's true column.
    """
    return float(image_log_losses(scores, columns, temperature).mean())


def score_columns(scores: np.ndarray) -> np.ndarray:
    """``scores`` as float64 with one column per class: a single column (the binary case) is
    the second class's score against 0."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.hstack([np.zeros_like(scores), scores]) if scores.shape[1] == 1 else scores


def image_log_losses(scores: np.ndarray, columns: np.ndarray,
                     temperature: float = 1.0) -> np.ndarray:
    """Each row's negative log probability of its true class (``negative_log_likelihood``
    before the mean)."""
    log_probabilities = log_softmax(score_columns(scores) / temperature, axis=1)
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


def vouched_accuracy(n: int) -> float:
    """The accuracy that ``n`` held-out images, all classified right, vouch for: the one-sided
    lower confidence bound at ``1 - ALL_RIGHT_LEVEL`` (Clopper-Pearson)."""
    return ALL_RIGHT_LEVEL ** (1.0 / n)


def mean_confidence(scores: np.ndarray, temperature: float = 1.0) -> float:
    """The mean top probability of softmax(scores / temperature)."""
    return float(softmax(score_columns(scores) / temperature, axis=1).max(axis=1).mean())


def confidence_temperature(scores: np.ndarray, target: float,
                           bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature within ``bounds`` at which the mean top probability of ``scores`` is
    ``target`` (it falls as T grows), or the bound nearer to it where none is."""
    scores = score_columns(scores)  # once, not at every step of the search
    low, high = math.log(bounds[0]), math.log(bounds[1])

    def excess(log_t: float) -> float:
        return mean_confidence(scores, math.exp(log_t)) - target

    if excess(low) <= 0.0:
        return bounds[0]
    if excess(high) >= 0.0:
        return bounds[1]
    return float(math.exp(brentq(excess, low, high, xtol=1e-9)))


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
    all_right: bool  # every held-out image right: T sharpens to vouched_accuracy, or stays 1
    images: int  # the held-out images it was fitted on

    @property
    def at_bound(self) -> bool:
        low, high = TEMPERATURE_BOUNDS
        return not low * 1.01 < self.temperature < high * 0.99


def calibrate(scores: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> Calibration | None:
    """The temperature for untempered held-out ``scores`` (columns in ``classes`` order) of
    images labelled ``labels``; images of classes the model never saw are left out. None when
    no image is left.

    When every image is classified right their log loss only falls as T shrinks (sharpened
    to the bound, a head that got its 238 validation images right scored a test log loss of
    0.29 instead of 0.05 on the cats-and-dogs photos of docs/defaults.md). What they show is
    an accuracy of at least ``vouched_accuracy``: a model less confident than that on them is
    sharpened until it is as confident (T < 1); one as confident or more keeps T = 1, since
    images all classified right cannot show that a model is too sure of itself.
    """
    seen, columns = label_columns(classes, labels)
    if not len(columns):
        return None
    scores = scores[seen]
    predicted = np.argmax(scores, axis=1) if scores.shape[1] > 1 else (scores[:, 0] > 0)
    all_right = bool(np.all(predicted == columns))
    temperature = confidence_temperature(scores, vouched_accuracy(len(columns)),
                                         (TEMPERATURE_BOUNDS[0], 1.0)) if all_right \
        else fit_temperature(scores, columns)
    return Calibration(temperature, negative_log_likelihood(scores, columns),
                       negative_log_likelihood(scores, columns, temperature), all_right,
                       len(columns))


def fitted_temperature(scores: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> float:
    """``calibrate``'s temperature, or 1 where no held-out image is of a class the model
    knows."""
    calibration = calibrate(scores, classes, labels)
    return calibration.temperature if calibration is not None else 1.0


def report(calibration: Calibration | None, model: str, held_out: str) -> dict:
    """Log what the temperature fit on ``held_out`` did for ``model`` (the head, the fine-tuned
    model) and return what its metrics record of it."""
    if calibration is None:
        log.warning("no held-out image of a class the %s knows: temperature left at 1", model)
        return {"temperature": 1.0, "held_out": held_out}
    if calibration.at_bound:
        log.warning("temperature %.3g is at the end of its range %s",
                    calibration.temperature, TEMPERATURE_BOUNDS)
    if calibration.all_right:
        log.info("%s: every image of the %s is classified right, which shows an accuracy of "
                 "at least %.4f (95%% confidence): temperature %.3f (%s): held-out log loss "
                 "%.4f -> %.4f", model, held_out, vouched_accuracy(calibration.images),
                 calibration.temperature,
                 "its mean confidence there raised to that" if calibration.temperature < 1.0
                 else "as confident as that already; right images cannot show over-confidence",
                 calibration.log_loss_uncalibrated, calibration.log_loss)
    else:
        log.info("%s: temperature %.3f fitted on the %s: held-out log loss %.4f -> %.4f", model,
                 calibration.temperature, held_out, calibration.log_loss_uncalibrated,
                 calibration.log_loss)
    return {"temperature": calibration.temperature, "held_out": held_out,
            "log_loss_uncalibrated": calibration.log_loss_uncalibrated,
            "log_loss": calibration.log_loss}
