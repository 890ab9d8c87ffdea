"""Classifier heads trained on cached embeddings, saved as plain arrays (no pickle).

Two kinds (``head.kind``): ``logistic``, multinomial logistic regression, the linear probe;
and ``mlp``, one hidden ReLU layer, stopped early on the validation split. Both standardize
the embeddings first and, once fitted, keep only arrays, so they save to a plain ``.npz`` and
predict with NumPy alone.
"""

from __future__ import annotations

import abc
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from stages.artifacts import load_arrays, save_arrays
from stages.embeddings import row_chunks
from stages.errors import PipelineError

log = logging.getLogger(__name__)

# Logit given to classes a head never saw in training: probability ~1e-13.
UNSEEN_LOGIT = -30.0


def standardize(X: np.ndarray) -> tuple[StandardScaler, np.ndarray]:
    """The scaler fitted on ``X`` and ``X`` standardized, in float32.

    ``X`` (memory-mapped or not) is read in chunks; the one copy made of it is the
    standardized matrix, four bytes per value, so a memory-mapped float16 or float32 cache
    costs no more memory than its own size.
    """
    scaler = StandardScaler()
    for _, chunk in row_chunks(X):
        scaler.partial_fit(chunk)
    return scaler, _scaled(X, scaler.mean_, scaler.scale_)


