"""The fine-tuning loop: learning rates per depth, schedule, augmentation, stopping."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

from transfer.backbones import load_backbone
from transfer.errors import PipelineError
from transfer.network import FinetuneNet, mark_trainable, trainable_groups
from transfer.params import FinetuneParams
from transfer.runtime import Runtime
from transfer.selection import ValidationScores
from transfer.training import (
    LabelledImages,
    optimizer_groups,
    train,
    train_transform,
    warmup_cosine,
)

CPU = Runtime(torch.device("cpu"), "float32")


def test_lower_blocks_learn_slower_and_norms_and_biases_get_no_weight_decay(net):
    mark_trainable(net, "last_k", 2)
    groups = optimizer_groups(trainable_groups(net), lr=1e-3, lr_decay=0.5, weight_decay=0.05)
    by_depth = {}
    for group in groups:
        by_depth.setdefault(group["depth"], set()).add(group["lr"])
        for p in group["params"]:
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
    assert by_depth == {0: {1e-3}, 1: {5e-4}, 2: {2.5e-4}}


def test_warmup_then_cosine_decay_to_zero():
    factors = [warmup_cosine(step, 10, 100) for step in range(101)]
    assert factors[0] < factors[5] < factors[9] < 1.0
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)


def test_augmentation_keeps_size_and_normalization_and_none_is_the_eval_transform():
    from PIL import Image

    preprocessing = load_backbone("tf_efficientnet_lite0").preprocessing
    image = Image.fromarray(np.full((90, 120, 3), 200, dtype=np.uint8))
    expected = preprocessing.eval_transform()(image)
    assert torch.equal(train_transform(preprocessing, "none")(image), expected)
    for augment in ("light", "strong"):
        torch.manual_seed(0)
        out = train_transform(preprocessing, augment)(image)
        assert out.shape == expected.shape and out.dtype == torch.float32
    # A uniform image stays uniform under crops and flips: normalized like the eval input.
    torch.manual_seed(0)
    assert torch.allclose(train_transform(preprocessing, "light")(image), expected, atol=1e-5)


class _NaNNet(FinetuneNet):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images) * float("nan")


def _pixels(n: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), 40 * (i % 3), dtype=np.uint8) for i in range(n)]


def _tensor_transform(image) -> torch.Tensor:
    return torch.as_tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 255


def _flat_net() -> FinetuneNet:
    net = FinetuneNet(torch.nn.Flatten(), 8 * 8 * 3, 3)
    return net


def test_a_non_finite_loss_stops_with_the_epoch_and_learning_rate(tmp_path):
    net = _NaNNet(torch.nn.Flatten(), 8 * 8 * 3, 3)
    data = LabelledImages(_pixels(6), np.arange(6) % 3, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=2, batch_size=2, lr=0.5,
                            warmup_epochs=0)
    with pytest.raises(PipelineError, match=r"loss became nan in epoch 1 at learning rate 0\.5"):
        train(net, data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")


def test_a_batch_larger_than_the_data_is_clamped_with_a_warning(tmp_path, caplog):
    net = _flat_net()
    data = LabelledImages(_pixels(6), np.arange(6) % 3, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=1, batch_size=64)
    with caplog.at_level(logging.WARNING):
        result = train(net, data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")
    assert "finetune.batch_size=64 is larger than the 6 training images; using 6" in caplog.text
    assert result.state.epoch == 1


def test_early_stopping_after_patience_epochs_keeps_the_best_start(tmp_path, monkeypatch):
    from transfer import training

    net = _flat_net()
    start = {n: t.clone() for n, t in net.state_dict().items()}
    data = LabelledImages(_pixels(6), np.arange(6) % 3, _tensor_transform)
    # (loss, accuracy): an equal accuracy is no improvement, even with a lower loss
    scores = iter([ValidationScores(0.5, 0.8, 0.8), ValidationScores(0.6, 0.7, 0.7),
                   ValidationScores(0.3, 0.8, 0.8), ValidationScores(0.3, 0.9, 0.9)])
    monkeypatch.setattr(training, "validation_scores", lambda *a: next(scores))
    params = FinetuneParams(enabled=True, strategy="head", epochs=6, batch_size=2, patience=2)
    result = train(net, data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")
    assert result.stopped_early and result.state.epoch == 2  # epochs 1 and 2 were no better
    assert result.state.best_epoch == 0
    assert all(torch.equal(start[n], t) for n, t in result.state.best_state.items())
    assert [r.val_accuracy for r in result.state.history] == [0.8, 0.7, 0.8]


def _separable(n: int, labels: np.ndarray) -> list[np.ndarray]:
    """Noisy 8x8 images whose class decides which third of the pixels is bright."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, size=(n, 8, 8, 3))
    for i, label in enumerate(labels):
        images[i, :, :, label] += 150
    return list(images.astype(np.uint8))


