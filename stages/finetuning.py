"""Fine-tuning a pretrained backbone with a new head: which layers train, how fast, on what.

The network is the backbone's encoder (cut before its source classifier) and a new linear
head. Its blocks come from timm's own grouping (``model.group_matcher``) or, for
torchvision models, from the top-level child modules. ``last_k`` trains the top ``k``
blocks; each block down from the head learns at ``lr_decay`` times the rate of the block
above it. Training resumes from a per-epoch checkpoint and is seeded per epoch, so an
interrupted run ends with the same model as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from stages.artifacts import atomic_output, read_json, write_json
from stages.backbones import Backbone, PreprocessedImages, Preprocessing, _TimmPreLogits
from stages.embeddings import EmbeddingMeta
from stages.errors import PipelineError, first_line
from stages.heads import LogisticHead, load_head
from stages.params import FinetuneParams, Params

log = logging.getLogger(__name__)

# A training image smaller than this share of the picture is not a useful crop of it.
CROP_SCALE = {"light": (0.35, 1.0), "strong": (0.08, 1.0)}


class FinetuneNet(torch.nn.Module):
    """Pretrained encoder (to pooled pre-logits features), then a new linear head."""

    def __init__(self, encoder: torch.nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def build_network(backbone: Backbone, num_classes: int) -> FinetuneNet:
    """The backbone's encoder with a new head; the encoder's own trainable flags are cleared."""
    encoder = backbone.encoder
    if isinstance(encoder, _TimmPreLogits):
        # The source classifier is not on the forward path (pre-logits); drop its weights.
        encoder.model.reset_classifier(0)
    net = FinetuneNet(encoder, backbone.num_features, num_classes)
    net.requires_grad_(False)
    return net


def encoder_blocks(net: FinetuneNet) -> list[list[torch.nn.Parameter]]:
    """The encoder's parameters in blocks, from the input (stem) up to the last block."""
    encoder = net.encoder
    if isinstance(encoder, _TimmPreLogits):
        from timm.models import group_parameters

        model = encoder.model
        named = dict(model.named_parameters())
        groups = group_parameters(model, model.group_matcher(coarse=True))
        blocks = [[named[name] for name in names] for names in groups.values()]
    else:
        module = encoder
        children = _children_with_parameters(module)
        while len(children) == 1:  # a lone container (e.g. `features`): its children are blocks
            module = children[0]
            children = _children_with_parameters(module)
        blocks = [list(child.parameters()) for child in children]
        own = list(module.parameters(recurse=False))
        blocks = [own + blocks[0], *blocks[1:]] if blocks else [own]
    blocks = [block for block in blocks if block]
    covered = {id(p) for block in blocks for p in block}
    rest = [p for p in encoder.parameters() if id(p) not in covered]
    if rest:  # parameters outside every block (class tokens, ...) train with the first block
        blocks[0] = rest + blocks[0]
    return blocks


