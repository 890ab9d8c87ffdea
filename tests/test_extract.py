import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages import extract
from tests.conftest import kill_stage_midway, write_params
from transfer.data import SPLITS, ImageStore
from transfer.embeddings import EmbeddingMeta, load_split


def test_embeddings_per_split_with_meta(embedded_project):
    directory = embedded_project / "data" / "embeddings"
    assert sorted(p.name for p in directory.iterdir()) == [
        "index.npz", "meta.json", "test.npy", "train.npy", "val.npy"]
    meta = EmbeddingMeta.read(directory)
    assert meta.backbone == "tf_efficientnet_lite0"
    assert meta.weights.startswith("package:") and len(meta.weights_sha256) == 64
    assert meta.preprocessing["mean"] == [0.5, 0.5, 0.5]
    assert meta.preprocessing["input_size"] == [3, 224, 224]
    assert meta.dim == 1280 and meta.dtype == "float32"
    assert meta.classes == ["blue", "green", "red"]
    # Nothing that changes with the images (finetune depends on this file: dvc.yaml).
    assert "count" not in (directory / "meta.json").read_text()
    for split in SPLITS:
        features, labels, ids = load_split(directory, split)
        store = ImageStore(embedded_project / "data" / "prepared", split)
        assert isinstance(features, np.memmap)
        assert features.shape == (len(store), 1280)
        assert np.array_equal(labels, store.labels) and np.array_equal(ids, store.ids)
        assert np.isfinite(features).all()
    assert not (embedded_project / "metrics" / "extract.json").exists()  # timings only logged


def cache_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data" / "embeddings").iterdir())}


def test_two_extractions_give_identical_files(project):
    before = cache_files(project)
    extract.main()
    assert cache_files(project) == before


def test_deterministic_extraction_applies_the_setting_and_gives_the_same_files(
        project, determinism_restored):
    before = cache_files(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["backbone"]["deterministic"] = True
    write_params(project, params)
    extract.main()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic
    assert cache_files(project) == before  # on CPU the default is bit-identical already


@pytest.mark.slow
def test_a_killed_extraction_leaves_no_partial_output_and_reruns_identically(project):
    reference = cache_files(project)
    shutil.rmtree(project / "data" / "embeddings")
    kill_stage_midway("extract", project, lambda: any(
        (project / "data").glob(".embeddings.tmp-*/train.npy")))
    assert not (project / "data" / "embeddings").exists()  # nothing that looks complete
    extract.main()  # what `dvc repro` runs next
    assert not list((project / "data").glob(".embeddings.*"))  # the killed run's temp is gone
    assert cache_files(project) == reference


def test_extraction_runs_onnx_runtime_on_cpu_and_records_it(embedded_project):
    import onnxruntime

    meta = EmbeddingMeta.read(embedded_project / "data" / "embeddings")
    assert meta.engine == "onnxruntime"
    assert meta.versions["onnxruntime"] == onnxruntime.__version__
    assert len(list((embedded_project / "cache" / "onnx").glob("*.onnx"))) == 1


def test_pytorch_gives_the_same_embeddings_and_head_predictions(project):
    from stages import train_head
    from transfer.heads import load_head

    directory = project / "data" / "embeddings"
    by_onnx_runtime = {split: np.array(load_split(directory, split)[0]) for split in SPLITS}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["backbone"]["engine"] = "torch"
    write_params(project, params)
    extract.main()
    meta = EmbeddingMeta.read(directory)
    assert meta.engine == "torch" and "onnxruntime" not in meta.versions
    train_head.main()
    head, _ = load_head(project / "models" / "head.npz")
    for split in SPLITS:
        features = np.array(load_split(directory, split)[0])
        scale = np.abs(features).max()
        assert np.abs(by_onnx_runtime[split] - features).max() < 1e-4 * scale
        np.testing.assert_array_equal(head.predict(by_onnx_runtime[split]),
                                      head.predict(features))
        np.testing.assert_allclose(head.predict_proba(by_onnx_runtime[split]),
                                   head.predict_proba(features), atol=1e-5)
