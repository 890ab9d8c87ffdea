"""The fine-tuning loss: soft targets, Mixup/CutMix from timm, class weights, balanced draws."""

import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target

from transfer.objective import Objective, balanced_sample_weights, balanced_weights
from transfer.params import FinetuneParams

CPU = torch.device("cpu")
SKEWED = np.array([0] * 18 + [1] * 4 + [2] * 2)


def test_balanced_weights_are_inverse_to_the_class_counts():
    weights = balanced_weights(SKEWED, 4)  # class 3 has no image
    assert weights == pytest.approx([24 / (3 * 18), 24 / (3 * 4), 24 / (3 * 2), 0.0])
    drawn = balanced_sample_weights(SKEWED).numpy()
    assert np.bincount(SKEWED, weights=drawn) == pytest.approx([1.0] * 3)


def test_without_mixing_or_weights_the_loss_is_torch_cross_entropy_with_smoothing():
    objective = Objective(FinetuneParams(label_smoothing=0.1), 3, SKEWED, CPU)
    images, labels = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, targets = objective.mix(images, labels)
    assert torch.equal(mixed, images)
    logits = torch.randn(6, 3)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert float(objective.loss(logits, targets)) == pytest.approx(float(expected), rel=1e-6)


def test_balanced_class_weights_make_the_rare_classes_count_more():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[3.0, 0.0, 0.0]] * 3 + [[3.0, 0.0, 0.0]])  # the class-1 image wrong
    plain = Objective(FinetuneParams(label_smoothing=0.0), 3, SKEWED, CPU)
    weighted = Objective(FinetuneParams(label_smoothing=0.0, class_weight="balanced"), 3,
                         SKEWED, CPU)
    _, targets = plain.mix(torch.zeros(4, 3, 2, 2), labels)
    expected = torch.nn.functional.cross_entropy(
        logits, labels, weight=torch.as_tensor(balanced_weights(SKEWED, 3), dtype=torch.float32))
    assert float(weighted.loss(logits, targets)) == pytest.approx(float(expected), rel=1e-6)
    assert float(weighted.loss(logits, targets)) > 2 * float(plain.loss(logits, targets))


@pytest.mark.parametrize("key", ["mixup_alpha", "cutmix_alpha"])
def test_mixing_blends_images_and_targets_and_an_odd_image_keeps_its_own(key):
    np.random.seed(0)
    objective = Objective(FinetuneParams(label_smoothing=0.1, **{key: 1.0}), 3, SKEWED, CPU)
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(5)])
    labels = torch.tensor([0, 1, 2, 0, 1])
    mixed, targets = objective.mix(images, labels)
    assert all(torch.equal(images[i], torch.full((3, 8, 8), float(i))) for i in range(5))
    assert not torch.equal(mixed[:4], images[:4])
    assert torch.equal(mixed[4], images[4])
    assert torch.allclose(targets.sum(1), torch.ones(5))
    smoothed = mixup_target(labels, 3, smoothing=0.1)
    assert not torch.allclose(targets[:4], smoothed[:4])  # each blended with its partner's
    assert torch.equal(targets[4], smoothed[4])
