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
from typing import TYPE_CHECKING, Any

import numpy as np

from transfer.embeddings import EmbeddingMeta
from transfer.heads import Head, load_head_for
from transfer.warm import META_FIELDS, WarmExtraction, warm_extraction, write_record

if TYPE_CHECKING:
    from transfer.inference import Classifier

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


def fields_differing(record_meta: dict[str, Any], meta: EmbeddingMeta) -> list[str]:
    """The fields of a warm record's meta (``transfer.warm.META_FIELDS``) that differ from
    those of the embedding meta ``meta``: none when that record's backbone made them."""
    made_by = asdict(meta)
    return [key for key in META_FIELDS if record_meta[key] != made_by[key]]


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
    differing = fields_differing(extraction.meta, meta)
    if differing:
        log.debug("the warm record's %s differ from %s/meta.json: loading the backbone",
                  ", ".join(differing), embeddings_dir)
        return None
    head, classes = load_head_for(head_path, meta)
    return WarmClassifier(extraction, head, classes, meta)


def leave_record(classifier: Classifier, params: Any, store_root: Path) -> None:
    """After the head model was loaded with PyTorch, write the warm record ``extract`` writes
    for the backbone ``params`` (the same record, tested), where it ran on ONNX Runtime and
    made the embeddings the head was trained on: the next ``predict`` then starts without
    PyTorch, also in a clone whose embeddings came from ``dvc pull`` and never ran
    ``extract``."""
    import torch

    from transfer.backbones import resolve_batch_size
    from transfer.extraction import Extraction
    from transfer.runtime import inference_runtime

    backbone = classifier.backbone
    runtime = inference_runtime(classifier.meta.precision)
    encoder = classifier.encoder(runtime)
    if params.store_max_gb <= 0 or not encoder.graph_sha256 or backbone.weights_file is None:
        return
    batch_size = resolve_batch_size(backbone, params.batch_size, runtime)
    extraction = Extraction(backbone, encoder, runtime, batch_size, params.flip_average)
    fields = extraction.meta_fields()
    if fields_differing(fields, classifier.meta):
        return  # params.yaml names another backbone configuration than the head's
    write_record(store_root, params, configuration=extraction.configuration(), meta=fields,
                 weights_file=backbone.weights_file, graph_sha256=encoder.graph_sha256,
                 batch_size=batch_size, threads=torch.get_num_threads())
