import json

import numpy as np

from stages.artifacts import load_arrays
from stages.data import SPLITS, ImageStore


def test_embeddings_per_split_with_meta(embedded_project):
    directory = embedded_project / "data" / "embeddings"
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta.json", "test.npz", "train.npz", "val.npz"]
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["backbone"] == "tf_efficientnet_lite0"
    assert meta["weights"].startswith("package:") and len(meta["weights_sha256"]) == 64
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["preprocessing"]["input_size"] == [3, 224, 224]
    assert meta["dim"] == 1280
    assert meta["classes"] == ["blue", "green", "red"]
    for split in SPLITS:
        arrays = load_arrays(directory / f"{split}.npz")
        store = ImageStore(embedded_project / "data" / "prepared", split)
        assert arrays["features"].shape == (len(store), 1280)
        assert meta["count"][split] == len(store)
        assert np.array_equal(arrays["labels"], store.labels)
        assert np.array_equal(arrays["ids"], store.ids)
        assert np.isfinite(arrays["features"]).all()
    speed = json.loads((embedded_project / "metrics" / "extract.json").read_text())
    assert speed["images"] == sum(meta["count"].values()) and speed["images_per_second"] > 0
