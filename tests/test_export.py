import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import export
from stages.predict import list_inputs
from tests.conftest import (
    REPO_ROOT,
    one_error_line,
    predict_without_torch,
    run_stage_cli,
    write_halves,
    write_params,
)
from transfer.errors import PipelineError
from transfer.exported import load_exported
from transfer.inference import load_classifier, load_finetuned
from transfer.layout import EMBEDDINGS_DIR, EXPORT_METADATA, EXPORT_OUTPUTS, HEAD_PATH


def _images(project, folder="inputs") -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in list_inputs([folder])[0]
            if p.suffix != ".txt"]


def _probabilities(model, images) -> np.ndarray:
    return np.concatenate(list(model.predict_proba(images)))


def _enable_export(project, **export_params) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"] = {"enabled": True, **export_params}
    write_params(project, params)


def test_the_stage_writes_only_a_note_while_disabled(trained):
    export.main([])
    assert sorted(p.name for p in (trained / "models" / "export").iterdir()) == ["metadata.json"]
    assert json.loads(EXPORT_METADATA.read_text())["enabled"] is False


def test_the_disabled_stage_never_imports_torch():
    probe = "import sys, stages.export; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_exported_file_predicts_as_the_pipeline_does_from_pixels_alone(trained, fmt):
    _enable_export(trained, format=fmt)
    export.main([])
    path = EXPORT_OUTPUTS[fmt]
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "metadata.json"])
    beside = json.loads(EXPORT_METADATA.read_text())
    assert beside["enabled"] is True and beside["file"] == path.name and beside["format"] == fmt
    images = _images(trained)
    reference = _probabilities(load_classifier(EMBEDDINGS_DIR, HEAD_PATH), images)
    exported = load_exported(path)
    assert exported.metadata["classes"] == ["blue", "green", "red"] == beside["classes"]
    assert exported.metadata["resize"]["crop"] == [224, 224]
    assert np.abs(_probabilities(exported, images) - reference).max() < 1e-4
    # The file's own input: uint8 (N, 3, H, W), no float conversion or normalization outside.
    [pixels] = exported.pixel_batches(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 3, 224, 224)
    assert np.abs(exported.run(pixels) - reference).max() < 1e-4


