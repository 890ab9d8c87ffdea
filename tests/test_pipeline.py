"""End to end: the real ``dvc repro`` in a throw-away git repository, on a small digits subset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from transfer.evaluation import HEADLINE_METRICS

PROJECT_FILES = ["stages", "transfer", "params.yaml", "dvc.yaml", ".dvc/config", ".dvc/.gitignore",
                 ".dvc/plots", ".dvcignore", ".gitignore", "data/raw/.gitkeep", "data/exclude.txt",
                 "data/relabel.csv", "weights/README.md"]
STAGES = ["check_params", "prepare", "extract", "audit", "train_head", "finetune", "evaluate",
          "export"]
EVALUATE_PLOTS = ["confusion.csv", "per_class_f1.csv", "calibration.csv", "roc.csv",
                  "precision_recall.csv", "mistakes.png"]

pytestmark = pytest.mark.slow


def command_environment() -> dict[str, str]:
    """The current environment (tests may set credentials in it) with a git identity."""
    return {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
            "DVC_NO_ANALYTICS": "1"}


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=command_environment(), capture_output=True,
                            text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def make_repo(root: Path) -> Path:
    """Copy the project into ``root`` as a fresh git repo, set to 80 digits."""
    for name in PROJECT_FILES:
        source, target = REPO_ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["max_per_class"] = 8  # 80 digits: seconds, not minutes
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("repo"))


def test_repro_trains_and_evaluates_then_a_second_repro_runs_nothing(repo):
    output = run(["dvc", "repro"], repo)
    assert stages_run(output) == STAGES
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"head"}
    data = json.loads((repo / "reports" / "data.json").read_text())
    assert sum(data["totals"].values()) == 80
    report = json.loads((repo / "reports" / "evaluate.json").read_text())
    assert report["head"]["n_images"] == data["totals"]["test"] > 0
    assert 0.0 <= metrics["head"]["accuracy"] <= 1.0
    shown = run(["dvc", "metrics", "show", "--json"], repo)
    # The headline numbers only: per-class figures, training details and strings are reports.
    [workspace] = json.loads(shown).values()
    assert workspace["data"] == {
        "metrics/evaluate.json": {"data": {"head": {m: metrics["head"][m]
                                                    for m in HEADLINE_METRICS}}}}

    again = run(["dvc", "repro"], repo)
    assert stages_run(again) == []
    assert "Data and pipelines are up to date" in again


def test_a_misspelt_key_stops_repro_instead_of_leaving_everything_up_to_date(repo):
    run(["dvc", "repro"], repo)
    original = (repo / "params.yaml").read_text()
    try:
        for typo in ("evalute:\n  split: val\n", "sede: 7\n"):
            (repo / "params.yaml").write_text(original + typo)
            result = subprocess.run(["dvc", "repro"], cwd=repo, env=command_environment(),
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode != 0
            name = typo.split(":")[0]
            assert f"error: params.yaml: unknown key '{name}'" in result.stdout + result.stderr
    finally:
        (repo / "params.yaml").write_text(original)
    # The file as it was when the stage last passed: nothing to run.
    assert stages_run(run(["dvc", "repro"], repo)) == []


def set_params(repo: Path, **sections: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_switching_backbone_and_back_restores_embeddings_from_the_run_cache(repo):
    import timm
    import torch

    run(["dvc", "repro"], repo)
    before = (repo / "data" / "embeddings" / "train.npy").read_bytes()
    weights = repo / "weights" / "test_resnet.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    set_params(repo, backbone={"name": "test_resnet", "weights": "weights/test_resnet.pth"})
    other = run(["dvc", "repro"], repo)
    assert "Running stage 'extract'" in other
    # Other weights in the same file: extract is no longer up to date (weights/ is its dep).
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    assert "extract:" in run(["dvc", "status", "extract"], repo)
    assert "Running stage 'extract'" in run(["dvc", "repro"], repo)
    # Back to the default backbone, with weights/ as it was: every dependency as in the first
    # run, so DVC's run cache restores its embeddings.
    weights.unlink()
    set_params(repo, backbone={"name": "tf_efficientnet_lite0", "weights": None})
    back = run(["dvc", "repro"], repo)
    assert "Running stage 'extract'" not in back
    assert "Stage 'extract' is cached - skipping run, checking out outputs" in back
    assert (repo / "data" / "embeddings" / "train.npy").read_bytes() == before


def test_head_experiment_reruns_the_head_and_what_follows_never_extraction(repo):
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline results"], repo)
    output = run(["dvc", "exp", "run", "-S", "head.C=0.1"], repo)
    # finetune and export run too (disabled, each says so in a fraction of a second): they
    # depend on the head, for when they are enabled. check_params runs on any edit of
    # params.yaml.
    assert stages_run(output) == ["check_params", "train_head", "finetune", "evaluate", "export"]
    diff = run(["dvc", "params", "diff"], repo)
    assert "head.C" in diff and "0.1" in diff


def test_curating_a_test_image_never_reruns_finetune(tmp_path):
    # finetune depends on the train and val files of data/prepared (dvc.yaml), and the head,
    # fitted on those splits, comes out the same bytes, so fine-tuning is left as it was.
    # (Colour folders, not the capped digits: under data.max_per_class an excluded image
    # lets another one in, which may land in any split.)
    import numpy as np

    from tests.conftest import write_colour_folder
    from transfer.curation import content_id

    repo = make_repo(tmp_path)
    write_colour_folder(repo / "data" / "raw" / "colours", per_class=10)
    set_params(repo, data={"source": "data/raw/colours", "max_per_class": None,
                           "val_size": 0.25, "test_size": 0.25})
    run(["dvc", "repro"], repo)
    with np.load(repo / "data" / "prepared" / "test.npz") as index:
        leak = content_id(index["sha256"][0].decode())
    with open(repo / "data" / "exclude.txt", "a", encoding="utf-8") as f:
        f.write(f"{leak}  # a leak\n")
    output = run(["dvc", "repro"], repo)
    assert "finetune" not in stages_run(output) and "evaluate" in stages_run(output)
    data = json.loads((repo / "reports" / "data.json").read_text())
    assert len(data["curation"]["exclude"]["excluded"]) == 1
    report = json.loads((repo / "reports" / "evaluate.json").read_text())
    assert report["head"]["n_images"] == data["totals"]["test"]


def commit_with_head_c(repo: Path, value: float) -> None:
    set_params(repo, head={"C": value})
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", f"head.C={value}", "--allow-empty"], repo)


def test_two_commits_differ_in_params_metrics_and_plots_diff(repo):
    commit_with_head_c(repo, 1.0)
    commit_with_head_c(repo, 0.05)
    params = json.loads(run(["dvc", "params", "diff", "HEAD~1", "--json"], repo))
    assert list(params["params.yaml"]) == ["head.C"]
    assert params["params.yaml"]["head.C"]["old"] == 1.0
    assert params["params.yaml"]["head.C"]["new"] == 0.05
    metrics = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "--json"], repo))
    changed = metrics["metrics/evaluate.json"]
    assert changed["head.log_loss"]["new"] != changed["head.log_loss"]["old"]
    assert changed["head.log_loss"]["diff"] == pytest.approx(
        changed["head.log_loss"]["new"] - changed["head.log_loss"]["old"])
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD~1", "--json"], repo))["data"]
    # Fine-tuning is off: its curve plots are declared but hold no epochs, and no range test.
    assert set(plots) == {f"plots/evaluate/{name}" for name in EVALUATE_PLOTS} | {
        "plots/train_head/regularisation.csv", "plots/audit/suspects.png", "finetune_loss",
        "finetune_accuracy", "finetune_learning_rate", "finetune_lr_range"}
    assert all(plots[name] == [] for name in plots if name.startswith("finetune_"))
    calibration = plots["plots/evaluate/calibration.csv"][0]
    assert sorted(calibration["revisions"]) == ["HEAD~1", "workspace"]
    rows = calibration["content"]["data"]["values"]
    by_rev = {rev: [r["confidence"] for r in rows if r["rev"] == rev]
              for rev in ("HEAD~1", "workspace")}
    assert by_rev["HEAD~1"] and by_rev["workspace"] and by_rev["HEAD~1"] != by_rev["workspace"]
    assert len(plots["plots/evaluate/mistakes.png"]) == 2  # one gallery per revision


QUEUED_C = ["0.01", "0.1", "10"]


@pytest.fixture(scope="module")
def queued(repo) -> dict[str, float]:
    """Three head.C experiments queued on a fresh baseline commit by one grid (``-S
    head.C=0.01,0.1,10``) and run two at a time; head.C -> test accuracy, as ``dvc exp show``
    lists them. Any test may ask for it first."""
    import csv
    import io
    import time

    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline before the queue", "--allow-empty"], repo)
    queued_output = run(["dvc", "exp", "run", "--queue", "-S", f"head.C={','.join(QUEUED_C)}"],
                        repo)
    assert queued_output.count("Queued experiment") == len(QUEUED_C), queued_output
    # The queue's workers outlive `dvc queue start`: give them a file, not this test's pipes,
    # or reading the command's output waits for the workers to exit.
    with open(repo.parent / "queue-start.log", "w") as log_file:
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=command_environment(),
                       check=True, stdout=log_file, stderr=subprocess.STDOUT, timeout=120)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], repo)
        if not any(state in status for state in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 3, status
    table = run(["dvc", "exp", "show", "--csv", "--no-pager"], repo)
    rows = [r for r in csv.DictReader(io.StringIO(table)) if r["head.C"] in QUEUED_C
            and r["Experiment"]]
    return {r["head.C"]: float(r["head.accuracy"]) for r in rows}


def test_queued_experiments_run_two_at_a_time_each_with_its_own_results(repo, queued):
    assert sorted(queued) == sorted(QUEUED_C)
    # Each queued result equals the same experiment run directly in the workspace.
    for value in ("0.01", "10"):
        run(["dvc", "exp", "run", "-S", f"head.C={value}"], repo)
        direct = json.loads((repo / "metrics" / "evaluate.json").read_text())
        assert direct["head"]["accuracy"] == pytest.approx(queued[value], abs=1e-5)


def test_experiments_are_compared_in_exp_show_and_plots_diff(repo, queued):
    import csv
    import io

    table = run(["dvc", "exp", "show", "--only-changed", "--csv", "--no-pager"], repo)
    rows = [r for r in csv.DictReader(io.StringIO(table)) if r["Experiment"]]
    columns = set(rows[0])
    assert "head.C" in columns and "head.log_loss" in columns
    assert "data.source" not in columns and "head.n_classes" not in columns  # unchanged
    # Three values of head.C (the queued ones, perhaps run again directly): three results.
    log_loss = {r["head.C"]: r["head.log_loss"] for r in rows}
    assert sorted(log_loss) == sorted(QUEUED_C)
    assert len(set(log_loss.values())) == len(log_loss)
    name = {r["head.C"]: r["Experiment"] for r in rows}
    first, second = name["0.01"], name["10"]
    plots = json.loads(run(["dvc", "plots", "diff", first, second, "--json"], repo))["data"]
    roc = plots["plots/evaluate/roc.csv"][0]
    assert sorted(roc["revisions"]) == sorted([first, second])
    assert {r["rev"] for r in roc["content"]["data"]["values"]} == {first, second}
    # Per-class F1 of both, side by side: one bar per model @ revision in each class's row.
    per_class = plots["plots/evaluate/per_class_f1.csv"][0]["content"]
    assert per_class["encoding"]["yOffset"]["field"] == "series"
    assert {"calculate": "datum.model + ' @ ' + datum.rev", "as": "series"} in \
        per_class["transform"]
    bars = {(r["rev"], r["class"]) for r in per_class["data"]["values"]}
    assert bars == {(rev, str(digit)) for rev in (first, second) for digit in range(10)}


def test_a_sweep_is_sorted_by_a_metric_to_pick_the_best(repo, queued):
    import csv
    import io

    table = run(["dvc", "exp", "show", "--csv", "--no-pager", "--sort-by", "head.log_loss"],
                repo)
    rows = [r for r in csv.DictReader(io.StringIO(table)) if r["typ"].startswith("branch_")]
    assert {r["head.C"] for r in rows} >= set(QUEUED_C)
    losses = [float(r["head.log_loss"]) for r in rows]
    assert losses == sorted(losses) and len(set(losses)) > 1


def compare_titles(header: str) -> list[str]:
    """The column titles of ``python -m stages.compare``'s header (two spaces apart at least)."""
    return [title.strip() for title in header.split("  ") if title.strip()]