def _scaled(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    standardized = np.empty(np.shape(X), dtype=np.float32)
    for start, chunk in row_chunks(X):
        standardized[start:start + len(chunk)] = (chunk - mean) / scale
    return standardized


class Head(abc.ABC):
    """What both kinds share: standardization, probabilities per class, saving."""

    kind = ""
    mean_: np.ndarray
    scale_: np.ndarray
    classes_: np.ndarray

    @abc.abstractmethod
    def _scores(self, standardized: np.ndarray) -> np.ndarray:
        """Scores of standardized rows: one column per class seen, or one for the binary case."""

    @abc.abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays particular to this kind, by the names they are saved under."""

    @abc.abstractmethod
    def layers(self, n_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Weights (out, in) and biases of linear layers with a ReLU between each two, on raw
        embeddings, whose last layer's logits give the same probabilities, one row for each of
        ``n_classes`` labels (classes the head never saw get no chance)."""

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        parts = [self._scores((chunk - self.mean_) / self.scale_) for _, chunk in row_chunks(X)]
        return np.concatenate(parts) if parts else self._scores(np.zeros((0, len(self.mean_))))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        if scores.shape[1] == 1:  # binary: scikit-learn keeps one score, for the second class
            scores = np.hstack([np.zeros_like(scores), scores])
        scores -= scores.max(axis=1, keepdims=True)
        probabilities = np.exp(scores)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_proba_all(self, X: np.ndarray, n_classes: int) -> np.ndarray:
        """Probabilities with a column for each of ``n_classes`` labels, in label order.

        The head knows only the classes it saw in training; the others get probability 0.
        """
        full = np.zeros((len(X), n_classes))
        full[:, self.classes_.astype(int)] = self.predict_proba(X)
        return full

    def _output_layer(self, weight: np.ndarray, bias: np.ndarray,
                      n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The score layer (out, in) widened to ``n_classes`` rows, the binary case included."""
        if weight.shape[0] == 1:  # binary: the one score row belongs to the second class
            weight = np.vstack([np.zeros_like(weight), weight])
            bias = np.concatenate([[0.0], bias])
        full_weight = np.zeros((n_classes, weight.shape[1]))
        full_bias = np.full(n_classes, UNSEEN_LOGIT)
        rows = self.classes_.astype(int)
        full_weight[rows], full_bias[rows] = weight, bias
        return full_weight, full_bias

    def save(self, path: str | Path, class_names: Sequence[str]) -> None:
        """Write the fitted arrays and the class names (indexed by label) to ``path``."""
        save_arrays(path, kind=np.asarray(self.kind), mean=self.mean_, scale=self.scale_,
                    classes=self.classes_, class_names=np.asarray(class_names, dtype=str),
                    **self._arrays())


class LogisticHead(Head):
    """Standardize embeddings, then multinomial logistic regression (scikit-learn conventions)."""

    kind = "logistic"

    def __init__(self, C: float = 1.0, max_iter: int = 1000, class_weight: str | None = None,
                 random_state: int = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticHead:
        """Fit on ``X`` (rows of embeddings, memory-mapped or not) and labels ``y``; L-BFGS
        works on the standardized float32 copy (scikit-learn keeps float32 for it)."""
        scaler, standardized = standardize(X)
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

    def _scores(self, standardized: np.ndarray) -> np.ndarray:
        return standardized @ self.coef_.T + self.intercept_

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef_, "intercept": self.intercept_}

    def as_linear(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Weight (n_classes, dim) and bias of one linear layer on raw embeddings whose
        logits give the same probabilities; classes the head never saw get no chance."""
        coef = self.coef_ / self.scale_
        return self._output_layer(coef, self.intercept_ - coef @ self.mean_, n_classes)

    def layers(self, n_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.as_linear(n_classes)]


class MLPHead(Head):
    """Standardize embeddings, then one hidden ReLU layer and a softmax: scikit-learn's
    ``MLPClassifier`` (Adam, L2 penalty ``alpha``), trained an epoch at a time and stopped
    early on the validation split. The epoch with the best validation accuracy (ties: a
    validation log loss lower by more than ``tol``, scikit-learn's own tolerance) is kept;
    training stops ``patience`` epochs after it."""

    kind = "mlp"
    tol = 1e-4

    def __init__(self, hidden_units: int = 256, alpha: float = 1e-4, max_epochs: int = 1000,
                 patience: int = 10, class_weight: str | None = None,
                 random_state: int = 0) -> None:
        self.hidden_units = hidden_units
        self.alpha = alpha
        self.max_epochs = max_epochs
        self.patience = patience
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray,
            y_val: np.ndarray) -> MLPHead:
        """Fit on ``X``, ``y``; ``X_val``, ``y_val`` choose the epoch to keep."""
        scaler, standardized = standardize(X)
        val = _scaled(X_val, scaler.mean_, scaler.scale_)
        model = MLPClassifier(hidden_layer_sizes=(self.hidden_units,), alpha=self.alpha,
                              random_state=self.random_state)
        classes = np.unique(y)
        weights = compute_sample_weight(self.class_weight, y) if self.class_weight else None
        best_accuracy, best_loss, best_weights, since_best = -1.0, np.inf, [], 0
        self.curve_: list[dict[str, float]] = []
        for epoch in range(1, self.max_epochs + 1):
            model.partial_fit(standardized, y, sample_weight=weights, classes=classes)
            probabilities = model.predict_proba(val)
            accuracy = float((classes[probabilities.argmax(axis=1)] == y_val).mean())
            loss = float(log_loss(y_val, probabilities, labels=classes))
            self.curve_.append({"epoch": epoch, "train_loss": float(model.loss_),
                                "val_accuracy": accuracy, "val_loss": loss})
            if accuracy > best_accuracy or (accuracy == best_accuracy
                                            and loss < best_loss - self.tol):
                best_accuracy, best_loss, since_best = accuracy, loss, 0
                best_weights = [np.array(w) for w in model.coefs_ + model.intercepts_]
                self.best_epoch_ = epoch
            else:
                since_best += 1
                if since_best >= self.patience:
                    break
        self.n_iter_ = epoch
        self.converged_ = since_best >= self.patience
        if not self.converged_:
            log.warning("the MLP head was still improving on validation after "
                        "head.max_iter=%d epochs; raise head.max_iter", self.max_epochs)
        hidden_weight, output_weight, hidden_bias, output_bias = best_weights
        self._set_arrays(scaler.mean_, scaler.scale_, hidden_weight, hidden_bias,
                         output_weight, output_bias, classes)
        return self

    def _set_arrays(self, mean: np.ndarray, scale: np.ndarray, hidden_weight: np.ndarray,
                    hidden_bias: np.ndarray, output_weight: np.ndarray,
                    output_bias: np.ndarray, classes: np.ndarray) -> None:
        self.mean_ = np.asarray(mean, dtype=np.float64)
        self.scale_ = np.asarray(scale, dtype=np.float64)
        self.hidden_weight_ = np.asarray(hidden_weight, dtype=np.float64)  # (dim, hidden)
        self.hidden_bias_ = np.asarray(hidden_bias, dtype=np.float64)
        self.output_weight_ = np.asarray(output_weight, dtype=np.float64)  # (hidden, scores)
        self.output_bias_ = np.asarray(output_bias, dtype=np.float64)
        self.classes_ = np.asarray(classes)

    def _scores(self, standardized: np.ndarray) -> np.ndarray:
        hidden = np.maximum(standardized @ self.hidden_weight_ + self.hidden_bias_, 0.0)
        return hidden @ self.output_weight_ + self.output_bias_

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"hidden_weight": self.hidden_weight_, "hidden_bias": self.hidden_bias_,
                "output_weight": self.output_weight_, "output_bias": self.output_bias_}

    def layers(self, n_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
        hidden = self.hidden_weight_.T / self.scale_
        return [(hidden, self.hidden_bias_ - hidden @ self.mean_),
                self._output_layer(self.output_weight_.T, self.output_bias_, n_classes)]


HEAD_KINDS: dict[str, type[Head]] = {"logistic": LogisticHead, "mlp": MLPHead}


def load_head(path: str | Path) -> tuple[Head, list[str]]:
    """Read a head written by ``Head.save``, of either kind; returns it with its class names."""
    arrays = load_arrays(path)
    kind = str(arrays["kind"]) if "kind" in arrays else "logistic"  # older heads: logistic
    fitted = {"logistic": ("coef", "intercept"),
              "mlp": ("hidden_weight", "hidden_bias", "output_weight", "output_bias")}
    if kind not in fitted:
        raise PipelineError(f"{path}: unknown head kind '{kind}'; known: {', '.join(fitted)}")
    expected = {"mean", "scale", "classes", "class_names", *fitted[kind]}
    if not expected <= arrays.keys():
        missing = ", ".join(sorted(expected - arrays.keys()))
        raise PipelineError(f"{path}: not a saved head (missing arrays: {missing})")
    head = HEAD_KINDS[kind]()
    head._set_arrays(arrays["mean"], arrays["scale"], *(arrays[name] for name in fitted[kind]),
                     arrays["classes"])
    return head, [str(name) for name in arrays["class_names"]]
