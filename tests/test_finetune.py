import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages import evaluate, finetune, train_head
from tests.conftest import kill_stage_midway, run_stage_cli, stage_environment, write_params
from transfer.data import ImageStore
from transfer.evaluation import FINETUNE_STATUS_KEY, HEADLINE_METRICS
from transfer.inference import load_finetuned
from transfer.layout import CURVES, FINETUNE_CURVES, curve_file
from transfer.layout import FINETUNE_LR_RANGE as LR_RANGE


def test_disabled_finetune_is_recorded_as_skipped_without_loading_torch(tmp_path):
    write_params(tmp_path, {"finetune": {"enabled": False}})
    stale = tmp_path / "checkpoints" / "finetune-0123456789abcdef.pt"
    stale.parent.mkdir()
    stale.write_bytes(b"an interrupted run's checkpoint")
    # What makes the disabled stage cheap: it never imports torch (seconds to load).
    probe = ("import sys; from stages import finetune; finetune.main(); "
             "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, env=stage_environment(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    status = json.loads((tmp_path / "models" / "finetune" / "status.json").read_text())
    assert status == {"enabled": False, "status": "skipped", "reason": "finetune.enabled is false"}
    curves = {p for p in (tmp_path / FINETUNE_CURVES).rglob("*") if p.is_file()}
    assert curves == {tmp_path / curve_file(c) for c in CURVES}
    assert all(len(path.read_text().splitlines()) == 1 for path in curves)  # no epochs
    assert (tmp_path / LR_RANGE).read_text() == "lr,loss\n"  # and no range test
    assert not stale.exists()  # nothing will resume it


def _enable(project: Path, **finetune) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    # The probe is right on every validation image of the colour folders: kept by accuracy,
    # its start could never be beaten and the stage would stop before training
    # (tests/test_training.py); the log loss lets the epochs be compared.
    params["finetune"] = {"enabled": True, "strategy": "last_k", "unfreeze_k": 1, "epochs": 2,
                          "batch_size": 8, "select_by": "log_loss", **finetune}
    write_params(project, params)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "models" / "finetune" / "model.safetensors"))


@pytest.mark.slow
def test_finetune_writes_the_best_model_its_curves_and_a_loadable_classifier(project):
    train_head.main()
    _enable(project, epochs=1)
    # It reads no test image (dvc.yaml lists the train and val files of data/prepared only).
    prepared = project / "data" / "prepared"
    for name in ("test.bin", "test.npz"):
        (prepared / name).rename(project / name)
    finetune.main()
    for name in ("test.bin", "test.npz"):
        (project / name).rename(prepared / name)
    out = project / "models" / "finetune"
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "trained" and status["epochs_run"] == 1
    assert status["trainable_parameters"] < status["total_parameters"]
    assert curve_file("val/accuracy").is_file()
    steps = curve_file("train/loss").read_text().split()
    assert steps[:2] == ["step", "loss"] and steps[2] == "1"  # epoch 1; epoch 0 has no training
    assert not list((project / "checkpoints").glob("*"))  # removed once finished
    # The disabled stage writes the same curve files, with headers only (dvc.yaml plots them).
    curves = curve_file("lr").parent
    written = {p.relative_to(curves).with_suffix("").as_posix(): p.read_text().splitlines()[0]
               for p in curves.rglob("*.tsv")}
    assert written == {c: f"step\t{c.rpartition('/')[2]}" for c in CURVES}
    assert (project / LR_RANGE).read_text() == "lr,loss\n"  # a fixed rate: no range test
    assert status["lr"] == 0.001 and status["lr_range_test"] is False
    assert status["select_by"] == "log_loss" and status["best_weights"] == "raw"
    model = load_finetuned(out)
    assert model.classes == ["blue", "green", "red"]
    store = ImageStore(project / "data" / "prepared", "val")
    probabilities = np.concatenate(list(model.predict_proba(list(store), batch_size=4)))
    assert probabilities.shape == (len(store), 3)
    accuracy = float((probabilities.argmax(1) == store.labels).mean())
    # The saved model is the kept epoch (by validation log loss here), the start included.
    assert accuracy == pytest.approx(model.info["val_accuracy"])
    evaluate.main()  # scores the fine-tuned model beside the head, on the test images
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"head", "finetune"}
    assert list(metrics["finetune"]) == list(HEADLINE_METRICS)
    report = json.loads((project / "reports" / "evaluate.json").read_text())
    assert report["finetune"]["n_images"] == report["head"]["n_images"]
    assert report[FINETUNE_STATUS_KEY] == status
    # The temperature fitted on validation is stored with the model and used by evaluate.
    assert model.temperature == status["calibration"]["temperature"] > 0
    assert {"ece_uncalibrated", "log_loss_uncalibrated"} <= set(report["finetune"])
    assert 0.0 <= metrics["finetune"]["accuracy"] <= 1.0
    summary = (project / "reports" / "summary.md").read_text()
    assert "Fine-tuning: trained (last_k, " in summary and "| finetune |" in summary


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("keys", [
    {}, {"lr": "auto", "ema_decay": 0.9, "sampler": "balanced"},
    {"ema_decay": 0.9, "mixup_alpha": 0.4, "cutmix_alpha": 1.0, "class_weight": "balanced"}],
    ids=["defaults", "range-test-ema-sampler", "ema-mixup-cutmix-weights"])
