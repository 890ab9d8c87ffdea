import tracemalloc

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from transfer import head_search
from transfer.errors import PipelineError
from transfer.head_search import (
    C_GRID,
    CV_FOLDS,
    MIN_VALIDATION_IMAGES,
    GridPoint,
    choose_held_out,
    search_logistic,
    search_mlp,
    within_one_standard_error,
)
from transfer.heads import LogisticHead, MLPHead

NAMES = [f"class{i}" for i in range(10)]


def split(X, y, n_train):
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def noisy_set():
    """Few rows, many features, a third of the labels flipped: easy to over-fit."""
    X, y = make_classification(n_samples=120 + 600, n_features=300, n_informative=4,
                               n_redundant=0, n_classes=3, n_clusters_per_class=1,
                               flip_y=0.3, class_sep=1.0, random_state=0)
    return split(X, y, 120)


def clean_set():
    """Well separated classes, no label noise, plenty of rows per feature."""
    X, y = make_classification(n_samples=600 + 400, n_features=10, n_informative=10,
                               n_redundant=0, n_classes=3, n_clusters_per_class=1,
                               class_sep=3.0, random_state=0)
    return split(X, y, 600)


def search(X, y, X_val, y_val, grid=C_GRID, **head):
    held_out = choose_held_out(y, len(y_val), NAMES)
    return search_logistic(LogisticHead(**head), X, y, X_val, y_val, grid, held_out)


def test_a_noisy_over_fittable_set_is_ranked_after_each_points_temperature():
    X, y, X_val, y_val = noisy_set()
    fitted = search(X, y, X_val, y_val)
    assert fitted.search.held_out.folds == 0  # 600 validation images
    best = min(fitted.search.points, key=lambda p: p.val_log_loss)
    assert best.value == fitted.search.chosen  # on the validation split: the lowest loss
    # A point's loss is the head's log loss once calibrated (a number: its one point).
    number = search(X, y, X_val, y_val, grid=(fitted.search.chosen,))
    [point] = number.search.points
    scores = number.head.decision_function(X_val)
    assert point.val_log_loss == head_search.calibrated_score(scores, number.head.classes_,
                                                               y_val)[0]
    assert point.val_log_loss < head_search.score(scores, number.head.classes_, y_val)[0]
    # Its temperature mends an over-confident head's log loss, not its accuracy: the choice
    # is within a point of the most accurate C the walk scored.
    assert best.val_accuracy >= max(p.val_accuracy for p in fitted.search.points) - 0.01


def noisy_training_labels():
    """A third of the training labels wrong, the validation labels right."""
    X, y = make_classification(n_samples=600 + 600, n_features=100, n_informative=4,
                               n_redundant=0, n_classes=3, n_clusters_per_class=1,
                               class_sep=1.5, random_state=0)
    rng = np.random.default_rng(0)
    flipped = rng.choice(600, 180, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 3, len(flipped))) % 3
    return X[:600], noisy[:600], X[600:], y[600:]


def test_wrong_training_labels_get_strong_regularisation_from_the_calibrated_loss():
    # Untempered, the strongly regularised heads look worse than they are (under-confident)
    # and the walk chose C = 0.1, fitting the wrong labels (0.82 validation accuracy).
    fitted = search(*noisy_training_labels())
    assert fitted.search.chosen <= 0.003
    chosen = next(p for p in fitted.search.points if p.value == fitted.search.chosen)
    assert chosen.val_accuracy >= 0.9


def test_a_clean_separable_set_gets_weak_regularisation():
    fitted = search(*clean_set())
    best = min(fitted.search.points, key=lambda p: p.val_log_loss)
    assert best.value >= 0.1  # 0.32, ranked once calibrated (untempered: 1 or weaker)
    curve = [p.val_log_loss for p in fitted.search.points]
    assert curve[0] > 3 * min(curve)  # the strongest regulariser under-fits badly
    assert best.value == fitted.search.chosen


def test_cross_validated_the_strongest_value_within_one_standard_error_is_kept():
    X, y, X_val, y_val = clean_set()
    fitted = search(X[:150], y[:150], X_val[:40], y_val[:40])
    assert fitted.search.held_out.folds == CV_FOLDS
    points = fitted.search.points
    best = min(points, key=lambda p: p.val_log_loss)
    assert fitted.search.chosen == within_one_standard_error(points).value < best.value
    assert all(p.val_log_loss_se > 0 for p in points)


