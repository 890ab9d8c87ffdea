"""The fine-tuned model without PyTorch, for ``predict`` and ``serve``.

A ``predict`` that loaded the fine-tuned network with PyTorch and ran it on ONNX Runtime
leaves a record in the ONNX graph cache (``<cache>/warm/<key>.json``), found by the SHA-256 of
the model's two files (``model.safetensors``, ``model.json``) and by what the records of
``transfer.warm`` are found by (library versions, processor, threads): the SHA-256 of the
graph that ran and its thread count. The next ``predict`` finds it, checks the graph's bytes
and runs it with ONNX Runtime, without importing torch, timm and torchvision (most of
``predict``'s start-up): the same probabilities (tested). A new model (another ``dvc repro``,
``dvc checkout``) has other files, so no record: it is loaded with PyTorch once more.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transfer.artifacts import sha256_file, write_json
from transfer.heads import softmax
from transfer.pixels import pixel_arrays
from transfer.preprocessing import Preprocessing
from transfer.warm import (
    INPUT_NAME,
    RECORDS,
    WarmMiss,
    machine_key,
    onnxruntime_session,
    sound_graph,
)

if TYPE_CHECKING:
    from transfer.inference import FinetunedModel

log = logging.getLogger(__name__)

WEIGHTS_FILE, DESCRIPTION_FILE = "model.safetensors", "model.json"


def record_path(finetune_dir: Path, description: bytes, graph_cache: Path) -> Path:
    """Where the record of the model in ``finetune_dir`` is, on this machine (``machine_key``),
    for the bytes of its ``model.json``, ``description``; a missing weights file raises
    ``OSError``."""
    files = {WEIGHTS_FILE: sha256_file(finetune_dir / WEIGHTS_FILE),
             DESCRIPTION_FILE: hashlib.sha256(description).hexdigest()}
    return graph_cache / RECORDS / f"{machine_key(finetuned=files)}.json"


@dataclass
class WarmFinetuned:
    """``transfer.inference.FinetunedModel`` on ONNX Runtime from a record: its graph (the
    network, its normalization and any mirror averaging) and the model's description."""

    info: dict[str, Any]
    graph: bytes  # its SHA-256 checked against the record's
    threads: int
    classes: list[str] = field(init=False)
    resize_crop: Any = field(init=False, repr=False)
    _session: Any = field(default=None, init=False, repr=False)

    name = "finetune"

    def __post_init__(self) -> None:
        self.classes = [str(name) for name in self.info["classes"]]
        self.resize_crop = Preprocessing.from_dict(self.info["preprocessing"]).pixel_transform()

    @property
    def short_side(self) -> int:
        """New images are first brought to this shorter side as the training images were."""
        return int(self.info["short_side"])

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", 1.0))

    def predict_proba(self, images: Sequence[np.ndarray],
                      batch_size: int = 32) -> Iterator[np.ndarray]:
        """Class probabilities with the temperature, batch by batch, as ``FinetunedModel``
        computes them on ONNX Runtime."""
        if self._session is None:
            self._session = onnxruntime_session(self.graph, self.threads)
        for batch in pixel_arrays(images, self.resize_crop, batch_size, "score", ahead=True):
            [scores] = self._session.run(None, {INPUT_NAME: batch})
            yield softmax(scores.astype(np.float64) / self.temperature)


def warm_finetuned(finetune_dir: Path, graph_cache: Path) -> WarmFinetuned | None:
    """The fine-tuned model in ``finetune_dir`` without PyTorch, where a record of it is in
    ``graph_cache`` with a sound graph; None (the reason in the debug log) otherwise."""
    try:
        description = (finetune_dir / DESCRIPTION_FILE).read_bytes()
        record = json.loads(record_path(finetune_dir, description, graph_cache).read_text(
            encoding="utf-8"))
        return WarmFinetuned(json.loads(description),
                             sound_graph(graph_cache, record["graph_sha256"]),
                             int(record["threads"]))
    except FileNotFoundError as err:
        log.debug("no warm record of %s (%s): loading it with PyTorch", finetune_dir,
                  err.filename)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, WarmMiss) as err:
        log.debug("warm record of %s not used (%s): loading it with PyTorch", finetune_dir, err)
    return None


def leave_record(model: FinetunedModel, finetune_dir: Path, graph_cache: Path) -> None:
    """After the fine-tuned model was loaded with PyTorch, compile it as its first batch would
    and, where it runs on ONNX Runtime, write the record the next ``predict`` finds it by."""
    import torch

    from transfer.runtime import resolve_runtime

    network = model.compiled(resolve_runtime())
    if network.graph_sha256 is None:
        return  # PyTorch runs it (a GPU, --engine torch, or a network ONNX cannot take)
    description = (finetune_dir / DESCRIPTION_FILE).read_bytes()
    write_json(record_path(finetune_dir, description, graph_cache),
               {"graph_sha256": network.graph_sha256, "threads": torch.get_num_threads()})
