import math

import numpy as np
import pytest

from transfer.calibration import (
    TEMPERATURE_BOUNDS,
    calibrate,
    fit_temperature,
    label_columns,
    negative_log_likelihood,
)


def calibrated_scores(rows=4000, classes=4, seed=0):
    """Scores whose softmax is the true probability of each label (labels drawn from it)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0.0, 2.0, size=(rows, classes))
    probabilities = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return scores, labels


def test_the_temperature_of_a_calibrated_model_is_about_one():
    scores, labels = calibrated_scores()
    assert fit_temperature(scores, labels) == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("confidence", [4.0, 0.3])
def test_the_temperature_undoes_over_and_under_confidence(confidence):
    scores, labels = calibrated_scores(seed=1)
    distorted = scores * confidence  # x4: over-confident; x0.3: under-confident
    temperature = fit_temperature(distorted, labels)
    assert temperature == pytest.approx(confidence, rel=0.08)
    before = negative_log_likelihood(distorted, labels)
    after = negative_log_likelihood(distorted, labels, temperature)
    assert after < before - 0.05
    assert after == pytest.approx(negative_log_likelihood(scores, labels), abs=0.01)


def test_binary_scores_are_one_column_against_zero():
    scores, labels = calibrated_scores(classes=2, seed=2)
    one_column = (scores[:, 1] - scores[:, 0])[:, None] * 3.0
    assert fit_temperature(one_column, labels) == pytest.approx(3.0, rel=0.1)
    assert negative_log_likelihood(one_column, labels) == pytest.approx(
        negative_log_likelihood(np.hstack([np.zeros_like(one_column), one_column]), labels))


def test_held_out_images_all_right_only_sharpen_and_within_the_bounds():
    scores = np.array([[5.0, 0.0], [0.0, 4.0], [6.0, 1.0]])
    # By likelihood alone it keeps growing as T shrinks, until it is 1 to machine precision;
    # the prior holds three images close to T = 1.
    unlimited = fit_temperature(scores, np.array([0, 1, 0]), prior_sd=math.inf)
    assert TEMPERATURE_BOUNDS[0] <= unlimited < 0.1
    assert 0.9 < fit_temperature(scores, np.array([0, 1, 0])) < 1.0


def test_the_prior_moves_a_temperature_on_few_images_part_of_the_way_only():
    scores, labels = calibrated_scores(seed=4)
    distorted = scores * 3.0
    for rows in (10, 30, 100):
        likelihood = fit_temperature(distorted[:rows], labels[:rows], prior_sd=math.inf)
        posterior = fit_temperature(distorted[:rows], labels[:rows])
        assert 1.0 < posterior < likelihood
    # Thousands of images leave it where they say.
    assert fit_temperature(distorted, labels) == pytest.approx(
        fit_temperature(distorted, labels, prior_sd=math.inf), rel=0.01)


def test_no_held_out_rows_leave_the_scores_as_they_are():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0


def test_label_columns_skip_labels_the_model_never_saw():
    seen, columns = label_columns(np.array([1, 4, 7]), np.array([4, 2, 7, 1]))
    assert seen.tolist() == [True, False, True, True]
    assert columns.tolist() == [1, 2, 0]


def test_calibrate_skips_unknown_classes_and_says_when_every_image_was_right():
    scores, labels = calibrated_scores(seed=3)
    classes = np.array([0, 2, 5, 7])  # the model's labels for the four score columns
    given = classes[labels]
    given[:50] = 9  # a class the model never saw: left out
    calibration = calibrate(scores * 2.0, classes, given)
    assert calibration.temperature == pytest.approx(2.0, rel=0.1)
    assert calibration.log_loss < calibration.log_loss_uncalibrated
    assert calibration.log_loss == pytest.approx(
        negative_log_likelihood(scores[50:] * 2.0, labels[50:], calibration.temperature))
    assert not calibration.all_right and not calibration.at_bound
    right = calibrate(np.array([[3.0], [-2.0]]), np.array([0, 1]), np.array([1, 0]))
    assert right.all_right and right.temperature == 1.0  # nothing to calibrate on
    assert calibrate(scores, classes, np.full(len(scores), 9)) is None
