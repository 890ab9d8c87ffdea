"""A model as one file for use outside the pipeline: ``transfer.exporting.export_model``
writes it (``.onnx`` for ONNX Runtime, TorchScript ``.pt`` for PyTorch), ``load_exported``
here runs it from the file alone, without importing PyTorch for an ONNX file.

The file takes uint8 ``(N, 3, H, W)`` RGB pixels already resized and centre-cropped to the
input size; scaling, normalization, flip averaging and the temperature are inside it. Its
embedded ``metadata.json`` says how to resize (``resize``) and names the classes.
``ExportedModel`` does that resizing, so that ``predict`` and ``serve`` can run an exported
file exactly as they run the pipeline's own models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transfer.errors import PipelineError, first_line
from transfer.params import EXPORT_SUFFIXES
from transfer.pixels import UPSCALE_FROM, pixel_arrays
from transfer.preprocessing import Preprocessing
from transfer.warm import INPUT_NAME

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
        batch: resized and centre-cropped as the pipeline's own models are fed on the CPU
        (``transfer.pixels.pixel_arrays``), uint8 ``(N, 3, H, W)``."""
        resize_crop = self.preprocessing.pixel_transform()
        for batch in pixel_arrays(images, resize_crop, batch_size, "predict"):
            yield np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

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
    import torch

    extra = {METADATA_FILE: ""}
    with torchscript_deprecation_said():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise PipelineError(f"{path}: a TorchScript file without this pipeline's metadata; "
                            "export it with python -m stages.export")

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(pixels)).numpy()

    return extra[METADATA_FILE], run


@contextlib.contextmanager
def torchscript_deprecation_said() -> Iterator[None]:
    """Without PyTorch's FutureWarning per ``torch.jit`` call (one line per export says it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield
