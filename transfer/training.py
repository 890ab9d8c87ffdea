"""Fine-tuning: the training loop, its schedule and augmentation, checkpoints, curves, and the
whole ``finetune`` stage (``run_finetune``).

Training resumes from a per-epoch checkpoint and is seeded per epoch, so an interrupted run
ends with the same model as an uninterrupted one. The kept model is the epoch with the best
validation score by ``finetune.select_by`` (epoch 0 is the starting network), its raw weights
or their moving average (``finetune.ema_decay``), whichever scored better. ``finetune.lr:
auto`` runs a learning-rate range test first. Timings go to the log, never into the outputs:
the same parameters give byte-identical outputs on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from transfer.artifacts import atomic_output, sha256_file, write_json
from transfer.backbones import (
    PreprocessedImages,
    Preprocessing,
    compile_on_pixels,
    preprocessing_of,
)
from transfer.calibration import calibrate, report
from transfer.data import ImageStore
from transfer.embeddings import EmbeddingMeta
from transfer.engines import TorchEngine
from transfer.errors import PipelineError
from transfer.inference import network_scores, save_finetuned
from transfer.layout import (
    FINETUNE_CHECKPOINTS,
    FINETUNE_DIR,
    FINETUNE_LR_RANGE,
    finetune_checkpoint,
    write_missing_curves,
)
from transfer.lr_range import (
    BELOW_MINIMUM,
    DIVERGED,
    LrRange,
    RangeTest,
    curve_text,
    range_test_steps,
)
from transfer.network import (
    FinetuneNet,
    FlipAveraged,
    mark_trainable,
    set_train_mode,
    starting_network,
    trainable_groups,
)
from transfer.objective import Objective, balanced_sample_weights
from transfer.params import FinetuneParams, Params
from transfer.runtime import Runtime, end_process_group, resolve_runtime, set_determinism
from transfer.selection import SELECT_BY, Criterion, ValidationScores
from transfer.strategies import STRATEGIES

log = logging.getLogger(__name__)

# A training image smaller than this share of the picture is not a useful crop of it.
CROP_SCALE = {"light": (0.35, 1.0), "strong": (0.08, 1.0)}


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


@dataclass
class EpochRecord:
    """One row of the training curves; epoch 0 is the starting point, before any step."""

    epoch: int
    lr: float
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float
    val_accuracy: float
    val_balanced_accuracy: float
    weights: str = "raw"  # which weights scored: raw, or their moving average (ema)

    @property
    def scores(self) -> ValidationScores:
        return ValidationScores(self.val_loss, self.val_accuracy, self.val_balanced_accuracy)


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


@dataclass
class FinetuneResult:
    state: TrainingState
    train_images_per_second: float
    resumed_from_epoch: int
    stop_reason: str | None  # why it stopped before finetune.epochs (None: it did not)
    lr: float | None  # the head's peak learning rate: finetune.lr, or the range test's
    # choice (None: lr: auto, and no epoch to train)
    lr_range: LrRange | None = None

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason is not None


def checkpoint_key(params: FinetuneParams, seed: int, identity: dict[str, Any]) -> str:
    """What a checkpoint must match to be resumed: every parameter and input identity."""
    raw = json.dumps({"finetune": asdict(params), "seed": seed, **identity}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def _save_checkpoint(path: Path, key: str, net: torch.nn.Module, optimizer: Any,
                     scheduler: Any, scaler: Any, state: TrainingState, ema: Any,
                     lr_range: LrRange | None) -> None:
    payload = {
        "key": key, "epoch": state.epoch, "model": net.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "history": [asdict(r) for r in state.history],
        "best_epoch": state.best_epoch, "best_state": state.best_state,
        "epochs_without_improvement": state.epochs_without_improvement,
        "ema": ema.state_dict() if ema is not None else None,
        "lr_range": asdict(lr_range) if lr_range is not None else None,
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


def _remove_superseded(checkpoint_dir: Path, keep: Path | None = None) -> None:
    """Remove the checkpoints of runs with other parameters or data: they can never resume."""
    for stale in checkpoint_dir.glob(FINETUNE_CHECKPOINTS):
        if stale != keep:
            log.info("removing %s: a checkpoint of other parameters or data", stale)
            stale.unlink(missing_ok=True)


def _seed_epoch(seed: int, epoch: int) -> int:
    """One seed per epoch: a resumed run draws exactly what the uninterrupted one drew."""
    epoch_seed = (seed * 1_000_003 + epoch) % 2**63
    torch.manual_seed(epoch_seed)
    np.random.seed(epoch_seed % 2**32)  # timm's Mixup draws from NumPy's global generator
    return epoch_seed


def _loader(dataset: LabelledImages, batch_size: int, runtime: Runtime, *, train: bool,
            epoch_seed: int = 0, sampler: str = "random") -> torch.utils.data.DataLoader:
    """Training batches drawn by ``epoch_seed`` (each process its share under torchrun):
    shuffled, or with ``sampler: balanced`` drawn equally by class with replacement; or
    evaluation batches in order."""
    chosen: torch.utils.data.Sampler | None = None
    generator = torch.Generator().manual_seed(epoch_seed)
    if train and sampler == "balanced":
        generator.manual_seed(epoch_seed + runtime.rank)  # each process draws its own share
        chosen = torch.utils.data.WeightedRandomSampler(
            balanced_sample_weights(dataset.labels), len(dataset) // runtime.world_size,
            replacement=True, generator=generator)
    elif train and runtime.world_size > 1:
        chosen = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=epoch_seed,
                                                     drop_last=True)
    elif train:
        chosen = torch.utils.data.RandomSampler(dataset, generator=generator)
    return runtime.loader(dataset, batch_size, sampler=chosen, generator=generator,
                          drop_last=train and len(dataset) // runtime.world_size > batch_size)


def _to_device(images: torch.Tensor, labels: torch.Tensor,
               runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    return (images.to(runtime.device, non_blocking=True, memory_format=torch.channels_last),
            labels.to(runtime.device, non_blocking=True))


@torch.inference_mode()
def validation_scores(net: torch.nn.Module, dataset: LabelledImages, batch_size: int,
                      runtime: Runtime, flip_average: bool = False) -> ValidationScores:
    """Log loss (no smoothing), accuracy and balanced accuracy of ``net`` on ``dataset``, on
    each image and its mirror image averaged with ``flip_average``, as inference will."""
    was_training = net.training
    net.eval()
    model = FlipAveraged(net) if flip_average else net
    probabilities, labels = [], []
    for images, y in _loader(dataset, batch_size, runtime, train=False):
        images, y = _to_device(images, y, runtime)
        with runtime.autocast():
            logits = model(images)
        probabilities.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
    net.train(was_training)
    if not labels:
        return ValidationScores(0.0, 0.0, 0.0)
    return ValidationScores.of(np.concatenate(labels), np.concatenate(probabilities))


class _Step:
    """One optimisation step: the objective's batch and loss, backward, clipping, AdamW."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                 objective: Objective, grad_clip: float | None, runtime: Runtime) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.objective, self.grad_clip, self.runtime = objective, grad_clip, runtime
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The training loss (not finite: no step taken), the logits and the labels."""
        images, labels = _to_device(images, labels, self.runtime)
        images, targets = self.objective.mix(images, labels)
        with self.runtime.autocast():
            logits = self.model(images)
            loss = self.objective.loss(logits, targets)
        value = float(loss.detach())
        if math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return value, logits, labels


def _optimizer(net: FinetuneNet, lr: float, params: FinetuneParams) -> torch.optim.AdamW:
    return torch.optim.AdamW(optimizer_groups(trainable_groups(net), lr, params.lr_decay,
                                              params.weight_decay))


def _scaler(runtime: Runtime) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "float16")


def _endless_batches(train_set: LabelledImages, batch_size: int, runtime: Runtime,
                     sampler: str, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches, epoch after epoch, each epoch drawn by its own seed below every
    training epoch's: training then draws what it would have drawn without them."""
    for rounds in itertools.count(1):
        yield from _loader(train_set, batch_size, runtime, train=True, sampler=sampler,
                           epoch_seed=_seed_epoch(seed, -rounds))


