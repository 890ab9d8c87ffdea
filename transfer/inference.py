"""The trained models as one piece each, for new images: RGB pixels in, class probabilities out.

``Classifier``: the frozen backbone and weights named in the embedding meta (their checksum
must still match), the preprocessing recorded there, and the head's plain arrays.
``FinetunedModel``: the fine-tuned network saved in ``models/finetune/`` (safetensors, no
pickle) with its ``model.json``. Used by ``evaluate``, ``predict`` and ``export``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.artifacts import read_json, write_json
from transfer.backbones import (
    Backbone,
    Preprocessing,
    backbone_of,
    compile_encoder,
    compile_on_pixels,
    embed_batches,
    load_backbone,
    pixel_batches,
)
from transfer.embeddings import EmbeddingMeta
from transfer.engines import CompiledNetwork, Engine, TorchEngine
from transfer.errors import PipelineError, first_line
from transfer.heads import Head, load_head_for, softmax
from transfer.network import FinetuneNet, FlipAveraged, build_network
from transfer.predictor import FamiliarityCheck, Predictor, check_familiarity, chosen_model
from transfer.runtime import Runtime, inference_runtime, resolve_runtime

log = logging.getLogger(__name__)


@dataclass
class Classifier:
    """Frozen backbone, then the head: RGB uint8 images in, class probabilities out. The
    backbone runs on ``engine`` (the head is a few small matrix products in NumPy)."""

    backbone: Backbone
    head: Head
    classes: list[str]
    meta: EmbeddingMeta
    engine: Engine = field(default_factory=TorchEngine)
    _encoders: dict[Runtime, CompiledNetwork] = field(default_factory=dict, init=False,
                                                      repr=False)

    name = "head"

    @property
    def short_side(self) -> int:
        """New images are first brought to this shorter side as the training images were."""
        return self.meta.short_side

    def encoder(self, runtime: Runtime) -> CompiledNetwork:
        """The backbone compiled for ``runtime`` by the engine, once per runtime."""
        if runtime not in self._encoders:
            self._encoders[runtime] = compile_encoder(self.backbone, self.engine, runtime)
        return self._encoders[runtime]

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 8,
              runtime: Runtime | None = None) -> Iterator[np.ndarray]:
        """The images' embeddings as the cache holds them, batch by batch."""
        runtime = runtime or inference_runtime(self.meta.precision)
        return embed_batches(self.encoder(runtime), images, self.backbone.preprocessing,
                             batch_size, runtime, flip_average=self.meta.flip_average,
                             desc="predict")

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities of embeddings, columns in the order of ``classes``."""
        return self.head.predict_proba_all(features, len(self.classes))

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 8,
                      runtime: Runtime | None = None) -> Iterator[np.ndarray]:
        """Class probabilities, batch by batch, columns in the order of ``classes``."""
        return map(self.probabilities, self.embed(images, batch_size, runtime))


def familiarity_check(predictor: Predictor, reference_path: Path, embeddings_dir: Path,
                      head_path: Path, engine: Engine | None = None) -> FamiliarityCheck | None:
    """What tells unfamiliar images apart, or None (with a line saying why) where the audit
    has not run or ran on other embeddings; a fine-tuned model's images are embedded by the
    head model's backbone on ``engine``."""
    return check_familiarity(predictor, reference_path, embeddings_dir,
                             lambda: load_classifier(embeddings_dir, head_path, engine))


def load_predictor(model: str, embeddings_dir: Path, head_path: Path, finetune_dir: Path,
                   engine: Engine | None = None) -> Predictor:
    """The model to classify with: ``head`` (frozen backbone + probe), ``finetune`` (the
    fine-tuned network), or ``auto``: the fine-tuned one when the pipeline trained one and
    kept an epoch after its start. Its network runs on ``engine`` (PyTorch unless given)."""
    engine = engine or TorchEngine()
    if chosen_model(model, finetune_dir) == "finetune":
        return load_finetuned(finetune_dir, engine)
    return load_classifier(embeddings_dir, head_path, engine)