# What `dvc exp show` adds to the metrics, parameters and dependencies it shows.
BOOKKEEPING = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}


def test_exp_show_only_changed_fits_a_terminal_with_every_change_and_both_models(repo):
    """Two head experiments and a fine-tuning one on the 10 digit classes: `dvc exp show
    --only-changed` has at most 16 columns, with every parameter that changed and the
    headline metrics of both models."""
    import csv
    import io

    set_params(repo, head={"C": 0.1}, finetune={  # tiny fine-tuning, set in the baseline
        "enabled": False, "strategy": "head", "epochs": 1, "batch_size": 16, "augment": "none"})
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline to compare against", "--allow-empty"], repo)
    for change in ("head.C=0.0001", "head.C=1", "finetune.enabled=true"):
        run(["dvc", "exp", "run", "-S", change], repo)
    shown = run(["dvc", "exp", "show", "--only-changed", "--no-pager", "--md"], repo)
    header = next(line for line in shown.splitlines() if line.startswith("| Experiment"))
    columns = [cell.strip() for cell in header.strip().strip("|").split("|")]
    assert len(columns) <= 16, columns
    assert {"head.C", "finetune.enabled"} <= set(columns)
    assert {f"finetune.{m}" for m in HEADLINE_METRICS} <= set(columns)
    # Nothing that changed is hidden: every metric and parameter whose value differs between
    # the rows of the full table is a column, the head's headline numbers among them (one equal
    # in every row, as accuracy can be on a dozen test images, is left out by --only-changed).
    full = list(csv.DictReader(io.StringIO(
        run(["dvc", "exp", "show", "--csv", "--no-pager"], repo))))
    assert len([r for r in full if r["typ"].startswith("branch_")]) == 3
    changed = {column for column in full[0] if len({row[column] for row in full}) > 1}
    assert changed - BOOKKEEPING - set(columns) == set()
    assert set(columns) - BOOKKEEPING - changed == set()
    assert {"head.log_loss", "head.ece"} <= changed
    # What is not a parameter or a headline number is a hash of a changed model file.
    assert {c for c in columns if c not in BOOKKEEPING and not c.startswith(("head.", "finetune."))
            } == {"models/head.npz", "models/finetune"}
    # The project's own table of the same experiments: under 120 characters a line, every
    # changed parameter, both models and the fine-tuning's kept epoch, the same numbers.
    table = subprocess.run([sys.executable, "-m", "stages.compare"], cwd=repo,
                           env=command_environment(), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert max(map(len, table)) < 120, table
    # Two header lines: each column's section (head, finetune, the models) over its name.
    assert compare_titles(table[0]) == ["head", "finetune", "head model", "fine-tuned model"]
    assert table[1].split()[:3] == ["experiment", "C", "enabled"], table
    assert compare_titles(table[1])[-4:] == ["acc", "log loss", "ECE", "epoch"]
    listed = [r for r in full if r["Experiment"] or r["rev"] != "workspace"]
    assert len(table) - 2 == len(listed) + 1  # the workspace too: it holds the last run
    by_name = {line.split()[0]: line.split() for line in table[2:]}
    for r in full:
        name = r["Experiment"] or (r["rev"] if r["rev"] != "workspace" else "workspace")
        if name in by_name:
            assert f"{float(r['head.accuracy']):.4f}" == by_name[name][3].rstrip("*")
    assert by_name["workspace"][2] == "true" and by_name["workspace"][-1] == "0"