def find_learning_rate(net: FinetuneNet, model: torch.nn.Module, train_set: LabelledImages,
                       params: FinetuneParams, batch_size: int, seed: int, runtime: Runtime,
                       objective: Objective) -> LrRange:
    """The learning-rate range test (``transfer.lr_range``) from the starting network, which
    is restored afterwards. Every group trains at its share of the rate tried, as in training."""
    start = _copy_state(net)
    optimizer = _optimizer(net, 1.0, params)
    shares = [group["lr"] for group in optimizer.param_groups]
    step = _Step(model, optimizer, _scaler(runtime), objective, params.grad_clip, runtime)
    test = RangeTest(range_test_steps(
        len(_loader(train_set, batch_size, runtime, train=True, sampler=params.sampler))))
    set_train_mode(net, params.bn)
    batches = tqdm(_endless_batches(train_set, batch_size, runtime, params.sampler, seed),
                   total=test.steps, desc="learning-rate range test", unit="batch",
                   leave=False, disable=None if runtime.is_main else True)
    for done, (images, labels) in enumerate(itertools.islice(batches, test.steps)):
        lr = test.rate(done)
        for group, share in zip(optimizer.param_groups, shares, strict=True):
            group["lr"] = lr * share
        loss, _, _ = step(images, labels)
        if not test.record(lr, runtime.mean_over_processes(loss)):
            break
    batches.close()
    net.load_state_dict(start)
    for p in step.trainable:
        p.grad = None
    found = test.result()
    log.info("learning-rate range test: %d steps, lowest smoothed loss at %.3g, %s; "
             "finetune.lr: auto chose %.3g", len(found.lrs), found.lr * BELOW_MINIMUM,
             f"diverged at {found.diverged_at:.3g}" if found.diverged_at else "no divergence",
             found.lr)
    return found