@pytest.mark.parametrize(("select_by", "kept"),
                         [("accuracy", 2), ("balanced_accuracy", 3), ("log_loss", 1)])
def test_select_by_keeps_the_epoch_best_by_that_score(tmp_path, monkeypatch, select_by, kept):
    from transfer import training

    net = _flat_net()
    data = LabelledImages(_pixels(6), np.arange(6) % 3, _tensor_transform)
    # epoch: (log loss, accuracy, balanced accuracy); each criterion has its own best epoch
    scores = [(0.5, 0.80, 0.70), (0.2, 0.80, 0.75), (0.4, 0.90, 0.72), (0.3, 0.85, 0.90)]
    states = []

    def scored(model, *args):
        states.append({n: t.clone() for n, t in model.state_dict().items()})
        return ValidationScores(*scores[len(states) - 1])

    monkeypatch.setattr(training, "validation_scores", scored)
    params = FinetuneParams(enabled=True, strategy="head", epochs=3, batch_size=2,
                            patience=None, select_by=select_by)
    result = train(net, data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")
    assert result.state.best_epoch == kept
    assert all(torch.equal(states[kept][n], t) for n, t in result.state.best_state.items())
    assert not all(torch.equal(states[0][n], t) for n, t in result.state.best_state.items())


def test_early_stopping_counts_epochs_without_a_lower_log_loss(tmp_path, monkeypatch):
    from transfer import training

    scores = iter([ValidationScores(0.5, 0.8, 0.8), ValidationScores(0.4, 0.7, 0.7),
                   ValidationScores(0.45, 0.9, 0.9), ValidationScores(0.3, 0.9, 0.9)])
    monkeypatch.setattr(training, "validation_scores", lambda *a: next(scores))
    data = LabelledImages(_pixels(6), np.arange(6) % 3, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=6, batch_size=2, patience=1,
                            select_by="log_loss")
    result = train(_flat_net(), data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")
    # a higher accuracy in epoch 2 does not count: its log loss is above epoch 1's
    assert result.stopped_early and result.state.epoch == 2 and result.state.best_epoch == 1


def test_ema_weights_differ_from_the_raw_ones_and_are_kept_when_they_score_better(
        tmp_path, monkeypatch):
    import timm.utils

    from transfer import training

    averages = []

    class RecordedEma(timm.utils.ModelEmaV3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            averages.append(self)

    monkeypatch.setattr(timm.utils, "ModelEmaV3", RecordedEma)
    net = _flat_net()
    # every raw network scores 0.6, the moving average 0.9
    monkeypatch.setattr(training, "validation_scores", lambda model, *a: ValidationScores(
        0.5, 0.9 if averages and model is averages[0].module else 0.6, 0.6))
    labels = np.arange(12) % 3
    data = LabelledImages(_separable(12, labels), labels, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=1, batch_size=4, lr=0.05,
                            warmup_epochs=0, ema_decay=0.9)
    result = train(net, data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")
    [ema] = averages
    kept, raw = result.state.best_state, net.state_dict()
    assert result.state.best_epoch == 1 and result.state.best.weights == "ema"
    assert all(torch.equal(kept[n], t) for n, t in ema.module.state_dict().items())
    assert not torch.allclose(kept["head.weight"], raw["head.weight"])
    # Without the average, epoch 1 is no better than the start, which stays.
    params = dataclasses.replace(params, ema_decay=None)
    result = train(_flat_net(), data, data, params, 0, CPU, tmp_path / "other.pt", "other")
    assert result.state.best_epoch == 0 and result.state.best.weights == "raw"


def test_the_range_test_picks_a_rate_below_divergence_and_restores_the_network(tmp_path):
    from transfer.objective import Objective
    from transfer.training import find_learning_rate

    # Bright inputs and one label in ten wrong: large steps overshoot, and the loss diverges.
    labels = np.arange(400) % 3
    noisy = np.where(np.random.default_rng(1).random(400) < 0.1, (labels + 1) % 3, labels)
    data = LabelledImages(_separable(400, labels), noisy,
                          lambda image: 10 * _tensor_transform(image))
    params = FinetuneParams(enabled=True, strategy="head", batch_size=8, lr="auto",
                            label_smoothing=0.0, epochs=2, warmup_epochs=0, patience=None)
    torch.manual_seed(0)
    net = _flat_net()
    net.requires_grad_(True)
    start = {n: t.clone() for n, t in net.state_dict().items()}
    found = find_learning_rate(net, net, data, params, 8, 0, CPU,
                               Objective(params, 3, noisy, CPU.device))
    assert all(torch.equal(start[n], t) for n, t in net.state_dict().items())  # restored
    lowest = int(np.argmin(found.losses))
    assert found.lr == pytest.approx(found.lrs[lowest] / 10)
    assert found.diverged_at is not None and found.lr < found.lrs[lowest] < found.diverged_at
    assert found.losses[-1] > 4 * found.losses[lowest]  # where it stopped: diverged
    assert found.lrs == sorted(found.lrs) and len(found.lrs) <= 100

    def final_train_loss(lr: float) -> float:
        torch.manual_seed(0)
        run = dataclasses.replace(params, lr=lr)
        result = train(_flat_net(), data, data, run, 0, CPU, tmp_path / f"{lr}.pt", str(lr))
        return result.state.history[-1].train_loss

    # Training at the chosen rate lowers the loss; at the divergence point it blows up.
    chosen = final_train_loss(found.lr)
    assert chosen < found.losses[0]
    assert final_train_loss(found.diverged_at) > 3 * chosen


def test_a_start_no_epoch_can_beat_is_kept_without_training(tmp_path, caplog):
    """Right on every validation image from the start, no epoch can be kept over it by
    accuracy: training stops before its first epoch and says why; by log loss it trains."""
    labels = np.arange(24) % 3
    data = LabelledImages(_separable(24, labels), labels, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=2, batch_size=4, lr=0.01)
    result = train(_flat_net(), data, data, params, 0, CPU, tmp_path / "a.pt", "a")
    assert result.state.best.val_accuracy == 1.0  # the premise
    assert result.state.epoch == 0 and result.stopped_early and len(result.state.history) == 1
    assert result.stop_reason == (
        "the network it started from (epoch 0) has a validation accuracy of 1 on the 24 "
        "validation images, so no later epoch could be kept over it; to compare epochs beyond "
        "that, enlarge the validation split (data.val_size) or set finetune.select_by: log_loss")
    assert "fine-tuning stopped after epoch 0 of 2: the network it started from" in caplog.text
    by_loss = dataclasses.replace(params, select_by="log_loss")
    result = train(_flat_net(), data, data, by_loss, 0, CPU, tmp_path / "b.pt", "b")
    assert result.state.epoch == 2 and result.stop_reason is None


def test_the_stop_reason_names_the_unbeatable_epoch_or_the_patience():
    from transfer.selection import SELECT_BY
    from transfer.training import EpochRecord, TrainingState, _stop_reason

    def record(epoch, accuracy):
        return EpochRecord(epoch, 0.0, None, None, 0.1, accuracy, accuracy)

    state = TrainingState(2, [record(0, 0.9), record(1, 0.95), record(2, 1.0)], best_epoch=2)
    assert _stop_reason(state, SELECT_BY["accuracy"], None, 40).startswith(
        "epoch 2 has a validation accuracy of 1 on the 40 validation images")
    assert _stop_reason(state, SELECT_BY["log_loss"], None, 40) is None  # a loss can fall
    state.best_epoch, state.epochs_without_improvement = 1, 1
    assert _stop_reason(state, SELECT_BY["accuracy"], 1, 40) == \
        "no better validation accuracy for 1 epoch"
    assert _stop_reason(state, SELECT_BY["accuracy"], 2, 40) is None


def test_lr_auto_is_recorded_and_a_loss_that_diverges_at_once_is_one_error(tmp_path):
    labels = np.arange(24) % 3
    data = LabelledImages(_separable(24, labels), labels, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=1, batch_size=4, lr="auto",
                            select_by="log_loss")  # accuracy: right from the start, no epoch
    result = train(_flat_net(), data, data, params, 0, CPU, tmp_path / "a.pt", "a")
    assert result.lr_range is not None and result.lr == result.lr_range.lr
    assert result.state.history[1].lr == pytest.approx(result.lr)  # no warm-up left at the end
    nan_net = _NaNNet(torch.nn.Flatten(), 8 * 8 * 3, 3)
    with pytest.raises(PipelineError, match=r"^finetune.lr: auto: the learning-rate range test "
                                            r"found no usable rate: the loss diverged at 1e-07, "
                                            r"at its first step; set finetune.lr to a number$"):
        train(nan_net, data, data, params, 0, CPU, tmp_path / "b.pt", "b")


def test_lr_auto_runs_no_range_test_where_no_epoch_could_beat_the_start(tmp_path, caplog):
    labels = np.arange(24) % 3
    data = LabelledImages(_separable(24, labels), labels, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=3, batch_size=4, lr="auto")
    caplog.set_level("INFO", logger="transfer.training")
    result = train(_perfect_flat_net(), data, data, params, 0, CPU, tmp_path / "a.pt", "a")
    assert result.state.history[0].val_accuracy == 1.0  # every validation image right
    assert result.state.epoch == 0 and result.stopped_early
    assert result.lr_range is None and result.lr is None
    assert "learning-rate range test" not in caplog.text


def _perfect_flat_net() -> FinetuneNet:
    net = _flat_net()
    with torch.no_grad():  # a head that reads each class's bright channel
        net.head.weight.zero_()
        net.head.bias.zero_()
        for c in range(3):
            net.head.weight[c, c * 64:(c + 1) * 64] = 1.0
    return net


def test_an_epoch_far_worse_than_the_start_warns_that_the_rate_is_too_high(tmp_path, caplog):
    labels = np.arange(24) % 3
    data = LabelledImages(_separable(24, labels), labels, _tensor_transform)
    params = FinetuneParams(enabled=True, strategy="head", epochs=1, batch_size=4, lr=10.0,
                            warmup_epochs=0, select_by="log_loss")
    result = train(_perfect_flat_net(), data, data, params, 0, CPU, tmp_path / "a.pt", "a")
    assert result.state.best_epoch == 0  # kept the start, as before
    assert "epoch 1: the validation loss is" in caplog.text
    assert "the learning rate (10 at its peak) is likely too high" in caplog.text
    caplog.clear()
    gentle = dataclasses.replace(params, lr=1e-4)
    train(_perfect_flat_net(), data, data, gentle, 0, CPU, tmp_path / "b.pt", "b")
    assert "likely too high" not in caplog.text


def test_the_balanced_sampler_draws_every_class_about_equally(tmp_path):
    from transfer.training import _loader

    labels = np.array([0] * 90 + [1] * 10)
    data = LabelledImages(_pixels(100), labels, _tensor_transform)
    drawn = {}
    for sampler in ("random", "balanced"):
        loader = _loader(data, 10, CPU, train=True, epoch_seed=3, sampler=sampler)
        drawn[sampler] = np.bincount(np.concatenate([y.numpy() for _, y in loader]), minlength=2)
    assert drawn["random"].tolist() == [90, 10]  # each image once
    assert drawn["balanced"].sum() == 100 and 35 <= drawn["balanced"][1] <= 65
