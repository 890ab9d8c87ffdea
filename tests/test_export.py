import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stages import export
from stages.predict import list_inputs
from transfer.inference import load_classifier


@pytest.fixture
def images_and_reference(trained):
    return _images_and_reference()


def _images_and_reference():
    classifier = load_classifier(export.EMBEDDINGS_DIR, export.HEAD_PATH)
    files = [p for p in list_inputs(["inputs"]) if p.suffix != ".txt"]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    reference = np.concatenate(list(classifier.predict_proba(images)))
    transform = classifier.backbone.preprocessing.eval_transform()
    batch = torch.stack([transform(Image.fromarray(image)) for image in images])
    return batch, reference, classifier.classes


def test_torchscript_file_matches_the_pytorch_model(trained, images_and_reference):
    batch, reference, classes = images_and_reference
    export.main(["--format", "torchscript"])
    path = trained / "models" / "export" / "classifier.pt"
    extra = {"metadata.json": ""}
    model = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    assert metadata["classes"] == classes
    assert metadata["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    with torch.inference_mode():
        probabilities = model(batch).numpy()
    assert np.abs(probabilities - reference).max() < 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == ["classifier.pt"]  # no temp left


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_the_exported_probabilities_are_the_heads_with_its_temperature(trained, kind):
    from stages import train_head
    from tests.conftest import write_params
    from transfer.heads import load_head

    if kind == "mlp":
        params = yaml.safe_load((trained / "params.yaml").read_text())
        params["head"] = {"kind": "mlp", "hidden_units": 16, "patience": 2}
        write_params(trained, params)
        train_head.main()
    head, names = load_head(export.HEAD_PATH)
    head.temperature_ = 7.0  # soft enough that it shows in every probability
    head.save(export.HEAD_PATH, names)
    batch, reference, _ = _images_and_reference()
    metadata = export.export(load_classifier(export.EMBEDDINGS_DIR, export.HEAD_PATH),
                             "torchscript", trained / "tempered.pt")
    assert metadata["temperature"] == 7.0
    model = torch.jit.load(str(trained / "tempered.pt"))
    with torch.inference_mode():
        probabilities = model(batch).numpy()
    assert np.abs(probabilities - reference).max() < 1e-4
    head.temperature_ = 1.0
    head.save(export.HEAD_PATH, names)
    _, untempered, _ = _images_and_reference()
    assert np.abs(probabilities - untempered).max() > 0.05


def test_an_mlp_head_is_exported_with_its_hidden_layer(trained):
    from stages import train_head
    from tests.conftest import write_params

    params = yaml.safe_load((trained / "params.yaml").read_text())
    params["head"] = {"kind": "mlp", "hidden_units": 16, "patience": 2}
    write_params(trained, params)
    train_head.main()
    batch, reference, _ = _images_and_reference()
    export.main(["--format", "torchscript"])
    model = torch.jit.load(str(trained / "models" / "export" / "classifier.pt"))
    assert any(isinstance(m, torch.jit.RecursiveScriptModule) and m.original_name == "ReLU"
               for m in model.modules())
    with torch.inference_mode():
        probabilities = model(batch).numpy()
    assert np.abs(probabilities - reference).max() < 1e-4


def test_onnx_file_matches_the_pytorch_model(trained, images_and_reference, caplog):
    import logging

    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    batch, reference, classes = images_and_reference
    with caplog.at_level(logging.INFO):
        export.main(["--format", "onnx", "--output", "exported/model.onnx"])
    assert [r.name for r in caplog.records] == ["stages.export"]  # the exporter's INFO: quiet
    path = trained / "exported" / "model.onnx"
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no external data left
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["metadata.json"])["classes"] == classes
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [probabilities] = session.run(None, {"images": batch.numpy()})
    assert np.abs(probabilities - reference).max() < 1e-4


