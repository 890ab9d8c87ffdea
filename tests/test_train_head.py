import csv
import dataclasses
import json
import logging

import numpy as np
import pytest
import yaml

from stages import train_head
from tests.conftest import run_stage_cli, write_params
from transfer import head_training, layout
from transfer.head_search import C_GRID
from transfer.heads import LogisticHead, MLPHead, load_head
from transfer.params import HeadParams

COLOURS = {"seed": 0, "data": {"source": "data/raw/colours", "short_side": 64},
           "backbone": {"batch_size": 8}}


def set_head(project, **head):
    write_params(project, {**COLOURS, "head": head})


def test_head_is_saved_with_its_search_temperature_and_metrics(project):
    train_head.main()
    head, classes = load_head(project / "models" / "head.npz")
    assert isinstance(head, LogisticHead)
    assert classes == ["blue", "green", "red"]
    assert head.coef_.shape == (3, 1280)
    metrics = json.loads((project / layout.TRAIN_HEAD_REPORT).read_text())
    assert metrics["train_accuracy"] == 1.0
    assert metrics["val"]["accuracy"] == 1.0  # colours are easy for an ImageNet backbone
    assert metrics["converged"] is True
    search = metrics["regularisation"]
    assert search["auto"] is True and search["parameter"] == "C"
    # A few validation images: C is scored by cross-validation on the training split.
    assert "cross-validation on the training split" in search["held_out"]
    values = [point["C"] for point in search["curve"]]
    assert values == list(C_GRID[:len(values)]) and search["C"] in values
    best = min(search["curve"], key=lambda point: point["val_log_loss"])
    strongest_as_good = next(point for point in search["curve"] if point["val_log_loss"]
                             <= best["val_log_loss"] + best["val_log_loss_se"])
    assert strongest_as_good["C"] == search["C"]
    with open(project / layout.REGULARISATION_PLOT, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["value"]) for row in rows] == values
    assert [row["chosen"] for row in rows].count("True") == 1
    calibration = metrics["calibration"]
    # Every out-of-fold colour is right, and the head is surer of them than they vouch for
    # (right images cannot show over-confidence): the temperature stays 1.
    assert calibration["temperature"] == head.temperature_ == 1.0
    assert calibration["log_loss"] == calibration["log_loss_uncalibrated"]


def test_head_params_change_the_model(project):
    set_head(project, C=1.0)
    train_head.main()
    first, _ = load_head(project / "models" / "head.npz")
    set_head(project, C=0.001)
    train_head.main()
    second, _ = load_head(project / "models" / "head.npz")
    assert abs(second.coef_).sum() < abs(first.coef_).sum()
    metrics = json.loads((project / layout.TRAIN_HEAD_REPORT).read_text())
    assert metrics["regularisation"]["auto"] is False
    assert [point["C"] for point in metrics["regularisation"]["curve"]] == [0.001]


def test_an_mlp_head_is_trained_when_asked(project):
    set_head(project, kind="mlp", hidden_units=16, patience=3)
    train_head.main()
    head, classes = load_head(project / "models" / "head.npz")
    assert isinstance(head, MLPHead) and head.weights_[0].shape == (1280, 16)
    metrics = json.loads((project / layout.TRAIN_HEAD_REPORT).read_text())
    assert metrics["val"]["accuracy"] == 1.0
    assert metrics["n_iter"] == metrics["best_epoch"] + 3
    search = metrics["regularisation"]
    assert search["parameter"] == "alpha" and search["auto"] is True
    assert head.temperature_ == metrics["calibration"]["temperature"]
    assert search["alpha"] in [point["alpha"] for point in search["curve"]]


def test_every_head_kind_has_a_trainer_and_a_saved_form():
    from transfer.heads import HEAD_KINDS

    [kind] = [f for f in dataclasses.fields(HeadParams) if f.name == "kind"]
    assert set(head_training.HEAD_TRAINERS) == set(HEAD_KINDS) == set(kind.metadata["choices"])


def keep_rows(project, split, keep):
    """Rewrite the embedding cache of ``split`` with only the rows ``keep`` selects."""
    directory = project / "data" / "embeddings"
    np.save(directory / f"{split}.npy", np.load(directory / f"{split}.npy")[keep])
    index = dict(np.load(directory / "index.npz"))
    for name in (f"{split}_labels", f"{split}_ids"):
        index[name] = index[name][keep]
    np.savez(directory / "index.npz", **index)


def one_blue_training_image(project):
    labels = np.load(project / "data" / "embeddings" / "index.npz")["train_labels"]
    blue = np.flatnonzero(labels == 0)
    keep = np.ones(len(labels), dtype=bool)
    keep[blue[1:]] = False
    keep_rows(project, "train", keep)


def test_a_class_of_one_training_image_falls_back_to_the_validation_split(project, caplog):
    one_blue_training_image(project)
    with caplog.at_level(logging.WARNING):
        train_head.main()
    assert "class 'blue' has 1 training image: too few for stratified cross-validation" \
        in caplog.text
    metrics = json.loads((project / layout.TRAIN_HEAD_REPORT).read_text())
    assert metrics["regularisation"]["held_out"].startswith("validation split (")


def test_with_no_held_out_images_at_all_the_stage_fails_in_one_line(project):
    one_blue_training_image(project)
    keep_rows(project, "val", np.zeros(len(np.load(
        project / "data" / "embeddings" / "index.npz")["val_labels"]), bool))
    result = run_stage_cli("train_head", project)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: head.C: no held-out images") and "class 'blue'" in line
    assert not (project / "models" / "head.npz").exists()


@pytest.mark.parametrize(("key", "value"), [("C", "autoo"), ("alpha", "-1")])
def test_a_misspelt_auto_names_the_key_and_what_it_may_be(project, key, value):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["head"] = {key: value}
    write_params(project, params)
    result = run_stage_cli("train_head", project)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: params.yaml: head.{key}='{value}' ")
    assert "auto or a number in" in line


def test_the_temperature_is_fitted_on_the_scores_the_search_held_out():
    from sklearn.datasets import make_classification

    from transfer.head_search import choose_held_out, search_logistic

    X, y = make_classification(n_samples=700, n_features=100, n_informative=5, n_classes=3,
                               flip_y=0.1, random_state=0)
    held_out = choose_held_out(y[:300], 400, ["a", "b", "c"])
    fitted = search_logistic(LogisticHead(), X[:300], y[:300], X[300:], y[300:], (100.0,),
                             held_out)  # barely regularised, on few rows: over-confident
    calibration = head_training.calibrate_head(fitted)
    assert fitted.head.temperature_ == calibration["temperature"] > 2
    assert calibration["log_loss"] < calibration["log_loss_uncalibrated"] - 0.1
    np.testing.assert_array_equal(fitted.held_out_scores,
                                  fitted.head.decision_function(X[300:]))


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_heads_are_fitted_on_a_fixed_number_of_threads(project, monkeypatch, kind):
    # The head's bytes depend on the BLAS/OpenMP thread count: fixed, they are the same on
    # every machine, whatever its cores.
    from threadpoolctl import threadpool_info, threadpool_limits

    set_head(project, kind=kind, C=1.0, alpha=0.001, max_iter=5)
    seen = []
    fit = head_training.HEAD_TRAINERS[kind].fit

    def recording(self, *args):
        seen.extend(pool["num_threads"] for pool in threadpool_info())
        return fit(self, *args)

    monkeypatch.setattr(head_training.HEAD_TRAINERS[kind], "fit", recording)
    with threadpool_limits(limits=2):
        train_head.main()
    assert seen and set(seen) == {head_training.FIT_THREADS}
