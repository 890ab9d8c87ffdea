"""A model as one file for use outside the pipeline: ``export_model`` writes it (``.onnx``
for ONNX Runtime, TorchScript ``.pt`` for PyTorch), ``load_exported`` runs it from the file alone.

The file takes uint8 ``(N, 3, H, W)`` RGB pixels already resized and centre-cropped to the
input size; scaling, normalization, flip averaging and the temperature are inside it. Its
embedded ``metadata.json`` says how to resize (``resize``) and names the classes.
``ExportedModel`` does that resizing, so that ``predict`` and ``serve`` can run an exported
file exactly as they run the pipeline's own models.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.artifacts import atomic_output
from transfer.backbones import Normalized, Preprocessing, pixel_batches
from transfer.engines import INPUT_NAME, export_onnx
from transfer.errors import PipelineError, first_line
from transfer.inference import Classifier, FinetunedModel
from transfer.network import FlipAveraged
from transfer.params import EXPORT_SUFFIXES
from transfer.pixels import UPSCALE_FROM
from transfer.runtime import resolve_runtime

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"  # its name inside the model file, and beside it in models/export/


def resize_steps(preprocessing: Preprocessing, short_side: int) -> dict[str, Any]:
    """How a caller turns a photo into the exported model's input, in words and in numbers."""
    _, height, width = preprocessing.input_size
    return {
        "steps": [f"convert to RGB; if the shorter side is above {short_side} px, or at least "
                  f"{math.ceil(UPSCALE_FROM * short_side)} px, resize it to {short_side} px "
                  "(bicubic), as the training images were",
                  f"resize the shorter side to {preprocessing.resize_size} px "
                  f"({preprocessing.interpolation}, antialiased)",
                  f"centre-crop to {height} x {width} (height x width)",
                  f"feed uint8 (N, 3, {height}, {width}), channels first"],
        "short_side": short_side, "resize_size": preprocessing.resize_size,
        "interpolation": preprocessing.interpolation, "crop": [height, width]}


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
            with _torchscript_deprecation_said():
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


@dataclass
class ExportedModel:
    """An exported model file: RGB uint8 images in, calibrated class probabilities out."""

    path: Path
    metadata: dict[str, Any]
    preprocessing: Preprocessing
    run: Callable[[np.ndarray], np.ndarray]

    name = "exported"

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def short_side(self) -> int:
        return int(self.metadata["resize"]["short_side"])

    def pixel_batches(self, images: Sequence[np.ndarray],
                      batch_size: int = 8) -> Iterator[np.ndarray]:
        """The model's input for ``images`` (already brought to ``short_side``), batch by
        batch: resized and centre-cropped as the pipeline's own models are fed
        (``transfer.backbones.pixel_batches``), uint8 ``(N, 3, H, W)``."""
        runtime = resolve_runtime("cpu")  # the file runs on the CPU (ONNX Runtime or PyTorch)
        for batch in pixel_batches(images, self.preprocessing, batch_size, runtime, "predict"):
            yield batch.permute(0, 3, 1, 2).contiguous().numpy()

    def predict_proba(self, images: Sequence[np.ndarray],
                      batch_size: int = 8) -> Iterator[np.ndarray]:
        """Class probabilities, batch by batch, columns in the order of ``classes``."""
        for pixels in self.pixel_batches(images, batch_size):
            yield self.run(pixels).astype(np.float64)


def load_exported(path: str | Path) -> ExportedModel:
    """Open an exported model file (``.onnx`` or ``.pt``) and read its metadata."""
    path = Path(path)
    kind = EXPORT_SUFFIXES.get(path.suffix)
    if kind is None:
        raise PipelineError(f"{path}: not an exported model file; expected one of "
                            f"{', '.join(EXPORT_SUFFIXES)} written by python -m stages.export")
    if not path.is_file():
        beside = sorted(p.name for p in path.parent.glob("*") if p.suffix in EXPORT_SUFFIXES) \
            if path.parent.is_dir() else []
        if beside:  # exported in the other format (export.format)
            raise PipelineError(f"{path}: no such file; {path.parent} holds "
                                f"{', '.join(beside)}: pass that, or set export.format")
        raise PipelineError(f"{path}: no such file; export one with dvc exp run -S "
                            "export.enabled=true (or python -m stages.export --output FILE)")
    try:
        raw, run = _open_onnx(path) if kind == "onnx" else _open_torchscript(path)
        metadata = json.loads(raw)
        preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
        if int(metadata["resize"]["short_side"]) < 1:
            raise ValueError("resize.short_side below 1")
        classes = metadata["classes"]
        if not isinstance(classes, list) or not classes or \
                not all(isinstance(c, str) for c in classes):
            raise ValueError("no list of class names")
        if len(set(classes)) != len(classes):
            raise ValueError("a class name twice in its metadata")
        # One image of zeros through the network: its answer has a column per class name.
        _, height, width = preprocessing.input_size
        answer = np.asarray(run(np.zeros((1, 3, height, width), dtype=np.uint8)))
        if answer.ndim != 2 or answer.shape != (1, len(classes)):
            raise ValueError(f"the network answers {answer.shape} for one image, not a row "
                             f"of {len(classes)} columns for the class names in its metadata")
    except PipelineError:
        raise
    except Exception as err:  # each runtime raises its own kinds for a damaged file
        raise PipelineError(f"{path}: cannot be read as a model exported by this pipeline "
                            f"({first_line(err)}); export it again") from err
    return ExportedModel(path, metadata, preprocessing, run)


def _open_onnx(path: Path) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_FILE)
    if raw is None:
        raise PipelineError(f"{path}: an ONNX file without this pipeline's metadata; export "
                            "it with python -m stages.export")
    return raw, lambda pixels: session.run(None, {INPUT_NAME: pixels})[0]


def _open_torchscript(path: Path) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    extra = {METADATA_FILE: ""}
    with _torchscript_deprecation_said():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise PipelineError(f"{path}: a TorchScript file without this pipeline's metadata; "
                            "export it with python -m stages.export")

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(pixels)).numpy()

    return extra[METADATA_FILE], run


@contextlib.contextmanager
def _torchscript_deprecation_said() -> Iterator[None]:
    """Without PyTorch's FutureWarning per ``torch.jit`` call (one line per export says it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield
