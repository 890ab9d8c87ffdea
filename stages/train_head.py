"""DVC stage ``train_head``: fit the classifier head on cached training embeddings."""

from __future__ import annotations

import logging
import time

import numpy as np

from transfer.artifacts import atomic_outputs, write_json
from transfer.embeddings import EmbeddingMeta, load_split
from transfer.errors import run_stage
from transfer.heads import Head, LogisticHead, MLPHead
from transfer.layout import EMBEDDINGS_DIR, HEAD_PATH, PARAMS, TRAIN_HEAD_METRICS
from transfer.metrics import classification_metrics
from transfer.params import HeadParams, load_params

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS)
    classes = EmbeddingMeta.read(EMBEDDINGS_DIR).classes
    train_x, train_y, _ = load_split(EMBEDDINGS_DIR, "train")
    val_x, val_y, _ = load_split(EMBEDDINGS_DIR, "val")
    started = time.perf_counter()
    head = fit_head(params.head, params.seed, train_x, train_y, val_x, val_y)
    seconds = time.perf_counter() - started
    val_metrics = classification_metrics(val_y, head.predict(val_x), len(classes))
    train_accuracy = float((head.predict(train_x) == train_y).mean())
    extra = {"best_epoch": head.best_epoch_} if isinstance(head, MLPHead) else {}
    with atomic_outputs(HEAD_PATH, TRAIN_HEAD_METRICS) as (head_tmp, metrics_tmp):
        head.save(head_tmp, classes)
        write_json(metrics_tmp, {"train_accuracy": train_accuracy,
                                 "val": val_metrics,
                                 "converged": head.converged_,
                                 "n_iter": head.n_iter_,
                                 **extra})  # no timings: same params, same file
    unit = "epochs" if isinstance(head, MLPHead) else "iterations"
    log.info("%s head: train accuracy %.4f, val accuracy %.4f (%d %s, %.2fs)", head.kind,
             train_accuracy, val_metrics["accuracy"], head.n_iter_, unit, seconds)


def fit_head(params: HeadParams, seed: int, train_x: np.ndarray, train_y: np.ndarray,
             val_x: np.ndarray, val_y: np.ndarray) -> Head:
    """The head ``head.kind`` names, fitted; the MLP picks its epoch on validation."""
    if params.kind == "mlp":
        return MLPHead(hidden_units=params.hidden_units, alpha=params.alpha,
                       max_epochs=params.max_iter, patience=params.patience,
                       class_weight=params.class_weight,
                       random_state=seed).fit(train_x, train_y, val_x, val_y)
    return LogisticHead(C=params.C, max_iter=params.max_iter, class_weight=params.class_weight,
                        random_state=seed).fit(train_x, train_y)


if __name__ == "__main__":
    run_stage(main)