def _children_with_parameters(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [child for child in module.children()
            if any(True for _ in child.parameters())]


def mark_trainable(net: FinetuneNet, strategy: str, unfreeze_k: int) -> None:
    """Let the head and, by ``strategy``, the top blocks of the encoder train."""
    blocks = encoder_blocks(net)
    if strategy == "head":
        chosen: list[list[torch.nn.Parameter]] = []
    elif strategy == "last_k":
        if unfreeze_k > len(blocks):
            log.warning("finetune.unfreeze_k=%d, but the encoder has %d blocks: training all",
                        unfreeze_k, len(blocks))
        chosen = blocks[::-1][:unfreeze_k]
    else:  # full, scratch
        chosen = blocks
    for block in [list(net.head.parameters()), *chosen]:
        for p in block:
            p.requires_grad_(True)


def trainable_groups(net: FinetuneNet) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters by depth below the head (the head is depth 0)."""
    blocks = [list(net.head.parameters()), *encoder_blocks(net)[::-1]]
    return [[p for p in block if p.requires_grad] for block in blocks
            if any(p.requires_grad for p in block)]


def frozen_modules(net: FinetuneNet) -> list[torch.nn.Module]:
    """Encoder modules none of whose parameters train: they stay in eval mode throughout."""
    return [m for m in net.encoder.modules()
            if any(True for _ in m.parameters(recurse=False))
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def set_train_mode(net: FinetuneNet, bn: str) -> None:
    """Training mode for trainable layers; frozen layers, and all batch norms when ``bn`` is
    ``frozen``, keep eval mode, so their running statistics never change."""
    net.train()
    for module in frozen_modules(net):
        module.eval()
    if bn == "frozen":
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def init_head_from_probe(net: FinetuneNet, head: LogisticHead) -> None:
    """Copy the linear probe into the new head: same logits on the same features."""
    weight, bias = head.as_linear(net.head.out_features)
    with torch.no_grad():
        net.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        net.head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def match_source_classes(classes: Sequence[str],
                         source_labels: Sequence[str]) -> dict[int, int]:
    """Target class index -> source classifier row, where the class name equals one of the
    comma-separated names of exactly one source label (case, '_' and '-' ignored)."""
    rows_by_name: dict[str, set[int]] = {}
    for row, label in enumerate(source_labels):
        for name in label.split(","):
            rows_by_name.setdefault(_normalise(name), set()).add(row)
    matches = {}
    for index, name in enumerate(classes):
        rows = rows_by_name.get(_normalise(name), set())
        if len(rows) == 1:  # "crane" is a bird and a machine: ambiguous names start nowhere
            matches[index] = next(iter(rows))
    return matches


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def init_head_from_source(net: FinetuneNet, classifier: torch.nn.Linear,
                          matches: dict[int, int]) -> None:
    """Copy the source classifier's rows into the head rows of the matching classes."""
    with torch.no_grad():
        for index, row in matches.items():
            net.head.weight[index].copy_(classifier.weight[row])
            net.head.bias[index].copy_(classifier.bias[row])


def optimizer_groups(blocks: Sequence[Sequence[torch.nn.Parameter]], lr: float,
                     lr_decay: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: block ``d`` below the head at ``lr * lr_decay**d``; no weight
    decay on biases and normalization parameters (one-dimensional tensors)."""
    groups = []
    for depth, block in enumerate(blocks):
        decayed = [p for p in block if p.ndim > 1]
        plain = [p for p in block if p.ndim <= 1]
        for params, decay in ((decayed, weight_decay), (plain, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr * lr_decay ** depth,
                               "weight_decay": decay, "depth": depth})
    return groups


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up from near zero, then cosine decay to zero."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_transform(preprocessing: Preprocessing, augment: str) -> v2.Compose:
    """Augmented training input, normalized exactly as the pretrained weights expect."""
    if augment == "none":
        return preprocessing.eval_transform()
    interpolation = v2.InterpolationMode(preprocessing.interpolation)
    steps: list[Any] = [
        v2.RandomResizedCrop(preprocessing.input_size[1:], scale=CROP_SCALE[augment],
                             interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "strong":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    return v2.Compose([*steps, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std))])


class LabelledImages(PreprocessedImages):
    """RGB uint8 arrays through ``transform``, each with its label."""

    def __init__(self, images: Sequence[np.ndarray], labels: np.ndarray,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        super().__init__(images, transform)
        self.labels = labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return super().__getitem__(i), int(self.labels[i])


@dataclass(frozen=True)
class Runtime:
    """Where and how training runs: device, mixed precision, and the process group."""

    device: torch.device
    precision: str  # "32", "bf16" or "16"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def resolve_runtime(device: str, precision: str) -> Runtime:
    """Turn ``finetune.device``/``precision`` into a runtime; joins torchrun's process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise PipelineError("finetune.device: cuda, but PyTorch sees no CUDA device "
                            "(torch.cuda.is_available() is False); use auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and has_cuda)
    chosen = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "16") if use_cuda else "32"
    if precision == "16" and not use_cuda:
        raise PipelineError("finetune.precision: 16 (float16 mixed precision) needs a CUDA "
                            "device; on CPU use 32 or bf16")
    rank = 0
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(chosen)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
    return Runtime(chosen, precision, rank, world_size)


@dataclass
class EpochRecord:
    """One row of the training curves; epoch 0 is the starting point, before any step."""

    epoch: int
    lr: float
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float
    val_accuracy: float


@dataclass
class TrainingState:
    """Everything an interrupted run needs to carry on exactly where it stopped."""

    epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    epochs_without_improvement: int = 0

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch]

    def patience_spent(self, patience: int | None) -> bool:
        """Early stopping: ``patience`` epochs in a row without a better one (None: never)."""
        return patience is not None and self.epochs_without_improvement >= patience

    def improved_by(self, record: EpochRecord) -> bool:
        # Accuracy only, strictly (as Keras' save_best_only): losses under label smoothing
        # are not comparable with the sharper starting probe's.
        return record.val_accuracy > self.best.val_accuracy


