"""The fine-tuning loop: learning rates per depth, schedule, augmentation, stopping."""

import logging

import numpy as np
import pytest
import torch

from transfer.backbones import load_backbone
from transfer.errors import PipelineError
from transfer.network import FinetuneNet, mark_trainable, trainable_groups
from transfer.params import FinetuneParams
from transfer.runtime import Runtime
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
    scores = iter([(0.5, 0.8), (0.6, 0.7), (0.3, 0.8), (0.3, 0.9)])
    monkeypatch.setattr(training, "evaluate_loss_accuracy", lambda *a: next(scores))
    params = FinetuneParams(enabled=True, strategy="head", epochs=6, batch_size=2, patience=2)
    result = train(net, data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")
    assert result.stopped_early and result.state.epoch == 2  # epochs 1 and 2 were no better
    assert result.state.best_epoch == 0
    assert all(torch.equal(start[n], t) for n, t in result.state.best_state.items())
    assert [r.val_accuracy for r in result.state.history] == [0.8, 0.7, 0.8]
