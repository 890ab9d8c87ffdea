import numpy as np
import pytest

from stages.metrics import classification_metrics, per_class_metrics, prediction_rows


def test_headline_metrics_on_a_known_case():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    metrics = classification_metrics(y_true, y_pred, n_classes=3)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    f1 = [2 * (3 / 4) * (3 / 4) / (3 / 2), 2 * (2 / 3) / (5 / 3), 2 * 0.5 / 1.5]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))
    assert metrics["n_images"] == 8
    assert metrics["n_classes_present"] == metrics["n_classes"] == 3


def test_a_class_never_predicted_counts_as_zero_f1():
    metrics = classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), n_classes=3)
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_a_class_absent_from_the_split_is_not_averaged_in():
    metrics = classification_metrics(np.array([0, 0, 1]), np.array([0, 0, 1]), n_classes=3)
    assert metrics["macro_f1"] == 1.0
    assert metrics["n_classes_present"] == 2 and metrics["n_classes"] == 3


def test_per_class_and_rows_use_class_names():
    report = per_class_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"])
    assert report["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                           "support": 2}
    rows = prediction_rows(["x.png", "y.png"], np.array([0, 1]), np.array([1, 1]), ["a", "b"])
    assert rows == [{"id": "x.png", "actual": "a", "predicted": "b"},
                    {"id": "y.png", "actual": "b", "predicted": "b"}]
