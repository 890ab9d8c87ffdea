"""The head model without PyTorch, for ``predict`` and ``serve``.

Where the warm record of the last extraction (``transfer.warm``) describes the backbone,
weights, preprocessing and engine that made the embeddings the head was trained on, new images
are embedded through that ONNX graph by ONNX Runtime and the head scores them: the
probabilities ``transfer.inference.Classifier`` gives on ONNX Runtime, without importing
torch, timm and torchvision, which take most of ``predict``'s start-up. Kept apart from
``transfer.warm`` so that ``extract`` does not depend on the heads' code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transfer.embeddings import EmbeddingMeta
from transfer.heads import Head, load_head_for
from transfer.warm import META_FIELDS, WarmExtraction, warm_extraction

log = logging.getLogger(__name__)


@dataclass
class WarmClassifier:
    """The head model without PyTorch: the backbone's ONNX graph from a warm record, run by
    ONNX Runtime, then the head; the probabilities ``transfer.inference.Classifier`` gives on
    ONNX Runtime (tested)."""

    extraction: WarmExtraction
    head: Head
    classes: list[str]
    meta: EmbeddingMeta

    name = "head"

    @property
    def short_side(self) -> int:
        """New images are first brought to this shorter side as the training images were."""
        return self.meta.short_side

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 8) -> Iterator[np.ndarray]:
        """The images' embeddings as the cache holds them, batch by batch."""
        return self.extraction.embed(images, "predict", batch_size)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities of embeddings, columns in the order of ``classes``."""
        return self.head.predict_proba_all(features, len(self.classes))

    def predict_proba(self, images: Sequence[np.ndarray],
                      batch_size: int = 8) -> Iterator[np.ndarray]:
        """Class probabilities, batch by batch, columns in the order of ``classes``."""
        return map(self.probabilities, self.embed(images, batch_size))


def warm_classifier(params: Any, embeddings_dir: Path, head_path: Path, store_root: Path,
                    graph_cache: Path) -> WarmClassifier | None:
    """The head model in ``head_path`` without PyTorch, where the warm record for the backbone
    ``params`` describes the backbone, weights, preprocessing and engine that made the
    embeddings in ``embeddings_dir`` the head was trained on; None (the reason in the debug
    log) where there is none to use."""
    extraction = warm_extraction(params, store_root, graph_cache)
    if extraction is None:
        return None
    meta = EmbeddingMeta.read(embeddings_dir)
    made_by = asdict(meta)
    differing = [key for key in META_FIELDS if made_by[key] != extraction.meta[key]]
    if differing:
        log.debug("the warm record's %s differ from %s/meta.json: loading the backbone",
                  ", ".join(differing), embeddings_dir)
        return None
    head, classes = load_head_for(head_path, meta)
    return WarmClassifier(extraction, head, classes, meta)
