"""Validation scores and the criteria that choose the kept epoch."""

import numpy as np
import pytest

from transfer.selection import SELECT_BY, ValidationScores


def test_scores_of_probabilities_on_a_skewed_split():
    y_true = np.array([0, 0, 0, 0, 1])
    probabilities = np.array([[0.9, 0.1]] * 4 + [[0.8, 0.2]])  # the one class-1 image wrong
    scores = ValidationScores.of(y_true, probabilities)
    assert scores.accuracy == pytest.approx(0.8)
    assert scores.balanced_accuracy == pytest.approx(0.5)  # (1.0 + 0.0) / 2
    assert scores.loss == pytest.approx(-(4 * np.log(0.9) + np.log(0.2)) / 5)


def test_each_criterion_compares_its_own_score_strictly():
    a, b = ValidationScores(0.3, 0.9, 0.6), ValidationScores(0.2, 0.8, 0.7)
    assert SELECT_BY["accuracy"].better(a, b) and not SELECT_BY["accuracy"].better(b, a)
    assert SELECT_BY["balanced_accuracy"].better(b, a)
    assert SELECT_BY["log_loss"].better(b, a) and not SELECT_BY["log_loss"].better(a, b)
    assert not any(criterion.better(a, a) for criterion in SELECT_BY.values())  # ties: no
