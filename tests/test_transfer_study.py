import json
import subprocess

import pytest

from stages import transfer_study
from stages.transfer_study import Outcome, StudyRow, collect, markdown_table, study_rows
from transfer.errors import PipelineError
from transfer.experiments import experiments


def test_rows_run_from_scratch_to_full_with_their_parameters():
    rows = study_rows([1, 3])
    assert [r.label for r in rows] == ["scratch", "head", "last_k (k=1)", "last_k (k=3)", "full"]
    assert StudyRow("last_k", 3).set_params(2) == [
        "-S", "finetune.enabled=true", "-S", "finetune.strategy=last_k",
        "-S", "finetune.epochs=2", "-S", "finetune.unfreeze_k=3"]
    assert "finetune.unfreeze_k" not in " ".join(StudyRow("full").set_params(2))


# A stand-in pipeline with the real metrics and report paths: what each experiment writes
# comes from its parameters, so `dvc exp show --json` (DVC's own output, not a copy of its
# shape) and the reports Git holds at each experiment's commit can be read.
FAKE_STAGE = """
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
def write(path, obj):
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(obj))
write("reports/train_head.json", {"val": {"accuracy": 0.95}})
scored = {"head": {"accuracy": 0.9}}
status = {"status": "skipped"}
if p["finetune"]["enabled"]:
    scored["finetune"] = {"accuracy": p["finetune"]["accuracy"]}
    status = {"epochs_run": 3, "best_epoch": 2, "val_accuracy": 0.96,
              "trainable_parameters": 12810}
write("metrics/evaluate.json", scored)
write("reports/evaluate.json", {"head": {"split": "test"}, "finetune_status": status})
"""


@pytest.fixture(scope="module")
def study_repo(tmp_path_factory):
    """A repository with a baseline commit and one experiment, and its ``dvc exp show --json``."""
    repo = tmp_path_factory.mktemp("study")
    (repo / "stage.py").write_text(FAKE_STAGE)
    (repo / "params.yaml").write_text("finetune:\n  enabled: false\n  accuracy: 0.5\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  all:\n    cmd: python stage.py\n    deps: [stage.py]\n"
        "    params: [finetune]\n    metrics:\n      - metrics/evaluate.json:\n"
        "          cache: false\n    outs:\n"
        + "".join(f"      - {m}:\n          cache: false\n"
                  for m in ("reports/train_head.json", "reports/evaluate.json")))

    def run(*command):
        subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True)

    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run("dvc", "init", "-q")
    run("dvc", "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run("dvc", "exp", "run", "-q", "--name", "s-head", "-S", "finetune.enabled=true",
        "-S", "finetune.accuracy=0.925")
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, check=True,
                           capture_output=True, text=True).stdout
    return repo, json.loads(shown)


@pytest.mark.slow
def test_the_table_puts_the_probe_first_and_marks_missing_experiments(study_repo, monkeypatch):
    repo, exp_show = study_repo
    monkeypatch.chdir(repo)  # the reports are read from Git at each experiment's commit
    baseline, named = collect(experiments(exp_show))
    assert list(named) == ["s-head"] and named["s-head"].baseline == baseline.rev
    table = markdown_table([StudyRow("head"), StudyRow("full")], ["s-head", "s-full"],
                           Outcome.of(baseline), {"s-head": Outcome.of(named["s-head"])},
                           "test")
    lines = table.splitlines()
    assert "Test accuracy" in lines[0]
    assert lines[2].startswith("| linear probe |") and "| 0.9500 | 0.9000 |" in lines[2]
    assert lines[3] == ("| head | new head only (backbone frozen), with augmentation | 12,810 | "
                        "3 (2) | 0.9600 | 0.9250 | s-head |")
    assert lines[4].startswith("| full |") and "failed or missing" in lines[4]


@pytest.mark.slow
def test_the_study_names_the_commit_its_experiments_hang_from(study_repo, monkeypatch, caplog,
                                                             tmp_path):
    # Once the report is committed, `dvc exp show` alone shows the new commit, without the
    # study's rows: the line says which commit to show.
    repo, exp_show = study_repo
    monkeypatch.chdir(repo)
    monkeypatch.setattr(transfer_study, "queue_and_run", lambda rows, *args: [
        "s-head", *(f"s-missing-{i}" for i in range(1, len(rows)))])
    monkeypatch.setattr(transfer_study, "dvc", lambda *args: json.dumps(exp_show))
    caplog.set_level("INFO", logger="stages.transfer_study")
    transfer_study.main(["--epochs", "1", "--output", str(tmp_path / "study.md")])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert f"git add it to keep it); compare the rows with `python -m stages.compare --rev " \
           f"{head[:7]}` (or `dvc exp show --only-changed --rev {head[:7]}`)" in caplog.text
    assert "| s-head |" in (tmp_path / "study.md").read_text()


def test_a_failing_dvc_command_stops_with_its_last_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"`dvc exp show --json` failed: .*"):
        transfer_study.dvc("exp", "show", "--json")


def test_outside_a_project_the_study_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="run the transfer study from the project root"):
        transfer_study.main(["--epochs", "1"])