@dataclass
class FinetuneResult:
    state: TrainingState
    train_images_per_second: float
    resumed_from_epoch: int
    stopped_early: bool


def checkpoint_key(params: FinetuneParams, seed: int, identity: dict[str, Any]) -> str:
    """What a checkpoint must match to be resumed: every parameter and input identity."""
    raw = json.dumps({"finetune": asdict(params), "seed": seed, **identity}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def _save_checkpoint(path: Path, key: str, net: torch.nn.Module, optimizer: Any,
                     scheduler: Any, scaler: Any, state: TrainingState) -> None:
    payload = {
        "key": key, "epoch": state.epoch, "model": net.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "history": [asdict(r) for r in state.history],
        "best_epoch": state.best_epoch, "best_state": state.best_state,
        "epochs_without_improvement": state.epochs_without_improvement,
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file is not worth failing the run for: start over
        log.warning("%s: unreadable checkpoint (%s); starting from the beginning", path, err)
        return None
    if payload.get("key") != key:
        log.info("%s belongs to other parameters or data; starting from the beginning", path)
        return None
    return payload


def _seed_epoch(seed: int, epoch: int) -> int:
    """One seed per epoch: a resumed run draws exactly what the uninterrupted one drew."""
    epoch_seed = (seed * 1_000_003 + epoch) % 2**63
    torch.manual_seed(epoch_seed)
    return epoch_seed


def _loader(dataset: torch.utils.data.Dataset, batch_size: int, runtime: Runtime, *,
            train: bool, epoch_seed: int = 0) -> torch.utils.data.DataLoader:
    sampler: torch.utils.data.Sampler | None = None
    generator = torch.Generator().manual_seed(epoch_seed)
    if train and runtime.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=epoch_seed,
                                                      drop_last=True)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    cuda = runtime.device.type == "cuda"
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
        # On CPU the forward and backward passes use every core; loader processes would
        # only compete with them.
        num_workers=min(8, os.cpu_count() or 1) if cuda else 0,
        generator=generator, pin_memory=cuda,
        drop_last=train and len(dataset) // runtime.world_size > batch_size)


def _to_device(images: torch.Tensor, labels: torch.Tensor,
               runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    return (images.to(runtime.device, non_blocking=True, memory_format=torch.channels_last),
            labels.to(runtime.device, non_blocking=True))


@torch.inference_mode()
def evaluate_loss_accuracy(net: torch.nn.Module, dataset: torch.utils.data.Dataset,
                           batch_size: int, runtime: Runtime) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy of ``net`` on ``dataset``."""
    was_training = net.training
    net.eval()
    total_loss, correct, count = 0.0, 0, 0
    for images, labels in _loader(dataset, batch_size, runtime, train=False):
        images, labels = _to_device(images, labels, runtime)
        with runtime.autocast():
            logits = net(images)
        total_loss += float(torch.nn.functional.cross_entropy(
            logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    net.train(was_training)
    return total_loss / max(count, 1), correct / max(count, 1)


def train(net: FinetuneNet, train_set: LabelledImages, val_set: LabelledImages,
          params: FinetuneParams, seed: int, runtime: Runtime, checkpoint: Path, key: str,
          on_epoch: Callable[[TrainingState], None] | None = None) -> FinetuneResult:
    """Fine-tune ``net`` (trainable flags already set); returns the best state by validation.

    Resumes from ``checkpoint`` when its ``key`` matches, writes it after every epoch.
    """
    batch_size = params.batch_size
    share = len(train_set) // runtime.world_size  # each process's part of the training set
    if batch_size > share:
        log.warning("finetune.batch_size=%d is larger than the %d training images%s; using %d",
                    batch_size, share, " of each process" if runtime.world_size > 1 else "",
                    share)
        batch_size = share
    trainable = [p for p in net.parameters() if p.requires_grad]
    model: torch.nn.Module = net
    if runtime.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(optimizer_groups(
        trainable_groups(net), params.lr, params.lr_decay, params.weight_decay))
    steps_per_epoch = len(_loader(train_set, batch_size, runtime, train=True))
    total_steps = steps_per_epoch * params.epochs
    warmup_steps = min(total_steps, round(params.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "16")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)

    state = TrainingState()
    saved = _load_checkpoint(checkpoint, key)
    if saved is not None:
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainingState(saved["epoch"], [EpochRecord(**r) for r in saved["history"]],
                              saved["best_epoch"], saved["best_state"],
                              saved["epochs_without_improvement"])
        log.info("resuming fine-tuning after epoch %d of %d from %s", state.epoch,
                 params.epochs, checkpoint)
    else:
        val_loss, val_accuracy = evaluate_loss_accuracy(net, val_set, batch_size, runtime)
        state.history.append(EpochRecord(0, 0.0, None, None, val_loss, val_accuracy))
        state.best_state = _copy_state(net)
        log.info("epoch 0 (start): val loss %.4f, val accuracy %.4f", val_loss, val_accuracy)
    resumed_from = state.epoch
    if on_epoch is not None:
        on_epoch(state)

    train_seconds, train_images = 0.0, 0
    stopped_early = state.patience_spent(params.patience)
    while state.epoch < params.epochs and not stopped_early:
        epoch = state.epoch + 1
        epoch_seed = _seed_epoch(seed, epoch)
        set_train_mode(net, params.bn)
        loader = _loader(train_set, batch_size, runtime, train=True, epoch_seed=epoch_seed)
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        started = time.perf_counter()
        for images, labels in tqdm(loader, desc=f"finetune epoch {epoch}", unit="batch",
                                   leave=False, disable=None if runtime.is_main else True):
            images, labels = _to_device(images, labels, runtime)
            with runtime.autocast():
                logits = model(images)
                loss = loss_fn(logits.float(), labels)
            if not torch.isfinite(loss):
                lr = optimizer.param_groups[0]["lr"]
                raise PipelineError(
                    f"finetune: the training loss became {loss.item()} in epoch {epoch} at "
                    f"learning rate {lr:.3g}; lower finetune.lr or keep finetune.grad_clip set")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if params.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        train_seconds += time.perf_counter() - started
        train_images += seen * runtime.world_size
        val_loss, val_accuracy = evaluate_loss_accuracy(net, val_set, batch_size, runtime)
        record = EpochRecord(epoch, optimizer.param_groups[0]["lr"], loss_sum / max(seen, 1),
                             correct / max(seen, 1), val_loss, val_accuracy)
        state.epoch = epoch
        state.history.append(record)
        if state.improved_by(record):
            state.best_epoch, state.best_state = epoch, _copy_state(net)
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        stopped_early = state.patience_spent(params.patience)
        log.info("epoch %d: train loss %.4f, train accuracy %.4f, val loss %.4f, "
                 "val accuracy %.4f, lr %.3g", epoch, record.train_loss,
                 record.train_accuracy, val_loss, val_accuracy, record.lr)
        if runtime.is_main:
            _save_checkpoint(checkpoint, key, net, optimizer, scheduler, scaler, state)
            if on_epoch is not None:
                on_epoch(state)
    if stopped_early and state.epoch < params.epochs:
        log.info("early stop after epoch %d: no better validation accuracy for %d epochs",
                 state.epoch, params.patience)
    rate = train_images / train_seconds if train_seconds else 0.0
    return FinetuneResult(state, rate, resumed_from, stopped_early and state.epoch < params.epochs)


def _copy_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True)
            for name, tensor in net.state_dict().items()}


def predict_proba(net: FinetuneNet, images: Sequence[np.ndarray], preprocessing: Preprocessing,
                  batch_size: int, runtime: Runtime) -> Iterator[np.ndarray]:
    """Class probabilities batch by batch, with the backbone's own eval preprocessing."""
    dataset = PreprocessedImages(images, preprocessing.eval_transform())
    net.eval().to(runtime.device, memory_format=torch.channels_last)
    with torch.inference_mode():
        for batch in _loader(dataset, batch_size, runtime, train=False):
            batch = batch.to(runtime.device, memory_format=torch.channels_last)
            with runtime.autocast():
                logits = net(batch)
            yield torch.softmax(logits.double(), dim=1).cpu().numpy()  # sums to 1 in float64


@dataclass
class FinetunedModel:
    """A fine-tuned network ready for new images: its preprocessing and class names."""

    net: FinetuneNet
    preprocessing: Preprocessing
    classes: list[str]
    info: dict[str, Any]
    name = "finetune"

    @property
    def short_side(self) -> int:
        """New images are first downscaled like the training images were."""
        return int(self.info["short_side"])

    def predict_proba(self, images: Sequence[np.ndarray], batch_size: int = 32,
                      runtime: Runtime | None = None) -> Iterator[np.ndarray]:
        runtime = runtime or resolve_runtime("auto", "auto")
        return predict_proba(self.net, images, self.preprocessing, batch_size, runtime)


def save_finetuned(directory: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """``model.safetensors`` (tensors only, no pickle) and ``model.json`` into ``directory``."""
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in state.items()},
              str(directory / "model.safetensors"))
    write_json(directory / "model.json", info)


def load_finetuned(directory: str | Path) -> FinetunedModel:
    """Rebuild the network recorded in ``directory/model.json`` and load its tensors."""
    from safetensors.torch import load_file

    from stages.backbones import load_backbone

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
    return FinetunedModel(net.eval(), preprocessing, list(info["classes"]), info)


def _sha256(path: Path) -> str | None:
    from stages.backbones import sha256_file

    return sha256_file(path) if path.is_file() else None


def starting_network(params: Params, meta: EmbeddingMeta, classes: Sequence[str],
                     head_path: Path) -> FinetuneNet:
    """The network fine-tuning starts from: pretrained weights with the linear probe as the
    new head (or source-classifier rows, or a random head), or for ``scratch`` the same
    architecture, randomly initialised from ``seed``."""
    from stages.backbones import load_backbone
    from stages.inference import backbone_of

    ft = params.finetune
    pretrained = ft.strategy != "scratch"
    torch.manual_seed(params.seed)  # scratch's network: timm initialises it as it builds it
    backbone = backbone_of(meta) if pretrained else load_backbone(meta.backbone, pretrained=False)
    torch.manual_seed(params.seed)  # the new head's initialisation
    net = build_network(backbone, len(classes))
    if pretrained and ft.init_from_head:
        head, _ = load_head(head_path)
        if not isinstance(head, LogisticHead):
            raise PipelineError(f"finetune.init_from_head: true starts the network's linear "
                                f"head from the linear probe, but {head_path} is an "
                                f"{head.kind} head; set finetune.init_from_head: false, or "
                                "head.kind: logistic")
        init_head_from_probe(net, head)
        if params.head.init_from_source:
            log.info("head.init_from_source unused: the head starts from the trained probe "
                     "(finetune.init_from_head: true)")
    elif pretrained and params.head.init_from_source:
        matches = match_source_classes(classes, backbone.source_labels or [])
        init_head_from_source(net, backbone.classifier, matches)
        log.info("head.init_from_source: %d of %d classes start from source classifier rows%s",
                 len(matches), len(classes), (": " + ", ".join(
                     f"{classes[i]} <- {backbone.source_labels[r].split(',')[0]}"
                     for i, r in matches.items())) if matches else "")
    return net


def run_finetune(params: Params, *, prepared_dir: Path, embeddings_dir: Path, head_path: Path,
                 out_dir: Path, checkpoint: Path) -> FinetuneResult:
    """The whole stage: build the network, train it (resuming), write ``out_dir``."""
    from stages.backbones import set_determinism
    from stages.data import ImageStore

    ft = params.finetune
    set_determinism(params.backbone.deterministic)  # before CUDA starts
    runtime = resolve_runtime(ft.device, ft.precision)
    meta = EmbeddingMeta.read(embeddings_dir)
    preprocessing = Preprocessing.from_dict(meta.preprocessing)
    stores = {split: ImageStore(prepared_dir, split) for split in ("train", "val")}
    classes = stores["train"].classes
    pretrained = ft.strategy != "scratch"
    net = starting_network(params, meta, classes, head_path)
    mark_trainable(net, ft.strategy, ft.unfreeze_k)
    bn = ft.bn
    if ft.strategy == "scratch" and bn == "frozen":
        log.info("scratch: batch-norm statistics are trained (there are no pretrained ones)")
        bn = "train"
    train_params = dataclasses.replace(ft, bn=bn)
    net.to(runtime.device, memory_format=torch.channels_last)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    log.info("fine-tuning %s (%s%s): %d of %d parameters trainable, on %s, precision %s, "
             "%d process(es)", meta.backbone, ft.strategy,
             f", k={ft.unfreeze_k}" if ft.strategy == "last_k" else "", trainable, total,
             runtime.device, runtime.precision, runtime.world_size)
    train_set = LabelledImages(stores["train"], stores["train"].labels,
                               train_transform(preprocessing, ft.augment))
    val_set = LabelledImages(stores["val"], stores["val"].labels,
                             preprocessing.eval_transform())
    key = checkpoint_key(train_params, params.seed, {
        "backbone": meta.backbone, "weights_sha256": meta.weights_sha256,
        "preprocessing": meta.preprocessing, "world_size": runtime.world_size,
        "init_from_source": params.head.init_from_source,
        "deterministic": params.backbone.deterministic,
        "head": _sha256(head_path) if pretrained and ft.init_from_head else None,
        "data": [_sha256(prepared_dir / f"{split}.npz") for split in ("train", "val")]})
    writing = atomic_output(out_dir) if runtime.is_main else contextlib.nullcontext(None)
    started = time.perf_counter()
    with writing as tmp:
        curves = _CurveWriter(tmp / "curves") if tmp is not None else None
        try:
            result = train(net, train_set, val_set, train_params, params.seed, runtime,
                           checkpoint, key, on_epoch=curves)
        except torch.cuda.OutOfMemoryError as err:
            raise PipelineError(
                f"finetune: the GPU ran out of memory at finetune.batch_size={ft.batch_size}; "
                f"try finetune.batch_size={max(1, ft.batch_size // 2)}") from err
        if tmp is not None:
            curves.close()
            best = result.state.best
            save_finetuned(tmp, result.state.best_state, {
                "backbone": meta.backbone, "weights": meta.weights if pretrained else "random-init",
                "pretrained": pretrained, "preprocessing": meta.preprocessing,
                "short_side": meta.short_side,
                "classes": classes, "strategy": ft.strategy,
                "unfreeze_k": ft.unfreeze_k if ft.strategy == "last_k" else None,
                "best_epoch": result.state.best_epoch,
                "val_accuracy": best.val_accuracy, "val_loss": best.val_loss})
            write_json(tmp / "status.json", {
                "enabled": True, "status": "trained", "strategy": ft.strategy,
                "epochs_run": result.state.epoch, "best_epoch": result.state.best_epoch,
                "val_accuracy": best.val_accuracy,
                "start_val_accuracy": result.state.history[0].val_accuracy,
                "stopped_early": result.stopped_early,
                "resumed_from_epoch": result.resumed_from_epoch,
                "trainable_parameters": trainable, "total_parameters": total,
                "device": str(runtime.device), "precision": runtime.precision,
                "processes": runtime.world_size, "bn": bn,
                "train_images_per_second": round(result.train_images_per_second, 2),
                "seconds": round(time.perf_counter() - started, 1)})
    if runtime.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if runtime.is_main:  # finished: a later run with these parameters starts afresh
        checkpoint.unlink(missing_ok=True)
    best = result.state.best
    log.info("fine-tuned: best epoch %d, val accuracy %.4f (start %.4f); %.1f training "
             "images/s", result.state.best_epoch, best.val_accuracy,
             result.state.history[0].val_accuracy, result.train_images_per_second)
    return result


class _CurveWriter:
    """Per-epoch curves through dvclive, replayed from the history when a run resumes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.logged = 0
        self.live: Any = None

    def __call__(self, state: TrainingState) -> None:
        if self.live is None:
            from dvclive import Live

            # Not dvclive's own DVC integration: the stage declares these files in dvc.yaml.
            self.live = Live(dir=str(self.directory), dvcyaml=False, save_dvc_exp=False,
                             report=None)
        for record in state.history[self.logged:]:
            self.live.step = record.epoch
            values = {"val/loss": record.val_loss, "val/accuracy": record.val_accuracy}
            if record.train_loss is not None:
                values.update({"train/loss": record.train_loss,
                               "train/accuracy": record.train_accuracy, "lr": record.lr})
            for name, value in values.items():
                self.live.log_metric(name, value)
            self.live.next_step()
        self.logged = len(state.history)

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
