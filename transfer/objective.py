"""What fine-tuning minimises: cross-entropy against soft targets, as timm builds them.

The targets are one-hot labels with label smoothing folded in (``timm.data.mixup_target``);
with ``finetune.mixup_alpha`` or ``finetune.cutmix_alpha`` the images and targets of a batch
are mixed by ``timm.data.Mixup``. ``finetune.class_weight: balanced`` weighs each class
inversely to its training images. The balanced sampler draws the images themselves equally by
class.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from transfer.params import FinetuneParams


def balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``n / (classes * count)`` per class, as scikit-learn's ``balanced`` (0 for a class
    without images: it never occurs)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def balanced_sample_weights(labels: np.ndarray) -> torch.Tensor:
    """A drawing weight per image such that every class is drawn equally often."""
    counts = np.bincount(labels)
    return torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)


class Objective:
    """The training loss of a batch: its images (mixed, when mixing is on) against soft
    targets, each class weighted as ``finetune.class_weight`` says."""

    def __init__(self, params: FinetuneParams, num_classes: int, train_labels: np.ndarray,
                 device: torch.device) -> None:
        self.num_classes = num_classes
        self.label_smoothing = params.label_smoothing
        self.mixup = None
        if params.mixup_alpha > 0 or params.cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=params.mixup_alpha, cutmix_alpha=params.cutmix_alpha,
                               label_smoothing=params.label_smoothing, num_classes=num_classes,
                               mode="batch")
        self.class_weights = None
        if params.class_weight == "balanced":
            self.class_weights = torch.as_tensor(
                balanced_weights(train_labels, num_classes), dtype=torch.float32, device=device)

    def mix(self, images: torch.Tensor,
            labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch to train on and its soft targets. Mixup pairs each image with the one at
        the mirrored position, so an odd image out keeps its own (smoothed) target."""
        targets = mixup_target(labels, self.num_classes, smoothing=self.label_smoothing)
        even = len(images) // 2 * 2
        if self.mixup is not None and even:
            images = images.clone()
            images[:even], targets[:even] = self.mixup(images[:even], labels[:even])
        return images, targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy, a mean over the batch weighted by class."""
        log_probabilities = torch.log_softmax(logits.float(), dim=1)
        if self.class_weights is None:
            return -(targets * log_probabilities).sum(1).mean()
        weighted = targets * self.class_weights
        return -(weighted * log_probabilities).sum() / weighted.sum()
