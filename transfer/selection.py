"""Which epoch fine-tuning keeps (``finetune.select_by``): one validation score per criterion.

Each criterion is one entry in ``SELECT_BY``: the score it reads from an epoch's validation
scores and whether higher is better. The kept epoch and early stopping both ask it. Nothing
here imports torch: the parameters use it without loading a network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ValidationScores:
    """A network's scores on the validation split (log loss without label smoothing)."""

    loss: float
    accuracy: float
    balanced_accuracy: float

    @classmethod
    def of(cls, y_true: np.ndarray, probabilities: np.ndarray) -> ValidationScores:
        """Scores of class ``probabilities`` (N, classes) against the labels ``y_true``."""
        picked = probabilities[np.arange(len(y_true)), y_true]
        loss = float(-np.log(np.clip(picked, 1e-300, None)).mean())
        correct = probabilities.argmax(1) == y_true
        # Recall per class present in y_true, averaged: every class counts the same.
        recalls = [correct[y_true == c].mean() for c in np.unique(y_true)]
        return cls(loss, float(correct.mean()), float(np.mean(recalls)))


@dataclass(frozen=True)
class Criterion:
    """A validation score (a field of ``ValidationScores``) and its direction."""

    name: str
    score: str
    higher_is_better: bool

    def value(self, scores: ValidationScores) -> float:
        return getattr(scores, self.score)

    def better(self, candidate: ValidationScores, best: ValidationScores) -> bool:
        """Strictly better: on a tie the earlier epoch (the starting network first) stays."""
        new, old = self.value(candidate), self.value(best)
        return new > old if self.higher_is_better else new < old

    def unbeatable(self, scores: ValidationScores) -> bool:
        """Whether no epoch can score better: an accuracy of 1 (every validation image
        right). A log loss is never unbeatable."""
        return self.higher_is_better and self.value(scores) >= 1.0


SELECT_BY: dict[str, Criterion] = {c.name: c for c in (
    Criterion("accuracy", "accuracy", True),
    Criterion("balanced_accuracy", "balanced_accuracy", True),
    Criterion("log_loss", "loss", False))}
