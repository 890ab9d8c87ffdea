import tracemalloc

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transfer import heads
from transfer.errors import PipelineError
from transfer.heads import LogisticHead, MLPHead, load_head


@pytest.mark.parametrize("n_classes", [2, 4])
def test_probabilities_match_scikit_learn_exactly(n_classes):
    X, y = make_classification(n_samples=200, n_features=12, n_informative=6,
                               n_classes=n_classes, random_state=0)
    head = LogisticHead(C=0.5, max_iter=500, random_state=0).fit(X, y)
    # The head fits on standardized values held in float32: the same as scikit-learn given
    # those values, and within 1e-4 of a float64 fit.
    scaler = StandardScaler().fit(X)
    model = LogisticRegression(C=0.5, max_iter=500, random_state=0).fit(
        scaler.transform(X).astype(np.float32), y)
    exact = model.predict_proba(scaler.transform(X))
    np.testing.assert_allclose(head.predict_proba(X), exact, atol=1e-10)
    assert np.array_equal(head.predict(X), model.predict(scaler.transform(X)))
    in_float64 = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=500,
                                                                    random_state=0)).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(X), in_float64.predict_proba(X), atol=1e-4)
    assert head.converged_


def test_a_memory_mapped_cache_read_in_chunks_gives_the_same_head(tmp_path, monkeypatch):
    X, y = make_classification(n_samples=300, n_features=10, n_informative=5, n_classes=3,
                               random_state=3)
    np.save(tmp_path / "x.npy", X.astype(np.float16))
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    whole = LogisticHead().fit(np.asarray(mapped), y)
    chunked_reads = heads.row_chunks
    monkeypatch.setattr(heads, "row_chunks", lambda features: chunked_reads(features, rows=64))
    chunked = LogisticHead().fit(mapped, y)
    np.testing.assert_allclose(chunked.predict_proba(mapped), whole.predict_proba(mapped),
                               atol=1e-6)
    assert np.array_equal(chunked.predict(mapped), whole.predict(mapped))


def test_saved_head_loads_without_pickle_and_predicts_the_same(tmp_path):
    X, y = make_classification(n_samples=150, n_features=8, n_informative=5, n_classes=3,
                               random_state=1)
    head = LogisticHead(class_weight="balanced").fit(X, y)
    path = tmp_path / "head.npz"
    head.save(path, ["cat", "dog", "émeu"])
    with np.load(path, allow_pickle=False) as arrays:  # plain arrays only
        assert set(arrays.files) == {"kind", "mean", "scale", "coef", "intercept", "classes",
                                     "class_names", "temperature"}
    loaded, names = load_head(path)
    assert isinstance(loaded, LogisticHead)
    assert names == ["cat", "dog", "émeu"]
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))


def test_too_few_iterations_is_reported_not_hidden():
    X, y = make_classification(n_samples=200, n_features=20, n_classes=3, n_informative=8,
                               random_state=2)
    head = LogisticHead(max_iter=1).fit(X, y)
    assert head.converged_ is False


def test_loading_something_else_names_the_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(2))
    with pytest.raises(PipelineError, match="other.npz: not a saved head"):
        load_head(path)


def test_predict_proba_all_gives_unseen_classes_a_zero_column():
    X = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]])
    y = np.array([0, 2, 0, 2])  # class 1 never seen in training
    head = LogisticHead().fit(X, y)
    full = head.predict_proba_all(X, n_classes=3)
    assert full.shape == (4, 3)
    assert np.all(full[:, 1] == 0)
    np.testing.assert_allclose(full[:, [0, 2]], head.predict_proba(X))


def _mlp_data(n_classes, seed=0):
    X, y = make_classification(n_samples=300, n_features=10, n_informative=6,
                               n_classes=n_classes, random_state=seed)
    return X[:200], y[:200], X[200:], y[200:]


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_head_predicts_like_scikit_learn_with_its_weights(n_classes):
    X, y, X_val, y_val = _mlp_data(n_classes)
    scaler = StandardScaler().fit(X)
    reference = MLPClassifier(hidden_layer_sizes=(16,), max_iter=300,
                              random_state=0).fit(scaler.transform(X), y)
    head = MLPHead()
    head._set_arrays(scaler.mean_, scaler.scale_, reference.coefs_, reference.intercepts_,
                     reference.classes_)
    np.testing.assert_allclose(head.predict_proba(X_val),
                               reference.predict_proba(scaler.transform(X_val)), atol=1e-10)


