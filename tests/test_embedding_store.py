import os

import numpy as np
import pytest

from transfer.embedding_store import EmbeddingStore, pixel_key, prune, store_size

CONFIG = {"backbone": "b", "dim": 4}


def keys_and_rows(n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(n)]
    return [pixel_key(image) for image in images], rng.normal(size=(n, 4)).astype(np.float32)


def found(store: EmbeddingStore, keys: list[bytes]) -> dict[int, np.ndarray]:
    rows = {}
    for positions, chunk in store.found({key: [i] for i, key in enumerate(keys)}):
        rows.update(zip(positions, chunk, strict=True))
    return rows


def test_pixel_key_depends_on_pixels_and_shape():
    image = np.zeros((4, 6, 3), np.uint8)
    assert pixel_key(image) == pixel_key(image.copy())
    assert pixel_key(image) != pixel_key(np.zeros((6, 4, 3), np.uint8))
    changed = image.copy()
    changed[3, 5, 2] = 1
    assert pixel_key(changed) != pixel_key(image)


def test_rows_come_back_by_key_from_every_shard(tmp_path):
    store = EmbeddingStore(tmp_path, CONFIG, dim=4)
    keys, rows = keys_and_rows(6)
    store.add(keys[:4], rows[:4])
    store.add(keys[4:], rows[4:])
    got = found(store, keys + keys_and_rows(2, seed=1)[0])  # two it has never seen
    assert sorted(got) == list(range(6))
    for i in range(6):
        assert got[i].tobytes() == rows[i].tobytes()


def test_a_damaged_shard_is_deleted_and_never_used(tmp_path, caplog):
    store = EmbeddingStore(tmp_path, CONFIG, dim=4)
    keys, rows = keys_and_rows(3)
    path = store.add(keys, rows)
    data = bytearray(path.read_bytes())
    data[-30] ^= 1
    path.write_bytes(bytes(data))
    assert found(store, keys) == {}
    assert not path.exists() and "do not match its name" in caplog.text


def test_a_shard_of_another_configuration_is_deleted_and_never_used(tmp_path, caplog):
    store = EmbeddingStore(tmp_path, CONFIG, dim=4)
    other = EmbeddingStore(tmp_path, {**CONFIG, "backbone": "c"}, dim=4)
    keys, rows = keys_and_rows(3)
    foreign = other.add(keys, rows)
    moved = store.folder / foreign.name  # its name still matches its bytes
    os.replace(foreign, moved)
    assert found(store, keys) == {}
    assert not moved.exists() and "another configuration" in caplog.text


def test_a_write_that_dies_midway_leaves_no_shard(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path, CONFIG, dim=4)
    keys, rows = keys_and_rows(3)

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        store.add(keys, rows)
    monkeypatch.undo()
    assert store.shards() == [] and sorted(p.name for p in store.folder.iterdir()) == [
        "config.json"]
    assert found(store, keys) == {}


def test_prune_deletes_the_least_recently_used_shards_first(tmp_path):
    store = EmbeddingStore(tmp_path, CONFIG, dim=4)
    other = EmbeddingStore(tmp_path, {**CONFIG, "backbone": "c"}, dim=4)
    old, middle, new = (s.add(*keys_and_rows(50, seed)) for s, seed in
                        ((other, 0), (store, 1), (store, 2)))
    for age, path in enumerate((new, middle, old)):  # written a minute apart, old first
        os.utime(path, (path.stat().st_mtime - 60 * (age + 1),) * 2)
    found(store, keys_and_rows(50, seed=1)[0])  # reading middle makes it the newest
    size = new.stat().st_size
    assert {old.stat().st_size, middle.stat().st_size} == {size}
    assert prune(tmp_path, 2 * size) == size
    assert not old.exists() and middle.exists() and new.exists()
    assert other.shards() == []
    prune(tmp_path, size)
    assert middle.exists() and not new.exists()
    assert store_size(tmp_path) == middle.stat().st_size
    prune(tmp_path, 0)
    assert store_size(tmp_path) == 0 and not list(tmp_path.glob("*/*.npz"))


def test_prune_leaves_folders_another_extraction_is_about_to_write_into(tmp_path):
    # Two extractions share the store (dvc queue start -j 2): one has just opened its
    # configuration's folder and the warm records' folder, with nothing in them yet, when the
    # other finishes and prunes; removing them would fail the first one's writes.
    store = EmbeddingStore(tmp_path, CONFIG, dim=4)
    records = tmp_path / "warm"
    records.mkdir()
    prune(tmp_path, 0)
    assert (store.folder / "config.json").is_file() and records.is_dir()
    store.add(*keys_and_rows(3, seed=0))
    assert found(store, keys_and_rows(3, seed=0)[0]).keys() == {0, 1, 2}


def test_opening_the_store_removes_a_killed_run_s_scratch_folder(tmp_path):
    # A run killed after moving its last shard into place, before removing the scratch folder
    # it wrote it in: the next run may have no shard to write, so opening the store clears it.
    import subprocess
    import sys

    store = EmbeddingStore(tmp_path, {"backbone": "x"}, 4)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = store.folder / f".shard.scratch-{dead.pid}"
    live = store.folder / f".shard.scratch-{os.getpid()}"  # another run sharing the store
    for folder in (stale, live):
        folder.mkdir()
        (folder / "0123.npz").write_bytes(b"half")
    EmbeddingStore(tmp_path, {"backbone": "x"}, 4)
    assert not stale.exists() and live.exists()
