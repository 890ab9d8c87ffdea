"""DVC stage ``train_head``: fit the classifier head on cached training embeddings."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stages.artifacts import write_json
from stages.embeddings import EmbeddingMeta, load_split
from stages.errors import run_stage
from stages.heads import LogisticHead
from stages.metrics import classification_metrics
from stages.params import load_params

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
EMBEDDINGS_DIR = Path("data/embeddings")
HEAD_PATH = Path("models/head.npz")
METRICS = Path("metrics/train_head.json")


def main() -> None:
    params = load_params(PARAMS)
    classes = EmbeddingMeta.read(EMBEDDINGS_DIR).classes
    train_x, train_y, _ = load_split(EMBEDDINGS_DIR, "train")
    val_x, val_y, _ = load_split(EMBEDDINGS_DIR, "val")
    started = time.perf_counter()
    head = LogisticHead(C=params.head.C, max_iter=params.head.max_iter,
                        class_weight=params.head.class_weight, random_state=params.seed)
    head.fit(train_x, train_y)
    seconds = time.perf_counter() - started
    head.save(HEAD_PATH, classes)
    val_metrics = classification_metrics(val_y, head.predict(val_x), len(classes))
    train_accuracy = float((head.predict(train_x) == train_y).mean())
    write_json(METRICS, {"train_accuracy": train_accuracy,
                         "val": val_metrics,
                         "converged": head.converged_,
                         "n_iter": head.n_iter_})  # no timings: same params, same file
    log.info("head: train accuracy %.4f, val accuracy %.4f (%d iterations, %.2fs)",
             train_accuracy, val_metrics["accuracy"], head.n_iter_, seconds)


if __name__ == "__main__":
    run_stage(main)
