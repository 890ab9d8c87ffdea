import numpy as np
import pytest

from transfer.artifacts import save_arrays, write_json
from transfer.embeddings import EmbeddingMeta, load_split, read_rows, row_chunks, write_split
from transfer.errors import PipelineError


def write_cache(directory, rows=6, dim=3, dtype="float16"):
    batches = [np.full((2, dim), i, dtype=np.float32) for i in range(rows // 2)]
    write_split(directory / "train.npy", iter(batches), rows=rows, dim=dim, dtype=dtype)
    save_arrays(directory / "index.npz", train_labels=np.arange(rows),
                train_ids=np.asarray([f"img{i}" for i in range(rows)]))
    meta = EmbeddingMeta(backbone="b", weights="w", weights_sha256=None, preprocessing={},
                         dim=dim, dtype=dtype, classes=[f"c{i}" for i in range(rows)],
                         flip_average=False, precision="float32", engine="torch", short_side=256,
                         versions={})
    write_json(directory / "meta.json", meta.to_dict())


def test_batches_stream_into_one_array_file(tmp_path):
    write_cache(tmp_path)
    features, labels, ids = load_split(tmp_path, "train")
    assert features.dtype == np.float16 and features.shape == (6, 3)
    assert np.array_equal(features[:, 0], [0, 0, 1, 1, 2, 2])
    assert list(ids) == [f"img{i}" for i in range(6)] and list(labels) == list(range(6))


def test_a_short_stream_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="wrote 2 rows, expected 4"):
        write_split(tmp_path / "x.npy", [np.zeros((2, 3))], rows=4, dim=3, dtype="float32")


def test_missing_split_says_how_to_make_it(tmp_path):
    write_cache(tmp_path)
    with pytest.raises(PipelineError, match="val.npy: missing; run the stage"):
        load_split(tmp_path, "val")


def test_a_truncated_cache_file_is_detected(tmp_path):
    write_cache(tmp_path)
    path = tmp_path / "train.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PipelineError, match="train.npy: truncated or damaged .*dvc repro --force "
                                            "extract"):
        load_split(tmp_path, "train")


def test_a_cache_file_that_disagrees_with_its_meta_or_index_is_detected(tmp_path):
    write_cache(tmp_path)
    np.save(tmp_path / "train.npy", np.zeros((6, 4), dtype=np.float16))  # a column too many
    with pytest.raises(PipelineError, match=r"holds \(6, 4\) float16, the meta says \(rows, 3\) "
                                            r"float16; re-run the extract stage"):
        load_split(tmp_path, "train")
    np.save(tmp_path / "train.npy", np.zeros((5, 3), dtype=np.float16))  # one row short
    with pytest.raises(PipelineError, match=r"index.npz does not match .*train.npy; re-run the "
                                            r"extract stage"):
        load_split(tmp_path, "train")


def test_row_chunks_cover_every_row_once_in_order(tmp_path):
    write_cache(tmp_path, rows=10, dim=3, dtype="float32")
    features, _, _ = load_split(tmp_path, "train")
    chunks = list(row_chunks(features, rows=4))
    assert [start for start, _ in chunks] == [0, 4, 8]
    assert all(chunk.dtype == np.float64 for _, chunk in chunks)
    assert np.array_equal(np.concatenate([chunk for _, chunk in chunks]), features)


def test_scattered_rows_read_from_the_file_equal_the_mapped_ones(tmp_path):
    write_cache(tmp_path, rows=10, dim=3, dtype="float16")
    features, _, _ = load_split(tmp_path, "train")
    rows = np.array([0, 3, 4, 9])
    np.testing.assert_array_equal(read_rows(features, rows), np.asarray(features)[rows])
    view = features[2:]  # a view's offset is not its own: read through the mapping
    np.testing.assert_array_equal(read_rows(view, rows[:3]), np.asarray(features)[2:][rows[:3]])
