"""DVC stage ``evaluate``: score every trained model on the held-out split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.artifacts import read_json, write_csv, write_json
from stages.data import ImageStore
from stages.embeddings import load_split
from stages.errors import run_stage
from stages.heads import LogisticHead
from stages.metrics import classification_metrics, per_class_metrics, prediction_rows
from stages.params import load_params

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
EMBEDDINGS_DIR = Path("data/embeddings")
HEAD_PATH = Path("models/head.npz")
FINETUNE_DIR = Path("models/finetune")
FINETUNE_STATUS = FINETUNE_DIR / "status.json"
PREPARED_DIR = Path("data/prepared")
METRICS = Path("metrics/evaluate.json")
REPORT = Path("reports/evaluate.json")
HEAD_PREDICTIONS = Path("plots/head_predictions.csv")


def main() -> None:
    params = load_params(PARAMS)
    split = params.evaluate.split
    head, classes = LogisticHead.load(HEAD_PATH)
    features, y_true, ids = load_split(EMBEDDINGS_DIR, split)
    y_pred = head.predict(features)
    metrics = {"head": {"split": split, **classification_metrics(y_true, y_pred, len(classes))}}
    report = {"head": {"per_class": per_class_metrics(y_true, y_pred, classes)}}
    finetune = read_json(FINETUNE_STATUS)
    if finetune["status"] == "trained":
        from stages.finetuning import load_finetuned

        model = load_finetuned(FINETUNE_DIR)
        store = ImageStore(PREPARED_DIR, split)
        probabilities = np.concatenate(list(model.predict_proba(store)))
        tuned_pred = probabilities.argmax(axis=1)
        metrics["finetune"] = {"split": split, **classification_metrics(
            store.labels, tuned_pred, len(classes))}
        report["finetune"] = {"per_class": per_class_metrics(store.labels, tuned_pred, classes)}
    write_json(METRICS, metrics)
    write_json(REPORT, {**report, "finetune_status": finetune})
    write_csv(HEAD_PREDICTIONS, prediction_rows(ids, y_true, y_pred, classes))
    log.info("head on %s: accuracy %.4f, balanced accuracy %.4f, macro F1 %.4f", split,
             metrics["head"]["accuracy"], metrics["head"]["balanced_accuracy"],
             metrics["head"]["macro_f1"])


if __name__ == "__main__":
    run_stage(main)
