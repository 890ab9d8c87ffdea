import math

import numpy as np
import pytest

from transfer.calibration import (
    TEMPERATURE_BOUNDS,
    calibrate,
    confidence_temperature,
    fit_temperature,
    label_columns,
    mean_confidence,
    negative_log_likelihood,
    vouched_accuracy,
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


def test_images_all_right_vouch_for_an_accuracy_by_the_rule_of_three():
    # n right of n happen with probability at most 5% below the accuracy they vouch for.
    for n in (1, 10, 238):
        assert vouched_accuracy(n) ** n == pytest.approx(0.05)
    assert vouched_accuracy(1000) == pytest.approx(1 - 3 / 1000, abs=2e-5)


def test_all_right_images_sharpen_an_unsure_model_to_the_accuracy_they_vouch_for():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 300)
    scores = rng.normal(0.0, 0.1, (300, 3))
    scores[np.arange(300), labels] += 1.0  # all right, about 0.6 sure of each
    calibration = calibrate(scores, np.arange(3), labels)
    assert calibration.all_right and calibration.temperature < 0.5
    assert mean_confidence(scores, calibration.temperature) == pytest.approx(
        vouched_accuracy(300), abs=1e-6)
    assert calibration.log_loss < calibration.log_loss_uncalibrated
    # As sure as that already, or surer: left as it is.
    sure = calibrate(scores * 20.0, np.arange(3), labels)
    assert sure.all_right and sure.temperature == 1.0
    assert sure.log_loss == sure.log_loss_uncalibrated


def test_a_confidence_out_of_reach_takes_the_nearer_bound():
    ties = np.zeros((4, 3))  # a third whatever the temperature
    assert confidence_temperature(ties, 0.9) == TEMPERATURE_BOUNDS[0]
    assert confidence_temperature(ties, 0.1) == TEMPERATURE_BOUNDS[1]
    one_column = np.array([[2.0], [-1.0]])
    temperature = confidence_temperature(one_column, 0.99)
    assert mean_confidence(one_column, temperature) == pytest.approx(0.99)


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
    assert right.all_right and right.temperature == 1.0  # surer than 2 images vouch for
    assert calibrate(scores, classes, np.full(len(scores), 9)) is None
