import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from stages.backbones import Preprocessing, extract_embeddings, load_backbone
from stages.errors import PipelineError

IMAGENET_DAISY = 985


def test_packaged_imagenet_weights_really_loaded(backbone):
    """The full ImageNet classifier, fed through the weights' own preprocessing, sees a daisy."""
    flower = Image.fromarray(load_sample_image("flower.jpg"))
    batch = backbone.preprocessing.eval_transform()(flower).unsqueeze(0)
    with torch.inference_mode():
        logits = backbone.model(batch)
    assert int(logits.argmax()) == IMAGENET_DAISY


def test_backbone_is_frozen_and_records_its_weights(backbone):
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.weights_id.startswith("package:efficientnet-lite0")
    assert len(backbone.weights_sha256) == 64
    assert backbone.num_features == 1280


def test_preprocessing_is_the_pretrained_config_not_typed_by_hand(backbone):
    pretrained = timm.create_model("tf_efficientnet_lite0", pretrained=False).pretrained_cfg
    prep = backbone.preprocessing
    assert prep.input_size == tuple(pretrained["input_size"])
    assert prep.mean == tuple(pretrained["mean"]) and prep.std == tuple(pretrained["std"])
    assert prep.interpolation == pretrained["interpolation"]
    assert prep.crop_pct == pretrained["crop_pct"]
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_embeddings_are_deterministic_and_independent_of_batch_size(backbone):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
              for h, w in [(30, 40), (64, 64), (8, 8), (300, 200), (50, 20)]]
    whole = extract_embeddings(backbone, images, batch_size=5)
    assert whole.shape == (5, 1280) and whole.dtype == np.float32
    np.testing.assert_allclose(extract_embeddings(backbone, images, batch_size=2), whole,
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(whole[0], whole[1])


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(PipelineError, match="unknown timm model 'tf_efficientnet_lite9'; "
                                           "did you mean tf_efficientnet_lite"):
        load_backbone("tf_efficientnet_lite9")


def test_offline_download_failure_says_what_to_do(monkeypatch):
    # The hub reads HF_HUB_OFFLINE at import time; set its constant so no network is tried.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    expected = "could not fetch its pretrained weights.*set backbone.weights to the local file"
    with pytest.raises(PipelineError, match=expected):
        load_backbone("resnet18")


def test_local_weights_file_loads_safely_and_bad_files_are_named(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)
    good = tmp_path / "resnet18.pth"
    torch.save({"state_dict": model.state_dict()}, good)
    loaded = load_backbone("resnet18", str(good))
    assert loaded.weights_id == f"file:{good.as_posix()}"
    torch.testing.assert_close(loaded.model.fc.weight, model.fc.weight)

    with pytest.raises(PipelineError, match="backbone.weights: '.*missing.pth' does not exist"):
        load_backbone("resnet18", str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="garbage.pth' is not a loadable state dict"):
        load_backbone("resnet18", str(garbage))
    with pytest.raises(PipelineError, match="resnet18.pth' does not fit 'resnet34'"):
        load_backbone("resnet34", str(good))