def train(net: FinetuneNet, train_set: LabelledImages, val_set: LabelledImages,
          params: FinetuneParams, seed: int, runtime: Runtime, checkpoint: Path, key: str,
          on_epoch: Callable[[TrainingState], None] | None = None) -> FinetuneResult:
    """Fine-tune ``net`` (trainable flags already set); returns the best state by validation.

    ``lr: auto`` runs the range test first. Resumes from ``checkpoint`` when its ``key``
    matches (the range test's outcome included), writes it after every epoch.
    """
    batch_size = params.batch_size
    share = len(train_set) // runtime.world_size  # each process's part of the training set
    if batch_size > share:
        log.warning("finetune.batch_size=%d is larger than the %d training images%s; using %d",
                    batch_size, share, " of each process" if runtime.world_size > 1 else "",
                    share)
        batch_size = share
    model: torch.nn.Module = net
    if runtime.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    objective = Objective(params, net.head.out_features, train_set.labels, runtime.device)
    criterion = SELECT_BY[params.select_by]
    saved = _load_checkpoint(checkpoint, key)
    start = None if saved is not None else validation_scores(net, val_set, batch_size, runtime,
                                                             params.flip_average)
    lr_range = None
    if params.lr == "auto" and not (start is not None and criterion.unbeatable(start)):
        lr_range = (LrRange(**saved["lr_range"]) if saved is not None else find_learning_rate(
            net, model, train_set, params, batch_size, seed, runtime, objective))
    # Where the start scores as well as any epoch could, no epoch is trained, and lr: auto
    # needs no rate (nor its range test, minutes on a small set).
    lr = lr_range.lr if lr_range is not None else None if params.lr == "auto" else params.lr
    optimizer = _optimizer(net, 0.0 if lr is None else lr, params)
    steps_per_epoch = len(_loader(train_set, batch_size, runtime, train=True,
                                  sampler=params.sampler))
    total_steps = steps_per_epoch * params.epochs
    warmup_steps = min(total_steps, round(params.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
    scaler = _scaler(runtime)
    step = _Step(model, optimizer, scaler, objective, params.grad_clip, runtime)
    ema = None
    if params.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(net, decay=params.ema_decay, use_warmup=True)

    def validate(epoch: int, scores: ValidationScores | None = None) -> EpochRecord:
        """The epoch's record: the raw weights' scores (``scores`` where already known), or
        the average's where better."""
        if scores is None:
            scores = validation_scores(net, val_set, batch_size, runtime, params.flip_average)
        weights = "raw"
        if ema is not None and epoch > 0:
            averaged = validation_scores(ema.module, val_set, batch_size, runtime,
                                         params.flip_average)
            log.info("epoch %d: EMA weights: val loss %.4f, val accuracy %.4f (raw: %.4f, "
                     "%.4f)", epoch, averaged.loss, averaged.accuracy, scores.loss,
                     scores.accuracy)
            if criterion.better(averaged, scores):
                scores, weights = averaged, "ema"
        return EpochRecord(epoch, optimizer.param_groups[0]["lr"] if epoch else 0.0, None,
                           None, scores.loss, scores.accuracy, scores.balanced_accuracy,
                           weights)

    state = TrainingState()
    if saved is not None:
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = TrainingState(saved["epoch"], [EpochRecord(**r) for r in saved["history"]],
                              saved["best_epoch"], saved["best_state"],
                              saved["epochs_without_improvement"])
        log.info("resuming fine-tuning after epoch %d of %d from %s", state.epoch,
                 params.epochs, checkpoint)
    else:
        state.history.append(validate(0, start))
        state.best_state = _copy_state(net)
        log.info("epoch 0 (start): val loss %.4f, val accuracy %.4f", state.best.val_loss,
                 state.best.val_accuracy)
    resumed_from = state.epoch
    if on_epoch is not None:
        on_epoch(state)

    train_seconds, train_images = 0.0, 0
    stop_reason = _stop_reason(state, criterion, params.patience, len(val_set))
    while state.epoch < params.epochs and stop_reason is None:
        epoch = state.epoch + 1
        epoch_seed = _seed_epoch(seed, epoch)
        set_train_mode(net, params.bn)
        loader = _loader(train_set, batch_size, runtime, train=True, epoch_seed=epoch_seed,
                         sampler=params.sampler)
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        started = time.perf_counter()
        for images, labels in tqdm(loader, desc=f"finetune epoch {epoch}", unit="batch",
                                   leave=False, disable=None if runtime.is_main else True):
            loss, logits, labels = step(images, labels)
            if not math.isfinite(loss):
                raise PipelineError(
                    f"finetune: the training loss became {loss} in epoch {epoch} at learning "
                    f"rate {optimizer.param_groups[0]['lr']:.3g}; lower finetune.lr or keep "
                    "finetune.grad_clip set")
            scheduler.step()
            if ema is not None:
                ema.update(net, step=scheduler.last_epoch)
            loss_sum += loss * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        train_seconds += time.perf_counter() - started
        train_images += seen * runtime.world_size
        record = dataclasses.replace(validate(epoch), train_loss=loss_sum / max(seen, 1),
                                     train_accuracy=correct / max(seen, 1))
        state.epoch = epoch
        state.history.append(record)
        if criterion.better(record.scores, state.best.scores):
            kept = ema.module if record.weights == "ema" else net
            state.best_epoch, state.best_state = epoch, _copy_state(kept)
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        stop_reason = _stop_reason(state, criterion, params.patience, len(val_set))
        log.info("epoch %d: train loss %.4f, train accuracy %.4f, val loss %.4f, "
                 "val accuracy %.4f (%s weights), lr %.3g", epoch, record.train_loss,
                 record.train_accuracy, record.val_loss, record.val_accuracy, record.weights,
                 record.lr)
        first = state.history[0]  # diverged as the range test calls it, and worse than the start
        if record.val_loss > DIVERGED * first.val_loss \
                and record.val_accuracy < first.val_accuracy:
            log.warning("epoch %d: the validation loss is %.3g, %.0fx the start's (%.3g), and "
                        "the accuracy fell from %.4f to %.4f: the learning rate (%.3g at its "
                        "peak) is likely too high; lower finetune.lr or set it to auto", epoch,
                        record.val_loss, record.val_loss / first.val_loss, first.val_loss,
                        first.val_accuracy, record.val_accuracy, lr)
        if runtime.is_main:
            if on_epoch is not None:  # first: an epoch with a checkpoint has its curves too
                on_epoch(state)
            _save_checkpoint(checkpoint, key, net, optimizer, scheduler, scaler, state, ema,
                             lr_range)
    if state.epoch >= params.epochs:
        stop_reason = None  # it ran every epoch
    if stop_reason is not None:
        (log.warning if state.epoch == 0 else log.info)(
            "fine-tuning stopped after epoch %d of %d: %s", state.epoch, params.epochs,
            stop_reason)
    rate = train_images / train_seconds if train_seconds else 0.0
    return FinetuneResult(state, rate, resumed_from, stop_reason, lr, lr_range)


def _stop_reason(state: TrainingState, criterion: Criterion, patience: int | None,
                 n_val: int) -> str | None:
    """Why training should stop before its last epoch, or None: the kept epoch scores as
    well as any can (no later epoch would be kept over it), or ``patience`` epochs in a row
    were no better."""
    score = criterion.name.replace("_", " ")
    if criterion.unbeatable(state.best.scores):
        kept = "the network it started from (epoch 0)" if state.best_epoch == 0 \
            else f"epoch {state.best_epoch}"
        return (f"{kept} has a validation {score} of 1 on the {n_val} validation images, so "
                "no later epoch could be kept over it; to compare epochs beyond that, enlarge "
                "the validation split (data.val_size) or set finetune.select_by: log_loss")
    if state.patience_spent(patience):
        return f"no better validation {score} for {patience} epoch{'s' * (patience != 1)}"
    return None


def _copy_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True)
            for name, tensor in net.state_dict().items()}


