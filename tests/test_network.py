"""The fine-tuning network: its blocks, which of them train, batch norm, where its head starts."""

import logging

import numpy as np
import pytest
import torch

from transfer.backbones import load_backbone
from transfer.heads import LogisticHead
from transfer.network import (
    FinetuneNet,
    build_network,
    encoder_blocks,
    init_head_from_probe,
    init_head_from_source,
    mark_trainable,
    match_source_classes,
    set_train_mode,
    starting_network,
    trainable_groups,
)
from transfer.params import params_from_dict


def _trainable_ids(net: torch.nn.Module) -> set[int]:
    return {id(p) for p in net.parameters() if p.requires_grad}


def test_timm_encoder_blocks_follow_timms_grouping_and_cover_every_parameter(net):
    blocks = encoder_blocks(net)
    # stem, blocks.0 ... blocks.6 (timm puts conv_head with the last block)
    assert len(blocks) == 8
    ids = [id(p) for block in blocks for p in block]
    assert len(ids) == len(set(ids)) == len(list(net.encoder.parameters()))
    assert blocks[0][0] is net.encoder.model.conv_stem.weight
    assert any(p is net.encoder.model.conv_head.weight for p in blocks[-1])


def test_torchvision_encoder_blocks_are_its_top_level_children():
    net = build_network(load_backbone("torchvision:resnet18", pretrained=False), 4)
    blocks = encoder_blocks(net)
    model = net.encoder
    assert [len(b) for b in blocks] == [1, 2, *(len(list(getattr(model, f"layer{i}")
                                                         .parameters())) for i in range(1, 5))]
    assert sum(len(b) for b in blocks) == len(list(model.parameters()))


@pytest.mark.parametrize(("strategy", "k", "blocks_trained"),
                         [("head", 2, 0), ("last_k", 2, 2), ("last_k", 3, 3), ("full", 2, 8)])
def test_strategies_train_the_head_and_the_top_blocks_only(net, strategy, k, blocks_trained):
    mark_trainable(net, strategy, k)
    blocks = encoder_blocks(net)
    expected = {id(p) for p in net.head.parameters()}
    expected |= {id(p) for block in blocks[len(blocks) - blocks_trained:] for p in block}
    assert _trainable_ids(net) == expected
    groups = trainable_groups(net)
    assert len(groups) == 1 + blocks_trained
    assert groups[0] == list(net.head.parameters())
    if blocks_trained:
        assert {id(p) for p in groups[1]} == {id(p) for p in blocks[-1]}


def test_unfreezing_more_blocks_than_exist_trains_all_and_warns(net, caplog):
    with caplog.at_level(logging.WARNING):
        mark_trainable(net, "last_k", 50)
    assert _trainable_ids(net) == {id(p) for p in net.parameters()}
    assert "unfreeze_k=50, but the encoder has 8 blocks" in caplog.text


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def _one_step(net: FinetuneNet, bn: str) -> None:
    set_train_mode(net, bn)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    images = torch.randn(4, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(net(images), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()


def test_frozen_batch_norm_keeps_every_running_statistic_while_weights_change(net):
    mark_trainable(net, "full", 1)
    before = _bn_buffers(net)
    weight = net.encoder.model.conv_stem.weight.clone()
    _one_step(net, "frozen")
    after = _bn_buffers(net)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not torch.equal(weight, net.encoder.model.conv_stem.weight)


def test_trained_batch_norm_updates_trainable_blocks_only(net):
    mark_trainable(net, "last_k", 1)
    top_block = net.encoder.model.blocks[6]
    stem_bn, top_bn = _bn_buffers(net.encoder.model.bn1), _bn_buffers(top_block)
    _one_step(net, "train")
    assert all(torch.equal(v, _bn_buffers(net.encoder.model.bn1)[n]) for n, v in stem_bn.items())
    assert not all(torch.equal(v, _bn_buffers(top_block)[n]) for n, v in top_bn.items())


@pytest.mark.parametrize("n_classes", [2, 4])
def test_head_from_the_probe_gives_the_probes_probabilities(n_classes):
    rng = np.random.default_rng(0)
    features = rng.normal(2.0, 3.0, size=(80, 6))
    labels = np.arange(80) % n_classes
    features[:, 0] += labels * 2
    probe = LogisticHead().fit(features, labels)
    net = FinetuneNet(torch.nn.Identity(), 6, n_classes)
    init_head_from_probe(net, probe)
    with torch.no_grad():
        probabilities = torch.softmax(net(torch.as_tensor(features, dtype=torch.float32)), 1)
    np.testing.assert_allclose(probabilities.numpy(), probe.predict_proba(features), atol=1e-5)


def test_classes_named_like_source_classes_start_from_their_classifier_rows():
    backbone = load_backbone("tf_efficientnet_lite0")
    classes = ["Daisy", "capuchin", "Cebus_capucinus", "crane", "n01440764", "my own class"]
    matches = match_source_classes(classes, backbone.source_labels)
    # crane is both a bird and a machine in ImageNet: ambiguous, so it starts nowhere
    assert matches == {0: 985, 1: 378, 2: 378, 4: 0}
    net = build_network(backbone, len(classes))
    untouched = net.head.weight[3].clone()
    init_head_from_source(net, backbone.classifier, matches)
    assert torch.equal(net.head.weight[0], backbone.classifier.weight[985])
    assert torch.equal(net.head.bias[4], backbone.classifier.bias[0])
    assert torch.equal(net.head.weight[3], untouched)


def test_a_scratch_network_starts_the_same_from_the_same_seed():
    from transfer.embeddings import EmbeddingMeta

    meta = EmbeddingMeta(backbone="tf_efficientnet_lite0", weights="none", weights_sha256=None,
                         preprocessing={}, dim=1280, dtype="float32", classes=["a", "b"],
                         flip_average=False, precision="float32", engine="torch",
                         short_side=64, versions={})

    def start(seed, before):
        params = params_from_dict({"seed": seed, "finetune": {"strategy": "scratch"}})
        torch.manual_seed(before)  # whatever the global generator held before the stage
        return starting_network(params, meta, ["a", "b"], head_path=None).state_dict()

    first, again, other = start(0, before=1), start(0, before=2), start(1, before=1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)
