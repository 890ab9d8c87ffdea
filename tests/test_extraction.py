import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import extract, prepare
from tests.conftest import kill_stage_midway, stage_environment, write_image, write_params
from tests.test_extract import cache_files
from transfer.backbones import compile_encoder
from transfer.embedding_store import EmbeddingStore
from transfer.engines import engine_named
from transfer.extraction import Extraction
from transfer.runtime import resolve_runtime


def set_backbone(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["backbone"].update(values)
    write_params(root, params)


def shards(root: Path) -> list[Path]:
    return sorted((root / "cache" / "embeddings").glob("*/*.npz"))


def every_shard_sound(root: Path) -> bool:
    """Whether each shard in the store reads back whole and of its own configuration."""
    [folder] = [f for f in (root / "cache" / "embeddings").iterdir() if f.name != "warm"]
    store = EmbeddingStore.__new__(EmbeddingStore)
    store.key = yaml.safe_load((folder / "config.json").read_text())["key"]
    store.folder, store.dim = folder, 1280
    return all(store._read(path) is not None for path in store.shards())


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_a_row_does_not_depend_on_the_other_images_of_its_batch(backbone, embedded_project,
                                                                 engine):
    # The condition the store and the sharding rely on: ONNX Runtime's rows are the same in
    # batches of any size; PyTorch's in batches of one size, whatever else is in them.
    runtime = resolve_runtime("cpu", "float32")
    encoder = compile_encoder(backbone, engine_named(engine, embedded_project / "cache" / "onnx"),
                              runtime)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8) for i in range(7)]

    def rows(batch_size: int, order: list[int]) -> np.ndarray:
        extraction = Extraction(backbone, encoder, runtime, batch_size, flip_average=False)
        embedded = np.concatenate(list(extraction.embed([images[i] for i in order], "test")))
        return embedded[np.argsort(order)]

    reference = rows(4, list(range(7)))
    assert rows(4, [6, 2, 5, 0, 3, 1, 4]).tobytes() == reference.tobytes()
    assert rows(4, [3, 1]).tobytes() == reference[[1, 3]].tobytes()
    if engine == "onnxruntime":
        assert encoder.batch_invariant
        assert rows(3, list(range(7))).tobytes() == reference.tobytes()


def add_images(root: Path, count: int) -> None:
    for i in range(count):
        write_image(root / "data" / "raw" / "colours" / ("red", "green", "blue")[i % 3] /
                    f"new-{i}.png", ((220, 30, 30), (30, 200, 40), (30, 40, 210))[i % 3],
                    seed=5000 + i)


def test_new_images_alone_are_embedded_and_the_files_equal_a_fresh_extraction(project,
                                                                               caplog):
    add_images(project, 4)
    prepare.main()
    with caplog.at_level(logging.INFO, "stages.extract"):
        extract.main()
    assert "embedded 4 images (30 more from the embedding store)" in caplog.text
    incremental = cache_files(project)
    set_backbone(project, store_max_gb=0)  # no store: every image embedded
    caplog.clear()
    with caplog.at_level(logging.INFO, "stages.extract"):
        extract.main()
    assert "embedded 34 images (0 more" in caplog.text
    assert cache_files(project) == incremental


def test_prepare_records_each_images_store_key_and_an_older_store_is_hashed_instead(project,
                                                                                    caplog):
    from transfer.artifacts import load_arrays, save_arrays
    from transfer.data import SPLITS, ImageStore
    from transfer.embedding_store import digest_key, pixel_key

    for split in SPLITS:
        images = ImageStore(project / "data" / "prepared", split)
        assert [digest_key(d) for d in images.stored_digests()] == \
            [pixel_key(images[i]) for i in range(len(images))]
    before = cache_files(project)
    for split in SPLITS:  # a store prepared before prepare recorded the keys
        index = project / "data" / "prepared" / f"{split}.npz"
        arrays = dict(load_arrays(index))
        del arrays["stored_sha256"]
        save_arrays(index, **arrays)
        assert ImageStore(project / "data" / "prepared", split).stored_digests() is None
    with caplog.at_level(logging.INFO, "stages.extract"):
        extract.main()
    assert "every image's embedding (30) came from the embedding store" in caplog.text
    assert cache_files(project) == before


def test_float16_files_from_the_store_equal_fresh_ones(project):
    set_backbone(project, embedding_dtype="float16")
    extract.main()  # every row from the store, which keeps float32
    from_store = cache_files(project)
    shutil.rmtree(project / "cache" / "embeddings")
    extract.main()
    assert cache_files(project) == from_store


