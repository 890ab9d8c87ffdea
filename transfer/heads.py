"""Classifier heads trained on cached embeddings, saved as plain arrays (no pickle).

Two kinds (``head.kind``): ``logistic``, multinomial logistic regression, the linear probe;
and ``mlp``, one hidden ReLU layer, stopped early on the validation split. Both standardize
the embeddings first, divide their scores by a temperature (1 until one is fitted, see
``transfer.calibration``) and, once fitted, keep only arrays, so they save to a plain ``.npz``
and predict with NumPy alone.
"""

from __future__ import annotations

import abc
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transfer.artifacts import load_arrays, save_arrays
from transfer.embeddings import EmbeddingMeta, read_rows, row_chunks
from transfer.errors import PipelineError

# scikit-learn is imported where a head is fitted, not where a saved one is loaded and
# applied (plain NumPy): predict, serve and export start about a second sooner without it.
if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

# Logit given to classes a head never saw in training: probability ~1e-13.
UNSEEN_LOGIT = -30.0


def fit_scaler(X: np.ndarray) -> StandardScaler:
    """A scaler fitted on ``X`` (memory-mapped or not), read in chunks."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for _, chunk in row_chunks(X):
        scaler.partial_fit(chunk)
    return scaler


def scaled(chunk: np.ndarray, scaler: StandardScaler) -> np.ndarray:
    """Rows standardized by ``scaler``, in float32: what the heads are fitted on."""
    return ((chunk - scaler.mean_) / scaler.scale_).astype(np.float32)


def standardize(X: np.ndarray) -> tuple[StandardScaler, np.ndarray]:
    """The scaler fitted on ``X`` and ``X`` standardized, in float32.

    ``X`` is read in chunks; the one copy made of it is the standardized matrix, four bytes
    per value, so a memory-mapped float16 or float32 cache costs no more memory than its own
    size.
    """
    scaler = fit_scaler(X)
    standardized = np.empty(np.shape(X), dtype=np.float32)
    for start, chunk in row_chunks(X):
        standardized[start:start + len(chunk)] = scaled(chunk, scaler)
    return scaler, standardized


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities from scores with one column per class, or one for the binary case
    (scikit-learn keeps one score there, for the second class)."""
    if scores.shape[1] == 1:
        scores = np.hstack([np.zeros_like(scores), scores])
    scores = scores - scores.max(axis=1, keepdims=True)
    probabilities = np.exp(scores)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