def test_the_strongest_value_within_one_standard_error_of_the_best_is_chosen():
    def point(value, loss, error):
        return GridPoint(value, loss, 0.9, 1, error)

    points = [point(0.001, 0.9, 0.05), point(0.01, 0.40, 0.04), point(0.1, 0.33, 0.03),
              point(1.0, 0.30, 0.05), point(10.0, 0.31, 0.01)]
    assert within_one_standard_error(points).value == 0.1  # 0.33 <= 0.30 + 0.05; 0.40 is not
    points[3] = point(1.0, 0.30, 0.02)
    assert within_one_standard_error(points).value == 1.0  # no stronger value is that close
    assert within_one_standard_error(points[:1]).value == 0.001


def test_the_standard_error_is_that_of_the_mean_log_loss_over_the_held_out_images():
    scores = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    y = np.array([0, 1, 0, 1])
    loss, accuracy, error = head_search.score(scores, np.array([0, 1]), y)
    losses = -np.log(np.exp(scores[np.arange(4), y]) / np.exp(scores).sum(axis=1))
    assert loss == pytest.approx(losses.mean())
    assert error == pytest.approx(losses.std(ddof=1) / 2)
    assert accuracy == 0.75  # the last image is called class 0


def test_the_walk_starts_each_fit_from_the_last_and_costs_less_than_fits_from_scratch():
    X, y, X_val, y_val = clean_set()
    fitted = search(X, y, X_val, y_val)
    walked = [p.value for p in fitted.search.points]
    assert walked == list(C_GRID[:len(walked)])  # strong to weak
    scaled = StandardScaler().fit_transform(X).astype(np.float32)
    tolerance = LogisticHead.tol * head_search.WALK_TOLERANCE
    from_scratch = sum(int(LogisticRegression(C=C, max_iter=1000, tol=tolerance)
                           .fit(scaled, y).n_iter_[0]) for C in walked)
    walk = sum(p.cost for p in fitted.search.points)
    assert walk < 0.7 * from_scratch, (walk, from_scratch)


def test_the_head_at_the_chosen_value_is_the_head_that_number_gives():
    X, y, X_val, y_val = noisy_set()
    fitted = search(X, y, X_val, y_val)
    head = fitted.head
    assert fitted.search.chosen == head.C and head.converged_
    reference = LogisticHead(C=head.C).fit(X, y)
    np.testing.assert_array_equal(head.coef_, reference.coef_)
    assert fitted.search.cost == sum(p.cost for p in fitted.search.points) + reference.n_iter_
    # The scores kept for the temperature are the head's own on the validation split.
    np.testing.assert_array_equal(fitted.held_out_scores, head.decision_function(X_val))


def test_a_number_is_a_grid_of_one_point_and_gives_the_head_it_always_gave():
    X, y, X_val, y_val = clean_set()
    fitted = search(X, y, X_val, y_val, grid=(0.5,))
    plain = LogisticHead(C=0.5).fit(X, y)
    np.testing.assert_array_equal(fitted.head.coef_, plain.coef_)
    assert [p.value for p in fitted.search.points] == [0.5] and fitted.search.chosen == 0.5
    assert fitted.search.cost == plain.n_iter_  # fitted once


def test_a_small_validation_split_means_stratified_cross_validation_and_a_refit():
    X, y, X_val, y_val = noisy_set()
    X_val, y_val = X_val[:40], y_val[:40]
    fitted = search(X, y, X_val, y_val)
    held_out = fitted.search.held_out
    assert held_out.folds == CV_FOLDS and "cross-validation" in held_out.description
    assert f"fewer than {MIN_VALIDATION_IMAGES}" in held_out.reason
    assert fitted.search.chosen < 0.1  # strong, as on the 600 validation images
    # The head is refitted on every training row at the chosen C, exactly as a number would.
    plain = LogisticHead(C=fitted.search.chosen).fit(X, y)
    np.testing.assert_array_equal(fitted.head.coef_, plain.coef_)
    # Out-of-fold scores of every training row, at the chosen C, feed the temperature.
    assert fitted.held_out_scores.shape == (len(y), 3)
    # (a walk that ends at the chosen C, along the same path, chooses it too: its last scores)
    refolded = search(X, y, X_val, y_val, grid=C_GRID[:C_GRID.index(fitted.search.chosen) + 1])
    assert refolded.search.chosen == fitted.search.chosen != fitted.search.points[-1].value
    np.testing.assert_array_equal(fitted.held_out_scores, refolded.held_out_scores)
    np.testing.assert_array_equal(fitted.held_out_labels, y)
    assert not np.allclose(fitted.held_out_scores, fitted.head.decision_function(X))