def test_a_killed_finetune_resumes_and_ends_byte_identical_to_an_uninterrupted_run(
        project, tmp_path, keys):
    train_head.main()
    _enable(project, **keys)
    twin = tmp_path / "twin"
    shutil.copytree(project, twin)
    checkpoints = project / "checkpoints"
    kill_stage_midway("finetune", project,
                      started=lambda: any(checkpoints.glob("finetune-*.pt")))
    assert not (project / "models" / "finetune").exists()
    # Live: the curves of the epochs done were written as each ended, where dvc.yaml plots
    # them, while the model is written only at the end.
    assert _steps(project / curve_file("val/accuracy")) == [0, 1]
    assert _steps(project / curve_file("train/loss")) == [1]
    resumed = run_stage_cli("finetune", project)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming fine-tuning after epoch 1 of 2" in resumed.stderr
    assert not list(checkpoints.glob("*"))
    uninterrupted = run_stage_cli("finetune", twin)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    expected, got = _tensors(twin), _tensors(project)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    # Every output file, status and curves included, has the same bytes: DVC's cache, run
    # cache and a teammate's push all match (timings are only logged).
    for output in ("models/finetune", FINETUNE_CURVES):
        assert _files(project / output) == _files(twin / output)
    assert _steps(project / curve_file("val/accuracy")) == [0, 1, 2]
    assert "training images/s" in uninterrupted.stderr


def _steps(curve: Path) -> list[int]:
    return [int(line.split("\t")[0]) for line in curve.read_text().splitlines()[1:]]


def test_a_checkpoint_of_other_parameters_is_removed_not_resumed(project):
    train_head.main()
    _enable(project, strategy="head", epochs=1, augment="none")
    checkpoints = project / "checkpoints"
    checkpoints.mkdir()
    for name in ("finetune.pt", "finetune-0123456789abcdef.pt"):  # the older name too
        torch.save({"key": "other parameters"}, checkpoints / name)
    result = run_stage_cli("finetune", project)
    assert result.returncode == 0, result.stderr
    assert "checkpoints/finetune.pt: a checkpoint of other parameters or data" in result.stderr
    assert not list(checkpoints.glob("*"))


def test_cuda_without_a_gpu_fails_with_one_line_and_no_output(project):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _enable(project, device="cuda")
    result = run_stage_cli("finetune", project)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: finetune.device: cuda, but PyTorch sees no CUDA device "
        "(torch.cuda.is_available() is False); use auto or cpu")
    assert not (project / "models" / "finetune").exists()


def test_an_mlp_head_cannot_seed_the_linear_head_and_says_what_to_set(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["head"] = {"kind": "mlp", "hidden_units": 8, "patience": 2}
    write_params(project, params)
    train_head.main()
    _enable(project, strategy="head", epochs=1)
    result = run_stage_cli("finetune", project)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: finetune.init_from_head: true starts the network's linear head from the linear "
        "probe, but models/head.npz is an mlp head; set finetune.init_from_head: false, or "
        "head.kind: logistic")
    assert not (project / "models" / "finetune").exists()


