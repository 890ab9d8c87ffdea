"""The logistic head fitted without its training matrix in memory, for a cache whose
standardized float32 copy would take more than ``head.in_memory_gb``.

scikit-learn's L-BFGS needs the whole standardized matrix at every iteration (4 bytes a value:
4.9 GB for a million 1,280-dimensional rows). This is scikit-learn's objective, multinomial
(binomial for two classes: one row of coefficients), the mean of the weighted log losses plus
``||W||² / (2 C Σw)`` with the intercept unpenalized, minimised by the same scipy L-BFGS-B with
scikit-learn's settings; only the loss and its gradient are summed over the cache a chunk at
a time. Memory is a chunk and the coefficients; each iteration reads the cache once. The head
it fits is a ``LogisticHead`` like any other (kind ``logistic``, the same arrays).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
from scipy import optimize
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from transfer.embeddings import read_rows, row_chunks
from transfer.heads import LogisticHead, fit_scaler

# Rows standardized and multiplied at a time: 5 MB of float32 at 1,280 dimensions, and few
# enough Python steps (a thousand a pass for a million rows).
CHUNK_ROWS = 1024


class StandardizedRows:
    """A cache's rows standardized as they are read, never all held: what the logistic head
    fits on in place of the standardized matrix when that would not fit ``head.in_memory_gb``.
    Indexing it reads those rows (scattered ones with ``pread``)."""

    dtype = np.dtype(np.float32)

    def __init__(self, features: np.ndarray, scaler: StandardScaler,
                 rows: int = CHUNK_ROWS) -> None:
        self.features, self.scaler, self.rows = features, scaler, rows
        self.mean32 = scaler.mean_.astype(np.float32)
        self.scale32 = scaler.scale_.astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(np.shape(self.features))  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        return self._standardized(read_rows(self.features, rows, np.float32))

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, standardized float32 rows)``, chunk by chunk."""
        for start, chunk in row_chunks(self.features, self.rows, np.float32):
            yield start, self._standardized(chunk)

    def _standardized(self, rows: np.ndarray) -> np.ndarray:
        """Float32 ``rows`` standardized in float32 (within a float32 rounding of
        ``heads.scaled``'s float64 arithmetic): read, converted and standardized at the cost
        of about the two products of an iteration, where float64 took twice as long again.
        A new array: ``rows`` may be a view of an in-memory cache."""
        centred = np.subtract(rows, self.mean32)
        centred /= self.scale32
        return centred


def standardized_gb(X: np.ndarray) -> float:
    """What the standardized float32 copy of ``X`` would take, in GB (2**30 bytes)."""
    return 4 * int(np.prod(np.shape(X))) / 2**30


class StreamedLogisticHead(LogisticHead):
    """A ``LogisticHead`` whose fits read the cache a chunk at a time at every iteration."""

    streamed = True

    def standardized(self, X: np.ndarray) -> tuple[StandardScaler, StandardizedRows]:
        scaler = fit_scaler(X)
        return scaler, StandardizedRows(X, scaler)

    def model(self, C: float, tol: float | None = None) -> StreamedLogisticRegression:
        return StreamedLogisticRegression(C=C, max_iter=self.max_iter, tol=tol or self.tol,
                                          class_weight=self.class_weight, warm_start=True)


class StreamedLogisticRegression:
    """The part of ``sklearn.linear_model.LogisticRegression`` (lbfgs, L2) the head uses, on
    ``StandardizedRows``: ``fit`` with sample weights, ``warm_start``, ``coef_``,
    ``intercept_``, ``classes_`` and ``n_iter_``; a ``ConvergenceWarning`` when L-BFGS stops
    before converging."""

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-4,
                 class_weight: str | None = None, warm_start: bool = False) -> None:
        self.C, self.max_iter, self.tol = C, max_iter, tol
        self.class_weight, self.warm_start = class_weight, warm_start

    def fit(self, X: StandardizedRows, y: np.ndarray,
            sample_weight: np.ndarray | None = None) -> StreamedLogisticRegression:
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"needs samples of at least 2 classes; got {len(classes)}")
        weight = np.ones(len(y)) if sample_weight is None else \
            np.asarray(sample_weight, dtype=np.float64).copy()
        if self.class_weight is not None:
            per_class = compute_class_weight(self.class_weight, classes=classes, y=y,
                                             sample_weight=sample_weight)
            weight *= per_class[np.searchsorted(classes, y)]
        labels = np.searchsorted(classes, y)
        rows = 1 if len(classes) == 2 else len(classes)
        dim = X.shape[1]
        start = np.zeros((rows, dim + 1))
        if self.warm_start and getattr(self, "coef_", None) is not None and \
                self.coef_.shape == (rows, dim):
            start[:, :dim], start[:, dim] = self.coef_, self.intercept_
        objective = _Objective(X, labels, weight, rows, strength=1.0 / (self.C * weight.sum()))
        result = optimize.minimize(
            objective, start.ravel(), method="L-BFGS-B", jac=True,
            options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                     "ftol": 64 * np.finfo(float).eps})
        if result.status != 0:  # as scikit-learn words it
            warnings.warn(f"lbfgs failed to converge after {result.nit} iteration(s) "
                          f"(status={result.status}): {result.message}", ConvergenceWarning,
                          stacklevel=2)
        solution = result.x.reshape(rows, dim + 1)
        self.coef_, self.intercept_ = solution[:, :dim].copy(), solution[:, dim].copy()
        self.classes_ = classes
        self.n_iter_ = np.asarray([min(int(result.nit), self.max_iter)])
        return self


class _Objective:
    """The loss and its gradient at a flat ``(rows, dim + 1)`` parameter vector, one pass over
    the rows (float32 products, as scikit-learn's on float32 rows; float64 sums)."""

    def __init__(self, X: StandardizedRows, labels: np.ndarray, weight: np.ndarray, rows: int,
                 strength: float) -> None:
        # Each row's share of the mean loss, once for every pass.
        self.X, self.labels, self.weight, self.rows = X, labels, weight / weight.sum(), rows
        self.strength = strength

    def __call__(self, flat: np.ndarray) -> tuple[float, np.ndarray]:
        dim = self.X.shape[1]
        params = flat.reshape(self.rows, dim + 1)
        coef, intercept = params[:, :dim], params[:, dim]
        coef32 = coef.astype(np.float32)
        loss, grad_coef, grad_intercept = 0.0, np.zeros_like(coef), np.zeros(self.rows)
        for start, chunk in self.X.chunks():
            labels = self.labels[start:start + len(chunk)]
            weight = self.weight[start:start + len(chunk)]
            scores = (chunk @ coef32.T).astype(np.float64) + intercept
            if self.rows == 1:  # binomial: the score of the second class
                z, target = scores[:, 0], (labels == 1).astype(np.float64)
                loss += float(weight @ (np.logaddexp(0.0, z) - target * z))
                residual = (expit(z) - target)[:, None] * weight[:, None]
            else:
                top = scores.max(axis=1, keepdims=True)  # scipy's logsumexp: 3x the time here
                log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
                loss += float(weight @ (log_norm - scores[np.arange(len(labels)), labels]))
                residual = np.exp(scores - log_norm[:, None])
                residual[np.arange(len(labels)), labels] -= 1.0
                residual *= weight[:, None]
            grad_coef += (residual.astype(np.float32).T @ chunk).astype(np.float64)
            grad_intercept += residual.sum(axis=0)
        loss += 0.5 * self.strength * float(np.sum(coef * coef))
        grad = np.empty_like(params)
        grad[:, :dim], grad[:, dim] = grad_coef + self.strength * coef, grad_intercept
        return loss, grad.ravel()

