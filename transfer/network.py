"""The network fine-tuning trains: a pretrained encoder, a new linear head, and which of its
blocks train.

The encoder is the backbone cut before its source classifier. Its blocks come from timm's own
grouping (``model.group_matcher``) or, for torchvision models, from the top-level child
modules; ``finetune.strategy`` (``transfer.strategies``) says which of them train. The new head
starts from the linear probe, from the source classifier's rows of classes it knows, or at
random.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from transfer.backbones import Backbone, _TimmPreLogits, backbone_of, load_backbone
from transfer.embeddings import EmbeddingMeta
from transfer.errors import PipelineError
from transfer.heads import LogisticHead, load_head
from transfer.params import Params
from transfer.strategies import STRATEGIES

log = logging.getLogger(__name__)


class FinetuneNet(torch.nn.Module):
    """Pretrained encoder (to pooled pre-logits features), then a new linear head."""

    def __init__(self, encoder: torch.nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


class FlipAveraged(torch.nn.Module):
    """``module``'s output on each image averaged with its output on the mirror image
    (test-time flip averaging): an image and its mirror get the same output."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.module(images) + self.module(images.flip(-1))) / 2


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
    """Let the head and, by ``strategy``, blocks of the encoder train."""
    blocks = encoder_blocks(net)
    if STRATEGIES[strategy].uses_unfreeze_k() and unfreeze_k > len(blocks):
        log.warning("finetune.unfreeze_k=%d, but the encoder has %d blocks: training all",
                    unfreeze_k, len(blocks))
    chosen = STRATEGIES[strategy].blocks_to_train(blocks, unfreeze_k)
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


def starting_network(params: Params, meta: EmbeddingMeta, classes: Sequence[str],
                     head_path: Path) -> FinetuneNet:
    """The network fine-tuning starts from: pretrained weights with the linear probe as the
    new head (or source-classifier rows, or a random head), or for ``scratch`` the same
    architecture, randomly initialised from ``seed``."""
    ft = params.finetune
    pretrained = STRATEGIES[ft.strategy].pretrained
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