@pytest.mark.slow
def test_torchrun_trains_with_two_cpu_processes_over_gloo(project):
    train_head.main()
    _enable(project, strategy="head", epochs=1, batch_size=4)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "stages.finetune"], cwd=project, capture_output=True, text=True, timeout=600,
        env={**stage_environment(), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((project / "models" / "finetune" / "status.json").read_text())
    assert status["processes"] == 2 and status["status"] == "trained"
    assert load_finetuned(project / "models" / "finetune").classes == ["blue", "green", "red"]


@pytest.mark.slow
def test_lr_auto_writes_the_range_test_curve_and_the_rate_it_chose(project):
    train_head.main()
    _enable(project, strategy="head", epochs=1, augment="none", lr="auto")
    finetune.main()
    status = json.loads((project / "models" / "finetune" / "status.json").read_text())
    assert status["lr_range_test"] is True
    lines = (project / LR_RANGE).read_text().splitlines()
    assert lines[0] == "lr,loss" and 30 <= len(lines) - 1 <= 100
    curve = np.array([[float(x) for x in line.split(",")] for line in lines[1:]])
    lowest = curve[curve[:, 1].argmin(), 0]
    assert status["lr"] == pytest.approx(lowest / 10)
    assert np.all(np.diff(curve[:, 0]) > 0)
    rates = project / curve_file("lr")
    # the rate the epoch trained at: one epoch of warm-up ends at the rate chosen
    assert float(rates.read_text().split()[-1]) == pytest.approx(status["lr"])


def test_a_range_test_that_diverges_at_once_is_one_line_and_writes_nothing(project):
    from transfer.artifacts import load_arrays, save_arrays

    train_head.main()
    head = load_arrays(project / "models" / "head.npz")
    # logits beyond float32: the loss is not a number from the first step
    save_arrays(project / "models" / "head.npz", **{**head, "coef": head["coef"] * 1e38})
    _enable(project, strategy="head", epochs=1, augment="none", lr="auto")
    result = run_stage_cli("finetune", project)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: finetune.lr: auto: the learning-rate range test found no usable rate: the loss "
        "diverged at 1e-07, at its first step; set finetune.lr to a number")
    assert not (project / "models" / "finetune").exists()
    assert not list((project / "checkpoints").glob("*"))


@pytest.mark.slow
def test_class_imbalance_keys_on_a_skewed_subset(tmp_path, caplog):
    from stages import extract, prepare
    from tests.conftest import working_directory, write_colour_folder

    root = tmp_path / "skewed"
    write_colour_folder(root / "data" / "raw" / "colours", per_class=14)
    for name in ("green", "blue"):  # 14 red, 5 green, 5 blue
        for path in sorted((root / "data" / "raw" / "colours" / name).iterdir())[5:]:
            path.unlink()
    params = {"seed": 0, "data": {"source": "data/raw/colours", "short_side": 64,
                                  "val_size": 0.3, "test_size": 0.2},
              "backbone": {"batch_size": 8}}
    write_params(root, params)
    losses = {}
    with working_directory(root):
        prepare.main()
        extract.main()
        train_head.main()
        counts = json.loads((root / "reports" / "data.json").read_text())["counts"]["train"]
        assert counts["red"] > 2 * counts["green"]
        for name, imbalance in {"plain": {}, "balanced": {
                "class_weight": "balanced", "sampler": "balanced"}}.items():
            _enable(root, strategy="head", epochs=1, augment="none", lr=0.01, **imbalance)
            finetune.main()
            status = json.loads((root / "models" / "finetune" / "status.json").read_text())
            assert status["epochs_run"] == 1 and 0.0 <= status["val_balanced_accuracy"] <= 1.0
            losses[name] = (root / curve_file("train/loss")).read_text()
        # Kept by balanced accuracy, the probe's start (right on every validation image of
        # each class) cannot be beaten: the stage stops before training and says why.
        _enable(root, strategy="head", epochs=1, augment="none", lr=0.01,
                select_by="balanced_accuracy")
        caplog.set_level("INFO", logger="transfer.training")
        finetune.main()
        status = json.loads((root / "models" / "finetune" / "status.json").read_text())
    assert losses["plain"] != losses["balanced"]  # weighted loss, other draws
    assert status["select_by"] == "balanced_accuracy" and status["val_balanced_accuracy"] == 1.0
    assert status["epochs_run"] == 0 and status["best_epoch"] == 0 and status["stopped_early"]
    assert status["stop_reason"].startswith("the network it started from (epoch 0) has a "
                                            "validation balanced accuracy of 1")
    assert "(start 1.0000); no epoch trained, " in caplog.text
    # Every curve dvc.yaml plots exists (the training ones a header alone), so that
    # `dvc plots show` does not warn that it failed to load them.
    assert len((root / curve_file("val/loss")).read_text().splitlines()) == 2  # epoch 0
    for curve in ("train/loss", "train/accuracy", "lr"):
        assert (root / curve_file(curve)).read_text() == f"step\t{curve.rpartition('/')[2]}\n"
