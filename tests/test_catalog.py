import tracemalloc

import numpy as np
from PIL import Image

from transfer.catalog import Catalog, SourceImage
from transfer.data import prepare_store
from transfer.sources import list_image_folder


def test_listed_files_come_back_by_id_with_their_split(tmp_path):
    with Catalog() as catalog:
        for id_, label, split in [("b/2.png", "b", "val"), ("a/1.png", "a", None),
                                  ("b/1.png", "b", "train")]:
            catalog.add(SourceImage(id_, tmp_path / id_, label, split))
        catalog.skip("c/x.png", "does not exist")
        assert len(catalog) == 3
        assert [(i.id, i.split) for i in catalog.images()] == [
            ("a/1.png", None), ("b/1.png", "train"), ("b/2.png", "val")]
        assert catalog.classes() == ["a", "b"]
        assert catalog.skipped == [{"path": "c/x.png", "reason": "does not exist"}]


def test_copies_are_ranked_given_train_first_then_unsplit_then_val_and_test(tmp_path):
    with Catalog() as catalog:
        for id_, split in [("a", "test"), ("b", "val"), ("c", None), ("d", "train")]:
            catalog.add(SourceImage(id_, tmp_path / id_, "x", split))
        assert [p.name for p in catalog.ranked_paths()] == ["d", "c", "b", "a"]


def _tiny_images(root, count):
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
            folder / f"{i:05d}.png", compress_level=0)
    return root


def _python_peak(root, out):
    tracemalloc.start()
    try:
        prepare_store(list_image_folder(root), out, source="test", short_side=8, val_size=0.2,
                      test_size=0.2, seed=0, min_per_class=1, max_per_class=None, workers=1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_prepare_keeps_no_record_per_image_in_memory(tmp_path):
    large_set = _tiny_images(tmp_path / "large", 3000)
    _python_peak(large_set, tmp_path / "warm-up")  # one-off growth: caches, interned names
    small = _python_peak(_tiny_images(tmp_path / "small", 300), tmp_path / "out-small")
    large = _python_peak(large_set, tmp_path / "out-large")
    # A Python record per image (paths, digests, sums: ~2 KB each, as prepare once kept)
    # would add ~5 MB for the 2,700 more images; the catalog keeps them on disk.
    assert large - small < 1.5 * 2**20, (small, large)
