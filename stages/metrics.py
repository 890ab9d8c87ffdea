"""Classification metrics, and per-image predictions that DVC draws as a confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           n_classes: int) -> dict[str, float | int]:
    """The headline numbers: accuracy, balanced accuracy and macro F1.

    Macro F1 averages over the classes that occur in ``y_true`` or ``y_pred``: a class absent
    from a small evaluation split is not counted as a zero.
    """
    present = np.union1d(y_true, y_pred)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro",
                                   zero_division=0)),
        "n_images": int(len(y_true)),
        "n_classes_present": int(len(np.unique(y_true))),
        "n_classes": int(n_classes),
    }


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                      class_names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support for each class, keyed by class name."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(class_names)), zero_division=0)
    return {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                   "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)}


def prediction_rows(ids: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray,
                    class_names: Sequence[str]) -> list[dict[str, str]]:
    """One row per image, the columns DVC's ``confusion`` template reads: actual, predicted."""
    return [{"id": str(i), "actual": class_names[t], "predicted": class_names[p]}
            for i, t, p in zip(ids, y_true, y_pred, strict=True)]
