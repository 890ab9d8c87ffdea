"""DVC stage ``evaluate``: score every trained model on the held-out split.

Each model is reduced to its class probabilities on the split; ``evaluate_model`` turns those
into metrics, plot tables and a list of confident mistakes, the same way for every model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.artifacts import atomic_output, read_json, write_csv, write_json
from stages.data import ImageStore
from stages.embeddings import load_split
from stages.errors import PipelineError, run_stage
from stages.evaluation import (
    GALLERY_FILE,
    evaluate_model,
    evaluation_report,
    plot_tables,
    summary_markdown,
)
from stages.gallery import draw_gallery, images_by_id, save_png
from stages.heads import load_head
from stages.params import load_params

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
PREPARED_DIR = Path("data/prepared")
EMBEDDINGS_DIR = Path("data/embeddings")
HEAD_PATH = Path("models/head.npz")
FINETUNE_DIR = Path("models/finetune")
FINETUNE_STATUS = FINETUNE_DIR / "status.json"
METRICS = Path("metrics/evaluate.json")
REPORT = Path("reports/evaluate.json")
SUMMARY = Path("reports/summary.md")
PLOTS_DIR = Path("plots/evaluate")


def main() -> None:
    params = load_params(PARAMS)
    split = params.evaluate.split
    features, y_true, ids = load_split(EMBEDDINGS_DIR, split)
    head, classes = load_head(HEAD_PATH)
    probabilities = {"head": head.predict_proba_all(features, len(classes))}
    uncalibrated = {"head": head.predict_proba_all(features, len(classes), calibrated=False)}
    finetune = read_json(FINETUNE_STATUS)
    store = ImageStore(PREPARED_DIR, split)
    if finetune["status"] == "trained":
        probabilities["finetune"] = finetuned_probabilities(store, ids)

    evaluations = [evaluate_model(name, y_true, p, classes, ids, split,
                                  uncalibrated=uncalibrated.get(name))
                   for name, p in probabilities.items()]
    write_json(METRICS, {e.name: e.metrics for e in evaluations})
    write_json(REPORT, evaluation_report(evaluations, finetune))
    for filename, rows in plot_tables(evaluations).items():
        write_csv(PLOTS_DIR / filename, rows)
    image_of = images_by_id(store, ids, f"{PREPARED_DIR}/{split}")
    gallery = draw_gallery(
        [(f"{e.name}: {len(e.mistakes)} most confident of {e.n_mistakes} mistakes "
          f"on {e.metrics['n_images']} {split} images", e.mistakes) for e in evaluations],
        image_of)
    save_png(gallery, PLOTS_DIR / GALLERY_FILE)
    with atomic_output(SUMMARY) as tmp:
        tmp.write_text(summary_markdown(evaluations, finetune, PLOTS_DIR.as_posix()),
                       encoding="utf-8")
    for e in evaluations:
        log.info("%s on %s: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f, ECE %.4f, "
                 "log loss %.4f", e.name, split, e.metrics["accuracy"],
                 e.metrics["balanced_accuracy"], e.metrics["macro_f1"], e.metrics["ece"],
                 e.metrics["log_loss"])
        if "ece_uncalibrated" in e.metrics:
            log.info("%s without its temperature: ECE %.4f, log loss %.4f", e.name,
                     e.metrics["ece_uncalibrated"], e.metrics["log_loss_uncalibrated"])
    log.info("summary: %s; plots: dvc plots show", SUMMARY)


def finetuned_probabilities(store: ImageStore, ids: np.ndarray) -> np.ndarray:
    """The fine-tuned network's class probabilities on the store's images, in ``ids`` order."""
    from stages.finetuning import load_finetuned

    if not np.array_equal(store.ids, ids):
        raise PipelineError(f"{PREPARED_DIR} and {EMBEDDINGS_DIR} list different images; "
                            "run `dvc repro`")
    return np.concatenate(list(load_finetuned(FINETUNE_DIR).predict_proba(store)))


if __name__ == "__main__":
    run_stage(main)