def test_mlp_head_keeps_its_best_validation_epoch_and_stops_after_patience():
    X, y, X_val, y_val = _mlp_data(3)
    head = MLPHead(hidden_units=32, max_epochs=300, patience=5).fit(X, y, X_val, y_val)
    best = head.best_epoch_ - 1
    later = head.curve_[best + 1:]
    assert all(e["val_accuracy"] < head.curve_[best]["val_accuracy"] or (
        e["val_accuracy"] == head.curve_[best]["val_accuracy"]
        and e["val_loss"] >= head.curve_[best]["val_loss"] - MLPHead.tol) for e in later)
    assert max(e["val_accuracy"] for e in head.curve_) == head.curve_[best]["val_accuracy"]
    assert head.n_iter_ == head.best_epoch_ + 5 and head.converged_
    kept_accuracy = (head.predict(X_val) == y_val).mean()
    assert kept_accuracy == pytest.approx(head.curve_[best]["val_accuracy"])


def test_mlp_head_saves_loads_and_exports_as_layers(tmp_path):
    X, y, X_val, y_val = _mlp_data(2)
    head = MLPHead(hidden_units=8, max_epochs=20, patience=3).fit(X, y, X_val, y_val)
    head.save(tmp_path / "head.npz", ["no", "yes"])
    loaded, names = load_head(tmp_path / "head.npz")
    assert isinstance(loaded, MLPHead) and names == ["no", "yes"]
    np.testing.assert_array_equal(loaded.predict_proba(X_val), head.predict_proba(X_val))
    (w1, b1), (w2, b2) = loaded.layers(n_classes=2)
    logits = np.maximum(X_val @ w1.T + b1, 0) @ w2.T + b2
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True),
                               head.predict_proba(X_val), atol=1e-10)


def test_an_mlp_that_runs_out_of_epochs_says_so():
    X, y, X_val, y_val = _mlp_data(3)
    head = MLPHead(hidden_units=8, max_epochs=2, patience=50).fit(X, y, X_val, y_val)
    assert head.n_iter_ == 2 and head.converged_ is False


def test_an_mlp_without_hidden_units_is_one_linear_softmax_layer(tmp_path):
    X, y = make_classification(n_samples=1200, n_features=10, n_informative=6, n_classes=3,
                               class_sep=2.0, random_state=0)
    X, y, X_val, y_val = X[:1000], y[:1000], X[1000:], y[1000:]
    head = MLPHead(hidden_units=0, max_epochs=300, patience=10).fit(X, y, X_val, y_val)
    assert [w.shape for w in head.weights_] == [(10, 3)]
    [(weight, bias)] = head.layers(n_classes=4)
    logits = X_val @ weight.T + bias
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose((softmax / softmax.sum(axis=1, keepdims=True))[:, :3],
                               head.predict_proba(X_val), atol=1e-10)
    probe = LogisticHead().fit(X, y)
    assert (head.predict(X_val) == y_val).mean() >= (probe.predict(X_val) == y_val).mean() - 0.05


def test_the_mlp_reads_a_memory_mapped_cache_in_chunks_not_whole(tmp_path):
    def python_peak(rows):
        X, y = make_classification(n_samples=rows, n_features=128, n_informative=10,
                                   n_classes=3, random_state=0)
        np.save(tmp_path / f"x{rows}.npy", X.astype(np.float32))
        mapped = np.load(tmp_path / f"x{rows}.npy", mmap_mode="r")
        tracemalloc.start()
        try:
            MLPHead(hidden_units=16, max_epochs=1).fit(mapped, y, mapped[:200], y[:200])
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    python_peak(2000)  # warm-up: one-off allocations
    small, large = python_peak(2000), python_peak(20000)
    # A float32 copy of the 18,000 more rows would add 8.8 MiB; chunks of 512 rows do not grow.
    assert large - small < 1.5 * 2**20, (small, large)


