"""What a model must offer to classify new images (``Predictor``; ``Embedder`` for a
frozen-backbone one), which model ``--model`` names, and the familiarity check, without
PyTorch: ``transfer.inference`` builds the models on it, and so does
``transfer.warm_head.WarmClassifier``, which runs without PyTorch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from transfer.artifacts import read_json
from transfer.audit import Familiarity
from transfer.embeddings import EmbeddingMeta
from transfer.errors import PipelineError

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """What predict and evaluate need of a model: class probabilities for RGB images."""

    name: str
    classes: list[str]

    @property
    def short_side(self) -> int: ...

    def predict_proba(self, images: Sequence[np.ndarray],
                      batch_size: int = 8) -> Iterator[np.ndarray]: ...


@runtime_checkable
class Embedder(Predictor, Protocol):
    """A frozen-backbone classifier: its embeddings of images, as the cache holds them, and
    the head's probabilities of embeddings."""

    meta: EmbeddingMeta

    def embed(self, images: Sequence[np.ndarray],
              batch_size: int = 8) -> Iterator[np.ndarray]: ...

    def probabilities(self, features: np.ndarray) -> np.ndarray: ...


@dataclass
class FamiliarityCheck:
    """The audit's familiarity reference, and the frozen-backbone classifier whose embeddings
    it compares."""

    reference: Familiarity
    embedder: Embedder


def predict_batches(predictor: Predictor, images: Sequence[np.ndarray], batch_size: int,
                    familiarity: FamiliarityCheck | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray | list[None]]]:
    """Per batch, the class probabilities and which images are unfamiliar (None each where
    not checked). The head's own embeddings are compared; a fine-tuned model's images are
    embedded by the frozen backbone as well."""
    if familiarity is None:
        for probabilities in predictor.predict_proba(images, batch_size):
            yield probabilities, [None] * len(probabilities)
    elif predictor is familiarity.embedder:
        for features in familiarity.embedder.embed(images, batch_size):
            yield (familiarity.embedder.probabilities(features),
                   familiarity.reference.unfamiliar(features))
    else:
        yield from zip(predictor.predict_proba(images, batch_size),
                       map(familiarity.reference.unfamiliar,
                           familiarity.embedder.embed(images, batch_size)), strict=True)


def chosen_model(model: str, finetune_dir: Path) -> str:
    """Which model ``--model`` names: ``head`` (frozen backbone + probe), ``finetune`` (the
    fine-tuned network), or for ``auto`` the fine-tuned one when the pipeline trained one and
    kept an epoch after its start."""
    trained = (finetune_dir / "model.json").is_file()
    if model == "finetune" and not trained:
        raise PipelineError(f"{finetune_dir}: no fine-tuned model (finetune.enabled is false "
                            "or the stage has not run); use --model head, or run "
                            "`dvc exp run -S finetune.enabled=true`")
    if model == "auto" and trained and kept_its_start(finetune_dir):
        log.info("model auto: the head, since fine-tuning kept the network it started from "
                 "(epoch 0); --model finetune takes that network")
        trained = False
    return "finetune" if model == "finetune" or (model == "auto" and trained) else "head"


def check_familiarity(predictor: Predictor, reference_path: Path, embeddings_dir: Path,
                      embedder: Callable[[], Embedder]) -> FamiliarityCheck | None:
    """What tells unfamiliar images apart, or None (with a line saying why) where the audit
    has not run or ran on other embeddings than those in ``embeddings_dir``. A head model
    compares its own embeddings; for another model ``embedder`` gives the one that does."""
    if not reference_path.is_file():
        log.debug("%s missing: files are not checked for being unfamiliar (run: dvc repro "
                  "audit)", reference_path)
        return None
    reference = Familiarity.load(reference_path)
    own = predictor if isinstance(predictor, Embedder) else embedder()
    if not reference.matches(own.meta):
        log.warning("%s was made from other embeddings than %s: files are not checked for "
                    "being unfamiliar (run: dvc repro audit)", reference_path, embeddings_dir)
        return None
    return FamiliarityCheck(reference, own)


def kept_its_start(finetune_dir: Path) -> bool:
    """Whether the fine-tuned model in ``finetune_dir`` is the network fine-tuning started from
    (no epoch scored better on validation): the probe's own predictions, when it started from
    the head, under a temperature fitted on a validation split it may have got all right.
    A description that cannot be read says no, so that loading it says what is wrong."""
    try:
        return int(read_json(finetune_dir / "model.json")["best_epoch"]) == 0
    except (PipelineError, OSError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return False
