"""The typed parameters of the pipeline: defaults in one place, read once from ``params.yaml``.

Every key is validated at load time. An unknown key lists the valid ones, a bad value names
the key and what it may be, and a YAML syntax error names the line. Every number must be
finite and every integer has an upper bound, so no value reaches a library it would break.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transfer.artifacts import read_json, read_utf8
from transfer.errors import ParamsError, PipelineError, first_line, unprintable
from transfer.layout import EMBEDDINGS_DIR, EXCLUDE_FILE, RELABEL_FILE, WEIGHTS_DIR, outside
from transfer.selection import SELECT_BY
from transfer.strategies import STRATEGIES

log = logging.getLogger(__name__)

# One vocabulary for the precision of every forward pass (transfer.runtime applies it).
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_OLD_PRECISIONS = {"32": "float32", "bf16": "bfloat16", "16": "float16"}
_PRECISION_HELP = ("auto: float32 on CPU, mixed precision on a GPU (float16 to extract, "
                   "bfloat16 where supported to train); float32; bfloat16 or float16 autocast "
                   "(float16 needs a GPU)")

# What runs the backbone's forward pass (transfer.engines.ENGINES, and auto: the fastest here).
ENGINES = ("auto", "onnxruntime", "torch")
_ENGINE_HELP = ("auto: ONNX Runtime on CPU (float32), PyTorch on a GPU or where ONNX Runtime "
                "is missing or the backbone does not export; onnxruntime; torch")

# The most images per class the data keys accept: far beyond any data set, far below the
# 64-bit integers the catalog stores counts in.
MAX_IMAGES_PER_CLASS = 10**9
# The most images in one forward pass any batch-size key (or option) accepts.
MAX_BATCH_SIZE = 65536
# The longest text value (a path or a name) accepted: Linux's longest path.
MAX_TEXT_LENGTH = 4096
# Longer values are shortened in messages.
SHOWN_CHARACTERS = 60


def _bounded(default: Any, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, help: str = "") -> Any:
    """A numeric field whose allowed range is checked when params are loaded."""
    return field(default=default,
                 metadata={"range": (low, high), "low_open": low_open, "help": help})


def _choice(default: Any, choices: tuple[Any, ...], help: str = "",
            old_spellings: dict[str, str] | None = None) -> Any:
    """A field whose value must be one of ``choices``; ``old_spellings`` are still accepted,
    with a notice naming the current one."""
    return field(default=default, metadata={"choices": choices, "help": help,
                                            "old_spellings": old_spellings or {}})


@dataclass(frozen=True)
class DataParams:
    source: str = field(default="digits", metadata={
        "help": "'digits', 'torchvision:<Name>', or a path under data/raw/ to an image-folder "
                "root, a pre-split root or a .csv manifest"})
    val_size: float = _bounded(0.15, 0.0, 0.5, low_open=True,
                               help="fraction of each class held out for validation")
    test_size: float = _bounded(0.15, 0.0, 0.5, low_open=True,
                                help="fraction of each class held out for testing")
    min_per_class: int = _bounded(5, 1, MAX_IMAGES_PER_CLASS,
                                  help="a class with fewer usable images fails the stage")
    max_per_class: int | None = _bounded(None, 1, MAX_IMAGES_PER_CLASS,
                                         help="cap on images per class (null: no cap)")
    short_side: int = _bounded(256, 32, 4096,
                               help="images are stored with this shorter side: larger "
                                    "ones downscaled, ones at least 7/8 of it upscaled")
    exclude: str = field(default=EXCLUDE_FILE.as_posix(), metadata={
        "help": "a Git-tracked text file: images to leave out, one per line (a path "
                "relative to the source, or an image id from reports/audit.json)"})
    relabel: str = field(default=RELABEL_FILE.as_posix(), metadata={
        "help": "a Git-tracked CSV file with the header image,label: images to file under "
                "another of the classes"})

    def conflict(self) -> str | None:
        """What the keys say together that each alone does not."""
        if self.val_size + self.test_size >= 1.0:
            return (f"data.val_size={self.val_size:g} and data.test_size={self.test_size:g} "
                    "leave no image for training; their sum must be below 1")
        for key, path, default in (("exclude", self.exclude, EXCLUDE_FILE),
                                   ("relabel", self.relabel, RELABEL_FILE)):
            # A decision that Git does not track is not versioned, and dvc.yaml's dependency
            # on a file outside the project is not one a teammate's clone can satisfy.
            if not path.strip() or Path(path) == Path("."):
                return (f"data.{key}={_show(path)} names no file; give a path inside the "
                        f"project (default {default.as_posix()})")
            if outside(Path(path), Path(".")) is not None:
                return (f"data.{key}={_show(path)} lies outside the project, so Git cannot "
                        f"track it; give a path inside it (default {default.as_posix()})")
        return None


# How backbone.name names a torchvision model: torchvision:resnet50; any other name is timm's.
TORCHVISION_PREFIX = "torchvision:"


def weights_file_named(backbone: str, weights: str | None) -> Path | None:
    """The state-dict file ``backbone.weights`` names, or None: null (the model's own
    weights, packaged or downloaded), or for a ``torchvision:`` model a weights name such as
    IMAGENET1K_V2 (a value with neither a suffix nor a folder)."""
    if weights is None:
        return None
    if backbone.startswith(TORCHVISION_PREFIX) and not (Path(weights).suffix or "/" in weights):
        return None
    return Path(weights)


# How the files a state dict is read from begin: torch.save's zip archive, its legacy
# pickle (protocol 2 or later), and safetensors (an 8-byte header length, then JSON).
_STATE_DICT_STARTS = (re.compile(rb"PK\x03\x04"), re.compile(rb"\x80"),
                      re.compile(rb".{8}\{", re.S))
# A torchvision weights enum name, such as IMAGENET1K_V2 or DEFAULT.
_WEIGHTS_ENUM_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def check_weights_file(backbone: str, weights: str | None) -> None:
    """A state-dict file named in ``backbone.weights`` exists, looks like one, and lies in
    ``weights/``, which dvc.yaml watches for extract: anywhere else (or through a link that
    leads out of it), ``dvc repro`` would call the embeddings up to date after the file
    changed. Else one line saying how, before DVC deletes the embeddings to re-extract."""
    path = weights_file_named(backbone, weights)
    if path is None:
        return
    if _WEIGHTS_ENUM_NAME.fullmatch(weights):
        raise ParamsError(
            f"backbone.weights: '{weights}' reads as a torchvision weights name, which only a "
            f"torchvision:<model> backbone takes; for '{backbone}' give null (its own "
            f"pretrained weights) or a state-dict file in {WEIGHTS_DIR}/")
    where = outside(path, WEIGHTS_DIR)
    if where is not None and where[0] == "linked":
        raise ParamsError(
            f"backbone.weights: '{weights}' leads through a link to '{where[1]}', outside "
            f"{WEIGHTS_DIR}/: dvc.yaml watches {WEIGHTS_DIR}/ but not what its links lead to; "
            f"copy the file into {WEIGHTS_DIR}/ instead of linking it")
    if where is not None:
        raise ParamsError(
            f"backbone.weights: '{weights}' is outside {WEIGHTS_DIR}/, which dvc.yaml watches "
            "for extract, so dvc repro would call the embeddings up to date after the file "
            f"changes; copy it in (cp '{weights}' {WEIGHTS_DIR}/ && dvc add "
            f"{WEIGHTS_DIR}/{path.name}) and set backbone.weights: {WEIGHTS_DIR}/{path.name}")
    if not path.is_file():
        if path.with_name(f"{path.name}.dvc").is_file():
            raise ParamsError(f"backbone.weights: '{weights}' is tracked by DVC but not in the "
                              f"workspace; fetch it with dvc pull {weights}")
        held = sorted(p.name for p in WEIGHTS_DIR.glob("*") if p.is_file() and not (
            p.name.startswith(".") or p.suffix in (".dvc", ".md")))
        raise ParamsError(f"backbone.weights: '{weights}' is not a file; {WEIGHTS_DIR}/ holds "
                          + (", ".join(held) if held else "no weights file"))
    with path.open("rb") as file:
        start = file.read(9)
    if not any(pattern.match(start) for pattern in _STATE_DICT_STARTS):
        raise ParamsError(
            f"backbone.weights: '{weights}' is not a state-dict file (neither torch.save's "
            "format nor safetensors); give one saved from the same architecture")


def _check_model_name(name: str, known: Sequence[str], what: str, where: str) -> None:
    """``name`` is one of the ``known`` models, else one line suggesting the names it begins
    (``tf_efficientnet_lite`` → lite0, lite1, lite2) or, failing those, the closest."""
    if name in known:
        return
    close = sorted(k for k in known if k.startswith(name))[:3] or \
        difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see {where}"
    raise ParamsError(f"backbone.name: unknown {what} '{name}'{hint}")


def check_backbone_name(name: str) -> None:
    """``backbone.name`` names a model timm or torchvision builds. Listing them imports the
    library (several seconds), so the default and the backbone the embeddings were last
    extracted with (data/embeddings/meta.json; only read, as a name known to be good) pass
    without it: the import is paid when the name changes, and extract with it."""
    if name == BackboneParams.name:
        return
    try:
        if read_json(EMBEDDINGS_DIR / "meta.json").get("backbone") == name:
            return
    except (PipelineError, AttributeError):
        pass  # no embeddings yet, or a damaged meta file that extract will replace
    check_known_model(name)


def check_known_model(name: str) -> None:
    """``name`` (a ``backbone.name``) is a model timm or torchvision builds; this imports the
    library to list them."""
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision.models

        _check_model_name(name.removeprefix(TORCHVISION_PREFIX),
                          torchvision.models.list_models(module=torchvision.models),
                          "torchvision classification model", "torchvision.models.list_models()")
    else:
        import timm

        _check_model_name(name, timm.list_models(), "timm model", "timm.list_models()")


@dataclass(frozen=True)
class BackboneParams:
    name: str = field(default="tf_efficientnet_lite0", metadata={
        "help": "a timm model name, or torchvision:<model name>"})
    weights: str | None = field(default=None, metadata={
        "help": "null: the model's own pretrained weights; a torchvision weights enum name "
                "(IMAGENET1K_V2, DEFAULT); or a state-dict file in weights/"})
    batch_size: int | str = field(default="auto", metadata={
        "range": (1, MAX_BATCH_SIZE), "low_open": False, "choices": ("auto",),
        "help": "images per forward pass, or auto (8 on CPU, the largest that fits on a GPU)"})
    precision: str = _choice("auto", PRECISIONS, help=_PRECISION_HELP)
    engine: str = _choice("auto", ENGINES, help=_ENGINE_HELP)
    flip_average: bool = False
    embedding_dtype: str = _choice("float32", ("float32", "float16"))
    mean: tuple[float, float, float] | None = field(default=None, metadata={
        "help": "override of the weights' normalization mean; refused unless allowed"})
    std: tuple[float, float, float] | None = _bounded(None, 0.0, None, low_open=True, help=(
        "override of the weights' normalization std; refused unless allowed"))
    allow_normalization_override: bool = False
    deterministic: bool = field(default=False, metadata={
        "help": "true: deterministic GPU kernels only (bit-identical reruns on one GPU, slower); "
                "CPU runs are bit-identical either way"})
    # Not a DVC param of extract (dvc.yaml): it changes how much is reused, never the outputs.
    store_max_gb: float = _bounded(4.0, 0.0, 1e6, help=(
        "size limit of the embedding store in cache/embeddings/ (least recently used shards "
        "deleted beyond it); 0: no store, every image embedded every run"))


@dataclass(frozen=True)
class HeadParams:
    kind: str = _choice("logistic", ("logistic", "mlp"), help=(
        "logistic: the linear probe; mlp: one hidden ReLU layer, stopped early on validation"))
    C: float | str = field(default="auto", metadata={
        "range": (0.0, None), "low_open": True, "choices": ("auto",),
        "help": "inverse regularisation strength of the logistic regression; auto: chosen "
                "on held-out images (transfer/head_search.py)"})
    max_iter: int = _bounded(1000, 1, 1_000_000,
                             help="logistic: L-BFGS iterations; mlp: epochs at most")
    class_weight: str | None = _choice(None, (None, "balanced"))
    in_memory_gb: float = _bounded(4.0, 0.0, 1e6, help=(
        "logistic: the largest standardized training matrix held in memory (4 bytes a value); "
        "past it the head is fitted streamed from the cache, the same objective and solver, "
        "one pass over the cache per L-BFGS iteration"))
    hidden_units: int = _bounded(256, 0, 65536, help=(
        "mlp: units in the hidden layer; 0: none, a linear softmax layer trained the same way"))
    alpha: float | str = field(default="auto", metadata={
        "range": (0.0, 100.0), "low_open": False, "choices": ("auto",),
        "help": "mlp: L2 penalty on the weights; auto: chosen on the validation split"})
    patience: int = _bounded(10, 1, 100_000,
                             help="mlp: epochs without a better validation score before stopping")
    init_from_source: bool = field(default=False, metadata={
        "help": "fine-tuning without the probe (finetune.init_from_head: false): start the "
                "rows of classes named like a source (ImageNet) class from the backbone's "
                "own classifier rows"})


@dataclass(frozen=True)
class FinetuneParams:
    enabled: bool = False
    strategy: str = _choice("last_k", tuple(STRATEGIES), help=(
        "head: backbone frozen, head trained with augmentation; last_k: the top unfreeze_k "
        "blocks and the head; full: every layer; scratch: same architecture, random "
        "initialisation (the baseline that shows what pretraining is worth)"))
    unfreeze_k: int = _bounded(1, 1, 10_000, help="blocks trained from the top under last_k")
    init_from_head: bool = field(default=True, metadata={
        "help": "start the new head from the trained linear probe (models/head.npz)"})
    epochs: int = _bounded(3, 1, 10_000)
    batch_size: int = _bounded(32, 1, MAX_BATCH_SIZE,
                               help="images per step (per process under torchrun)")
    lr: float | str = field(default=1e-3, metadata={
        "range": (0.0, 10.0), "low_open": True, "choices": ("auto",),
        "help": "peak learning rate of the head (AdamW), or auto: chosen by a learning-rate "
                "range test before training"})
    lr_decay: float = _bounded(0.5, 0.0, 1.0, low_open=True,
                               help="each block down from the head trains at this factor "
                                    "times the learning rate of the block above it")
    weight_decay: float = _bounded(0.01, 0.0, 10.0)
    warmup_epochs: float = _bounded(1.0, 0.0, 10_000.0,
                                    help="linear warm-up before the cosine decay")
    grad_clip: float | None = _bounded(1.0, 0.0, None, low_open=True,
                                       help="maximum gradient norm (null: no clipping)")
    label_smoothing: float = _bounded(0.1, 0.0, 0.99)
    patience: int | None = _bounded(3, 1, 10_000, help=(
        "stop after this many epochs without a better validation score (null: never)"))
    select_by: str = _choice("accuracy", tuple(SELECT_BY), help=(
        "the validation score that chooses the epoch kept and stops training early"))
    class_weight: str | None = _choice(None, (None, "balanced"), help=(
        "balanced: each class weighs in the loss inversely to its training images"))
    sampler: str = _choice("random", ("random", "balanced"), help=(
        "random: every training image once per epoch; balanced: drawn with replacement so "
        "that every class is drawn equally often"))
    ema_decay: float | None = _bounded(None, 0.0, 0.99999, low_open=True, help=(
        "keep an exponential moving average of the weights (timm ModelEmaV3, with warm-up) "
        "and keep it when it scores better on validation (null: off)"))
    mixup_alpha: float = _bounded(0.0, 0.0, 10.0, help="Mixup's Beta(alpha, alpha) (0: off)")
    cutmix_alpha: float = _bounded(0.0, 0.0, 10.0, help="CutMix's Beta(alpha, alpha) (0: off)")
    flip_average: bool = field(default=False, metadata={
        "help": "average the fine-tuned network's output on each image and its mirror image, "
                "in validation, evaluate, predict and the exported model"})
    bn: str = _choice("frozen", ("frozen", "train"), help=(
        "frozen: batch-norm running statistics kept as pretrained; train: updated in "
        "trainable blocks"))
    augment: str = _choice("light", ("none", "light", "strong"), help=(
        "light: random resized crop and flip; strong: adds TrivialAugment"))
    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    precision: str = _choice("auto", PRECISIONS, help=_PRECISION_HELP,
                             old_spellings=_OLD_PRECISIONS)


@dataclass(frozen=True)
class AuditParams:
    folds: int = _bounded(5, 2, 100, help=(
        "cross-validation folds for the out-of-fold probabilities that find label issues"))
    C: float = _bounded(0.1, 0.0, None, low_open=True, help=(
        "inverse regularisation strength of the audit's logistic regression"))
    duplicate_margin: float = _bounded(0.1, 0.0, 2.0, low_open=True, help=(
        "two images are near-duplicates when their cosine similarity exceeds their "
        "neighbourhood's typical one by this much"))
    duplicate_keypoints: int = _bounded(8, 0, 100_000, help=(
        "a near-duplicate pair is listed only when this many SIFT keypoints of the two images "
        "(or one and the other's mirror image) match in one arrangement; 0: the embeddings "
        "alone decide"))
    neighbours: int = _bounded(5, 1, 1000, help=(
        "outliers: the mean distance to this many nearest training images is the score"))
    unfamiliar_percentile: float = _bounded(99.0, 50.0, 100.0, help=(
        "predict marks an image unfamiliar beyond this percentile of the validation "
        "images' distance to the training images (a conformal quantile: at most 100 minus "
        "this percent of images like them are marked)"))
    max_listed: int = _bounded(50, 1, 100_000, help=(
        "entries listed per kind in reports/audit.json (the counts cover all)"))


@dataclass(frozen=True)
class EvaluateParams:
    split: str = _choice("test", ("test", "val"))


# What the export stage writes (transfer.exported reads them back), by file suffix.
EXPORT_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript"}
EXPORT_FORMATS = tuple(EXPORT_SUFFIXES.values())
# The trained models predict, export and serve choose from.
MODEL_CHOICES = ("auto", "head", "finetune")


@dataclass(frozen=True)
class ExportParams:
    enabled: bool = False
    format: str = _choice("onnx", EXPORT_FORMATS, help=(
        "onnx: runs on ONNX Runtime, in any language; torchscript: runs on PyTorch"))
    model: str = _choice("auto", MODEL_CHOICES, help=(
        "auto: the fine-tuned model when fine-tuning kept an epoch after its start, else the "
        "head on the frozen backbone; head; finetune"))


@dataclass(frozen=True)
class Params:
    seed: int = _bounded(42, 0, 2**32 - 1)
    data: DataParams = field(default_factory=DataParams)
    backbone: BackboneParams = field(default_factory=BackboneParams)
    head: HeadParams = field(default_factory=HeadParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    audit: AuditParams = field(default_factory=AuditParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)


YAML11_BOOLEANS = ("yes", "no", "on", "off")


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans, as DVC reads ``params.yaml``: only
    ``true`` and ``false``. YAML 1.1 also reads ``yes``, ``no``, ``on`` and ``off`` as
    booleans, which DVC shows, compares and writes back as text; read as text here too, a bool
    key refuses them instead of acting on a value DVC does not see."""


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path``; missing keys take their defaults."""
    path = Path(path)
    try:
        text = read_utf8(path)
    except OSError as err:
        raise ParamsError(f"{path}: cannot read parameters file ({err.strerror})") from err
    try:
        raw = yaml.load(text, Loader=ParamsLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}{where}: invalid YAML: {err.problem or err}") from err
    except yaml.YAMLError as err:  # a character YAML does not allow: the first line says which
        raise ParamsError(f"{path}: invalid YAML: {first_line(err)}") from err
    except RecursionError as err:
        raise ParamsError(f"{path}: invalid YAML: nested too deeply") from err
    return params_from_dict({} if raw is None else raw, source=str(path))


def params_from_dict(raw: Any, source: str = "params") -> Params:
    """Build a validated ``Params`` from a nested mapping as found in ``params.yaml``."""
    return _build(Params, raw, prefix="", source=source)


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: '{where}' must be a mapping of keys to values, "
                          f"got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            valid = ", ".join(fields)
            close = [name for name in fields if name.lower() == str(key).lower()]
            close = close or difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ParamsError(f"{source}: unknown key '{prefix}{key}'{hint}; "
                              f"valid keys in {where}: {valid}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] or {}, prefix=f"{key}.", source=source)
        else:
            values[name] = _check_value(key, raw[name], hint, f.metadata, source)
    built = cls(**values)
    problem = built.conflict() if hasattr(built, "conflict") else None
    if problem:
        raise ParamsError(f"{source}: {problem}")
    return built


def _check_value(key: str, value: Any, hint: Any, meta: Any, source: str) -> Any:
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if is_union else (hint,)
    if type(value) is int and str in allowed and not {int, float} & set(allowed) \
            and "choices" in meta:
        value = str(value)  # `precision: 32` in YAML means the choice "32"
    try:
        given, value = value, _coerce(key, value, allowed, source)
    except ParamsError:
        if "range" in meta and "choices" in meta:  # the only words it takes are its choices
            raise ParamsError(f"{source}: {key}={_show(value)} has the wrong type; expected "
                              f"{_allowed(meta, int in allowed and float not in allowed)}"
                              ) from None
        if bool in allowed and isinstance(value, str) and value.lower() in YAML11_BOOLEANS:
            raise ParamsError(f"{source}: {key}={_show(value)} has the wrong type; expected "
                              "bool: write true or false (DVC reads yes, no, on and off as "
                              "text)") from None
        raise
    if value in meta.get("old_spellings", {}):
        value = meta["old_spellings"][value]
        log.warning("%s: %s=%s is an old spelling, read as %s; write that instead", source, key,
                    given, value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if "choices" in meta and not numeric and value not in meta["choices"]:
        if "range" in meta:  # a word or a number, e.g. head.C: auto or 0.1
            raise ParamsError(f"{source}: {key}={_show(given)} is not valid; expected "
                              f"{_allowed(meta)}")
        raise ParamsError(f"{source}: {key}={_show(given)} is not valid; choose one of: "
                          f"{_choices(meta)}")
    if isinstance(value, str) and (unprintable(value) or len(value) > MAX_TEXT_LENGTH):
        raise ParamsError(f"{source}: {key}={_show(given)} is not valid; a name or path of at "
                          f"most {MAX_TEXT_LENGTH} characters, without control characters")
    numbers = value if isinstance(value, tuple) else (value,) if numeric else ()
    if not all(math.isfinite(number) for number in numbers if isinstance(number, float)):
        within = f"; allowed: {_allowed(meta)}" if "range" in meta else ""
        raise ParamsError(f"{source}: {key}={_show(given)} is not a finite number{within}")
    if "range" in meta:
        low, high = meta["range"]
        for number in numbers:
            too_low = low is not None and (number <= low if meta["low_open"] else number < low)
            if too_low or (high is not None and number > high):
                each = " (each number)" if isinstance(value, tuple) else ""
                raise ParamsError(f"{source}: {key}={_show(given)} is out of range; "
                                  f"allowed{each}: {_allowed(meta)}")
    return value


def _range(meta: Any) -> str:
    """The allowed range in interval notation: ``(0.0, 0.5]``, ``[1, 65536]``, ``(0.0, inf)``."""
    low, high = meta["range"]
    lower = f"{'(' if meta['low_open'] or low is None else '['}{'-inf' if low is None else low}"
    upper = "inf)" if high is None else f"{high}]"
    return f"{lower}, {upper}"


def _choices(meta: Any) -> str:
    return ", ".join("null" if c is None else str(c) for c in meta["choices"])


def _allowed(meta: Any, whole: bool = False) -> str:
    """The range of a numeric field, after its word choices if it has any (``whole``: it
    takes integers only)."""
    number = "a whole number" if whole else "a number"
    return f"{_choices(meta)} or {number} in {_range(meta)}" if "choices" in meta \
        else _range(meta)


def _coerce(key: str, value: Any, allowed: tuple[Any, ...], source: str) -> Any:
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is int and isinstance(value, (float, str)):
            # A whole number written as 1e3 or 1000.0: PyYAML reads "1e3" (no dot) as a
            # string, and `dvc exp run -S head.max_iter=1e3` writes just that.
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _float(value)
        if typ is str and isinstance(value, str):
            return value
        if typing.get_origin(typ) is tuple and isinstance(value, list):
            size = len(typing.get_args(typ))
            if len(value) == size and all(isinstance(v, (int, float))
                                          and not isinstance(v, bool) for v in value):
                return tuple(_float(v) for v in value)
        if typ is float and isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string; `dvc exp run -S lr=1e-4` writes just that.
            try:
                return _float(value)
            except ValueError:
                pass
    names = " or ".join(_type_name(t) for t in allowed)
    raise ParamsError(f"{source}: {key}={_show(value)} has the wrong type; expected {names}")


def _float(value: int | float | str) -> float:
    """``float(value)``, with integers too large for a float read as infinite (refused later)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _type_name(typ: Any) -> str:
    if typ is type(None):
        return "null"
    if typing.get_origin(typ) is tuple:
        return f"a list of {len(typing.get_args(typ))} numbers"
    return typ.__name__


def _show(value: Any) -> str:
    shown = "null" if value is None else repr(value)
    return shown if len(shown) <= SHOWN_CHARACTERS else f"{shown[:SHOWN_CHARACTERS - 1]}…"
