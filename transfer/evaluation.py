"""Score one model from its class probabilities; gather what the plots and reports show.

A model enters evaluation only as a probability matrix on the evaluation split (one row per
image, one column per class in label order), so the head and a fine-tuned network are scored
by the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from transfer.errors import PipelineError, counted
from transfer.layout import (
    EVALUATE_METRICS,
    EVALUATE_REPORT,
    FINETUNE_CURVES,
    FINETUNE_STATUS_KEY,
    HEADLINE_METRICS,
)
from transfer.metrics import (
    CALIBRATION_BINS,
    calibration_bins,
    confusion_rows,
    micro_precision_recall_curve,
    micro_roc_curve,
    most_confused,
    probability_metrics,
)

# How many of a model's most confident mistakes the gallery shows.
GALLERY_SIZE = 12

# The plot tables evaluate writes under plots/evaluate/, one row per model and item, and what
# each shows (for the summary).
PLOT_FILES = {
    "confusion.csv": "confusion matrix, each row (true class) normalised to 1",
    "per_class_f1.csv": "F1 of every class, weakest first",
    "calibration.csv": f"reliability diagram: accuracy against confidence in "
                       f"{CALIBRATION_BINS} equal-width bins, with image counts",
    "roc.csv": "ROC curve, micro-averaged one-vs-rest",
    "precision_recall.csv": "precision-recall curve, micro-averaged one-vs-rest",
}
GALLERY_FILE = "mistakes.png"

# The columns of the summary table, in order, with their headings.
SUMMARY_COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                   "macro_f1": "macro F1", "weighted_f1": "weighted F1",
                   "top5_accuracy": "top-5 accuracy", "log_loss": "log loss",
                   "ece": "calibration error (ECE)", "roc_auc_macro": "ROC AUC (macro)"}


@dataclass(frozen=True)
class Mistake:
    """One wrongly classified image of the evaluation split."""

    id: str
    actual: str
    predicted: str
    confidence: float


@dataclass(frozen=True)
class ModelEvaluation:
    """Everything evaluate writes about one model."""

    name: str
    metrics: dict
    confusion: list[dict]
    calibration: list[dict]
    roc: list[dict]
    precision_recall: list[dict]
    most_confused: list[dict]
    mistakes: list[Mistake]
    n_mistakes: int

    @property
    def headline(self) -> dict[str, float]:
        """The model's entry in metrics/evaluate.json."""
        return {key: self.metrics[key] for key in HEADLINE_METRICS}


def evaluate_model(name: str, y_true: np.ndarray, probabilities: np.ndarray,
                   class_names: Sequence[str], ids: Sequence[str], split: str,
                   gallery_size: int = GALLERY_SIZE,
                   uncalibrated: np.ndarray | None = None) -> ModelEvaluation:
    """Score ``probabilities`` (images x classes, label order) against ``y_true``; the
    model's probabilities before its temperature, when given as ``uncalibrated``, add their
    log loss and calibration error.

    Raises ``PipelineError`` when the shapes do not fit the split and the class list.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_true = np.asarray(y_true)
    expected = (len(y_true), len(class_names))
    if probabilities.shape != expected or len(ids) != len(y_true):
        raise PipelineError(f"model '{name}': {probabilities.shape[0]} x "
                            f"{probabilities.shape[1] if probabilities.ndim == 2 else '?'} "
                            f"probabilities and {len(ids)} ids for a {split} split of "
                            f"{expected[0]} images and {expected[1]} classes")
    y_pred = np.argmax(probabilities, axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    # Most confident first; ties by id, so the gallery is the same on every run.
    order = sorted(wrong, key=lambda i: (-confidence[i], str(ids[i])))
    mistakes = [Mistake(str(ids[i]), class_names[y_true[i]], class_names[y_pred[i]],
                        float(confidence[i])) for i in order[:gallery_size]]
    return ModelEvaluation(
        name=name,
        metrics={"split": split, **probability_metrics(y_true, probabilities, class_names,
                                                       uncalibrated)},
        confusion=confusion_rows(y_true, y_pred, class_names),
        calibration=calibration_bins(y_true, probabilities),
        roc=micro_roc_curve(y_true, probabilities),
        precision_recall=micro_precision_recall_curve(y_true, probabilities),
        most_confused=most_confused(y_true, y_pred, class_names),
        mistakes=mistakes,
        n_mistakes=len(wrong),
    )


def plot_tables(evaluations: Sequence[ModelEvaluation]) -> dict[str, list[dict]]:
    """The rows of each file in ``PLOT_FILES``, every row tagged with its model's name."""
    tables: dict[str, list[dict]] = {name: [] for name in PLOT_FILES}
    for e in evaluations:
        model = {"model": e.name}
        tables["confusion.csv"] += [{**model, **row} for row in e.confusion]
        tables["per_class_f1.csv"] += [
            {**model, "class": name, "f1": scores["f1"], "support": scores["support"]}
            for name, scores in e.metrics["per_class"].items()]
        tables["calibration.csv"] += [{**model, **row} for row in e.calibration]
        tables["roc.csv"] += [{**model, **row} for row in e.roc]
        tables["precision_recall.csv"] += [{**model, **row} for row in e.precision_recall]
    return tables


