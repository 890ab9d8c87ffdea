import numpy as np
import pytest

from transfer.metrics import (
    calibration_bins,
    classification_metrics,
    confusion_rows,
    expected_calibration_error,
    macro_roc_auc,
    micro_precision_recall_curve,
    micro_roc_curve,
    most_confused,
    per_class_metrics,
    probability_metrics,
)


def one_hot_probabilities(y_pred: np.ndarray, n_classes: int, confidence: float) -> np.ndarray:
    """Every image gets ``confidence`` on its predicted class, the rest spread evenly."""
    p = np.full((len(y_pred), n_classes), (1 - confidence) / (n_classes - 1))
    p[np.arange(len(y_pred)), y_pred] = confidence
    return p


def test_headline_metrics_on_a_known_case():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    metrics = classification_metrics(y_true, y_pred, n_classes=3)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    f1 = [2 * (3 / 4) * (3 / 4) / (3 / 2), 2 * (2 / 3) / (5 / 3), 2 * 0.5 / 1.5]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))
    assert metrics["weighted_f1"] == pytest.approx(np.average(f1, weights=[4, 2, 2]))
    assert metrics["n_images"] == 8
    assert metrics["n_classes_present"] == metrics["n_classes"] == 3


def test_a_class_never_predicted_counts_as_zero_f1():
    metrics = classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), n_classes=3)
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_a_class_absent_from_the_split_is_not_averaged_in():
    metrics = classification_metrics(np.array([0, 0, 1]), np.array([0, 0, 1]), n_classes=3)
    assert metrics["macro_f1"] == 1.0
    assert metrics["n_classes_present"] == 2 and metrics["n_classes"] == 3


def test_per_class_uses_class_names():
    report = per_class_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"])
    assert report["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                           "support": 2}


def test_probability_metrics_log_loss_calibration_and_per_class():
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    y_pred = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 1])  # 8 of 10 right
    p = one_hot_probabilities(y_pred, 3, confidence=0.9)
    metrics = probability_metrics(y_true, p, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.8)
    # Every image is 90% sure and 80% are right: the calibration gap is 0.1.
    assert metrics["ece"] == pytest.approx(0.1)
    expected_loss = -(8 * np.log(0.9) + 2 * np.log(0.05)) / 10
    assert metrics["log_loss"] == pytest.approx(expected_loss)
    assert "top5_accuracy" not in metrics  # fewer than 10 classes
    assert set(metrics["per_class"]) == {"a", "b", "c"}
    assert metrics["per_class"]["c"]["recall"] == pytest.approx(2 / 3)
    assert 0.5 < metrics["roc_auc_macro"] < 1.0


def test_top5_accuracy_from_ten_classes_on():
    n = 10
    y_true = np.arange(n)
    p = np.full((n, n), 0.01)
    p[np.arange(5), np.arange(5)] = 0.5          # right, ranked first
    for i in range(5, n):
        p[i, i] = 0.05                           # ranked 5th: four classes above it
        p[i, [(i + k) % n for k in range(1, 5)]] = 0.1
    for i in range(5, 8):
        p[i, i] = 0.02                           # ranked 6th for three of them: one more above
        p[i, (i + 5) % n] = 0.06
    p /= p.sum(axis=1, keepdims=True)
    metrics = probability_metrics(y_true, p, [str(c) for c in range(n)])
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["top5_accuracy"] == pytest.approx(0.7)


def test_log_loss_counts_every_class_even_one_absent_from_the_split():
    y_true = np.array([0, 1, 0, 1])
    p = one_hot_probabilities(y_true, 3, confidence=0.98)
    metrics = probability_metrics(y_true, p, ["a", "b", "c"])
    assert metrics["log_loss"] == pytest.approx(-np.log(0.98))


def test_calibration_bins_are_equal_width_and_a_confidence_of_one_is_in_the_last():
    y_true = np.array([0, 0, 1, 1])
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.3, 0.7]])
    rows = calibration_bins(y_true, p, n_bins=5)
    assert [(r["bin_lower"], r["count"]) for r in rows] == [
        pytest.approx((0.4, 1)), pytest.approx((0.6, 2)), pytest.approx((0.8, 1))]
    assert rows[-1]["bin_upper"] == 1.0 and rows[-1]["accuracy"] == 1.0
    assert rows[1]["confidence"] == pytest.approx(0.75)
    assert expected_calibration_error(y_true, p, n_bins=5) == pytest.approx(
        0.25 * abs(1 - 0.5) + 0.5 * abs(1 - 0.75) + 0.25 * 0.0)


def test_macro_roc_auc_perfect_ranking_and_single_class():
    y_true = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
    assert macro_roc_auc(y_true, p) == 1.0
    assert macro_roc_auc(np.array([0, 0]), p[:2]) is None


def test_curves_are_thinned_and_keep_their_ends():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 400)
    p = rng.dirichlet(np.ones(5), 400)
    roc = micro_roc_curve(y_true, p, points=50)
    assert len(roc) <= 50
    assert roc[0] == {"fpr": 0.0, "tpr": 0.0} and roc[-1] == {"fpr": 1.0, "tpr": 1.0}
    pr = micro_precision_recall_curve(y_true, p, points=50)
    assert len(pr) <= 50 and pr[0]["recall"] == 1.0 and pr[-1]["recall"] == 0.0


def test_confusion_rows_are_aggregated_and_normalised_per_true_class():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 0, 0, 2])  # class 1 is never predicted right
    rows = confusion_rows(y_true, y_pred, ["a", "b", "c"])
    cells = {(r["actual"], r["predicted"]): (r["count"], r["rate"]) for r in rows}
    assert cells == {("a", "a"): (2, pytest.approx(2 / 3)), ("a", "b"): (1, pytest.approx(1 / 3)),
                     ("b", "a"): (2, 1.0), ("b", "b"): (0, 0.0), ("c", "c"): (1, 1.0)}
    assert most_confused(y_true, y_pred, ["a", "b", "c"]) == [
        {"actual": "b", "predicted": "a", "count": 2},
        {"actual": "a", "predicted": "b", "count": 1}]
