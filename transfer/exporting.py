"""Writing a model as one file for use outside the pipeline (``export_model``): ONNX for ONNX
Runtime, TorchScript for PyTorch; ``transfer.exported`` describes the file and runs it.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from transfer.artifacts import atomic_output
from transfer.backbones import Normalized
from transfer.engines import export_onnx
from transfer.exported import METADATA_FILE, resize_steps, torchscript_deprecation_said
from transfer.inference import Classifier, FinetunedModel
from transfer.network import FlipAveraged

log = logging.getLogger(__name__)


class SoftmaxClassifier(torch.nn.Module):
    """A network that gives class scores, divided by a temperature, then a softmax."""

    def __init__(self, net: torch.nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(images) / self.temperature, dim=1)


def head_network(classifier: Classifier) -> torch.nn.Module:
    """The frozen encoder, then the head's linear layers with ReLUs between (standardization
    folded into the first, the temperature into the last), the last with a row per class the
    head knows, in ``head.classes_`` order."""
    head = classifier.head
    layers = head.layers(len(classifier.classes))
    rows = head.classes_.astype(int)
    encoder = classifier.backbone.encoder
    # backbone.flip_average: the embedding of each image and its mirror image, averaged
    modules: list[torch.nn.Module] = [FlipAveraged(encoder) if classifier.meta.flip_average
                                      else encoder]
    for i, (weight, bias) in enumerate(layers):
        last = i == len(layers) - 1
        weight, bias = (weight[rows], bias[rows]) if last else (weight, bias)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        modules += [linear] if last else [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*modules)


def exportable(model: Classifier | FinetunedModel) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module to trace, uint8 pixels in, and the metadata to embed, for the head or the
    fine-tuned model."""
    if isinstance(model, Classifier):
        meta = model.meta
        net, temperature = head_network(model), 1.0  # the head's is in its last layer
        preprocessing, short_side = model.backbone.preprocessing, meta.short_side
        described = {"model": "head", "temperature": model.head.temperature_,
                     "flip_average": meta.flip_average, "backbone": meta.backbone,
                     "weights": meta.weights, "weights_sha256": meta.weights_sha256,
                     # the head's rows (head_network) are in head.classes_ order
                     "classes": [model.classes[int(i)] for i in model.head.classes_]}
    else:
        info = model.info
        net, temperature = model.scorer, model.temperature
        preprocessing, short_side = model.preprocessing, model.short_side
        described = {"model": "finetune", "temperature": temperature,
                     "flip_average": bool(info.get("flip_average")),
                     "backbone": info["backbone"],
                     "weights": f"fine-tuned from {info['weights']} ({info['strategy']})",
                     "classes": list(model.classes)}
    _, height, width = preprocessing.input_size
    metadata = {
        **described,
        "input": f"uint8 (N, 3, {height}, {width}) RGB pixels, resized and centre-cropped as "
                 "'resize' says; the float conversion, normalization, flip averaging and "
                 "temperature are inside",
        "output": "calibrated class probabilities (N, len(classes)), in the order of 'classes'",
        "resize": resize_steps(preprocessing, short_side),
        "preprocessing": preprocessing.to_dict()}
    module = Normalized(net, preprocessing, channels_first=True)
    return SoftmaxClassifier(module, temperature), metadata


def export_model(model: Classifier | FinetunedModel, fmt: str, path: Path) -> dict[str, Any]:
    """Write ``model`` as ONNX or TorchScript (``fmt``) to ``path``; returns the metadata
    embedded in it."""
    module, metadata = exportable(model)
    module = module.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros((2, *metadata["preprocessing"]["input_size"]), dtype=torch.uint8)
    text = json.dumps(metadata, sort_keys=True)
    with atomic_output(path) as tmp, torch.inference_mode(False), torch.no_grad():
        if fmt == "torchscript":
            log.warning("PyTorch deprecates TorchScript; the ONNX format (export.format: "
                        "onnx) is the one to build on")
            with torchscript_deprecation_said():
                traced = torch.jit.trace(module, example)
                # Saved through a buffer: a file's archive takes its (temporary) name, which
                # would make two exports of one model differ.
                buffer = io.BytesIO()
                torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: text})
            tmp.write_bytes(_without_debug_records(buffer.getvalue()))
        else:
            export_onnx(module, example, tmp, output_name="probabilities",
                        metadata={METADATA_FILE: text})
    return metadata


def _without_debug_records(archive: bytes) -> bytes:
    """A TorchScript archive without its ``*.debug_pkl`` records: the traced source lines,
    with the absolute paths of this checkout and of site-packages, which would make an export
    from another folder (a queued experiment's copy of the workspace) other bytes and name the
    folders of whoever exported it. Loading needs none of them; the archive's
    ``serialization_id`` is written anew from what is left."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(archive))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name in reader.get_all_records():
        if not name.endswith(".debug_pkl") and name != ".data/serialization_id":
            record = reader.get_record(name)
            writer.write_record(name, record, len(record))
    writer.write_end_of_file()
    return out.getvalue()
