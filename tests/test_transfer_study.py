import pytest

from stages import transfer_study
from stages.errors import PipelineError
from stages.transfer_study import StudyRow, collect, markdown_table, study_rows


def test_rows_run_from_scratch_to_full_with_their_parameters():
    rows = study_rows([1, 3])
    assert [r.label for r in rows] == ["scratch", "head", "last_k (k=1)", "last_k (k=3)", "full"]
    assert StudyRow("last_k", 3).set_params(2) == [
        "-S", "finetune.enabled=true", "-S", "finetune.strategy=last_k",
        "-S", "finetune.epochs=2", "-S", "finetune.unfreeze_k=3"]
    assert "finetune.unfreeze_k" not in " ".join(StudyRow("full").set_params(2))


def _rev(name, metrics):
    return {"rev": "abc", "name": name,
            "data": {"metrics": {path: {"data": data} for path, data in metrics.items()}}}


# The shape of `dvc exp show --json` (DVC 3): the workspace, then the baseline commit with its
# experiments' revisions.
EXP_SHOW = [{**_rev(None, {"metrics/evaluate.json": {"head": {"accuracy": 0.1}}}),
             "rev": "workspace", "experiments": None}, {
    **_rev(None, {"metrics/evaluate.json": {"head": {"accuracy": 0.9, "split": "test"}},
                  "metrics/train_head.json": {"val": {"accuracy": 0.95}}}),
    "experiments": [
        {"revs": [_rev("s-head", {
            "metrics/evaluate.json": {"head": {"accuracy": 0.9},
                                      "finetune": {"accuracy": 0.925}},
            "models/finetune/status.json": {"epochs_run": 3, "best_epoch": 2,
                                            "val_accuracy": 0.96,
                                            "trainable_parameters": 12810,
                                            "train_images_per_second": 40.5}})]},
        {"revs": [_rev("other-exp", {})]},
    ],
}]


def test_the_table_puts_the_probe_first_and_marks_missing_experiments():
    baseline, experiments = collect(EXP_SHOW)
    assert set(experiments) == {"s-head", "other-exp"}
    table = markdown_table([StudyRow("head"), StudyRow("full")], ["s-head", "s-full"],
                           baseline, experiments, "test")
    lines = table.splitlines()
    assert "Test accuracy" in lines[0]
    assert lines[2].startswith("| linear probe |") and "| 0.9500 | 0.9000 |" in lines[2]
    assert lines[3] == ("| head | new head only (backbone frozen), with augmentation | 12,810 | "
                        "3 (2) | 0.9600 | 0.9250 | 40.5 | s-head |")
    assert lines[4].startswith("| full |") and "failed or missing" in lines[4]


def test_a_failing_dvc_command_stops_with_its_last_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"`dvc exp show --json` failed: .*"):
        transfer_study.dvc("exp", "show", "--json")


def test_outside_a_project_the_study_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="run the transfer study from the project root"):
        transfer_study.main(["--epochs", "1"])
