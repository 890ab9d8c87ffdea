"""How well ``predict``'s ``unfamiliar`` flag tells photos of the project's kind from others.

For a project that has run ``dvc repro`` (``models/familiarity.npz``, ``models/head.npz``,
``data/embeddings/``), its test split is the photos of its kind that neither the reference
nor the threshold saw; every labelled photo of each other project given (embedded by the
same backbone, weights and preprocessing) is a photo of another kind. Prints, per other
project, the share of each flagged ``unfamiliar`` (on the test split: false alarms, about
1 - ``audit.unfamiliar_percentile`` / 100 expected), the area under the ROC curve of the
familiarity distance as a score for "another kind", against that of the head's own doubt
(1 - its top calibrated probability, the usual baseline), and the share of the other photos
the head is sure of (top probability at least 0.9): what ``--min-confidence`` alone would let
through.

    python -m benchmarks.unfamiliar PROJECT OTHER [OTHER ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from transfer.audit import Familiarity, embeddings_identity
from transfer.embeddings import EmbeddingMeta, load_split
from transfer.errors import PipelineError
from transfer.heads import load_head

SURE = 0.9


def embeddings(project: Path, splits: tuple[str, ...]) -> tuple[EmbeddingMeta, np.ndarray]:
    directory = project / "data" / "embeddings"
    meta = EmbeddingMeta.read(directory)
    rows = [np.asarray(load_split(directory, split)[0], dtype=np.float32) for split in splits]
    return meta, np.concatenate(rows)


def scores(familiarity: Familiarity, head, features: np.ndarray) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """The familiarity distance and the head's top calibrated probability of each row."""
    return familiarity.distances(features), head.predict_proba(features).max(axis=1)


def measure(project: Path, others: list[Path]) -> None:
    familiarity = Familiarity.load(project / "models" / "familiarity.npz")
    head, _ = load_head(project / "models" / "head.npz")
    _, test = embeddings(project, ("test",))
    in_distance, in_top = scores(familiarity, head, test)
    print(f"{project}: threshold {familiarity.threshold:.4f} (audit.unfamiliar_percentile "
          f"{familiarity.percentile:g}); {len(test)} test photos, "
          f"{np.mean(in_distance > familiarity.threshold):.4f} flagged unfamiliar")
    print("| other photos | photos | flagged unfamiliar | ROC AUC, familiarity distance | "
          f"ROC AUC, 1 - top probability | head's top probability >= {SURE} |")
    print("|---|---:|---:|---:|---:|---:|")
    for other in others:
        meta, features = embeddings(other, ("train", "val", "test"))
        if embeddings_identity(meta) != familiarity.embeddings:
            raise PipelineError(f"{other}: its embeddings come from another backbone, weights "
                                f"or preprocessing than {project}'s; they cannot be compared")
        distance, top = scores(familiarity, head, features)
        labels = np.r_[np.zeros(len(test)), np.ones(len(features))]
        print(f"| {other} | {len(features)} | {np.mean(distance > familiarity.threshold):.4f} | "
              f"{roc_auc_score(labels, np.r_[in_distance, distance]):.4f} | "
              f"{roc_auc_score(labels, np.r_[1 - in_top, 1 - top]):.4f} | "
              f"{np.mean(top >= SURE):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    args = parser.parse_args()
    measure(args.project, args.others)


if __name__ == "__main__":
    main()
