"""The trained classifier as one piece, for new images: backbone + head + preprocessing.

Everything is rebuilt from the pipeline's outputs: the backbone and weights named in the
embedding meta (their checksum must still match), the preprocessing recorded there, and the
head's plain arrays. Used by ``predict`` and ``export``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.backbones import Backbone, Preprocessing, embed_batches, load_backbone
from stages.embeddings import EmbeddingMeta
from stages.errors import PipelineError
from stages.heads import LogisticHead


@dataclass
class Classifier:
    """Frozen backbone, then the head: RGB uint8 images in, class probabilities out."""

    backbone: Backbone
    head: LogisticHead
    classes: list[str]
    meta: EmbeddingMeta

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 8,
                      device: torch.device | None = None) -> Iterator[np.ndarray]:
        """Class probabilities, batch by batch, columns in the order of ``classes``."""
        for features in embed_batches(self.backbone, images, batch_size, device,
                                      precision=self.meta.precision,
                                      flip_average=self.meta.flip_average, desc="predict"):
            yield self.head.predict_proba_all(features, len(self.classes))


def load_classifier(embeddings_dir: Path, head_path: Path) -> Classifier:
    meta = EmbeddingMeta.read(embeddings_dir)
    head, classes = LogisticHead.load(head_path)
    backbone = load_backbone(meta.backbone, _weights_argument(meta.weights))
    if meta.weights_sha256 and backbone.weights_sha256 != meta.weights_sha256:
        raise PipelineError(f"the weights of {meta.backbone} ({meta.weights}) changed since the "
                            "embeddings were extracted; run `dvc repro` first")
    backbone.preprocessing = Preprocessing.from_dict(meta.preprocessing)
    return Classifier(backbone, head, classes, meta)


def _weights_argument(weights_id: str) -> str | None:
    """Turn the weights id recorded at extraction back into ``load_backbone``'s argument."""
    kind, _, value = weights_id.partition(":")
    if kind == "file":
        return value
    if kind == "torchvision":
        return value.rpartition(".")[2]  # "ResNet50_Weights.IMAGENET1K_V2" -> the enum name
    return None  # packaged or hub weights: the model's own