def load_classifier(embeddings_dir: Path, head_path: Path,
                    engine: Engine | None = None) -> Classifier:
    meta = EmbeddingMeta.read(embeddings_dir)
    head, classes = load_head_for(head_path, meta)
    return Classifier(backbone_of(meta), head, classes, meta, engine or TorchEngine())


@dataclass
class FinetunedModel:
    """A fine-tuned network ready for new images: its preprocessing and class names."""

    net: FinetuneNet
    preprocessing: Preprocessing
    classes: list[str]
    info: dict[str, Any]
    engine: Engine = field(default_factory=TorchEngine)
    _scorers: dict[Runtime, CompiledNetwork] = field(default_factory=dict, init=False,
                                                     repr=False)
    name = "finetune"

    @property
    def short_side(self) -> int:
        """New images are first brought to this shorter side as the training images were."""
        return int(self.info["short_side"])

    @property
    def scorer(self) -> torch.nn.Module:
        """The network that gives the class scores: averaged over each image and its mirror
        when it was fine-tuned with ``finetune.flip_average``."""
        return FlipAveraged(self.net) if self.info.get("flip_average") else self.net

    @property
    def temperature(self) -> float:
        """What the scores are divided by before the softmax (fitted on the validation split;
        models saved without one: 1)."""
        return float(self.info.get("temperature", 1.0))

    def compiled(self, runtime: Runtime) -> CompiledNetwork:
        """The scorer compiled by the engine for ``runtime``, once per runtime."""
        if runtime not in self._scorers:
            label = f"fine-tuned {self.info.get('backbone', 'network')}"
            self._scorers[runtime] = compile_on_pixels(self.scorer, self.preprocessing,
                                                       self.engine, runtime, label)
        return self._scorers[runtime]

    def scores(self, images: Sequence[np.ndarray], batch_size: int = 32,
               runtime: Runtime | None = None) -> Iterator[np.ndarray]:
        """Untempered class scores (logits), batch by batch."""
        runtime = runtime or resolve_runtime()
        return network_scores(self.compiled(runtime), images, self.preprocessing, batch_size,
                              runtime)

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 32,
                      runtime: Runtime | None = None,
                      calibrated: bool = True) -> Iterator[np.ndarray]:
        """Class probabilities batch by batch; ``calibrated``: with the temperature."""
        temperature = self.temperature if calibrated else 1.0
        for scores in self.scores(images, batch_size, runtime):
            yield softmax(scores / temperature)


def network_scores(network: CompiledNetwork, images: Sequence[np.ndarray],
                   preprocessing: Preprocessing, batch_size: int,
                   runtime: Runtime) -> Iterator[np.ndarray]:
    """Class scores (float64 logits) of a network compiled with ``compile_on_pixels``, batch
    by batch, with the backbone's own eval preprocessing."""
    for batch in pixel_batches(images, preprocessing, batch_size, runtime, "score",
                               network.read_ahead):
        yield network(batch).astype(np.float64)


def save_finetuned(directory: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """``model.safetensors`` (tensors only, no pickle) and ``model.json`` into ``directory``."""
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in state.items()},
              str(directory / "model.safetensors"))
    write_json(directory / "model.json", info)


def load_finetuned(directory: str | Path, engine: Engine | None = None) -> FinetunedModel:
    """Rebuild the network recorded in ``directory/model.json`` and load its tensors; it runs
    on ``engine`` (PyTorch unless given)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    info = read_json(directory / "model.json")
    try:
        backbone = load_backbone(info["backbone"], pretrained=False)  # every tensor comes next
        net = build_network(backbone, len(info["classes"]))
        preprocessing = Preprocessing.from_dict(info["preprocessing"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PipelineError(f"{directory}/model.json: not a fine-tuned model's description "
                            f"({type(err).__name__}: {err}); re-run: dvc repro finetune") from err
    try:
        net.load_state_dict(load_file(str(directory / "model.safetensors")))
    except Exception as err:  # OSError, RuntimeError, safetensors' own error for bad bytes
        raise PipelineError(f"{directory}/model.safetensors: cannot be loaded into "
                            f"{info['backbone']} ({first_line(err)}); re-run: dvc repro "
                            "finetune") from err
    return FinetunedModel(net.eval(), preprocessing, list(info["classes"]), info,
                          engine or TorchEngine())