def test_exports_from_checkouts_in_two_places_are_the_same_bytes(trained, tmp_path):
    # In separate processes, as DVC runs the stage (TorchScript names a class it traced again
    # in one process anew). A queued experiment runs in a temporary copy of the workspace
    # (.dvc/tmp/exps/...); the exporters record each node's source line, with the checkout's
    # absolute path.
    digests = set()
    for place in ("a", "checkout-b"):
        code = tmp_path / place
        for package in ("stages", "transfer"):
            shutil.copytree(REPO_ROOT / package, code / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for suffix in (".onnx", ".pt"):
            result = subprocess.run(
                [sys.executable, "-m", "stages.export", "--output", f"{place}/model{suffix}"],
                cwd=trained, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True,
                text=True, timeout=600)
            assert result.returncode == 0, result.stderr
        files = [(trained / place / f"model{s}").read_bytes() for s in (".onnx", ".pt")]
        with zipfile.ZipFile(io.BytesIO(files[1])) as archive:  # compressed records
            records = [archive.read(name) for name in archive.namelist()]
        for data in (files[0], *records):
            assert str(code).encode() not in data and b"site-packages" not in data
        digests.add(tuple(hashlib.sha256(data).hexdigest() for data in files))
    assert len(digests) == 1


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_the_exported_probabilities_are_the_heads_with_its_temperature(trained, kind):
    from stages import train_head
    from transfer.heads import load_head

    if kind == "mlp":
        params = yaml.safe_load((trained / "params.yaml").read_text())
        params["head"] = {"kind": "mlp", "hidden_units": 16, "patience": 2}
        write_params(trained, params)
        train_head.main()
    head, names = load_head(HEAD_PATH)
    head.temperature_ = 7.0  # soft enough that it shows in every probability
    head.save(HEAD_PATH, names)
    images = _images(trained)
    reference = _probabilities(load_classifier(EMBEDDINGS_DIR, HEAD_PATH), images)
    export.main(["--output", "tempered.pt"])
    exported = load_exported(trained / "tempered.pt")
    assert exported.metadata["temperature"] == 7.0
    probabilities = _probabilities(exported, images)
    assert np.abs(probabilities - reference).max() < 1e-4
    head.temperature_ = 1.0
    head.save(HEAD_PATH, names)
    untempered = _probabilities(load_classifier(EMBEDDINGS_DIR, HEAD_PATH), images)
    assert np.abs(probabilities - untempered).max() > 0.05


@pytest.mark.slow
def test_the_fine_tuned_model_is_exported_by_default_once_it_exists(trained):
    from stages import finetune

    params = yaml.safe_load((trained / "params.yaml").read_text())
    # From a fresh head, so that the epoch trained is kept over the start: a run that kept
    # its start (the probe again) leaves auto to the head.
    params["finetune"] = {"enabled": True, "strategy": "head", "epochs": 1, "batch_size": 8,
                          "augment": "none", "init_from_head": False, "lr": 0.01,
                          "select_by": "log_loss"}
    params["export"] = {"enabled": True}
    write_params(trained, params)
    finetune.main()
    assert json.loads((trained / "models" / "finetune" / "model.json").read_text()
                      )["best_epoch"] == 1
    images = _images(trained)
    reference = _probabilities(load_finetuned(trained / "models" / "finetune"), images)
    export.main([])
    exported = load_exported(EXPORT_OUTPUTS["onnx"])
    assert exported.metadata["model"] == "finetune"
    assert exported.metadata["classes"] == ["blue", "green", "red"]
    assert np.abs(_probabilities(exported, images) - reference).max() < 1e-4
    export.main(["--model", "head", "--output", "head.onnx"])
    assert load_exported(trained / "head.onnx").metadata["model"] == "head"


def _mirrored(project) -> list[np.ndarray]:
    image = write_halves(project / "mirrored" / "a.png", (220, 30, 30), (30, 40, 210))
    with Image.open(image) as opened:
        opened.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image.with_name("b.png"))
    return _images(project, "mirrored")


def _assert_mirror_equal(probabilities: np.ndarray, reference: np.ndarray) -> None:
    """As the pipeline's model, and the same for both images, in log space: the small
    probabilities tell two images apart where the large ones round to 1."""
    log = np.log(probabilities.astype(np.float64))
    assert np.abs(log - np.log(reference)).max() < 1e-3
    assert np.abs(log[0] - log[1]).max() < 1e-4


def test_a_flip_averaged_fine_tuned_model_averages_inside_the_exported_file(flip_finetuned):
    model = load_finetuned(flip_finetuned / "models" / "finetune")
    images = _mirrored(flip_finetuned)
    reference = _probabilities(model, images)
    export.main(["--model", "finetune", "--output", "flip.onnx"])
    exported = load_exported(flip_finetuned / "flip.onnx")
    assert exported.metadata["flip_average"] is True
    _assert_mirror_equal(_probabilities(exported, images), reference)


def test_a_head_on_flip_averaged_embeddings_is_exported_with_the_averaging(trained):
    meta_path = trained / "data" / "embeddings" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "flip_average": True}))
    images = _mirrored(trained)
    reference = _probabilities(load_classifier(EMBEDDINGS_DIR, HEAD_PATH), images)
    export.main(["--model", "head", "--output", "flip.pt"])
    exported = load_exported(trained / "flip.pt")
    assert exported.metadata["flip_average"] is True
    _assert_mirror_equal(_probabilities(exported, images), reference)


@pytest.mark.parametrize(("args", "expected"), [
    (["--format", "onnx"], "--format and --model need --output FILE"),
    (["--output", "model.bin"], "--output model.bin: name a file ending in .onnx or .pt"),
])
def test_bad_export_options_are_one_error_line(trained, args, expected):
    assert expected in one_error_line(run_stage_cli("export", trained, *args))


