"""``head.C: auto`` on few photos per class, against every C of its grid in hindsight.

For each embedding cache given (a copy of a project's ``data/embeddings``, e.g. of real photos)
and each ``--per-class`` n, it keeps n training images of every class and about n x 0.15/0.7
validation images of every class (what the default 70/15/15 split leaves a set of that size),
chosen at random with each of ``--seeds`` seeds, so the search cross-validates on the training
split as it does for a small set. The head is fitted as train_head fits it (the search, then the
temperature on the held-out scores) with ``head.C: auto`` and with each C of the grid as a
number, and scored on the cache's whole test split. Prints, per cache and n, the means over the
seeds: test accuracy, log loss and ECE of auto (with the C it chose at each seed), and of each
C of the grid, the best in hindsight marked.

    python -m benchmarks.head_few_shot DIR [DIR ...] [--per-class 5 10 25] [--seeds 3]
                                       [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from transfer.embeddings import EmbeddingMeta, load_split
from transfer.head_search import C_GRID
from transfer.head_training import LogisticTrainer, calibrate_head
from transfer.heads import LogisticHead
from transfer.metrics import calibration_metrics
from transfer.params import HeadParams

VALIDATION_SHARE = 0.15 / 0.7  # validation images per training image under the default split


def subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_class`` rows of each class, drawn by ``rng``, in row order."""
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rows.append(rng.choice(members, min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(rows))


def test_scores(head: LogisticHead, X: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    probabilities = head.predict_proba(X)
    columns = np.searchsorted(head.classes_, y)
    metrics = calibration_metrics(columns, probabilities)
    accuracy = float((probabilities.argmax(axis=1) == columns).mean())
    return accuracy, metrics["log_loss"], metrics["ece"]


def load_splits(directory: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The cache's train, val and test split: (float32 features, labels) each."""
    splits = []
    for split in ("train", "val", "test"):
        features, labels, _ = load_split(directory, split)
        splits.append((np.asarray(features, dtype=np.float32), labels))
    return splits


def measure(directory: Path, per_class: int, seeds: int) -> None:
    classes = EmbeddingMeta.read(directory).classes
    (X, y), (X_val, y_val), (X_test, y_test) = load_splits(directory)
    values = ["auto", *C_GRID]
    scores = {value: [] for value in values}
    chosen = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        rows = subset(y, per_class, rng)
        val_rows = subset(y_val, max(1, round(per_class * VALIDATION_SHARE)), rng)
        for value in values:
            trainer = LogisticTrainer(HeadParams(C=value), seed, classes)
            fitted = trainer.fit(X[rows], y[rows], X_val[val_rows], y_val[val_rows])
            calibrate_head(fitted)
            scores[value].append(test_scores(fitted.head, X_test, y_test))
            if value == "auto":
                chosen.append(fitted.head.C)
    print_means(f"{directory}: {per_class} training images a class, {seeds} seeds, "
                f"test split {len(y_test)} images", scores, chosen)


def print_means(title: str, scores: dict[str | float, list[tuple[float, ...]]],
                chosen: list[float],
                columns: tuple[str, ...] = ("test accuracy", "test log loss", "test ECE"),
                parameter: str = "C") -> None:
    """A markdown table of the mean scores (``columns``, the log loss second) of each value
    tried: ``auto`` with the value it chose at each seed, a number as that value of
    ``parameter`` (the best in hindsight, by log loss, marked), any other name as it is."""
    means = {value: np.mean(rows, axis=0) for value, rows in scores.items()}
    best = min((value for value in scores if isinstance(value, float)),
               key=lambda value: means[value][1])
    print(f"\n{title}")
    print(f"| {parameter} | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for value, row in means.items():
        if value == "auto":
            name = "auto (" + ", ".join(f"{c:g}" for c in chosen) + ")"
        elif isinstance(value, float):
            name = f"{value:g}" + (" (best in hindsight)" if value == best else "")
        else:
            name = value
        print(f"| {name} | " + " | ".join(f"{cell:.4f}" for cell in row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", type=Path, nargs="+")
    parser.add_argument("--per-class", type=int, nargs="+", default=[5, 10, 25])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with threadpool_limits(args.threads):
        for directory in args.embeddings:
            for per_class in args.per_class:
                measure(directory, per_class, args.seeds)


if __name__ == "__main__":
    main()
