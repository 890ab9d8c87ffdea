"""DVC stage ``train_head``: fit the classifier head on cached training embeddings, choose its
regularisation (``auto``) and its temperature on held-out images."""

from __future__ import annotations

import logging
import time

from threadpoolctl import threadpool_limits

from transfer.artifacts import atomic_outputs, write_csv, write_json
from transfer.embeddings import EmbeddingMeta, load_split
from transfer.errors import run_stage
from transfer.head_training import FIT_THREADS, HEAD_TRAINERS, calibrate_head, log_search
from transfer.layout import (
    EMBEDDINGS_DIR,
    HEAD_PATH,
    PARAMS,
    REGULARISATION_PLOT,
    TRAIN_HEAD_REPORT,
)
from transfer.metrics import classification_metrics
from transfer.params import load_params

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS)
    classes = EmbeddingMeta.read(EMBEDDINGS_DIR).classes
    train_x, train_y, _ = load_split(EMBEDDINGS_DIR, "train")
    val_x, val_y, _ = load_split(EMBEDDINGS_DIR, "val")
    trainer = HEAD_TRAINERS[params.head.kind](params.head, params.seed, classes)
    started = time.perf_counter()
    with threadpool_limits(limits=FIT_THREADS):
        fitted = trainer.fit(train_x, train_y, val_x, val_y)
        log_search(trainer, fitted)
        calibration = calibrate_head(fitted)
    seconds = time.perf_counter() - started
    head, search = fitted.head, fitted.search
    val_metrics = classification_metrics(val_y, head.predict(val_x), len(classes))
    train_accuracy = float((head.predict(train_x) == train_y).mean())
    # The head, its report and its search curve are replaced together, or not at all.
    with atomic_outputs(HEAD_PATH, TRAIN_HEAD_REPORT, REGULARISATION_PLOT) as (
            head_tmp, report_tmp, plot_tmp):
        head.save(head_tmp, classes)
        write_json(report_tmp, {"train_accuracy": train_accuracy,
                                "val": val_metrics,
                                "converged": head.converged_,
                                "n_iter": head.n_iter_,
                                **trainer.extra_metrics(head),
                                "regularisation": search.metrics(),
                                "calibration": calibration})  # no timings: same params, same file
        write_csv(plot_tmp, search.plot_rows())
    log.info("%s head: train accuracy %.4f, val accuracy %.4f (%d %s, %.2fs)", head.kind,
             train_accuracy, val_metrics["accuracy"], head.n_iter_, trainer.unit, seconds)


if __name__ == "__main__":
    run_stage(main)
