"""Choosing a head's regularisation on held-out images: ``head.C: auto`` and ``head.alpha: auto``.

The grid is walked from strong to weak regularisation, each fit starting from the previous
one's solution (warm start) on the training matrix standardized once. Every point is scored by
log loss on held-out images: the validation split when it has at least
``MIN_VALIDATION_IMAGES``, else, for the logistic head, stratified k-fold cross-validation on
the training split (the MLP always uses the validation split: it stops early on it). The walk
stops once ``PATIENCE`` points in a row score no better than the best so far. On the
validation split the logistic head takes the value of lowest log loss after each value's own
temperature (the log loss the calibrated head will have there); cross-validated, the
strongest regularisation whose log loss is within one standard error of the lowest (the
"one-standard-error rule" of Hastie, Tibshirani and Friedman, as glmnet's ``lambda.1se``):
folds of a few images each cannot tell those values apart, and when they are all classified
right their log loss keeps falling as the regularisation weakens, where the stronger value
scored better on test photos (docs/defaults.md). The head is then fitted at the chosen C from
scratch, as that number would fit it. A number instead of
``auto`` is a grid of one point, scored the same way, so that the temperature is fitted on the
same held-out images either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from transfer.calibration import fitted_temperature, image_log_losses, label_columns
from transfer.embeddings import row_chunks
from transfer.errors import PipelineError
from transfer.heads import LogisticHead, MLPHead, MLPTraining, scaled, softmax

# Strongest regularisation first (small C, large alpha); half-decade steps for C, decades for
# the MLP's alpha, whose every step costs at least head.patience epochs.
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))
ALPHA_GRID = tuple(float(a) for a in np.logspace(1, -5, 7))
# Below this many images the validation log loss is too noisy to rank neighbouring grid
# points, and cross-validating the (then small) training split is cheap.
MIN_VALIDATION_IMAGES = 200
CV_FOLDS = 5
# Points in a row no better than the best before the walk stops: past its minimum the held-out
# loss only grows as the regularisation weakens.
PATIENCE = 3
# The walk's L-BFGS tolerance, in multiples of the head's own: enough to rank the points; the
# head is then fitted at the chosen one from scratch, to its own tolerance.
WALK_TOLERANCE = 10.0
CHUNK_ROWS = 512


@dataclass(frozen=True)
class HeldOut:
    """Where grid points are scored: the validation split (``folds == 0``) or k folds of the
    training split, and why."""

    folds: int
    description: str
    reason: str
    fallback: bool = False


@dataclass(frozen=True)
class GridPoint:
    value: float
    val_log_loss: float
    val_accuracy: float
    cost: int  # L-BFGS iterations (logistic, all folds together) or epochs (mlp) it took
    val_log_loss_se: float = 0.0  # the standard error of the mean over the held-out images


def within_one_standard_error(points: Sequence[GridPoint]) -> GridPoint:
    """The first point (strongest regularisation, as the grid is walked) whose log loss is
    at most the best point's plus that point's standard error."""
    best = min(points, key=lambda p: p.val_log_loss)
    return next(p for p in points if p.val_log_loss <= best.val_log_loss + best.val_log_loss_se)


@dataclass
class Search:
    """The points a search scored and the one it chose."""

    parameter: str
    auto: bool
    points: list[GridPoint]
    chosen: float
    held_out: HeldOut
    stopped_early: bool
    cost: int  # L-BFGS iterations (logistic) or epochs (mlp), the final fit included

    @property
    def calibrated(self) -> bool:
        """Whether the points' log losses are taken after each point's temperature
        (``calibrated_score``: the logistic head on the validation split), not untempered."""
        return self.parameter == "C" and not self.held_out.folds

    def metrics(self) -> dict:
        unit = "iterations" if self.parameter == "C" else "epochs"
        return {"parameter": self.parameter, "auto": self.auto, self.parameter: self.chosen,
                "held_out": self.held_out.description, "why": self.held_out.reason,
                "stopped_early": self.stopped_early, unit: self.cost,
                "curve": [{self.parameter: p.value, "val_log_loss": p.val_log_loss,
                           "val_log_loss_se": p.val_log_loss_se,
                           "val_accuracy": p.val_accuracy, unit: p.cost}
                          for p in self.points]}

    def plot_rows(self) -> list[dict]:
        """One row per scored point, for the DVC plot (the parameter's name in a column, so
        both head kinds draw with one plot definition)."""
        return [{"parameter": self.parameter, "value": p.value, "val_log_loss": p.val_log_loss,
                 "val_accuracy": p.val_accuracy, "chosen": p.value == self.chosen}
                for p in self.points]


@dataclass
class Fitted:
    """A fitted head, the search that chose its regularisation, and the untempered scores of
    the held-out images that scored it (with their labels), for the temperature."""

    head: LogisticHead | MLPHead
    search: Search
    held_out_scores: np.ndarray
    held_out_labels: np.ndarray


def choose_held_out(y: np.ndarray, n_val: int, class_names: Sequence[str],
                    parameter: str = "head.C") -> HeldOut:
    """The validation split when it is big enough, else stratified cross-validation on the
    training labels ``y``, with as many folds as the smallest class allows (at most
    ``CV_FOLDS``); a class of one training image leaves the validation split, however small."""
    if n_val >= MIN_VALIDATION_IMAGES:
        return HeldOut(0, f"validation split ({n_val} images)",
                       f"the validation split has at least {MIN_VALIDATION_IMAGES} images")
    small = f"the validation split has {n_val} images (fewer than {MIN_VALIDATION_IMAGES})"
    labels, counts = np.unique(y, return_counts=True)
    folds = min(CV_FOLDS, int(counts.min()))
    smallest = class_names[int(labels[np.argmin(counts)])]
    if folds >= 2:
        why = small if folds == CV_FOLDS else \
            f"{small}; {folds} folds: class '{smallest}' has {folds} training images"
        return HeldOut(folds, f"{folds}-fold stratified cross-validation on the training split "
                              f"({len(y)} images)", why)
    if n_val == 0:
        raise PipelineError(f"{parameter}: no held-out images to score it and fit the "
                            f"temperature on: the validation split is empty and class "
                            f"'{smallest}' has 1 training image (cross-validation needs 2); "
                            "add images to that class")
    return HeldOut(0, f"validation split ({n_val} images)",
                   f"{small}, but class '{smallest}' has 1 training image: too few for "
                   "stratified cross-validation", fallback=True)


def score(scores: np.ndarray, classes: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Log loss, accuracy and the log loss's standard error (of the mean over the images) of
    untempered ``scores`` (columns in ``classes`` order) against labels ``y``; an image of a
    class the head never saw counts as wrong and is left out of the log loss (no
    regularisation could help it)."""
    accuracy = float((classes[np.argmax(softmax(scores), axis=1)] == y).mean())
    seen, columns = label_columns(classes, y)
    if not seen.any():
        return float("inf"), accuracy, 0.0
    losses = image_log_losses(scores[seen], columns)
    error = float(losses.std(ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else 0.0
    return float(losses.mean()), accuracy, error


def calibrated_score(scores: np.ndarray, classes: np.ndarray,
                     y: np.ndarray) -> tuple[float, float, float]:
    """``score`` of ``scores`` after the temperature ``transfer.calibration`` fits on them: the
    log loss the head at that C will have once ``train_head`` calibrates it on these images.
    Untempered, a strongly regularised head looks worse than it is (it is under-confident,
    which its temperature mends), and the walk chose weaker C that fitted wrong training
    labels (docs/defaults.md)."""
    return score(scores / fitted_temperature(scores, classes, y), classes, y)


def walk(grid: Sequence[float], fit_at: Callable[[float], tuple],
         keep: Callable[[], None]) -> tuple[list[GridPoint], bool]:
    """Fit and score each value of ``grid`` in order (``fit_at`` returns log loss, accuracy,
    cost and, optionally, the log loss's standard error); ``keep`` is called whenever a point
    is the best so far, so that the caller can keep what it fitted there. Returns the points
    and whether the walk stopped before the end."""
    points: list[GridPoint] = []
    best, since_best = 0, 0
    for value in grid:
        points.append(GridPoint(value, *fit_at(value)))
        loss = points[-1].val_log_loss
        if len(points) == 1 or loss < points[best].val_log_loss:
            best, since_best = len(points) - 1, 0
            keep()
        else:
            since_best += 1
            if since_best >= PATIENCE and len(points) < len(grid):
                return points, True
    return points, False


def linear_scores(model: LogisticRegression, rows: np.ndarray) -> np.ndarray:
    """Untempered scores of standardized ``rows``."""
    return rows @ model.coef_.T + model.intercept_


def search_logistic(head: LogisticHead, X: np.ndarray, y: np.ndarray, X_val: np.ndarray,
                    y_val: np.ndarray, grid: Sequence[float], held_out: HeldOut,
                    auto: bool = True) -> Fitted:
    """``head`` fitted on ``X``, ``y`` at the value of ``grid`` that scores best on
    ``held_out``. ``X`` is standardized once, into the one float32 matrix every fit shares
    (a ``StreamedLogisticHead`` standardizes each chunk as its fits read it).

    The walk only ranks the values; the head is then fitted at the chosen C from scratch, to
    its own tolerance: the head that number given as ``head.C`` trains, whatever the walk's
    path (a warm-started path ends a little differently with every BLAS thread count).
    """
    scaler, standardized = head.standardized(X)
    tolerance = head.tol * (WALK_TOLERANCE if len(grid) > 1 else 1.0)
    if held_out.folds:
        points, stopped, out_of_fold = _walk_folds(head, standardized, y, grid, held_out,
                                                   tolerance)
    elif len(grid) > 1:
        points, stopped = _walk_validation(head, standardized, y, scaler, X_val, y_val, grid,
                                           tolerance)
    else:  # a number on the validation split: its one point is the head itself
        points, stopped = [], False
    if held_out.folds:
        head.C = within_one_standard_error(points).value
        out_of_fold = out_of_fold[head.C]
    else:
        head.C = grid[0] if not points else min(points, key=lambda p: p.val_log_loss).value
    model = head.model(head.C)
    head.fit_model(model, standardized, y)
    head.take(model, scaler)
    cost = sum(p.cost for p in points) + head.n_iter_
    if held_out.folds:
        return Fitted(head, Search("C", auto, points, head.C, held_out, stopped, cost),
                      out_of_fold, y)
    scores = head.decision_function(X_val)
    if not points:
        loss, accuracy, error = calibrated_score(scores, head.classes_, y_val)
        points = [GridPoint(head.C, loss, accuracy, head.n_iter_, error)]
    return Fitted(head, Search("C", auto, points, head.C, held_out, stopped, cost), scores,
                  y_val)


def _walk_validation(head: LogisticHead, standardized: np.ndarray, y: np.ndarray, scaler,
                     X_val: np.ndarray, y_val: np.ndarray, grid: Sequence[float],
                     tolerance: float) -> tuple[list[GridPoint], bool]:
    """The walk scored on the validation split, read and standardized a chunk at a time."""
    model = head.model(grid[0], tolerance)

    def fit_at(C: float) -> tuple[float, float, int, float]:
        model.C = C
        head.fit_model(model, standardized, y)
        scores = np.concatenate([linear_scores(model, scaled(chunk, scaler))
                                 for _, chunk in row_chunks(X_val)] or
                                [np.zeros((0, model.coef_.shape[0]))])
        loss, accuracy, error = calibrated_score(scores, model.classes_, y_val)
        return loss, accuracy, head.n_iter_, error

    return walk(grid, fit_at, lambda: None)


def _walk_folds(head: LogisticHead, standardized: np.ndarray, y: np.ndarray,
                grid: Sequence[float], held_out: HeldOut,
                tolerance: float) -> tuple[list[GridPoint], bool, dict[float, np.ndarray]]:
    """The walk with every point scored on k stratified folds; each fold's model is fitted
    on the shared matrix with zero weight on its held-out rows (no copy of the rows), and
    scores them a chunk at a time. Returns the points, whether the walk stopped early and the
    out-of-fold scores of every training row at each point that was the best so far when it
    was scored: the one-standard-error rule only ever chooses such a point (an earlier one
    at least as good comes first), and the temperature is fitted on its scores."""
    splitter = StratifiedKFold(held_out.folds, shuffle=True, random_state=head.random_state)
    held_rows = [rows for _, rows in splitter.split(np.zeros(len(y)), y)]
    weights = []
    for rows in held_rows:
        weight = np.ones(len(y), dtype=standardized.dtype)
        weight[rows] = 0.0
        weights.append(weight)
    models = [head.model(grid[0], tolerance) for _ in held_rows]
    classes = np.unique(y)
    out_of_fold: dict[float, np.ndarray] = {}
    last: dict[float, np.ndarray] = {}

    def fit_at(C: float) -> tuple[float, float, int, float]:
        iterations = 0
        last.clear()
        scores = last[C] = np.zeros((len(y), 1 if len(classes) == 2 else len(classes)))
        for model, weight, rows in zip(models, weights, held_rows, strict=True):
            model.C = C
            head.fit_model(model, standardized, y, sample_weight=weight)
            iterations += head.n_iter_
            for start in range(0, len(rows), CHUNK_ROWS):
                part = rows[start:start + CHUNK_ROWS]
                scores[part] = linear_scores(model, standardized[part])
        loss, accuracy, error = score(scores, classes, y)
        return loss, accuracy, iterations, error

    points, stopped = walk(grid, fit_at, lambda: out_of_fold.update(last))
    return points, stopped, out_of_fold


def search_mlp(head: MLPHead, X: np.ndarray, y: np.ndarray, X_val: np.ndarray,
               y_val: np.ndarray, grid: Sequence[float], auto: bool = True) -> Fitted:
    """``head`` trained at the ``alpha`` of ``grid`` whose kept epoch scores best on the
    validation split. One network is trained throughout: each ``alpha`` continues from the
    best epoch of the one before."""
    training = MLPTraining(head, X, y)
    held_out = HeldOut(0, f"validation split ({len(y_val)} images)",
                       "the MLP stops early on the validation split, so it is scored there")
    kept, last = {}, {}

    def fit_at(alpha: float) -> tuple[float, float, int]:
        run = last["run"] = training.run(alpha, X_val, y_val, by_loss=auto)
        return run.val_loss, run.val_accuracy, run.epochs

    def keep() -> None:
        model = training.model
        kept.update(alpha=model.alpha, run=last["run"],
                    weights=[np.array(w) for w in model.coefs_],
                    biases=[np.array(b) for b in model.intercepts_])

    points, stopped = walk(grid, fit_at, keep)
    training.model.coefs_, training.model.intercepts_ = kept["weights"], kept["biases"]
    head.alpha = kept["alpha"]
    head.take(training, kept["run"])
    search = Search("alpha", auto, points, head.alpha, held_out, stopped,
                    sum(p.cost for p in points))
    return Fitted(head, search, head.decision_function(X_val), y_val)