def test_cross_validation_scores_each_fold_with_a_model_that_never_saw_it():
    """Zero weight on a fold's rows fits the same model as leaving them out."""
    X, y, _, _ = noisy_set()
    scaled = StandardScaler().fit_transform(X).astype(np.float32)
    held = np.arange(0, len(y), 4)
    weight = np.ones(len(y), dtype=np.float32)
    weight[held] = 0
    weighted = LogisticRegression(C=0.01, tol=1e-8, max_iter=5000).fit(scaled, y,
                                                                      sample_weight=weight)
    left_out = LogisticRegression(C=0.01, tol=1e-8, max_iter=5000).fit(
        np.delete(scaled, held, axis=0), np.delete(y, held))
    np.testing.assert_allclose(weighted.coef_, left_out.coef_, atol=1e-5)


def test_where_the_points_are_scored_and_why():
    y = np.repeat([0, 1, 2], [30, 30, 3])
    assert choose_held_out(y, 250, NAMES).folds == 0
    three = choose_held_out(y, 20, NAMES)
    assert three.folds == 3 and "class 'class2' has 3 training images" in three.reason
    y[-2:] = 0  # class2 now has 1 training image: no stratified folds
    fallback = choose_held_out(y, 20, NAMES)
    assert fallback.folds == 0 and fallback.fallback
    assert "class 'class2' has 1 training image" in fallback.reason
    with pytest.raises(PipelineError, match=r"^head.C: .*validation split is empty and class "
                                            r"'class2' has 1 training image"):
        choose_held_out(y, 0, NAMES)


def test_the_search_holds_no_more_memory_than_one_fit(tmp_path):
    """Its peak is that of fitting the head at one C: the standardized float32 matrix, with
    no second copy of the rows for the folds or the validation split."""
    rows, dim = 8000, 512
    X, y = make_classification(n_samples=rows + MIN_VALIDATION_IMAGES, n_features=dim,
                               n_informative=8, n_classes=3, random_state=0)
    np.save(tmp_path / "x.npy", X[:rows].astype(np.float32))
    np.save(tmp_path / "v.npy", X[rows:].astype(np.float32))
    mapped, val = np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "v.npy",
                                                                      mmap_mode="r")
    y, y_val = y[:rows], y[rows:]

    def python_peak(run):
        tracemalloc.start()
        try:
            run()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    one_fit = python_peak(lambda: LogisticHead(C=0.1).fit(mapped, y))
    assert one_fit < 1.5 * rows * dim * 4  # the float32 matrix and small change
    for n_val in (MIN_VALIDATION_IMAGES, 50):  # the validation split, then 5 folds
        peak = python_peak(lambda: search(mapped, y, val[:n_val], y_val[:n_val],  # noqa: B023
                                          grid=C_GRID[4:8]))
        assert peak < 1.05 * one_fit, (n_val, peak / one_fit)


def test_the_mlp_alpha_search_continues_one_network_and_keeps_the_best_alpha():
    X, y = make_classification(n_samples=500, n_features=10, n_informative=6, n_classes=3,
                               random_state=0)
    X, y, X_val, y_val = split(X, y, 350)
    grid = (1.0, 0.1, 0.01)
    fitted = search_mlp(MLPHead(hidden_units=16, patience=3), X, y, X_val, y_val, grid)
    points = fitted.search.points
    assert [p.value for p in points] == list(grid[:len(points)])
    best = min(points, key=lambda p: p.val_log_loss)
    assert fitted.search.chosen == best.value == fitted.head.alpha
    assert fitted.search.cost == sum(p.cost for p in points)
    kept = fitted.head.curve_[fitted.head.best_epoch_ - 1]
    assert kept["val_loss"] == pytest.approx(best.val_log_loss)
    assert fitted.search.held_out.description == "validation split (150 images)"


def test_a_given_alpha_trains_the_mlp_as_it_always_did():
    X, y = make_classification(n_samples=300, n_features=10, n_informative=6, n_classes=3,
                               random_state=1)
    X, y, X_val, y_val = split(X, y, 200)
    fitted = search_mlp(MLPHead(hidden_units=8, alpha=0.01, patience=3), X, y, X_val, y_val,
                        (0.01,), auto=False)
    plain = MLPHead(hidden_units=8, alpha=0.01, patience=3).fit(X, y, X_val, y_val)
    for a, b in zip(fitted.head.weights_, plain.weights_, strict=True):
        np.testing.assert_array_equal(a, b)
    assert fitted.head.best_epoch_ == plain.best_epoch_
