"""The eval-time input pipeline a backbone's weights expect (``Preprocessing``): what is
recorded beside the embeddings, in a fine-tuned model's description and in an exported
file's metadata. Without PyTorch, so that a model run by ONNX Runtime needs none."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from transfer.embeddings import json_preview
from transfer.errors import PipelineError
from transfer.pixels import PIL_FILTERS, ResizeCrop

if TYPE_CHECKING:
    from torchvision.transforms import v2

log = logging.getLogger(__name__)

# The largest side an image is resized or cropped to: above any classification backbone's
# input (448 to 600 pixels for the largest), far below what would exhaust memory.
MAX_SIDE = 2048


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Preprocessing:
    """The eval-time input pipeline the pretrained weights expect.

    Resize the shorter side to ``resize_size`` with ``interpolation``, centre-crop to
    ``input_size``, scale to [0, 1], normalize with ``mean`` and ``std``: what both timm's
    eval transform and torchvision's ``ImageClassification`` preset do.
    """

    input_size: tuple[int, int, int]
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    @classmethod
    def from_timm(cls, config: dict[str, Any]) -> Preprocessing:
        if config.get("crop_mode", "center") != "center":
            raise PipelineError(f"timm crop_mode '{config['crop_mode']}' is not supported; "
                                "only 'center' crops are")
        size = config["input_size"]
        # timm's own rule (transforms_factory): scale the crop up by 1 / crop_pct.
        resize = math.floor(min(size[1:]) / config["crop_pct"])
        return cls(tuple(size), resize, str(config["interpolation"]),
                   tuple(float(v) for v in config["mean"]),
                   tuple(float(v) for v in config["std"]), "timm pretrained config")

    @classmethod
    def from_torchvision(cls, weights: Any) -> Preprocessing:
        preset = weights.transforms()
        crop = preset.crop_size[0]
        return cls((3, crop, crop), preset.resize_size[0], preset.interpolation.value,
                   tuple(float(v) for v in preset.mean), tuple(float(v) for v in preset.std),
                   f"torchvision {type(weights).__name__}.{weights.name}.transforms()")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessing:
        """The preprocessing a file describes (``to_dict``'s); ``ValueError`` (or ``KeyError``,
        ``TypeError``) saying what is wrong with a damaged one, before any image is sized by
        it: a side of 60,000 pixels would take the machine's memory."""
        size, resize = raw["input_size"], raw["resize_size"]
        if not (isinstance(size, list | tuple) and len(size) == 3 and size[0] == 3 and
                all(_whole(v) and 1 <= v <= MAX_SIDE for v in size[1:])):
            raise ValueError(f"input_size {json_preview(size)}: expected [3, height, width], "
                             f"each side 1 to {MAX_SIDE}")
        if not (_whole(resize) and 1 <= resize <= MAX_SIDE):
            raise ValueError(f"resize_size {json_preview(resize)}: expected 1 to {MAX_SIDE}")
        if raw["interpolation"] not in PIL_FILTERS:
            raise ValueError(f"interpolation {json_preview(raw['interpolation'])}: expected one "
                             f"of {', '.join(PIL_FILTERS)}")
        for key in ("mean", "std"):
            values = raw[key]
            if not (isinstance(values, list | tuple) and len(values) == 3 and
                    all(isinstance(v, int | float) and not isinstance(v, bool) and
                        math.isfinite(v) for v in values) and
                    (key == "mean" or all(v > 0 for v in values))):
                raise ValueError(f"{key} {json_preview(values)}: expected 3 finite numbers" +
                                 (", each above 0" if key == "std" else ""))
        return cls(tuple(size), int(resize), str(raw["interpolation"]),
                   tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"]),
                   str(raw["source"]))

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    def with_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None,
                           allow_override: bool) -> Preprocessing:
        """Apply a user mean/std; one that disagrees with the weights is refused unless allowed."""
        wanted_mean = tuple(mean) if mean is not None else self.mean
        wanted_std = tuple(std) if std is not None else self.std
        if np.allclose(wanted_mean, self.mean) and np.allclose(wanted_std, self.std):
            return self
        if not allow_override:
            raise PipelineError(
                f"backbone.mean/std {list(wanted_mean)}/{list(wanted_std)} disagree with the "
                f"weights' own {list(self.mean)}/{list(self.std)} ({self.source}): the "
                "network only works on inputs normalized as in its training, and a mismatch "
                "typically costs 10-20 accuracy points. Remove backbone.mean/std, or set "
                "backbone.allow_normalization_override: true if this is deliberate")
        log.warning("normalization overridden: mean %s std %s instead of the weights' %s %s",
                    wanted_mean, wanted_std, self.mean, self.std)
        return Preprocessing(self.input_size, self.resize_size, self.interpolation,
                             wanted_mean, wanted_std, f"{self.source}, normalization overridden")

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """The shape of one image as ``pixel_transform`` gives it: (height, width, channels)."""
        channels, height, width = self.input_size
        return height, width, channels

    def pixel_transform(self) -> ResizeCrop:
        """PIL image or uint8 ``(H, W, 3)`` array in, its uint8 ``(H, W, 3)`` pixels at the
        network's input size out: resized and centre-cropped; ``Normalized`` does the rest,
        batched, inside the network."""
        return ResizeCrop(self.resize_size, self.input_size[1:], self.interpolation)

    def eval_transform(self) -> v2.Compose:
        """PIL image in, normalized float ``(3, H, W)`` tensor out."""
        import torch
        from torchvision.transforms import v2

        from transfer.backbones import channels_first

        return v2.Compose([
            self.pixel_transform(),
            channels_first,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])
