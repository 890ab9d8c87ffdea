"""``head.C: auto`` against the old default ``C: 1.0`` where training labels are wrong.

Real photo sets carry wrong labels, and a weakly regularised head fits them. For each embedding
cache given (a copy of a project's ``data/embeddings``) and each ``--flip`` share, that share of
the training and of the validation images is given another class, drawn at random with each of
``--seeds`` seeds. The head is fitted as train_head fits it (the search, then the temperature on
the held-out scores) with ``head.C: auto`` and with each C of the grid as a number, and ``C:
1.0`` without a temperature (the default before ``auto``). Prints, per cache and share, the
means over the seeds (auto with the C it chose at each seed, the best C in hindsight by test
log loss marked): test accuracy, log loss and ECE on the test labels as given, which say what
the head learnt of the true classes, and the log loss and ECE with the same share of the test
labels flipped too, as the temperature fitted on flipped validation labels expects.

    python -m benchmarks.head_label_noise DIR [DIR ...] [--flip 0.1 0.3] [--seeds 3]
                                          [--kind logistic|mlp] [--clean-validation]
                                          [--threads 1]

``--kind mlp`` does the same for the MLP head's ``head.alpha`` (the old default 1e-4);
``--clean-validation`` flips the training labels only, as for a curated validation split.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.head_few_shot import load_splits, print_means, test_scores
from transfer.embeddings import EmbeddingMeta
from transfer.head_training import HEAD_TRAINERS, calibrate_head
from transfer.params import HeadParams

# Each head kind's value before ``auto`` became its default.
OLD_DEFAULT = {"logistic": 1.0, "mlp": 1e-4}


def flipped(labels: np.ndarray, share: float, n_classes: int,
            rng: np.random.Generator) -> np.ndarray:
    """``labels`` with ``share`` of them (at random) moved to another class, drawn uniformly."""
    noisy = labels.copy()
    rows = rng.choice(len(labels), round(share * len(labels)), replace=False)
    noisy[rows] = (labels[rows] + rng.integers(1, n_classes, len(rows))) % n_classes
    return noisy


def measure(directory: Path, share: float, seeds: int, kind: str,
            clean_validation: bool = False) -> None:
    classes = EmbeddingMeta.read(directory).classes
    (X, y), (X_val, y_val), (X_test, y_test) = load_splits(directory)
    trainer = HEAD_TRAINERS[kind]
    before = f"{OLD_DEFAULT[kind]:g} without T (the old default)"
    values = [before, "auto", *trainer.auto_grid]
    scores = {value: [] for value in values}
    chosen = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        y_noisy = flipped(y, share, len(classes), rng)
        # Drawn even where left unused, so the training and test flips are the same either way.
        y_val_noisy = flipped(y_val, share, len(classes), rng)
        if clean_validation:
            y_val_noisy = y_val
        y_test_noisy = flipped(y_test, share, len(classes), rng)
        for value in values:
            params = HeadParams(kind=kind, **{trainer.parameter: OLD_DEFAULT[kind]
                                              if value == before else value})
            fitted = trainer(params, seed, classes).fit(X, y_noisy, X_val, y_val_noisy)
            if value != before:
                calibrate_head(fitted)
            scores[value].append(test_scores(fitted.head, X_test, y_test)
                                 + test_scores(fitted.head, X_test, y_test_noisy)[1:])
            if value == "auto":
                chosen.append(getattr(fitted.head, trainer.parameter))
    flipped_splits = "training" if clean_validation else "training and validation"
    print_means(f"{directory}: {kind} head, {share:.0%} of {flipped_splits} labels flipped, "
                f"{seeds} seeds, test split {len(y_test)} images", scores, chosen,
                ("test accuracy", "test log loss", "test ECE", "log loss (test flipped too)",
                 "ECE (test flipped too)"), trainer.parameter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", type=Path, nargs="+")
    parser.add_argument("--flip", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kind", choices=tuple(HEAD_TRAINERS), default="logistic")
    parser.add_argument("--clean-validation", action="store_true",
                        help="flip the training labels only (a curated validation split)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with threadpool_limits(args.threads):
        for directory in args.embeddings:
            for share in args.flip:
                measure(directory, share, args.seeds, args.kind, args.clean_validation)


if __name__ == "__main__":
    main()
