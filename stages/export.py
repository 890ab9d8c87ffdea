"""Export the trained classifier to one file: ``python -m stages.export --format torchscript|onnx``.

The file holds the fine-tuned network when fine-tuning ran (``--model auto``, the default),
else the frozen backbone and the head (its linear layers, standardization and temperature
folded in); a softmax; and, as metadata, the preprocessing and class names a server needs. Its
input is a batch of images already resized, cropped and normalized as the metadata says; its
output, class probabilities in the metadata's class order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from transfer.artifacts import atomic_output
from transfer.engines import export_onnx
from transfer.errors import ArgumentParser, run_stage
from transfer.inference import MODEL_CHOICES, Classifier, Predictor, load_predictor
from transfer.layout import EMBEDDINGS_DIR, EXPORT_DIR, FINETUNE_DIR, HEAD_PATH
from transfer.network import FlipAveraged

log = logging.getLogger(__name__)

OUTPUTS = {"torchscript": EXPORT_DIR / "classifier.pt", "onnx": EXPORT_DIR / "classifier.onnx"}
METADATA_FILE = "metadata.json"


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


IO_NOTE = {"input": "float32 (N, 3, H, W), RGB resized, centre-cropped and normalized per "
                    "'preprocessing'",
           "output": "class probabilities (N, len(classes))"}


def export_metadata(classifier: Classifier) -> dict[str, Any]:
    meta = classifier.meta
    classes = [classifier.classes[int(i)] for i in classifier.head.classes_]
    return {"model": "head", "classes": classes, "flip_average": meta.flip_average,
            "temperature": classifier.head.temperature_,
            "preprocessing": meta.preprocessing, "short_side": meta.short_side,
            "backbone": meta.backbone, "weights": meta.weights,
            "weights_sha256": meta.weights_sha256, **IO_NOTE}


def exportable(model: Predictor) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The module to trace and the metadata to embed, for the head or the fine-tuned model."""
    if isinstance(model, Classifier):
        return SoftmaxClassifier(head_network(model)), export_metadata(model)
    info = model.info
    return SoftmaxClassifier(model.scorer, model.temperature), {
        "model": "finetune", "classes": model.classes, "temperature": model.temperature,
        "flip_average": bool(info.get("flip_average")), "preprocessing": info["preprocessing"],
        "short_side": info["short_side"], "backbone": info["backbone"],
        "weights": f"fine-tuned from {info['weights']} ({info['strategy']})", **IO_NOTE}


def export(model: Predictor, fmt: str, path: Path) -> dict[str, Any]:
    """Write ``model`` as TorchScript or ONNX to ``path``; returns the embedded metadata."""
    module, metadata = exportable(model)
    module = module.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros((2, *metadata["preprocessing"]["input_size"]))
    with atomic_output(path) as tmp, torch.inference_mode(False), torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example)
            torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata)})
        else:
            export_onnx(module, example, tmp, output_name="probabilities",
                        metadata={METADATA_FILE: json.dumps(metadata)})
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.export",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=sorted(OUTPUTS), default="torchscript")
    parser.add_argument("--output", type=Path, help=f"file to write (default: {EXPORT_DIR}/)")
    parser.add_argument("--model", choices=MODEL_CHOICES, default="auto",
                        help="auto (default): the fine-tuned model when there is one, else "
                             "the head on the frozen backbone")
    args = parser.parse_args(argv)
    path = args.output or OUTPUTS[args.format]
    model = load_predictor(args.model, EMBEDDINGS_DIR, HEAD_PATH, FINETUNE_DIR)
    metadata = export(model, args.format, path)
    log.info("wrote %s (%s model, %s, %d classes, input %s)", path, metadata["model"],
             args.format, len(metadata["classes"]), metadata["preprocessing"]["input_size"])


if __name__ == "__main__":
    run_stage(main)
