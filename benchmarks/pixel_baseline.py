"""The honest baseline: the same logistic-regression head on raw pixels instead of embeddings.

Uses the prepared store's own train/val/test split and the head parameters of ``params.yaml``
(``head.C: auto`` searches C on the pixels as train_head does on the embeddings), and prints it
next to the transfer result in ``metrics/evaluate.json``. Needs images of one size (the
built-in digits are all 8x8).

    python -m benchmarks.pixel_baseline
"""

from __future__ import annotations

import numpy as np

from transfer.artifacts import read_json
from transfer.data import ImageStore
from transfer.head_training import LogisticTrainer
from transfer.metrics import classification_metrics
from transfer.params import load_params


def pixels(store: ImageStore) -> np.ndarray:
    shapes = {image.shape for image in store}
    if len(shapes) != 1:
        raise SystemExit(f"images have {len(shapes)} different sizes; this baseline needs one")
    return np.stack([image.reshape(-1) for image in store]).astype(np.float64)


def main() -> None:
    params = load_params("params.yaml")
    train, val, test = (ImageStore("data/prepared", split) for split in ("train", "val", "test"))
    head = LogisticTrainer(params.head, params.seed, train.classes).fit(
        pixels(train), train.labels, pixels(val), val.labels).head
    baseline = classification_metrics(test.labels, head.predict(pixels(test)), len(test.classes))
    transfer = read_json("metrics/evaluate.json")["head"]
    print(f"{'test split, ' + str(len(test)) + ' images':32s} accuracy  balanced  macro_f1")
    for name, m in (("raw pixels + logistic regression", baseline),
                    ("frozen backbone + logistic head", transfer)):
        print(f"{name:32s} {m['accuracy']:.4f}    {m['balanced_accuracy']:.4f}    "
              f"{m['macro_f1']:.4f}")


if __name__ == "__main__":
    main()