def test_a_validation_class_missing_from_training_counts_as_wrong_not_as_an_error():
    X, y, X_val, y_val = _mlp_data(3)
    keep = y != 2
    head = MLPHead(hidden_units=8, max_epochs=5, patience=2).fit(X[keep], y[keep], X_val, y_val)
    assert list(head.classes_) == [0, 1]
    assert all(e["val_accuracy"] <= (y_val != 2).mean() for e in head.curve_)


def test_the_temperature_divides_the_scores_is_saved_and_folded_into_the_layers(tmp_path):
    X, y, X_val, y_val = _mlp_data(3)
    for head in (LogisticHead().fit(X, y),
                 MLPHead(hidden_units=8, max_epochs=5, patience=2).fit(X, y, X_val, y_val)):
        plain = head.predict_proba(X_val)
        head.temperature_ = 2.5
        softened = head.predict_proba(X_val)
        np.testing.assert_allclose(head.predict_proba(X_val, calibrated=False), plain)
        expected = np.exp(head.decision_function(X_val) / 2.5)
        np.testing.assert_allclose(softened, expected / expected.sum(axis=1, keepdims=True))
        assert softened.max(axis=1).mean() < plain.max(axis=1).mean() - 0.01
        assert np.array_equal(head.predict(X_val), head.classes_[plain.argmax(axis=1)])
        head.save(tmp_path / "head.npz", ["a", "b", "c"])
        loaded, _ = load_head(tmp_path / "head.npz")
        assert loaded.temperature_ == 2.5
        np.testing.assert_allclose(loaded.predict_proba(X_val), softened)
        *hidden, (weight, bias) = loaded.layers(n_classes=4)
        values = X_val
        for hidden_weight, hidden_bias in hidden:
            values = np.maximum(values @ hidden_weight.T + hidden_bias, 0)
        values = values @ weight.T + bias
        exported = np.exp(values - values.max(axis=1, keepdims=True))
        np.testing.assert_allclose((exported / exported.sum(axis=1, keepdims=True))[:, :3],
                                   softened, atol=1e-10)


def test_a_head_saved_before_calibration_loads_with_temperature_one(tmp_path):
    X, y = make_classification(n_samples=150, n_features=8, n_informative=5, n_classes=3,
                               random_state=1)
    head = LogisticHead().fit(X, y)
    np.savez(tmp_path / "old.npz", kind=np.asarray("logistic"), mean=head.mean_,
             scale=head.scale_, coef=head.coef_, intercept=head.intercept_,
             classes=head.classes_, class_names=np.asarray(["a", "b", "c"]))
    loaded, _ = load_head(tmp_path / "old.npz")
    assert loaded.temperature_ == 1.0
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))


def test_fine_tuning_starts_from_the_untempered_probe():
    X, y = make_classification(n_samples=150, n_features=8, n_informative=5, n_classes=3,
                               random_state=1)
    head = LogisticHead().fit(X, y)
    before = head.as_linear(n_classes=3)
    head.temperature_ = 4.0
    for a, b in zip(head.as_linear(n_classes=3), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_head_for_other_embeddings_or_other_classes_names_the_difference(tmp_path):
    from transfer.embeddings import EmbeddingMeta

    X, y = make_classification(n_samples=60, n_features=6, n_informative=4, n_classes=3,
                               random_state=0)
    LogisticHead().fit(X, y).save(tmp_path / "head.npz", ["cat", "dog", "fox"])

    def meta(dim, classes):
        return EmbeddingMeta(backbone="b", weights="w", weights_sha256=None, preprocessing={},
                             dim=dim, dtype="float32", classes=classes,
                             flip_average=False, precision="float32", engine="torch",
                             short_side=64, versions={})

    assert heads.load_head_for(tmp_path / "head.npz", meta(6, ["cat", "dog", "fox"]))[1] == [
        "cat", "dog", "fox"]
    with pytest.raises(PipelineError, match=r"other embeddings \(6-d, 3 classes\) than the "
                                            r"cache holds \(8-d, 3 classes\)"):
        heads.load_head_for(tmp_path / "head.npz", meta(8, ["cat", "dog", "fox"]))
    with pytest.raises(PipelineError, match=r"head.npz was trained on other classes than the "
                                            r"cache holds \(its class 1 is 'dog', the cache's "
                                            r"'wolf'\); run dvc repro$"):
        heads.load_head_for(tmp_path / "head.npz", meta(6, ["cat", "wolf", "fox"]))
