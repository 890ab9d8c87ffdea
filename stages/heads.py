"""Classifier heads trained on cached embeddings, saved as plain arrays (no pickle)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from stages.artifacts import load_arrays, save_arrays
from stages.embeddings import row_chunks
from stages.errors import PipelineError

log = logging.getLogger(__name__)


class LogisticHead:
    """Standardize embeddings, then multinomial logistic regression (scikit-learn conventions).

    After ``fit`` only arrays remain (means, scales, coefficients), so the head saves to a
    plain ``.npz`` and predicts with NumPy alone.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, class_weight: str | None = None,
                 random_state: int = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticHead:
        """Fit on ``X`` (rows of embeddings, memory-mapped or not) and labels ``y``.

        ``X`` is read in chunks; the one copy made of it is the standardized float32 matrix
        that L-BFGS works on, four bytes per value, so a memory-mapped float16 or float32
        cache costs no more memory than its own size.
        """
        scaler = StandardScaler()
        for _, chunk in row_chunks(X):
            scaler.partial_fit(chunk)
        standardized = np.empty(X.shape, dtype=np.float32)
        for start, chunk in row_chunks(X):
            standardized[start:start + len(chunk)] = (chunk - scaler.mean_) / scaler.scale_
        model = LogisticRegression(C=self.C, max_iter=self.max_iter,
                                   class_weight=self.class_weight,
                                   random_state=self.random_state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(standardized, y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not self.converged_:
            log.warning("logistic regression did not converge in head.max_iter=%d iterations; "
                        "raise head.max_iter or lower head.C", self.max_iter)
        self.n_iter_ = int(np.max(model.n_iter_))
        self._set_arrays(scaler.mean_, scaler.scale_, model.coef_, model.intercept_,
                         model.classes_)
        return self

    def _set_arrays(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray,
                    intercept: np.ndarray, classes: np.ndarray) -> None:
        self.mean_ = np.asarray(mean, dtype=np.float64)
        self.scale_ = np.asarray(scale, dtype=np.float64)
        self.coef_ = np.asarray(coef, dtype=np.float64)
        self.intercept_ = np.asarray(intercept, dtype=np.float64)
        self.classes_ = np.asarray(classes)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        scores = np.empty((len(X), len(self.intercept_)))
        for start, chunk in row_chunks(X):
            scores[start:start + len(chunk)] = \
                ((chunk - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return scores

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        if self.coef_.shape[0] == 1:  # binary: scikit-learn keeps one row, for the second class
            scores = np.hstack([np.zeros_like(scores), scores])
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def as_linear(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Weight (n_classes, dim) and bias of one linear layer on raw embeddings whose
        logits give the same probabilities; classes the head never saw get no chance."""
        coef = self.coef_ / self.scale_
        intercept = self.intercept_ - coef @ self.mean_
        if coef.shape[0] == 1:  # binary: the one score row belongs to the second class
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        weight = np.zeros((n_classes, coef.shape[1]))
        bias = np.full(n_classes, -30.0)  # probability ~1e-13
        rows = self.classes_.astype(int)
        weight[rows], bias[rows] = coef, intercept
        return weight, bias

    def predict_proba_all(self, X: np.ndarray, n_classes: int) -> np.ndarray:
        """Probabilities with a column for each of ``n_classes`` labels, in label order.

        The head knows only the classes it saw in training; the others get probability 0.
        """
        full = np.zeros((len(X), n_classes))
        full[:, self.classes_.astype(int)] = self.predict_proba(X)
        return full

    def save(self, path: str | Path, class_names: Sequence[str]) -> None:
        """Write the fitted arrays and the class names (indexed by label) to ``path``."""
        save_arrays(path, mean=self.mean_, scale=self.scale_, coef=self.coef_,
                    intercept=self.intercept_, classes=self.classes_,
                    class_names=np.asarray(class_names, dtype=str))

    @classmethod
    def load(cls, path: str | Path) -> tuple[LogisticHead, list[str]]:
        """Read a head written by ``save``; returns it with its class names."""
        arrays = load_arrays(path)
        expected = {"mean", "scale", "coef", "intercept", "classes", "class_names"}
        if not expected <= arrays.keys():
            missing = ", ".join(sorted(expected - arrays.keys()))
            raise PipelineError(f"{path}: not a saved head (missing arrays: {missing})")
        head = cls()
        head._set_arrays(arrays["mean"], arrays["scale"], arrays["coef"], arrays["intercept"],
                         arrays["classes"])
        return head, [str(name) for name in arrays["class_names"]]
