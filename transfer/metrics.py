"""Classification metrics from class probabilities, and the aggregated tables DVC plots draw.

Every function takes labels as integers indexing ``class_names`` and probabilities with one
column per class (all classes, in label order), and returns plain Python values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

# Top-5 accuracy says little with fewer classes than this (with 5 classes it is always 1).
TOP5_MIN_CLASSES = 10
# Equal-width confidence bins of the expected calibration error and the reliability diagram.
CALIBRATION_BINS = 15
# Curves are thinned to at most this many points: enough to draw, small enough to commit.
CURVE_POINTS = 200


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           n_classes: int) -> dict[str, float | int]:
    """The headline numbers from predicted labels: accuracy, balanced accuracy, F1.

    Macro F1 averages over the classes that occur in ``y_true`` or ``y_pred``: a class absent
    from a small evaluation split is not counted as a zero.
    """
    present = np.union1d(y_true, y_pred)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro",
                                   zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=present, average="weighted",
                                      zero_division=0)),
        "n_images": int(len(y_true)),
        "n_classes_present": int(len(np.unique(y_true))),
        "n_classes": int(n_classes),
    }


def probability_metrics(y_true: np.ndarray, probabilities: np.ndarray,
                        class_names: Sequence[str],
                        uncalibrated: np.ndarray | None = None) -> dict:
    """``classification_metrics`` of the top class, then what needs the probabilities.

    Top-5 accuracy (from 10 classes on), log loss, expected calibration error (and both of
    the ``uncalibrated`` probabilities, when given, as ``log_loss_uncalibrated`` and
    ``ece_uncalibrated``), one-vs-rest ROC AUC and micro average precision, and per-class
    scores under ``per_class``.
    """
    n_classes = len(class_names)
    labels = np.arange(n_classes)
    y_pred = np.argmax(probabilities, axis=1)
    metrics: dict = classification_metrics(y_true, y_pred, n_classes)
    if n_classes >= TOP5_MIN_CLASSES:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(y_true, probabilities, k=5,
                                                              labels=labels))
    metrics.update(calibration_metrics(y_true, probabilities))
    if uncalibrated is not None:
        metrics.update({f"{name}_uncalibrated": value for name, value
                        in calibration_metrics(y_true, uncalibrated).items()})
    auc = macro_roc_auc(y_true, probabilities)
    if auc is not None:
        metrics["roc_auc_macro"] = auc
    metrics["average_precision_micro"] = float(average_precision_score(
        _one_hot(y_true, n_classes).ravel(), probabilities.ravel()))
    metrics["per_class"] = per_class_metrics(y_true, y_pred, class_names)
    return metrics


def calibration_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Log loss and expected calibration error: how much the probabilities can be trusted."""
    labels = np.arange(probabilities.shape[1])
    return {"log_loss": float(log_loss(y_true, probabilities, labels=labels)),
            "ece": expected_calibration_error(y_true, probabilities)}


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                      class_names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support for each class, keyed by class name."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(class_names)), zero_division=0)
    return {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                   "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)}


def calibration_bins(y_true: np.ndarray, probabilities: np.ndarray,
                     n_bins: int = CALIBRATION_BINS) -> list[dict[str, float | int]]:
    """Per non-empty confidence bin: its range, mean confidence, accuracy and image count.

    Confidence is the top class probability; bins are equal-width on [0, 1], each closed on
    the right, so a confidence of exactly 1 falls in the last bin.
    """
    confidence = probabilities.max(axis=1)
    correct = np.argmax(probabilities, axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        members = which == b
        if members.any():
            rows.append({"bin_lower": float(edges[b]), "bin_upper": float(edges[b + 1]),
                         "confidence": float(confidence[members].mean()),
                         "accuracy": float(correct[members].mean()),
                         "count": int(members.sum())})
    return rows


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray,
                               n_bins: int = CALIBRATION_BINS) -> float:
    """Mean gap between confidence and accuracy over the bins, weighted by bin size."""
    total = len(y_true)
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
                     for row in calibration_bins(y_true, probabilities, n_bins)))


def macro_roc_auc(y_true: np.ndarray, probabilities: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC averaged over the classes present (None with fewer than two)."""
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    return float(np.mean([roc_auc_score(y_true == k, probabilities[:, k]) for k in present]))


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray,
                   class_names: Sequence[str]) -> list[dict[str, str | int | float]]:
    """The confusion matrix, aggregated: count and share of its true class per non-empty cell.

    Rates are normalised by row (true class), so each row of the drawn matrix sums to 1. The
    diagonal cell of every class in ``y_true`` is kept even when empty, so that a class that
    is never predicted still gets its column.
    """
    counts = confusion_matrix(y_true, y_pred, labels=np.arange(len(class_names)))
    totals = counts.sum(axis=1)
    keep = (counts > 0) | (np.diag(totals > 0))
    return [{"actual": class_names[t], "predicted": class_names[p], "count": int(counts[t, p]),
             "rate": float(counts[t, p] / totals[t])}
            for t, p in zip(*np.nonzero(keep), strict=True)]


def most_confused(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                  top: int = 10) -> list[dict[str, str | int]]:
    """The off-diagonal confusion cells with the most images, largest first."""
    cells = [row for row in confusion_rows(y_true, y_pred, class_names)
             if row["actual"] != row["predicted"]]
    cells.sort(key=lambda row: (-row["count"], row["actual"], row["predicted"]))
    return [{"actual": r["actual"], "predicted": r["predicted"], "count": r["count"]}
            for r in cells[:top]]


def micro_roc_curve(y_true: np.ndarray, probabilities: np.ndarray,
                    points: int = CURVE_POINTS) -> list[dict[str, float]]:
    """Micro-averaged one-vs-rest ROC curve (every image-class pair is one decision)."""
    fpr, tpr, _ = roc_curve(_one_hot(y_true, probabilities.shape[1]).ravel(),
                            probabilities.ravel())
    keep = _thin(len(fpr), points)
    return [{"fpr": float(fpr[i]), "tpr": float(tpr[i])} for i in keep]


def micro_precision_recall_curve(y_true: np.ndarray, probabilities: np.ndarray,
                                 points: int = CURVE_POINTS) -> list[dict[str, float]]:
    """Micro-averaged one-vs-rest precision-recall curve."""
    precision, recall, _ = precision_recall_curve(
        _one_hot(y_true, probabilities.shape[1]).ravel(), probabilities.ravel())
    keep = _thin(len(recall), points)
    return [{"recall": float(recall[i]), "precision": float(precision[i])} for i in keep]


def _one_hot(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    return (y_true[:, None] == np.arange(n_classes)[None, :]).astype(np.int8)


def _thin(length: int, points: int) -> np.ndarray:
    """Indices of at most ``points`` evenly spaced entries, always with the first and last."""
    if length <= points:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, points).round().astype(int))
