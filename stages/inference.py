"""The trained classifier as one piece, for new images: backbone + head + preprocessing.

Everything is rebuilt from the pipeline's outputs: the backbone and weights named in the
embedding meta (their checksum must still match), the preprocessing recorded there, and the
head's plain arrays. Used by ``predict`` and ``export``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from stages.backbones import (
    Backbone,
    Preprocessing,
    embed_batches,
    load_backbone,
    weights_argument,
)
from stages.embeddings import EmbeddingMeta
from stages.errors import PipelineError
from stages.heads import Head, load_head_for


class Predictor(Protocol):
    """What predict and evaluate need of a model: class probabilities for RGB images."""

    name: str
    classes: list[str]

    @property
    def short_side(self) -> int: ...

    def predict_proba(self, images: Sequence[np.ndarray],
                      batch_size: int = 8) -> Iterator[np.ndarray]: ...


@dataclass
class Classifier:
    """Frozen backbone, then the head: RGB uint8 images in, class probabilities out."""

    backbone: Backbone
    head: Head
    classes: list[str]
    meta: EmbeddingMeta

    name = "head"

    @property
    def short_side(self) -> int:
        """New images are first downscaled like the training images were."""
        return self.meta.short_side

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 8,
                      device: torch.device | None = None) -> Iterator[np.ndarray]:
        """Class probabilities, batch by batch, columns in the order of ``classes``."""
        for features in embed_batches(self.backbone, images, batch_size, device,
                                      precision=self.meta.precision,
                                      flip_average=self.meta.flip_average, desc="predict"):
            yield self.head.predict_proba_all(features, len(self.classes))


MODEL_CHOICES = ("auto", "head", "finetune")


def load_predictor(model: str, embeddings_dir: Path, head_path: Path,
                   finetune_dir: Path) -> Predictor:
    """The model to classify with: ``head`` (frozen backbone + probe), ``finetune`` (the
    fine-tuned network), or ``auto``: the fine-tuned one when the pipeline trained one."""
    trained = (finetune_dir / "model.json").is_file()
    if model == "finetune" and not trained:
        raise PipelineError(f"{finetune_dir}: no fine-tuned model (finetune.enabled is false "
                            "or the stage has not run); use --model head, or run "
                            "`dvc exp run -S finetune.enabled=true`")
    if model == "finetune" or (model == "auto" and trained):
        from stages.finetuning import load_finetuned

        return load_finetuned(finetune_dir)
    return load_classifier(embeddings_dir, head_path)


def load_classifier(embeddings_dir: Path, head_path: Path) -> Classifier:
    meta = EmbeddingMeta.read(embeddings_dir)
    head, classes = load_head_for(head_path, meta)
    return Classifier(backbone_of(meta), head, classes, meta)


def backbone_of(meta: EmbeddingMeta) -> Backbone:
    """The backbone that made the embeddings, with their preprocessing; refused if its
    weights changed since."""
    backbone = load_backbone(meta.backbone, weights_argument(meta.weights))
    if meta.weights_sha256 and backbone.weights_sha256 != meta.weights_sha256:
        raise PipelineError(f"the weights of {meta.backbone} ({meta.weights}) changed since the "
                            "embeddings were extracted; run `dvc repro` first")
    try:
        backbone.preprocessing = Preprocessing.from_dict(meta.preprocessing)
    except (KeyError, TypeError, ValueError) as err:
        raise PipelineError(f"the embedding meta's preprocessing is damaged ({err!r}); re-run "
                            "the extract stage: dvc repro --force extract") from err
    return backbone
