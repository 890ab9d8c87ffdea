import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from stages import predict
from tests.conftest import predict_without_torch, write_params
from transfer.errors import PipelineError


def test_table_lists_top_classes_and_error_rows(trained, capsys):
    predict.main(["inputs", "missing.png", "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    rows = {line.split()[0]: line for line in lines}
    assert rows["inputs/a-red.png"].split()[1] == "red"
    assert rows["inputs/more/b-green.jpg"].split()[1] == "green"
    assert rows["inputs/more/c-blue"].split()[1] == "blue"
    assert "error: not an image" in rows["inputs/notes.txt"]
    assert "error: No such file or directory" in rows["missing.png"]
    top_probability = float(rows["inputs/a-red.png"].split()[2])
    assert 0.5 < top_probability <= 1.0


def test_csv_and_json_carry_the_same_predictions(trained, capsys):
    predict.main(["inputs/a-red.png", "inputs/notes.txt", "--format", "csv", "--top-k", "3"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == ["inputs/a-red.png", "inputs/notes.txt"]
    assert rows[0]["class_1"] == "red" and rows[0]["error"] == ""
    probabilities = [float(rows[0][f"probability_{i}"]) for i in (1, 2, 3)]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["class_1"] == "" and rows[1]["error"].startswith("not an image")

    predict.main(["inputs/a-red.png", "--format", "json", "--top-k", "1"])
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["predictions"][0]["class"] == "red" and entry["error"] is None
    assert entry["predictions"][0]["probability"] == pytest.approx(probabilities[0], abs=1e-6)


def test_nothing_predictable_is_a_failure(trained):
    with pytest.raises(PipelineError, match="none of the 1 files could be classified"):
        predict.main(["inputs/notes.txt"])
    with pytest.raises(PipelineError, match="no files found in empty-dir"):
        (trained / "empty-dir").mkdir()
        predict.main(["empty-dir"])


def test_changed_weights_are_detected(trained):
    import json as json_module

    meta_path = trained / "data" / "embeddings" / "meta.json"
    meta = json_module.loads(meta_path.read_text())
    meta["weights_sha256"] = "0" * 64
    meta_path.write_text(json_module.dumps(meta))
    with pytest.raises(PipelineError, match="changed since the embeddings were extracted"):
        predict.main(["inputs/a-red.png"])


def test_predict_prefers_the_fine_tuned_model_and_explains_when_there_is_none(trained, capsys,
                                                                               caplog):
    import logging

    import yaml

    from stages import finetune
    from tests.conftest import write_params

    with pytest.raises(PipelineError, match="no fine-tuned model .* use --model head"):
        predict.main(["inputs/a-red.png", "--model", "finetune"])
    params = yaml.safe_load((trained / "params.yaml").read_text())
    # From the probe, right on every validation image: the run keeps its start, the probe
    # again, and auto keeps to the head, saying why.
    params["finetune"] = {"enabled": True, "strategy": "head", "epochs": 1, "batch_size": 8,
                          "augment": "none"}
    write_params(trained, params)
    finetune.main()
    with caplog.at_level(logging.INFO):
        predict.main(["inputs/a-red.png"])
    assert "model auto: the head, since fine-tuning kept the network it started from " \
           "(epoch 0)" in caplog.text and "with the head model" in caplog.text
    capsys.readouterr()
    caplog.clear()
    # From a fresh head, the epoch trained is kept: auto takes the fine-tuned network.
    params["finetune"].update(init_from_head=False, lr=0.01, select_by="log_loss", epochs=3,
                              warmup_epochs=0)
    write_params(trained, params)
    finetune.main()
    with caplog.at_level(logging.INFO):
        predict.main(["inputs/a-red.png", "inputs/more/b-green.jpg"])
    assert "with the finetune model" in caplog.text
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["red", "green"]


def test_devices_pipes_and_huge_files_are_error_rows_never_read(trained, capsys):
    import os

    os.mkfifo(trained / "pipe.png")  # opening it for reading would wait forever
    with open(trained / "huge.png", "wb") as f:
        f.truncate(600 * 2**20)
    predict.main(["/dev/zero", "pipe.png", "huge.png", "inputs/a-red.png"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    not_regular = "error: not a regular file (a folder, device, pipe or socket)"
    assert not_regular in rows["/dev/zero"] and not_regular in rows["pipe.png"]
    assert "error: larger than 512 MiB (not read)" in rows["huge.png"]
    assert rows["inputs/a-red.png"].split()[1] == "red"


def test_a_folder_s_dead_links_and_pipes_are_error_rows_not_left_out(trained, capsys):
    import os

    folder = trained / "inputs" / "more"
    (folder / "gone.jpg").symlink_to(trained / "nowhere.jpg")
    os.mkfifo(folder / "pipe.png")
    predict.main(["inputs"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["inputs/more/gone.jpg"].endswith("error: a link to nothing (its target is gone)")
    assert "error: not a regular file" in rows["inputs/more/pipe.png"]
    assert rows["inputs/a-red.png"].split()[1] == "red"


def test_a_folder_s_links_to_folders_and_unreadable_folders_are_error_rows(trained, capsys,
                                                                          monkeypatch):
    import os

    (trained / "inputs" / "elsewhere").symlink_to(trained / "inputs" / "more")
    (trained / "inputs" / "more" / "loop.png").symlink_to("loop.png")  # leads to itself
    locked = trained / "inputs" / "locked"
    locked.mkdir()
    scandir = os.scandir

    def refusing(path="."):  # the tests run as root, whom permissions do not stop
        if not isinstance(path, int) and Path(path).absolute() == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    predict.main(["inputs"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["inputs/elsewhere"].endswith(
        "error: a link to a folder (not followed: name the folder itself instead)")
    assert rows["inputs/locked"].endswith("error: cannot read this folder (Permission denied)")
    assert rows["inputs/more/loop.png"].endswith(
        "error: cannot be read (Too many levels of symbolic links)")
    assert rows["inputs/a-red.png"].split()[1] == "red"
    assert rows["inputs/more/b-green.jpg"].split()[1] == "green"


def test_bad_inputs_through_the_command_are_one_line(trained):
    from tests.conftest import one_error_line, run_stage_cli

    assert one_error_line(run_stage_cli("predict", trained, "/dev/zero")) == (
        "error: none of the 1 files could be classified (first: /dev/zero: not a regular file "
        "(a folder, device, pipe or socket))")
    assert one_error_line(run_stage_cli("predict", trained, "inputs", "--batch-size", "0"),
                          code=2) == ("error: python -m stages.predict: --batch-size must be "
                                      "from 1 to 65536 (see --help)")
    assert one_error_line(run_stage_cli("predict", trained, "--top-k", "x", "inputs"),
                          code=2).startswith("error: python -m stages.predict: argument --top-k")


def test_progress_bars_leave_no_cursor_escapes_in_a_log(trained):
    from tests.conftest import run_stage_cli

    result = run_stage_cli("predict", trained, "inputs", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert result.stderr.splitlines() == [
        "INFO __main__: classified 3 files with the head model",
        "WARNING __main__: 1 of 4 files could not be classified"]


def soften_head(project, temperature):
    """Give the trained head another temperature, as if train_head had fitted it."""
    from transfer.heads import load_head

    path = project / "models" / "head.npz"
    head, classes = load_head(path)
    head.temperature_ = temperature
    head.save(path, classes)


def json_predictions(capsys, *args):
    predict.main(["inputs/a-red.png", "inputs/more/b-green.jpg", "--format", "json", *args])
    return json.loads(capsys.readouterr().out)


def test_predict_uses_the_temperature_stored_with_the_head(trained, capsys):
    import numpy as np

    soften_head(trained, 1.0)
    plain = json_predictions(capsys)
    soften_head(trained, 20.0)
    softened = json_predictions(capsys)
    for a, b in zip(plain, softened, strict=True):
        p = {c["class"]: c["probability"] for c in a["predictions"]}
        q = {c["class"]: c["probability"] for c in b["predictions"]}
        expected = {name: value ** (1 / 20) for name, value in p.items()}  # softmax(s / 20)
        total = sum(expected.values())
        assert q == pytest.approx({name: v / total for name, v in expected.items()}, rel=1e-6)
        assert a["prediction"] == b["prediction"] and max(q.values()) < max(p.values()) - 0.01
        assert np.isclose(sum(q.values()), 1.0)


def test_min_confidence_marks_unsure_files_uncertain_in_every_format(trained, capsys):
    soften_head(trained, 1000.0)  # three classes, all near 1/3
    predict.main(["inputs", "--min-confidence", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines}
    assert rows["inputs/a-red.png"].split()[1:3] == ["uncertain:", "red"]
    assert "error: not an image" in rows["inputs/notes.txt"]

    predict.main(["inputs/a-red.png", "inputs/notes.txt", "--format", "csv",
                  "--min-confidence", "0.5"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["prediction"] for r in rows] == ["uncertain", ""]
    assert rows[0]["class_1"] == "red" and float(rows[0]["probability_1"]) < 0.5

    entries = json_predictions(capsys, "--min-confidence", "0.5")
    assert [(e["prediction"], e["uncertain"]) for e in entries] == [("uncertain", True)] * 2

    soften_head(trained, 1.0)
    entries = json_predictions(capsys, "--min-confidence", "0.5")
    assert [(e["prediction"], e["uncertain"]) for e in entries] == [("red", False),
                                                                   ("green", False)]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_a_min_confidence_outside_zero_to_one_is_one_error_line(trained, value):
    import subprocess
    import sys

    from tests.conftest import stage_environment

    result = subprocess.run([sys.executable, "-m", "stages.predict", "inputs",
                             "--min-confidence", value], cwd=trained, env=stage_environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: --min-confidence must be a probability between 0 and 1, got {float(value):g}"]


def _probabilities(rows: list[dict]) -> dict[str, list[float]]:
    return {Path(row["path"]).name: [p["probability"] for p in sorted(
        row["predictions"], key=lambda p: p["class"])] for row in rows}


def test_flip_averaging_gives_an_image_and_its_mirror_equal_probabilities(flip_finetuned,
                                                                          capsys):
    predict.main(["mirrored", "--format", "json", "--model", "finetune"])
    averaged = _probabilities(json.loads(capsys.readouterr().out))
    # relative: the small probabilities tell the images apart where the large ones round to 1
    assert averaged["a.png"] == pytest.approx(averaged["b.png"], rel=1e-5, abs=0)
    # the same network without the averaging tells them apart
    model_json = flip_finetuned / "models" / "finetune" / "model.json"
    model_json.write_text(model_json.read_text().replace('"flip_average": true',
                                                         '"flip_average": false'))
    predict.main(["mirrored", "--format", "json", "--model", "finetune"])
    plain = _probabilities(json.loads(capsys.readouterr().out))
    assert plain["a.png"] != pytest.approx(plain["b.png"], rel=1e-3, abs=0)



@pytest.mark.parametrize("model", ["head", "finetune"])
def test_onnx_runtime_and_pytorch_give_the_same_probabilities(flip_finetuned, capsys,
                                                              monkeypatch, model):
    from transfer import engines

    exported = []
    real_cached_graph = engines.cached_graph
    monkeypatch.setattr(engines, "cached_graph",
                        lambda *args: exported.append(args[-1]) or real_cached_graph(*args))
    monkeypatch.setattr(predict, "warm_model", lambda engine, backbone: None)  # load the backbone
    found = {}
    for engine in ("torch", "onnxruntime"):
        predict.main(["inputs", "mirrored", "--format", "json", "--model", model,
                      "--engine", engine])
        found[engine] = _probabilities([row for row in json.loads(capsys.readouterr().out)
                                        if not row["error"]])
    label = "tf_efficientnet_lite0" if model == "head" else "fine-tuned tf_efficientnet_lite0"
    assert exported == [label]  # only onnxruntime reads an ONNX graph, this one
    assert sorted(found["torch"]) == ["a-red.png", "a.png", "b-green.jpg", "b.png", "c-blue"]
    for name, probabilities in found["torch"].items():
        assert found["onnxruntime"][name] == pytest.approx(probabilities, abs=1e-4)


def test_the_head_model_runs_without_pytorch_where_extraction_left_its_record(trained, capsys,
                                                                              monkeypatch):
    # extract ran with ONNX Runtime and left a warm record of the backbone: predict runs the
    # head through the same cached graph without importing torch, to the same probabilities
    # as loading the backbone with PyTorch and running it on ONNX Runtime.
    found = {}
    for way in ("warm", "backbone loaded"):
        if way != "warm":
            monkeypatch.setattr(predict, "warm_model", lambda engine, backbone: None)
        predict.main(["inputs", "--format", "json", "--engine", "onnxruntime"])
        found[way] = json.loads(capsys.readouterr().out)
    assert found["warm"] == found["backbone loaded"]
    assert sum(1 for row in found["warm"] if not row["error"]) == 3

    assert predict_without_torch(trained, "inputs/a-red.png").split()[1] == "red"


def test_predict_with_pytorch_leaves_the_record_extract_would(trained, capsys):
    # A clone whose embeddings came from `dvc pull` never ran extract, so it has no record:
    # the first predict loads the backbone and writes the record extract writes (the same
    # bytes), and the next runs without PyTorch.
    from stages.predict import backbone_params, warm_model
    from transfer.warm_head import WarmClassifier

    [record] = Path("cache/embeddings/warm").glob("*.json")
    written_by_extract = record.read_bytes()
    record.unlink()
    assert warm_model("auto", backbone_params()) is None
    predict.main(["inputs/a-red.png"])
    assert capsys.readouterr().out.split()[1] == "red"
    assert record.read_bytes() == written_by_extract
    assert isinstance(warm_model("auto", backbone_params()), WarmClassifier)
    # Not where params.yaml names another configuration than the one the head was made with.
    record.unlink()
    params = yaml.safe_load(Path("params.yaml").read_text())
    write_params(trained, {**params, "backbone": {**params["backbone"], "flip_average": True}})
    predict.main(["inputs/a-red.png"])
    assert not record.exists() and not list(record.parent.glob("*.json"))


def test_a_record_of_another_backbone_or_no_graph_loads_the_backbone(trained, capsys):
    from stages.predict import backbone_params, warm_model
    from transfer.warm_head import WarmClassifier

    assert isinstance(warm_model("auto", backbone_params()), WarmClassifier)
    assert warm_model("torch", backbone_params()) is None
    # params.yaml changed since extract ran (no repro yet): the record found is of other
    # embeddings than the head's, so the backbone is loaded, as the head was trained.
    params = yaml.safe_load(Path("params.yaml").read_text())
    write_params(trained, {**params, "backbone": {**params["backbone"], "flip_average": True}})
    assert warm_model("auto", backbone_params()) is None
    write_params(trained, params)
    assert isinstance(warm_model("auto", backbone_params()), WarmClassifier)
    for graph in Path("cache/onnx").glob("*.onnx"):
        graph.unlink()
    assert warm_model("auto", backbone_params()) is None
    predict.main(["inputs/a-red.png"])  # with PyTorch: the graph is exported again
    assert capsys.readouterr().out.split()[1] == "red"
    assert isinstance(warm_model("auto", backbone_params()), WarmClassifier)


def test_the_fine_tuned_model_runs_without_pytorch_from_its_second_predict(flip_finetuned,
                                                                           capsys):
    # The first predict loads the fine-tuned network with PyTorch, runs it on ONNX Runtime and
    # leaves a record of its graph; the next runs that graph without importing torch, to the
    # same answers, the familiarity check included (the head's backbone without PyTorch too).
    from stages import audit
    from stages.predict import warm_finetuned_model
    from transfer.warm_finetune import WarmFinetuned

    audit.main()
    args = ["inputs", "mirrored", "--format", "json", "--model", "finetune"]
    assert warm_finetuned_model("auto") is None
    predict.main(args)
    loaded = json.loads(capsys.readouterr().out)
    assert isinstance(warm_finetuned_model("auto"), WarmFinetuned)
    assert warm_finetuned_model("torch") is None
    predict.main(args)
    assert json.loads(capsys.readouterr().out) == loaded
    assert json.loads(predict_without_torch(flip_finetuned, *args)) == loaded
    assert sum(1 for row in loaded if not row["error"]) == 5
    assert all(row["unfamiliar"] is not None for row in loaded if not row["error"])
    # Another model (here, another temperature in its description) has no record.
    model_json = flip_finetuned / "models" / "finetune" / "model.json"
    info = json.loads(model_json.read_text())
    model_json.write_text(json.dumps({**info, "temperature": 2.0}))
    assert warm_finetuned_model("auto") is None
    predict.main(args)
    hotter = json.loads(capsys.readouterr().out)
    assert hotter != loaded and isinstance(warm_finetuned_model("auto"), WarmFinetuned)
    # A graph whose bytes changed is not run: the network is loaded with PyTorch again.
    [graph] = Path("cache/onnx").glob("fine_tuned*.onnx")
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    assert warm_finetuned_model("auto") is None


def test_the_table_lines_up_names_with_wide_and_combining_characters():
    from transfer.prediction import Prediction

    out = io.StringIO()
    predict.write_table([Prediction("猫/写真.jpg", [("cat", 0.9)]),
                         Prediction("cafe\u0301/a.jpg", [("dog", 0.8)]),
                         Prediction("plain/abc.jpg", error="not an image")], out)
    lines = out.getvalue().splitlines()
    assert lines == ["猫/写真.jpg    cat 0.900",
                     "cafe\u0301/a.jpg     dog 0.800",
                     "plain/abc.jpg  error: not an image"]


def test_names_that_are_not_utf8_or_hold_line_breaks_keep_every_format_well_formed(trained,
                                                                                   capsys):
    # A byte that is not UTF-8 made the JSON and CSV invalid UTF-8 (or a traceback under a
    # strict locale), and a line break in a name split a table row in two.
    import os
    import subprocess
    import sys

    folder = trained / "odd"
    folder.mkdir()
    red = (trained / "inputs" / "a-red.png").read_bytes()
    names = [b"caf\xe9.png", b"new\nline.png", b"esc\x1b[2J.png"]
    for name in names:
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(red)
    result = subprocess.run([sys.executable, "-m", "stages.predict", "odd", "--format", "json"],
                            cwd=trained, capture_output=True, check=False,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    answers = json.loads(result.stdout.decode("utf-8"))  # strict: the output is UTF-8
    assert sorted(os.path.basename(os.fsencode(a["path"])) for a in answers) == sorted(names)
    assert {a["prediction"] for a in answers} == {"red"}

    predict.main(["odd"])
    table = capsys.readouterr().out
    assert len(table.splitlines()) == 3
    assert all(line.split()[1] == "red" for line in table.splitlines())
    assert "odd/caf\\udce9.png" in table and "\\x1b" in table and "new\\nline" in table
    predict.main(["odd", "--format", "csv"])
    text = capsys.readouterr().out
    text.encode("utf-8")  # strict: no lone surrogate left
    assert sorted(row[0] for row in list(csv.reader(io.StringIO(text)))[1:]) == [
        "odd/caf\\udce9.png", "odd/esc\x1b[2J.png", "odd/new\nline.png"]


def test_predict_and_serve_start_without_importing_scikit_learn():
    # Applying a saved head is plain NumPy; scikit-learn's import alone costs predict and the
    # service about a second at start (measured: 9.4 s against 7.5 s for two photos).
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, stage_environment

    code = ("import sys, stages.predict, stages.serve, stages.export; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=stage_environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
