"""The logistic head fitted streamed from the cache (``head.in_memory_gb``): scikit-learn's
objective and solver without the standardized matrix in memory."""

import logging
import tracemalloc

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from transfer.errors import ParamsError, PipelineError
from transfer.head_search import C_GRID, choose_held_out, search_logistic
from transfer.head_training import LogisticTrainer
from transfer.heads import LogisticHead, standardize
from transfer.params import HeadParams, load_params
from transfer.streamed_logistic import (
    StandardizedRows,
    StreamedLogisticHead,
    StreamedLogisticRegression,
)

NAMES = [f"class{i}" for i in range(4)]


def data(classes, rows=400, features=40, seed=0):
    X, y = make_classification(n_samples=rows, n_features=features, n_informative=6,
                               n_redundant=0, n_classes=classes, flip_y=0.1, random_state=seed)
    return X, y


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_it_reaches_scikit_learns_solution_in_as_many_iterations(classes, class_weight):
    X, y = data(classes)
    y = np.where(np.arange(len(y)) % 5 == 0, 0, y)  # skewed, so that balanced weighs
    weight = np.ones(len(y))
    weight[::7] = 0  # a fold's held-out rows, as head.C: auto weighs them
    scaler, matrix = standardize(X)
    before = X.copy()
    ours = StreamedLogisticRegression(C=0.3, max_iter=1000, class_weight=class_weight).fit(
        StandardizedRows(X, scaler, rows=64), y, sample_weight=weight)
    np.testing.assert_array_equal(X, before)  # its chunks are views of X: never changed
    theirs = LogisticRegression(C=0.3, max_iter=1000, class_weight=class_weight).fit(
        matrix, y, sample_weight=weight)
    assert ours.coef_.shape == theirs.coef_.shape == ((1 if classes == 2 else classes), 40)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-5)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, atol=1e-5)
    assert abs(int(ours.n_iter_[0]) - int(theirs.n_iter_[0])) <= 1
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)


def test_a_warm_start_continues_from_the_last_fit():
    X, y = data(3)
    scaler, _ = standardize(X)
    rows = StandardizedRows(X, scaler)
    model = StreamedLogisticRegression(C=0.01, max_iter=1000, warm_start=True).fit(rows, y)
    model.C = 0.0316
    model.fit(rows, y)
    cold = StreamedLogisticRegression(C=0.0316, max_iter=1000).fit(rows, y)
    assert model.n_iter_[0] < cold.n_iter_[0]
    np.testing.assert_allclose(model.coef_, cold.coef_, atol=1e-4)


def test_running_out_of_iterations_warns_as_scikit_learn_does():
    X, y = data(3)
    scaler, _ = standardize(X)
    with pytest.warns(Warning, match="lbfgs failed to converge") as caught:
        model = StreamedLogisticRegression(C=100.0, max_iter=2).fit(StandardizedRows(X, scaler),
                                                                   y)
    assert caught[0].category.__name__ == "ConvergenceWarning" and model.n_iter_[0] == 2


def test_past_in_memory_gb_the_head_and_its_search_stream_and_choose_as_in_memory(caplog):
    X, y = data(4, rows=900)
    X_train, y_train, X_val, y_val = X[:600], y[:600], X[600:], y[600:]
    caplog.set_level(logging.INFO, logger="transfer.head_training")

    def trained(**head):
        return LogisticTrainer(HeadParams(**head), 0, NAMES).fit(X_train, y_train, X_val, y_val)

    in_memory = trained()  # 600 x 40 float32: far under the default 4 GB
    assert not in_memory.head.streamed and "fitted streamed" not in caplog.text
    streamed = trained(in_memory_gb=0)
    assert isinstance(streamed.head, StreamedLogisticHead)
    assert "more than head.in_memory_gb=0: the logistic head is fitted streamed" in caplog.text
    assert streamed.search.chosen == in_memory.search.chosen
    assert [p.value for p in streamed.search.points] == [p.value for p in in_memory.search.points]
    np.testing.assert_allclose(streamed.head.coef_, in_memory.head.coef_, atol=1e-5)
    np.testing.assert_array_equal(streamed.head.predict(X_val), in_memory.head.predict(X_val))
    # Saved, it is a logistic head like any other.
    assert streamed.head.kind == "logistic"


def test_cross_validation_streams_too():
    X, y = data(3, rows=300)
    held_out = choose_held_out(y, 40, NAMES)
    assert held_out.folds == 5
    in_memory = search_logistic(LogisticHead(), X, y, X[:40], y[:40], C_GRID[:6], held_out)
    streamed = search_logistic(StreamedLogisticHead(), X, y, X[:40], y[:40], C_GRID[:6],
                               held_out)
    assert streamed.search.chosen == in_memory.search.chosen
    np.testing.assert_allclose(streamed.held_out_scores, in_memory.held_out_scores, atol=1e-3)


def test_streamed_the_fit_holds_a_chunk_not_the_matrix(tmp_path):
    """Its memory grows by the per-row vectors (labels, weights: 16 bytes a row), not by the
    float32 matrix (4 bytes a value: 256 a row here)."""
    dim, peaks = 64, {}
    for rows in (16000, 64000):
        X, y = make_classification(n_samples=rows, n_features=dim, n_informative=8,
                                   n_classes=3, random_state=0)
        np.save(tmp_path / "x.npy", X.astype(np.float32))
        mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
        tracemalloc.start()
        try:
            head = StreamedLogisticHead(C=0.1).fit(mapped, y)
            peaks[rows] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert head.converged_
    assert (peaks[64000] - peaks[16000]) / 48000 < 32, peaks
    assert peaks[64000] < 0.6 * 64000 * dim * 4, peaks  # the matrix would be 16 MB


def test_in_memory_gb_is_checked_like_every_parameter(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("head:\n  in_memory_gb: -1\n")
    with pytest.raises(ParamsError, match="head.in_memory_gb"):
        load_params(path)
    path.write_text("head:\n  in_memory_gb: 0.5\n")
    assert load_params(path).head.in_memory_gb == 0.5


def test_a_float16_cache_streams_and_a_damaged_one_stops_with_its_name(tmp_path):
    X, y = data(3)
    np.save(tmp_path / "half.npy", X.astype(np.float16))
    half = np.load(tmp_path / "half.npy", mmap_mode="r")
    streamed = StreamedLogisticHead(C=0.1).fit(half, y)
    held = LogisticHead(C=0.1).fit(half, y)
    np.testing.assert_allclose(streamed.coef_, held.coef_, atol=1e-5)
    damaged = X.astype(np.float32)
    damaged[123, 4] = np.nan
    np.save(tmp_path / "damaged.npy", damaged)
    with pytest.raises(PipelineError, match=r"damaged\.npy: holds values that are not finite"):
        StreamedLogisticHead(C=0.1).fit(np.load(tmp_path / "damaged.npy", mmap_mode="r"), y)
