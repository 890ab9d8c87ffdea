import numpy as np
import pytest

from stages.artifacts import save_arrays
from stages.embeddings import load_split, write_split
from stages.errors import PipelineError


def test_batches_stream_into_one_array_file(tmp_path):
    batches = [np.full((2, 3), i, dtype=np.float32) for i in range(3)]
    write_split(tmp_path / "train.npy", iter(batches), rows=6, dim=3, dtype="float16")
    save_arrays(tmp_path / "index.npz", train_labels=np.arange(6),
                train_ids=np.asarray(list("abcdef")))
    features, labels, ids = load_split(tmp_path, "train")
    assert features.dtype == np.float16 and features.shape == (6, 3)
    assert np.array_equal(features[:, 0], [0, 0, 1, 1, 2, 2])
    assert list(ids) == list("abcdef") and list(labels) == list(range(6))


def test_a_short_stream_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="wrote 2 rows, expected 4"):
        write_split(tmp_path / "x.npy", [np.zeros((2, 3))], rows=4, dim=3, dtype="float32")


def test_missing_split_says_how_to_make_it(tmp_path):
    with pytest.raises(PipelineError, match="val.npy: missing; run the stage"):
        load_split(tmp_path, "val")