def test_queued_experiments_use_the_store_and_graph_of_the_workspace_dvc_names(project,
                                                                               tmp_path,
                                                                               monkeypatch):
    # `dvc queue start` runs an experiment in a temporary copy, with DVC_ROOT the workspace;
    # the Git-ignored cache/ starts empty there.
    reference = cache_files(project)
    workspace = tmp_path / "workspace"
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    shutil.rmtree(project / "cache")
    extract.main()
    assert len(list((workspace / "cache" / "embeddings").glob("*/*.npz"))) == 1
    assert len(list((workspace / "cache" / "onnx").glob("*.onnx"))) == 1
    assert not (project / "cache").exists() and cache_files(project) == reference
    # The next experiment embeds new images over the workspace's graph, without PyTorch
    # (with a graph cache of its own copy it would export the graph again, with PyTorch).
    add_images(project, 4)
    prepare.main()
    output = run_extract_reporting_imports(project)
    assert "imported: []" in output and "embedded 4 images (30 more" in output
    assert not (project / "cache").exists()


def test_damaged_and_foreign_shards_are_embedded_again(project, caplog):
    reference = cache_files(project)
    [shard] = shards(project)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO):
        extract.main()
    assert "do not match its name" in caplog.text and "embedded 30 images (0 more" in caplog.text
    assert cache_files(project) == reference and every_shard_sound(project)


@pytest.mark.slow
def test_a_killed_extraction_leaves_the_store_sound(project):
    reference = cache_files(project)
    shutil.rmtree(project / "cache" / "embeddings")
    store = project / "cache" / "embeddings"
    kill_stage_midway("extract", project, lambda: any(store.glob("*/.shard.scratch-*")) or
                      any(store.glob("*/*.npz")))
    assert every_shard_sound(project)
    extract.main()
    assert cache_files(project) == reference and every_shard_sound(project)
    assert not list(store.glob("*/.*"))  # the killed run's scratch folder is gone


