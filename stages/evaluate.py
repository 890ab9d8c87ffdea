"""DVC stage ``evaluate``: score every trained model on the held-out split.

Each model is reduced to its class probabilities on the split; ``evaluate_model`` turns those
into metrics, plot tables and a list of confident mistakes, the same way for every model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.artifacts import atomic_output, read_json, write_csv, write_json
from stages.data import ImageStore
from stages.embeddings import load_split
from stages.errors import run_stage
from stages.evaluation import (
    GALLERY_FILE,
    evaluate_model,
    evaluation_report,
    plot_tables,
    summary_markdown,
)
from stages.gallery import draw_gallery, images_by_id, save_png
from stages.heads import LogisticHead
from stages.params import load_params

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
PREPARED_DIR = Path("data/prepared")
EMBEDDINGS_DIR = Path("data/embeddings")
HEAD_PATH = Path("models/head.npz")
FINETUNE_STATUS = Path("models/finetune/status.json")
METRICS = Path("metrics/evaluate.json")
REPORT = Path("reports/evaluate.json")
SUMMARY = Path("reports/summary.md")
PLOTS_DIR = Path("plots/evaluate")


def main() -> None:
    params = load_params(PARAMS)
    split = params.evaluate.split
    features, y_true, ids = load_split(EMBEDDINGS_DIR, split)
    head, classes = LogisticHead.load(HEAD_PATH)
    probabilities = {"head": head.predict_proba_all(features, len(classes))}
    # Fine-tuning is recorded as skipped until it is built; then its probabilities join here.
    finetune = read_json(FINETUNE_STATUS)

    evaluations = [evaluate_model(name, y_true, p, classes, ids, split)
                   for name, p in probabilities.items()]
    write_json(METRICS, {e.name: e.metrics for e in evaluations})
    write_json(REPORT, evaluation_report(evaluations, finetune))
    for filename, rows in plot_tables(evaluations).items():
        write_csv(PLOTS_DIR / filename, rows)
    image_of = images_by_id(ImageStore(PREPARED_DIR, split), ids, f"{PREPARED_DIR}/{split}")
    gallery = draw_gallery(
        [(f"{e.name}: {len(e.mistakes)} most confident of {e.n_mistakes} mistakes "
          f"on {e.metrics['n_images']} {split} images", e.mistakes) for e in evaluations],
        image_of)
    save_png(gallery, PLOTS_DIR / GALLERY_FILE)
    with atomic_output(SUMMARY) as tmp:
        tmp.write_text(summary_markdown(evaluations, finetune, PLOTS_DIR.as_posix()),
                       encoding="utf-8")
    for e in evaluations:
        log.info("%s on %s: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f, ECE %.4f",
                 e.name, split, e.metrics["accuracy"], e.metrics["balanced_accuracy"],
                 e.metrics["macro_f1"], e.metrics["ece"])
    log.info("summary: %s; plots: dvc plots show", SUMMARY)


if __name__ == "__main__":
    run_stage(main)
