"""DVC stage ``evaluate``: score every trained model on the held-out split.

Each model is reduced to its class probabilities on the split; ``evaluate_model`` turns those
into metrics, plot tables and a list of confident mistakes, the same way for every model.
"""

from __future__ import annotations

import logging

import numpy as np

from transfer.artifacts import csv_text, json_text, read_json, write_files
from transfer.audit import summary_section
from transfer.data import ImageStore
from transfer.embeddings import EmbeddingMeta, load_split
from transfer.errors import PipelineError, run_stage
from transfer.evaluation import (
    GALLERY_FILE,
    evaluate_model,
    evaluation_report,
    plot_tables,
    summary_markdown,
)
from transfer.gallery import draw_gallery, images_by_id, png_bytes
from transfer.heads import load_head_for
from transfer.layout import (
    AUDIT_REPORT,
    EMBEDDINGS_DIR,
    EVALUATE_METRICS,
    EVALUATE_PLOTS_DIR,
    EVALUATE_REPORT,
    FINETUNE_DIR,
    FINETUNE_STATUS,
    HEAD_PATH,
    PARAMS,
    PREPARED_DIR,
    SUMMARY,
)
from transfer.params import load_params

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS)
    split = params.evaluate.split
    features, y_true, ids = load_split(EMBEDDINGS_DIR, split)
    head, classes = load_head_for(HEAD_PATH, EmbeddingMeta.read(EMBEDDINGS_DIR))
    probabilities = {"head": head.predict_proba_all(features, len(classes))}
    uncalibrated = {"head": head.predict_proba_all(features, len(classes), calibrated=False)}
    finetune = read_json(FINETUNE_STATUS)
    if not isinstance(finetune, dict):
        raise PipelineError(f"{FINETUNE_STATUS}: not a status object; re-run: dvc repro finetune")
    store = ImageStore(PREPARED_DIR, split)
    if finetune.get("status") == "trained":
        probabilities["finetune"], uncalibrated["finetune"] = finetuned_probabilities(store, ids)
    untrained = [name for i, name in enumerate(classes) if i not in head.classes_]
    if untrained:
        log.warning("no training image for class %s: no model can predict it",
                    ", ".join(untrained))

    # Everything is computed before anything is written: a failure leaves the previous
    # outputs as they were, never some new and some old.
    evaluations = [evaluate_model(name, y_true, p, classes, ids, split,
                                  uncalibrated=uncalibrated.get(name))
                   for name, p in probabilities.items()]
    image_of = images_by_id(store, ids, f"{PREPARED_DIR}/{split}")
    gallery = draw_gallery(
        [(f"{e.name}: {len(e.mistakes)} most confident of {e.n_mistakes} mistakes "
          f"on {e.metrics['n_images']} {split} images", e.mistakes) for e in evaluations],
        image_of)
    write_files({
        EVALUATE_METRICS: json_text({e.name: e.headline for e in evaluations}),
        EVALUATE_REPORT: json_text(evaluation_report(evaluations, finetune)),
        **{EVALUATE_PLOTS_DIR / filename: csv_text(rows)
           for filename, rows in plot_tables(evaluations).items()},
        EVALUATE_PLOTS_DIR / GALLERY_FILE: png_bytes(gallery),
        SUMMARY: summary_markdown(evaluations, finetune, EVALUATE_PLOTS_DIR.as_posix(), untrained)
        + (summary_section(read_json(AUDIT_REPORT), params.data.exclude, params.data.relabel)
           if AUDIT_REPORT.is_file() else ""),
    })
    for e in evaluations:
        log.info("%s on %s: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f, ECE %.4f, "
                 "log loss %.4f", e.name, split, e.metrics["accuracy"],
                 e.metrics["balanced_accuracy"], e.metrics["macro_f1"], e.metrics["ece"],
                 e.metrics["log_loss"])
        if "ece_uncalibrated" in e.metrics:
            log.info("%s without its temperature: ECE %.4f, log loss %.4f", e.name,
                     e.metrics["ece_uncalibrated"], e.metrics["log_loss_uncalibrated"])
    log.info("summary: %s; plots: dvc plots show", SUMMARY)


def finetuned_probabilities(store: ImageStore, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tuned network's class probabilities on the store's images, in ``ids`` order:
    with its temperature and without."""
    from transfer.heads import softmax
    from transfer.inference import load_finetuned

    if not np.array_equal(store.ids, ids):
        raise PipelineError(f"{PREPARED_DIR} and {EMBEDDINGS_DIR} list different images; "
                            "run `dvc repro`")
    model = load_finetuned(FINETUNE_DIR)
    scores = np.concatenate(list(model.scores(store)))
    return softmax(scores / model.temperature), softmax(scores)


if __name__ == "__main__":
    run_stage(main)