@pytest.mark.slow
def test_the_fine_tuned_model_is_exported_by_default_once_it_exists(trained):
    from stages import finetune
    from tests.conftest import write_params
    from transfer.inference import load_finetuned

    params = yaml.safe_load((trained / "params.yaml").read_text())
    params["finetune"] = {"enabled": True, "strategy": "head", "epochs": 1, "batch_size": 8,
                          "augment": "none"}
    write_params(trained, params)
    finetune.main()
    model = load_finetuned(trained / "models" / "finetune")
    files = [p for p in list_inputs(["inputs"]) if p.suffix != ".txt"]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    reference = np.concatenate(list(model.predict_proba(images)))
    transform = model.preprocessing.eval_transform()
    batch = torch.stack([transform(Image.fromarray(image)) for image in images])
    export.main(["--format", "torchscript"])
    extra = {"metadata.json": ""}
    exported = torch.jit.load(str(trained / "models" / "export" / "classifier.pt"),
                              _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    assert metadata["model"] == "finetune" and metadata["classes"] == ["blue", "green", "red"]
    with torch.inference_mode():
        probabilities = exported(batch).numpy()
    assert np.abs(probabilities - reference).max() < 1e-4
    export.main(["--format", "torchscript", "--model", "head", "--output", "head.pt"])
    extra = {"metadata.json": ""}
    torch.jit.load(str(trained / "head.pt"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["model"] == "head"


@pytest.mark.parametrize("path", ["models/export/classifier.onnx",
                                  "models/export/.classifier.onnx.tmp-123.data",
                                  "data/.prepared.scratch-123/digits/0/0000.png",
                                  "metrics/.evaluate.json.tmp-45", "data/.prepared.old-6"])
def test_exports_and_temporaries_are_ignored_by_git(path):
    import subprocess

    from tests.conftest import REPO_ROOT

    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO_ROOT)
    assert ignored.returncode == 0


def _mirrored_batch(project, preprocessing) -> torch.Tensor:
    transform = preprocessing.eval_transform()
    return torch.stack([transform(Image.open(project / "mirrored" / name).convert("RGB"))
                        for name in ("a.png", "b.png")])


def test_a_flip_averaged_fine_tuned_model_averages_inside_the_exported_network(flip_finetuned):
    from transfer.inference import load_finetuned

    model = load_finetuned(flip_finetuned / "models" / "finetune")
    images = [np.asarray(Image.open(flip_finetuned / "mirrored" / name).convert("RGB"))
              for name in ("a.png", "b.png")]
    reference = np.concatenate(list(model.predict_proba(images)))
    export.main(["--format", "torchscript"])
    extra = {"metadata.json": ""}
    exported = torch.jit.load(str(flip_finetuned / "models" / "export" / "classifier.pt"),
                              _extra_files=extra)
    assert json.loads(extra["metadata.json"])["flip_average"] is True
    with torch.inference_mode():
        probabilities = exported(_mirrored_batch(flip_finetuned, model.preprocessing)).numpy()
    _assert_mirror_equal(probabilities, reference)


def _assert_mirror_equal(probabilities: np.ndarray, reference: np.ndarray) -> None:
    """As the PyTorch model, and the same for both images, in log space: the small
    probabilities tell two images apart where the large ones round to 1."""
    log = np.log(probabilities.astype(np.float64))
    assert np.abs(log - np.log(reference)).max() < 1e-3
    assert np.abs(log[0] - log[1]).max() < 1e-4


def test_a_head_on_flip_averaged_embeddings_is_exported_with_the_averaging(trained):
    meta_path = trained / "data" / "embeddings" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "flip_average": True}))
    from tests.conftest import write_halves

    image = write_halves(trained / "mirrored" / "a.png", (220, 30, 30), (30, 40, 210))
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image.with_name("b.png"))
    classifier = load_classifier(export.EMBEDDINGS_DIR, export.HEAD_PATH)
    images = [np.asarray(Image.open(trained / "mirrored" / n).convert("RGB"))
              for n in ("a.png", "b.png")]
    reference = np.concatenate(list(classifier.predict_proba(images)))
    export.main(["--format", "torchscript", "--model", "head"])
    extra = {"metadata.json": ""}
    exported = torch.jit.load(str(trained / "models" / "export" / "classifier.pt"),
                              _extra_files=extra)
    assert json.loads(extra["metadata.json"])["flip_average"] is True
    with torch.inference_mode():
        probabilities = exported(_mirrored_batch(trained, classifier.backbone.preprocessing))
    _assert_mirror_equal(probabilities.numpy(), reference)