def test_a_file_that_is_not_an_export_is_one_error_line(trained):
    (trained / "fake.onnx").write_bytes(b"not a model")
    result = run_stage_cli("predict", trained, "inputs", "--exported", "fake.onnx")
    assert "fake.onnx: cannot be read as a model exported by this pipeline" in \
        one_error_line(result)
    result = run_stage_cli("predict", trained, "inputs", "--exported", "model.txt")
    assert "model.txt: not an exported model file; expected one of .onnx, .pt" in \
        one_error_line(result)


def test_predict_runs_an_exported_file(trained, capsys):
    from stages import predict

    export.main(["--output", "model.onnx"])
    predict.main(["inputs", "--exported", "model.onnx", "--format", "json"])
    rows = {row["path"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["inputs/a-red.png"]["prediction"] == "red"
    assert rows["inputs/more/c-blue"]["prediction"] == "blue"
    assert rows["inputs/a-red.png"]["unfamiliar"] is None  # not checked: no training images
    assert rows["inputs/notes.txt"]["error"].startswith("not an image")

    # An ONNX file runs without PyTorch: ONNX Runtime, NumPy and Pillow are all it takes.
    table = predict_without_torch(trained, "inputs/a-red.png", "--exported", "model.onnx")
    assert table.split()[1] == "red"


@pytest.mark.parametrize("path", ["models/export/.classifier.onnx.tmp-123.data",
                                  "data/.prepared.scratch-123/digits/0/0000.png",
                                  "metrics/.evaluate.json.tmp-45", "data/.prepared.old-6"])
def test_temporaries_are_ignored_by_git(path):
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO_ROOT)
    assert ignored.returncode == 0


def test_a_missing_file_names_the_export_beside_it(tmp_path):
    with pytest.raises(PipelineError, match=r"no such file; export one with dvc exp run -S "):
        load_exported(tmp_path / "classifier.onnx")
    (tmp_path / "classifier.pt").write_bytes(b"")
    with pytest.raises(PipelineError) as err:
        load_exported(tmp_path / "classifier.onnx")
    assert str(err.value) == (f"{tmp_path / 'classifier.onnx'}: no such file; {tmp_path} holds "
                              "classifier.pt: pass that, or set export.format")


def test_an_export_whose_class_names_do_not_fit_its_network_is_refused_when_opened(trained):
    # Too few names were an IndexError traceback in predict and a 500 per request in the
    # service; names for columns the network lacks passed unseen.
    import onnx

    from transfer.exported import METADATA_FILE

    export.main(["--output", "model.onnx"])
    model = onnx.load(str(trained / "model.onnx"))
    [entry] = [p for p in model.metadata_props if p.key == METADATA_FILE]
    metadata = json.loads(entry.value)
    assert len(metadata["classes"]) == 3

    def altered(classes) -> str:
        entry.value = json.dumps({**metadata, "classes": classes})
        onnx.save(model, str(trained / "altered.onnx"))
        return "altered.onnx"

    wrong_count = "the network answers (1, 3) for one image, not a row of 2 columns for the " \
        "class names in its metadata"
    for classes, reason in ((["red", "green"], wrong_count),
                            (["red", "red", "blue"], "a class name twice in its metadata"),
                            ("abc", "no list of class names")):
        with pytest.raises(PipelineError) as err:
            load_exported(altered(classes))
        assert str(err.value) == ("altered.onnx: cannot be read as a model exported by this "
                                  f"pipeline ({reason}); export it again")
    # The service stops at start, with that line, instead of failing every request.
    assert one_error_line(run_stage_cli("serve", trained, "--port", "0", "--exported",
                                        altered(["red", "green"]))) == (
        f"error: altered.onnx: cannot be read as a model exported by this pipeline "
        f"({wrong_count}); export it again")