class Head(abc.ABC):
    """What both kinds share: standardization, probabilities per class, temperature, saving."""

    kind = ""
    mean_: np.ndarray
    scale_: np.ndarray
    classes_: np.ndarray
    # Scores are divided by it before the softmax; fitted on held-out data by train_head.
    temperature_: float = 1.0

    @abc.abstractmethod
    def _scores(self, standardized: np.ndarray) -> np.ndarray:
        """Scores of standardized rows: one column per class seen, or one for the binary case."""

    @abc.abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays particular to this kind, by the names they are saved under."""

    @classmethod
    @abc.abstractmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Head:
        """The head saved as ``arrays``; ``KeyError`` names a missing one."""

    @abc.abstractmethod
    def _layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Weights (out, in) and biases of linear layers with a ReLU between each two, on raw
        embeddings, whose last layer gives the scores (``_scores``' columns), untempered."""

    def layers(self, n_classes: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``_layers`` with the temperature folded into the last, whose logits then give the
        same probabilities as ``predict_proba``, one row for each of ``n_classes`` labels
        (classes the head never saw get no chance)."""
        layers = self._layers()
        weight, bias = layers[-1]
        layers[-1] = self._output_layer(weight / self.temperature_, bias / self.temperature_,
                                        n_classes)
        return layers

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Untempered scores of raw embeddings, as ``_scores`` gives them."""
        parts = [self._scores((chunk - self.mean_) / self.scale_) for _, chunk in row_chunks(X)]
        return np.concatenate(parts) if parts else self._scores(np.zeros((0, len(self.mean_))))

    def predict_proba(self, X: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order; ``calibrated=False`` leaves the
        temperature out."""
        scores = self.decision_function(X)
        return softmax(scores / self.temperature_ if calibrated else scores)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_proba_all(self, X: np.ndarray, n_classes: int,
                          calibrated: bool = True) -> np.ndarray:
        """Probabilities with a column for each of ``n_classes`` labels, in label order.

        The head knows only the classes it saw in training; the others get probability 0.
        """
        full = np.zeros((len(X), n_classes))
        full[:, self.classes_.astype(int)] = self.predict_proba(X, calibrated)
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
                    temperature=np.asarray(self.temperature_), **self._arrays())


class LogisticHead(Head):
    """Standardize embeddings, then multinomial logistic regression (scikit-learn conventions)."""

    kind = "logistic"
    streamed = False  # fitted on rows held in memory (see transfer.streamed_logistic)
    tol = 1e-4  # scikit-learn's: L-BFGS stops when no gradient component is larger

    def __init__(self, C: float = 1.0, max_iter: int = 1000, class_weight: str | None = None,
                 random_state: int = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticHead:
        """Fit on ``X`` (rows of embeddings, memory-mapped or not) and labels ``y``; L-BFGS
        works on the standardized float32 copy (scikit-learn keeps float32 for it)."""
        scaler, standardized = self.standardized(X)
        model = self.model(self.C)
        self.fit_model(model, standardized, y)
        return self.take(model, scaler)

    def standardized(self, X: np.ndarray) -> tuple[StandardScaler, np.ndarray]:
        """The scaler fitted on ``X`` and the rows L-BFGS works on: ``X`` standardized, the
        one float32 matrix every fit shares (``transfer.streamed_logistic`` streams them
        instead)."""
        return standardize(X)

    def model(self, C: float, tol: float | None = None) -> LogisticRegression:
        """An unfitted scikit-learn model with this head's settings at ``C``; it starts from
        its last fit when fitted again (``warm_start``)."""
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, max_iter=self.max_iter, tol=tol or self.tol,
                                  class_weight=self.class_weight, warm_start=True,
                                  random_state=self.random_state)

    def fit_model(self, model: LogisticRegression, standardized: np.ndarray, y: np.ndarray,
                  sample_weight: np.ndarray | None = None) -> None:
        """Fit ``model`` on standardized rows; records whether L-BFGS converged and how many
        iterations it took."""
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(standardized, y, sample_weight=sample_weight)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.n_iter_ = int(np.max(model.n_iter_))

    def take(self, model: LogisticRegression, scaler: StandardScaler) -> LogisticHead:
        """Keep the arrays of ``model`` (fitted on rows standardized by ``scaler``)."""
        if not self.converged_:
            log.warning("logistic regression did not converge in head.max_iter=%d iterations; "
                        "raise head.max_iter or lower head.C", self.max_iter)
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

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LogisticHead:
        head = cls()
        head._set_arrays(arrays["mean"], arrays["scale"], arrays["coef"], arrays["intercept"],
                         arrays["classes"])
        return head

    def _scores(self, standardized: np.ndarray) -> np.ndarray:
        return standardized @ self.coef_.T + self.intercept_

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef_, "intercept": self.intercept_}

    def _layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        coef = self.coef_ / self.scale_
        return [(coef, self.intercept_ - coef @ self.mean_)]

    def as_linear(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Weight (n_classes, dim) and bias of one linear layer on raw embeddings whose
        logits are the head's scores, without the temperature (the start fine-tuning takes);
        classes the head never saw get no chance."""
        return self._output_layer(*self._layers()[0], n_classes)


class MLPHead(Head):
    """Standardize embeddings, then ``hidden_units`` ReLU units (none: straight to the output)
    and a softmax: scikit-learn's ``MLPClassifier`` (Adam, L2 penalty ``alpha``).

    Each epoch feeds it the training rows in a new random order, a chunk at a time, read
    from the (memory-mapped) cache and standardized on the way, so memory does not grow with
    the number of rows. After each epoch the validation split scores it; the epoch with the
    best validation accuracy (ties: a validation log loss lower by more than ``tol``,
    scikit-learn's own tolerance) is kept, and training stops ``patience`` epochs after it.
    (The alpha search of ``head.alpha: auto`` keeps, for each alpha, the epoch of lowest
    validation log loss instead: ``MLPTraining.run``.)
    """

    kind = "mlp"
    tol = 1e-4
    chunk_rows = 512

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
        training = MLPTraining(self, X, y)
        return self.take(training, training.run(self.alpha, X_val, y_val))

    def take(self, training: MLPTraining, run: MLPRun) -> MLPHead:
        """Keep the weights ``training`` holds, those of the best epoch of ``run``."""
        self.curve_, self.best_epoch_, self.n_iter_ = run.curve, run.best_epoch, run.epochs
        self.converged_ = run.converged
        if not self.converged_:
            log.warning("the MLP head was still improving on validation after "
                        "head.max_iter=%d epochs; raise head.max_iter", self.max_epochs)
        model = training.model
        self._set_arrays(training.scaler.mean_, training.scaler.scale_, model.coefs_,
                         model.intercepts_, training.classes)
        return self

    def _set_arrays(self, mean: np.ndarray, scale: np.ndarray, weights: Sequence[np.ndarray],
                    biases: Sequence[np.ndarray], classes: np.ndarray) -> None:
        self.mean_ = np.asarray(mean, dtype=np.float64)
        self.scale_ = np.asarray(scale, dtype=np.float64)
        self.weights_ = [np.asarray(w, dtype=np.float64) for w in weights]  # (in, out) each
        self.biases_ = [np.asarray(b, dtype=np.float64) for b in biases]
        self.classes_ = np.asarray(classes)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MLPHead:
        layers = sum(1 for name in arrays if name.startswith("weight_"))
        head = cls()
        head._set_arrays(arrays["mean"], arrays["scale"],
                         [arrays[f"weight_{i}"] for i in range(max(layers, 1))],
                         [arrays[f"bias_{i}"] for i in range(max(layers, 1))],
                         arrays["classes"])
        return head

    def _scores(self, standardized: np.ndarray) -> np.ndarray:
        values = standardized
        for i, (weight, bias) in enumerate(zip(self.weights_, self.biases_, strict=True)):
            values = values @ weight + bias
            if i < len(self.weights_) - 1:
                values = np.maximum(values, 0.0)
        return values

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**{f"weight_{i}": w for i, w in enumerate(self.weights_)},
                **{f"bias_{i}": b for i, b in enumerate(self.biases_)}}

    def _layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        first = self.weights_[0].T / self.scale_
        layers = [(first, self.biases_[0] - first @ self.mean_)]
        return layers + [(w.T, b) for w, b in zip(self.weights_[1:], self.biases_[1:],
                                                  strict=True)]


@dataclass
class MLPRun:
    """The epochs trained at one ``alpha``: the kept epoch, its validation scores, the curve."""

    best_epoch: int
    epochs: int
    converged: bool
    val_accuracy: float
    val_loss: float
    curve: list[dict[str, float]]


class MLPTraining:
    """One scikit-learn MLP trained on the cache a chunk at a time; ``run`` trains it at an
    ``alpha`` until the validation split stops improving and leaves it at its best epoch, so
    that a later ``run`` at another ``alpha`` continues from there (the alpha search)."""

    def __init__(self, head: MLPHead, X: np.ndarray, y: np.ndarray) -> None:
        from sklearn.neural_network import MLPClassifier
        from sklearn.utils.class_weight import compute_sample_weight

        self.head, self.X, self.y = head, X, y
        self.scaler = fit_scaler(X)
        self.model = MLPClassifier(hidden_layer_sizes=(head.hidden_units,) if head.hidden_units
                                   else (), alpha=head.alpha, random_state=head.random_state)
        self.classes = np.unique(y)
        self.weights = compute_sample_weight(head.class_weight, y) if head.class_weight \
            else None
        self.order = np.random.default_rng(head.random_state)
        self.chunks = max(1, -(-len(X) // head.chunk_rows))

    def run(self, alpha: float, X_val: np.ndarray, y_val: np.ndarray,
            by_loss: bool = False) -> MLPRun:
        """Train at ``alpha`` until ``patience`` epochs bring no better validation score:
        accuracy, ties broken by log loss; or, ``by_loss``, log loss alone."""
        from sklearn.metrics import log_loss

        head, model, X, y, classes = self.head, self.model, self.X, self.y, self.classes
        model.alpha = alpha
        best_accuracy, best_loss, best_weights, best_epoch, since_best = -1.0, np.inf, [], 0, 0
        curve: list[dict[str, float]] = []
        for epoch in range(1, head.max_epochs + 1):
            train_loss = 0.0
            for rows in np.array_split(self.order.permutation(len(X)), self.chunks):
                rows.sort()  # reads the file front to back
                model.partial_fit(scaled(read_rows(X, rows), self.scaler), y[rows],
                                  classes=classes, sample_weight=None if self.weights is None
                                  else self.weights[rows])
                train_loss += model.loss_ * len(rows) / len(X)
            probabilities = np.concatenate([model.predict_proba(scaled(chunk, self.scaler))
                                            for _, chunk in row_chunks(X_val)])
            accuracy = float((classes[probabilities.argmax(axis=1)] == y_val).mean())
            seen = np.isin(y_val, classes)  # a class missing from training counts as wrong
            loss = float(log_loss(y_val[seen], probabilities[seen], labels=classes)) \
                if seen.any() else np.inf
            curve.append({"epoch": epoch, "train_loss": float(train_loss),
                          "val_accuracy": accuracy, "val_loss": loss})
            lower_loss = loss < best_loss - head.tol
            if (lower_loss if by_loss else accuracy > best_accuracy
                    or (accuracy == best_accuracy and lower_loss)):
                best_accuracy, best_loss, best_epoch, since_best = accuracy, loss, epoch, 0
                best_weights = [np.array(w) for w in model.coefs_ + model.intercepts_]
            else:
                since_best += 1
                if since_best >= head.patience:
                    break
        half = len(best_weights) // 2
        model.coefs_, model.intercepts_ = best_weights[:half], best_weights[half:]
        return MLPRun(best_epoch=best_epoch, epochs=epoch, converged=since_best >= head.patience,
                      val_accuracy=best_accuracy, val_loss=best_loss, curve=curve)


HEAD_KINDS: dict[str, type[Head]] = {"logistic": LogisticHead, "mlp": MLPHead}


def load_head(path: str | Path) -> tuple[Head, list[str]]:
    """Read a head written by ``Head.save``, of either kind; returns it with its class names."""
    arrays = load_arrays(path)
    kind = arrays.get("kind", np.asarray("logistic"))  # older heads: logistic
    kind = str(kind) if kind.shape == () else f"an array of shape {kind.shape}"
    if kind not in HEAD_KINDS:
        raise PipelineError(f"{path}: unknown head kind '{kind[:40]}'; known: "
                            f"{', '.join(HEAD_KINDS)}")
    try:
        head = HEAD_KINDS[kind].from_arrays(arrays)
        class_names = arrays["class_names"]
        if "temperature" in arrays:  # heads saved before calibration: 1, scores as they are
            head.temperature_ = float(arrays["temperature"])
    except KeyError as err:
        raise PipelineError(f"{path}: not a saved head (missing array {err})") from err
    except (TypeError, ValueError) as err:  # text where numbers belong
        raise PipelineError(f"{path}: not a saved head ({err})") from err
    problem = _head_problem(head, class_names)
    if problem:
        raise PipelineError(f"{path}: not a usable head ({problem}); re-run: dvc repro "
                            "train_head")
    return head, [str(name) for name in class_names]


def load_head_for(path: str | Path, meta: EmbeddingMeta) -> tuple[Head, list[str]]:
    """``load_head``, refused unless the head was trained on embeddings like ``meta``'s
    (same dimension, same classes)."""
    head, classes = load_head(path)
    if len(head.mean_) != meta.dim or len(classes) != len(meta.classes):
        raise PipelineError(f"{path} was trained on other embeddings ({len(head.mean_)}-d, "
                            f"{len(classes)} classes) than the cache holds ({meta.dim}-d, "
                            f"{len(meta.classes)} classes); run dvc repro")
    if classes != meta.classes:
        i = next(i for i, (a, b) in enumerate(zip(classes, meta.classes, strict=True))
                 if a != b)
        raise PipelineError(f"{path} was trained on other classes than the cache holds (its "
                            f"class {i} is '{classes[i]}', the cache's '{meta.classes[i]}'); "
                            "run dvc repro")
    return head, classes


def _head_problem(head: Head, class_names: np.ndarray) -> str:
    """What keeps a loaded head from scoring, or ``""``: checked once, on load, so a damaged
    file stops with its name instead of failing deep inside NumPy."""
    if class_names.ndim != 1 or not len(class_names) or class_names.dtype.kind != "U":
        return "class_names is not a list of names"
    classes = head.classes_
    if classes.ndim != 1 or classes.dtype.kind not in "iu" or len(set(classes.tolist())) \
            != len(classes) or not np.all((classes >= 0) & (classes < len(class_names))):
        return f"classes is not a set of labels below {len(class_names)}"
    if head.mean_.ndim != 1 or head.scale_.shape != head.mean_.shape:
        return "mean and scale are not two vectors of one length"
    numbers = [head.mean_, head.scale_, *head._arrays().values()]
    if any(a.ndim == 0 for a in numbers):
        return "an array is a single number"
    if not all(np.all(np.isfinite(a)) for a in numbers) or np.any(head.scale_ <= 0):
        return "its numbers are not all finite, or a scale is not positive"
    if not (np.isfinite(head.temperature_) and head.temperature_ > 0):
        return f"its temperature {head.temperature_} is not a positive number"
    try:
        scores = head.predict_proba(np.zeros((1, len(head.mean_))))
    except ValueError as err:  # layer shapes that do not chain
        return f"its arrays do not fit together: {err}"
    if scores.shape != (1, len(classes)):
        return f"it scores {scores.shape[1]} classes, not the {len(classes)} it lists"
    return ""