def _sha256(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def run_finetune(params: Params, *, prepared_dir: Path, embeddings_dir: Path, head_path: Path,
                 out_dir: Path, curves_dir: Path, checkpoint_dir: Path) -> FinetuneResult:
    """The whole stage: build the network, train it (resuming), write ``out_dir`` at the end
    and the curves in ``curves_dir`` after every epoch."""
    ft = params.finetune
    strategy = STRATEGIES[ft.strategy]
    set_determinism(params.backbone.deterministic)  # before CUDA starts
    runtime = resolve_runtime(ft.device, ft.precision, key="finetune.precision", training=True,
                              distributed=True)
    meta = EmbeddingMeta.read(embeddings_dir)
    preprocessing = preprocessing_of(meta)
    stores = {split: ImageStore(prepared_dir, split) for split in ("train", "val")}
    classes = stores["train"].classes
    net = starting_network(params, meta, classes, head_path)
    mark_trainable(net, ft.strategy, ft.unfreeze_k)
    bn = ft.bn
    if strategy.needs_trained_bn and bn == "frozen":
        log.info("%s: batch-norm statistics are trained (there are no pretrained ones)",
                 strategy.name)
        bn = "train"
    train_params = dataclasses.replace(ft, bn=bn)
    net.to(runtime.device, memory_format=torch.channels_last)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    log.info("fine-tuning %s (%s): %d of %d parameters trainable, on %s, precision %s, "
             "%d process(es)", meta.backbone, strategy.label(ft.unfreeze_k), trainable, total,
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
        "head": _sha256(head_path) if strategy.pretrained and ft.init_from_head else None,
        "data": [_sha256(prepared_dir / f"{split}.npz") for split in ("train", "val")]})
    checkpoint = checkpoint_dir / finetune_checkpoint(key)
    if runtime.is_main:
        _remove_superseded(checkpoint_dir, keep=checkpoint)
    writing = atomic_output(out_dir) if runtime.is_main else contextlib.nullcontext(None)
    started = time.perf_counter()
    with writing as tmp:
        curves = None
        if tmp is not None:
            tmp.mkdir()
            curves = _CurveWriter(curves_dir)
        try:
            result = train(net, train_set, val_set, train_params, params.seed, runtime,
                           checkpoint, key, on_epoch=curves)
        except torch.cuda.OutOfMemoryError as err:
            raise PipelineError(
                f"finetune: the GPU ran out of memory at finetune.batch_size={ft.batch_size}; "
                f"try finetune.batch_size={max(1, ft.batch_size // 2)}") from err
        if tmp is not None:
            curves.close()
            write_missing_curves(curves_dir)  # no epoch trained: no training curves yet
            best = result.state.best
            net.load_state_dict(result.state.best_state)
            scorer = FlipAveraged(net) if ft.flip_average else net  # as evaluate will score
            calibration = fit_temperature_on(scorer, stores["val"], preprocessing,
                                             min(ft.batch_size, 64), runtime, len(classes))
            save_finetuned(tmp, result.state.best_state, {
                "backbone": meta.backbone,
                "weights": meta.weights if strategy.pretrained else "random-init",
                "pretrained": strategy.pretrained, "preprocessing": meta.preprocessing,
                "short_side": meta.short_side,
                "classes": classes, "strategy": ft.strategy,
                "unfreeze_k": ft.unfreeze_k if strategy.uses_unfreeze_k() else None,
                "flip_average": ft.flip_average, "best_epoch": result.state.best_epoch,
                "best_weights": best.weights, "val_accuracy": best.val_accuracy,
                "val_loss": best.val_loss, "temperature": calibration["temperature"]})
            (tmp / FINETUNE_LR_RANGE.relative_to(FINETUNE_DIR)).write_text(
                curve_text(result.lr_range), encoding="utf-8")
            # No timings and nothing about how the run went (resumed or not): the same
            # parameters give the same bytes, so DVC's run cache and teammates' pushes match.
            write_json(tmp / "status.json", {
                "enabled": True, "status": "trained", "strategy": ft.strategy,
                "lr": result.lr, "lr_range_test": result.lr_range is not None,
                "select_by": ft.select_by,
                "epochs_run": result.state.epoch, "best_epoch": result.state.best_epoch,
                "best_weights": best.weights, "val_accuracy": best.val_accuracy,
                "val_balanced_accuracy": best.val_balanced_accuracy, "val_loss": best.val_loss,
                "start_val_accuracy": result.state.history[0].val_accuracy,
                "stopped_early": result.stopped_early, "stop_reason": result.stop_reason,
                "trainable_parameters": trainable, "total_parameters": total,
                "device": runtime.device.type, "precision": runtime.precision,
                "processes": runtime.world_size, "bn": bn, "calibration": calibration})
    end_process_group(runtime)
    if runtime.is_main:  # finished: a later run with these parameters starts afresh
        checkpoint.unlink(missing_ok=True)
    best = result.state.best
    resumed = (f", resumed after epoch {result.resumed_from_epoch}"
               if result.resumed_from_epoch else "")
    speed = (f"{result.train_images_per_second:.1f} training images/s, "
             if result.train_images_per_second else "no epoch trained, ")
    log.info("fine-tuned: best epoch %d, val accuracy %.4f (start %.4f); %s%.1fs in all%s",
             result.state.best_epoch, best.val_accuracy, result.state.history[0].val_accuracy,
             speed, time.perf_counter() - started, resumed)
    return result


def fit_temperature_on(net: torch.nn.Module, store: ImageStore, preprocessing: Preprocessing,
                       batch_size: int, runtime: Runtime, n_classes: int) -> dict[str, Any]:
    """The temperature of ``net``'s scores on the validation ``store`` (as the head's is
    fitted); returns what status.json records of it."""
    scorer = compile_on_pixels(net, preprocessing, TorchEngine(), runtime, "fine-tuned network")
    scores = np.concatenate(list(network_scores(scorer, store, preprocessing, batch_size,
                                                runtime)))
    calibration = calibrate(scores, np.arange(n_classes), store.labels)
    return report(calibration, "fine-tuned model", f"validation split ({len(store)} images)")


class _CurveWriter:
    """Per-epoch curves through dvclive, written as each epoch ends (so that they can be watched
    while training runs) and replayed from the history when a run resumes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.logged = 0
        self.live: Any = None
        shutil.rmtree(directory, ignore_errors=True)  # another run's curves, or a killed one's

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
