"""Predictions for images: the top classes with their probabilities, and the flags that say
when not to trust them (``uncertain``, ``unfamiliar``). Shared by ``predict`` and ``serve``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transfer.data import decode_image
from transfer.pixels import fit_short_side
from transfer.predictor import FamiliarityCheck, Predictor, predict_batches

UNCERTAIN = "uncertain"
UNFAMILIAR = "unfamiliar"


@dataclass
class Prediction:
    """One input: its top classes with probabilities, or why it could not be classified;
    ``uncertain`` when the top probability is below the threshold asked for; ``unfamiliar``
    when it is unlike the training images (None: not checked)."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""
    uncertain: bool = False
    unfamiliar: bool | None = None

    @property
    def flags(self) -> list[str]:
        return [name for name, on in ((UNCERTAIN, self.uncertain),
                                      (UNFAMILIAR, self.unfamiliar)) if on]

    @property
    def label(self) -> str:
        """The answer: the top class, ``uncertain``, or empty for an input that failed."""
        if self.error:
            return ""
        return UNCERTAIN if self.uncertain else self.top[0][0]

    def answer(self) -> dict[str, Any]:
        """The answer as JSON gives it (``predict --format json``, ``serve``), without the
        input's name."""
        return {"prediction": self.label or None, "uncertain": self.uncertain,
                "unfamiliar": self.unfamiliar,
                "predictions": [{"class": name, "probability": probability}
                                for name, probability in self.top]}


def decode_for(predictor: Predictor, data: bytes) -> np.ndarray:
    """Image bytes as the RGB pixels ``predictor`` takes: brought to ``short_side`` like the
    training images were. ``ValueError`` with a short reason for bytes that are not a readable
    image."""
    return np.asarray(fit_short_side(decode_image(data), predictor.short_side))


def classify(predictor: Predictor, results: Sequence[Prediction], images: Sequence[np.ndarray],
             top_k: int, batch_size: int, min_confidence: float = 0.0,
             familiarity: FamiliarityCheck | None = None) -> None:
    """Fill each of ``results`` with the top ``top_k`` classes of its image in ``images``; one
    whose top probability is below ``min_confidence`` is marked uncertain, and with
    ``familiarity`` one unlike the training images unfamiliar."""
    k = min(top_k, len(predictor.classes))
    rows = (row for batch in predict_batches(predictor, images, batch_size, familiarity)
            for row in zip(*batch, strict=True))
    for result, (probabilities, unfamiliar) in zip(results, rows, strict=True):
        order = np.argsort(-probabilities, kind="stable")[:k]
        result.top = [(predictor.classes[i], float(probabilities[i])) for i in order]
        result.uncertain = result.top[0][1] < min_confidence
        result.unfamiliar = None if unfamiliar is None else bool(unfamiliar)
