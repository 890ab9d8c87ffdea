import logging

import numpy as np
import pytest
import torch

from stages.backbones import load_backbone
from stages.errors import PipelineError
from stages.finetuning import (
    FinetuneNet,
    LabelledImages,
    Runtime,
    build_network,
    encoder_blocks,
    init_head_from_probe,
    init_head_from_source,
    mark_trainable,
    match_source_classes,
    optimizer_groups,
    resolve_runtime,
    set_train_mode,
    starting_network,
    train,
    train_transform,
    trainable_groups,
    warmup_cosine,
)
from stages.heads import LogisticHead
from stages.params import FinetuneParams, params_from_dict

CPU = Runtime(torch.device("cpu"), "32")


@pytest.fixture
def net() -> FinetuneNet:
    """Pretrained lite0 with a 3-class head; private to each test, which may change it."""
    return build_network(load_backbone("tf_efficientnet_lite0"), 3)


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


def test_lower_blocks_learn_slower_and_norms_and_biases_get_no_weight_decay(net):
    mark_trainable(net, "last_k", 2)
    groups = optimizer_groups(trainable_groups(net), lr=1e-3, lr_decay=0.5, weight_decay=0.05)
    by_depth = {}
    for group in groups:
        by_depth.setdefault(group["depth"], set()).add(group["lr"])
        for p in group["params"]:
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
    assert by_depth == {0: {1e-3}, 1: {5e-4}, 2: {2.5e-4}}


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
    from stages import finetuning

    net = _flat_net()
    start = {n: t.clone() for n, t in net.state_dict().items()}
    data = LabelledImages(_pixels(6), np.arange(6) % 3, _tensor_transform)
    # (loss, accuracy): an equal accuracy is no improvement, even with a lower loss
    scores = iter([(0.5, 0.8), (0.6, 0.7), (0.3, 0.8), (0.3, 0.9)])
    monkeypatch.setattr(finetuning, "evaluate_loss_accuracy", lambda *a: next(scores))
    params = FinetuneParams(enabled=True, strategy="head", epochs=6, batch_size=2, patience=2)
    result = train(net, data, data, params, 0, CPU, tmp_path / "ckpt.pt", "key")
    assert result.stopped_early and result.state.epoch == 2  # epochs 1 and 2 were no better
    assert result.state.best_epoch == 0
    assert all(torch.equal(start[n], t) for n, t in result.state.best_state.items())
    assert [r.val_accuracy for r in result.state.history] == [0.8, 0.7, 0.8]


def test_cuda_asked_for_without_a_gpu_and_float16_on_cpu_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="finetune.device: cuda, but PyTorch sees no CUDA"):
        resolve_runtime("cuda", "auto")
    with pytest.raises(PipelineError, match="finetune.precision: 16 .* needs a CUDA device"):
        resolve_runtime("auto", "16")
    runtime = resolve_runtime("auto", "auto")
    assert (runtime.device.type, runtime.precision, runtime.world_size) == ("cpu", "32", 1)


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
    from stages.embeddings import EmbeddingMeta

    meta = EmbeddingMeta(backbone="tf_efficientnet_lite0", weights="none", weights_sha256=None,
                         preprocessing={}, dim=1280, dtype="float32", classes=["a", "b"],
                         count={}, flip_average=False, precision="float32", short_side=64,
                         versions={})

    def start(seed, before):
        params = params_from_dict({"seed": seed, "finetune": {"strategy": "scratch"}})
        torch.manual_seed(before)  # whatever the global generator held before the stage
        return starting_network(params, meta, ["a", "b"], head_path=None).state_dict()

    first, again, other = start(0, before=1), start(0, before=2), start(1, before=1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)