def start_extraction(root: Path, *launcher: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *launcher, "-m", "stages.extract"], cwd=root,
                            env={**stage_environment(), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_two_experiments_sharing_the_store_at_once_agree(project, tmp_path):
    # What `dvc queue start -j 2` does: two extractions at once, one store between them.
    reference = cache_files(project)
    shared = tmp_path / "shared-store"
    shutil.move(project / "cache" / "embeddings", shared)
    shutil.rmtree(shared)
    shared.mkdir()
    other = tmp_path / "other"
    shutil.copytree(project, other)
    for root in (project, other):
        (root / "cache" / "embeddings").symlink_to(shared)
    for process in [start_extraction(root) for root in (project, other)]:
        finished(process)
    assert cache_files(project) == reference and cache_files(other) == reference
    assert every_shard_sound(project)


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_the_same_files(project):
    reference = cache_files(project)
    shutil.rmtree(project / "data" / "embeddings")
    shutil.rmtree(project / "cache" / "embeddings")
    output = finished(start_extraction(
        project, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert "cpu x 2 process(es)" in output and "embedded 30 images (0 more" in output
    assert cache_files(project) == reference
    assert len(shards(project)) == 2 and every_shard_sound(project)  # one per process
    set_backbone(project, store_max_gb=0)
    finished(start_extraction(project, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2"))
    assert cache_files(project) == reference


WITHOUT_TORCH = ("import logging; logging.basicConfig(level=logging.INFO); "
                 "from stages import extract; extract.main(); import sys; "
                 "print('imported:', [m for m in ('torch', 'timm', 'torchvision') "
                 "if m in sys.modules])")


def run_extract_reporting_imports(root: Path) -> str:
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=root,
                          env=stage_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_run_after_one_with_pytorch_loads_no_network_and_writes_the_same_files(project):
    reference = cache_files(project)
    shutil.rmtree(project / "cache" / "embeddings" / "warm")
    first = run_extract_reporting_imports(project)  # with PyTorch: it leaves the record
    assert "imported: ['torch', 'timm', 'torchvision']" in first
    assert len(list((project / "cache" / "embeddings" / "warm").glob("*.json"))) >= 1
    second = run_extract_reporting_imports(project)
    assert "imported: []" in second and "not loaded" in second
    assert "every image's embedding (30) came from the embedding store" in second
    assert cache_files(project) == reference
    # New images, embedded by ONNX Runtime over the cached graph, still without torch: the
    # same files as an extraction with PyTorch and no store.
    add_images(project, 4)
    prepare.main()
    third = run_extract_reporting_imports(project)
    assert "imported: []" in third and "embedded 4 images (30 more" in third
    incremental = cache_files(project)
    set_backbone(project, store_max_gb=0)
    extract.main()
    assert cache_files(project) == incremental


def test_flip_averaged_rows_embedded_without_torch_equal_those_with_it(project, caplog):
    set_backbone(project, flip_average=True)
    extract.main()  # new parameters: PyTorch loads the backbone, and records it
    with_torch = cache_files(project)
    for folder in (project / "cache" / "embeddings").iterdir():
        if folder.name != "warm":
            shutil.rmtree(folder)  # every row must be embedded again
    with caplog.at_level(logging.INFO, "stages.extract"):
        extract.main()
    assert "not loaded" in caplog.text and "embedded 30 images (0 more" in caplog.text
    assert cache_files(project) == with_torch


@pytest.mark.parametrize("damage", ["weights changed", "graph gone", "graph damaged",
                                    "record damaged"])
def test_a_record_that_no_longer_holds_is_not_used(project, caplog, damage):
    reference = cache_files(project)
    extract.main()
    [record] = (project / "cache" / "embeddings" / "warm").glob("*.json")
    if damage == "weights changed":
        text = record.read_text()
        sha = yaml.safe_load(text)["weights_sha256"]
        record.write_text(text.replace(sha, "0" * 64))
    elif damage == "graph gone":
        for graph in (project / "cache" / "onnx").glob("*.onnx"):
            graph.unlink()
    elif damage == "graph damaged":
        for graph in (project / "cache" / "onnx").glob("*.onnx"):
            data = bytearray(graph.read_bytes())
            data[len(data) // 2] ^= 0xFF
            graph.write_bytes(bytes(data))
    else:
        record.write_text(record.read_text()[:40])
    for folder in (project / "cache" / "embeddings").iterdir():
        if folder.name != "warm":
            shutil.rmtree(folder)
    with caplog.at_level(logging.INFO, "stages.extract"):
        extract.main()
    assert "not loaded" not in caplog.text and "embedded 30 images (0 more" in caplog.text
    assert cache_files(project) == reference
    assert yaml.safe_load(record.read_text())["weights_sha256"] != "0" * 64  # written again


def test_a_record_is_not_used_for_another_file_under_the_weights_path_it_names(tmp_path,
                                                                            monkeypatch):
    # backbone.weights: models/w.pth in the workspace and in a queued experiment's copy of it
    # is one record key; the copy's file, not the workspace's, decides whether it holds.
    from transfer.params import BackboneParams
    from transfer.warm import META_FIELDS, warm_extraction, write_record

    workspace, copy = tmp_path / "workspace", tmp_path / "copy"
    for root, content in ((workspace, b"workspace weights"), (copy, b"the copy's weights")):
        (root / "models").mkdir(parents=True)
        (root / "models" / "w.pth").write_bytes(content)
    params = BackboneParams(weights="models/w.pth")
    graph = b"an ONNX graph"
    graph_sha = hashlib.sha256(graph).hexdigest()
    (workspace / "cache" / "onnx").mkdir(parents=True)
    (workspace / "cache" / "onnx" / f"net-{graph_sha[:16]}.onnx").write_bytes(graph)
    store = workspace / "cache" / "embeddings"
    meta = {key: "x" for key in META_FIELDS} | {
        "weights_sha256": hashlib.sha256(b"workspace weights").hexdigest(),
        "preprocessing": {"input_size": [3, 224, 224], "resize_size": 256,
                          "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                          "source": "test"}}
    monkeypatch.chdir(workspace)
    write_record(store, params, configuration={}, meta=meta, weights_file=Path("models/w.pth"),
                 graph_sha256=graph_sha, batch_size=8, threads=1)
    assert warm_extraction(params, store, workspace / "cache" / "onnx") is not None
    monkeypatch.chdir(copy)
    assert warm_extraction(params, store, workspace / "cache" / "onnx") is None
    # Nor a record whose preprocessing is damaged (a side of 60,000 pixels): checked before
    # any image is sized by it.
    monkeypatch.chdir(workspace)
    damaged = meta | {"preprocessing": meta["preprocessing"] | {"resize_size": 60000}}
    write_record(store, params, configuration={}, meta=damaged,
                 weights_file=Path("models/w.pth"), graph_sha256=graph_sha, batch_size=8,
                 threads=1)
    assert warm_extraction(params, store, workspace / "cache" / "onnx") is None