def evaluation_report(evaluations: Sequence[ModelEvaluation], finetune_status: dict) -> dict:
    """What the metrics file leaves out, per model: the other scores (per class under
    ``per_class``), confused pairs and confident mistakes; and the fine-tuning status."""
    report: dict = {e.name: {
        **{key: value for key, value in e.metrics.items() if key not in HEADLINE_METRICS},
        "n_mistakes": e.n_mistakes,
        "most_confused": e.most_confused,
        "most_confident_mistakes": [vars(m) for m in e.mistakes],
    } for e in evaluations}
    report[FINETUNE_STATUS_KEY] = finetune_status
    return report


def summary_markdown(evaluations: Sequence[ModelEvaluation], finetune_status: Mapping,
                     plots_dir: str, untrained_classes: Sequence[str] = ()) -> str:
    """``reports/summary.md``: the key numbers of this run and where to look next.

    ``untrained_classes`` (classes without a training image, which no model can predict) get
    a warning at the top.
    """
    first = evaluations[0].metrics
    columns = [key for key in SUMMARY_COLUMNS if key in first]
    finetune = finetune_status.get("status", "unknown")
    if "reason" in finetune_status:
        finetune += f" ({finetune_status['reason']})"
    if finetune == "trained":
        stopped = finetune_status.get("stop_reason")
        stopped = f"; stopped: {stopped}" if stopped else ""
        run, best = finetune_status["epochs_run"], finetune_status["best_epoch"]
        kept = f"best epoch {best} of {run} trained" if best else \
            f"{counted(run, 'epoch')}, none better on validation than the network it started " \
            "from (epoch 0), which is kept"
        finetune = f"trained ({finetune_status['strategy']}, {kept}{stopped})" if run else \
            f"no epoch trained ({finetune_status['strategy']}{stopped})"
    lines = [
        "# Evaluation summary",
        "",
        f"Models scored on the **{first['split']}** split: {first['n_images']} images, "
        f"{first['n_classes_present']} of {first['n_classes']} classes present. "
        f"Fine-tuning: {finetune}.",
        "",
        *([f"**Warning:** no training image for class {', '.join(untrained_classes)}: no "
           "model can predict it. Add training images (`reports/data.json` lists the counts "
           "per split).", ""] if untrained_classes else []),
        "| model | " + " | ".join(SUMMARY_COLUMNS[key] for key in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [f"| {e.name} | " + " | ".join(f"{e.metrics[key]:.4f}" for key in columns) + " |"
              for e in evaluations]
    lines += ["", "Higher is better except log loss and calibration error (0 is perfect).", ""]
    for e in evaluations:
        per_class = e.metrics["per_class"]
        weakest = sorted((s["f1"], name) for name, s in per_class.items() if s["support"])[:3]
        confused = ", ".join(f"{c['actual']} → {c['predicted']} ({c['count']})"
                             for c in e.most_confused[:5]) or "none"
        lines += [
            f"## {e.name}",
            "",
            f"- Mistakes: {e.n_mistakes} of {e.metrics['n_images']} images.",
            "- Weakest classes by F1: "
            + ", ".join(f"{name} ({f1:.3f})" for f1, name in weakest) + ".",
            f"- Most confused (true → predicted, images): {confused}.",
            "",
        ]
    lines += [
        "## Where to look",
        "",
        f"- `{EVALUATE_METRICS}`: the numbers experiments are compared by "
        f"({', '.join(HEADLINE_METRICS)}), per model: `dvc exp show`, `dvc metrics diff`.",
        f"- `{EVALUATE_REPORT}`: every other score, per class under `per_class`; the most "
        "confused class pairs and the most confident mistakes (image ids); the fine-tuning "
        "status.",
        *(f"- `{plots_dir}/{name}`: {what}." for name, what in PLOT_FILES.items()),
        f"- `{plots_dir}/{GALLERY_FILE}`: the most confident mistakes, with true and "
        "predicted class.",
        *([f"- `{FINETUNE_CURVES}/`: fine-tuning loss, accuracy and learning rate per epoch "
           "(the `finetune_*` plots)."] if finetune_status.get("status") == "trained"
          else []),
        "",
        "Draw the plots with `dvc plots show` (then open `dvc_plots/index.html`); compare with "
        "another commit or experiment with `dvc plots diff <rev>` and `dvc metrics diff <rev>`.",
        "",
    ]
    return "\n".join(lines)
