"""Fine-tuning strategies (``finetune.strategy``): how much of the network trains, from what.

Each strategy is one class and one entry in ``STRATEGIES``; parameters, the network, the
training loop and the transfer study all ask it instead of comparing names. Nothing here
imports torch: the parameters and the study use it without loading a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

Block = TypeVar("Block")


class Strategy:
    """Which encoder blocks train (the new head always does), and whether from pretrained
    weights."""

    name = ""
    pretrained = True
    # Batch-norm running statistics must train when there are no pretrained ones.
    needs_trained_bn = False
    what_trains = ""

    def blocks_to_train(self, blocks: Sequence[Block], unfreeze_k: int) -> list[Block]:
        """The blocks (ordered from the input up) whose parameters train."""
        return list(blocks)

    def uses_unfreeze_k(self) -> bool:
        return False

    def label(self, unfreeze_k: int) -> str:
        """How a person reads this strategy: ``last_k (k=2)``, ``full``."""
        return f"{self.name} (k={unfreeze_k})" if self.uses_unfreeze_k() else self.name


class HeadOnly(Strategy):
    name = "head"
    what_trains = "new head only (backbone frozen), with augmentation"

    def blocks_to_train(self, blocks: Sequence[Block], unfreeze_k: int) -> list[Block]:
        return []


class LastK(Strategy):
    name = "last_k"
    what_trains = "new head + top {k} block(s), lower ones slower"

    def blocks_to_train(self, blocks: Sequence[Block], unfreeze_k: int) -> list[Block]:
        return list(blocks[::-1][:unfreeze_k])

    def uses_unfreeze_k(self) -> bool:
        return True


class Full(Strategy):
    name = "full"
    what_trains = "every layer, lower ones slower"


class Scratch(Strategy):
    """The same architecture from a random start: what pretraining is worth."""

    name = "scratch"
    pretrained = False
    needs_trained_bn = True
    what_trains = "every layer, random initialisation"


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (HeadOnly(), LastK(), Full(), Scratch())}
