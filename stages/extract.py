"""DVC stage ``extract``: embed every prepared image once with the frozen pretrained backbone.

Images embedded before with the same configuration come from the embedding store
(``cache/embeddings/``); ``torchrun --nproc_per_node=N -m stages.extract`` shares the images
among N processes (GPUs or hosts), with the same result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from transfer.artifacts import save_arrays, write_json
from transfer.data import SPLITS, ImageStore
from transfer.embedding_store import EmbeddingStore, prune
from transfer.embeddings import EmbeddingMeta
from transfer.errors import run_stage
from transfer.extraction import extract_splits, shared_output
from transfer.layout import (
    EMBEDDING_STORE,
    EMBEDDINGS_DIR,
    ONNX_CACHE,
    PARAMS,
    PREPARED_DIR,
    shared_by_experiments,
)
from transfer.params import check_weights_file, load_params
from transfer.warm import warm_extraction, write_record

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS).backbone
    check_weights_file(params.name, params.weights)
    # Both kept in the workspace while `dvc queue` runs an experiment in a temporary copy, so
    # that the experiment reuses the graph and the record that let it skip PyTorch.
    store_root = shared_by_experiments(EMBEDDING_STORE)
    graphs = shared_by_experiments(ONNX_CACHE)
    warm = warm_extraction(params, store_root, graphs) if params.store_max_gb > 0 else None
    if warm is None:
        extract_with_torch(params, store_root, graphs)
        return
    log.info("%s: the backbone as the last run resolved it (its weights and ONNX graph "
             "unchanged): not loaded", params.name)
    stores = _prepared()
    _check_short_side(stores, warm.meta["preprocessing"]["resize_size"])
    extract(warm, stores, params, store_root)


def _prepared() -> dict[str, ImageStore]:
    return {split: ImageStore(PREPARED_DIR, split) for split in SPLITS}


def extract_with_torch(params: Any, store_root: Path, graphs: Path) -> None:
    """Load the backbone with PyTorch and extract; leave a record for the next run where it
    ran with ONNX Runtime (``transfer.warm``)."""
    import torch

    from transfer.backbones import compile_encoder, load_backbone, resolve_batch_size
    from transfer.engines import engine_named
    from transfer.extraction import Extraction
    from transfer.runtime import end_process_group, resolve_runtime, set_determinism

    set_determinism(params.deterministic)
    backbone = load_backbone(params.name, params.weights)
    backbone.preprocessing = backbone.preprocessing.with_normalization(
        params.mean, params.std, params.allow_normalization_override)
    runtime = resolve_runtime("auto", params.precision, key="backbone.precision",
                              distributed=True)
    batch_size = resolve_batch_size(backbone, params.batch_size, runtime)
    stores = _prepared()
    if runtime.is_main:
        _check_short_side(stores, backbone.preprocessing.resize_size)
    encoder = compile_encoder(backbone, engine_named(params.engine, graphs, "backbone.engine"),
                              runtime)
    extraction = Extraction(backbone, encoder, runtime, batch_size, params.flip_average)
    extract(extraction, stores, params, store_root)
    if (params.store_max_gb > 0 and runtime.world_size == 1 and encoder.graph_sha256
            and backbone.weights_file is not None):
        write_record(store_root, params, configuration=extraction.configuration(),
                     meta=extraction.meta_fields(), weights_file=backbone.weights_file,
                     graph_sha256=encoder.graph_sha256, batch_size=batch_size,
                     threads=torch.get_num_threads())
    end_process_group(runtime)


def _check_short_side(stores: dict[str, ImageStore], resize_size: int) -> None:
    short_side = stores["train"].meta["short_side"]
    if short_side < resize_size:
        log.warning("data.short_side=%d is below the %d pixels this backbone resizes to: "
                    "larger images were stored smaller than it could use", short_side,
                    resize_size)


def extract(extraction: Any, stores: dict[str, ImageStore], params: Any, store_root) -> None:
    """Write the embeddings of every split, their index and meta (``extraction``: with
    PyTorch, ``transfer.extraction.Extraction``, or without, ``transfer.warm``)."""
    runtime = extraction.runtime
    store = EmbeddingStore(store_root, extraction.configuration(), extraction.dim) \
        if params.store_max_gb > 0 else None
    started = time.perf_counter()
    with shared_output(EMBEDDINGS_DIR, runtime) as tmp:
        done = extract_splits(tmp, stores, extraction, params.embedding_dtype, store)
        if runtime.is_main:
            save_arrays(tmp / "index.npz", **{
                f"{split}_{kind}": getattr(image_store, kind)
                for split, image_store in stores.items() for kind in ("labels", "ids")})
            fields = extraction.meta_fields()
            meta = EmbeddingMeta(
                backbone=fields["backbone"], weights=fields["weights"],
                weights_sha256=fields["weights_sha256"], preprocessing=fields["preprocessing"],
                dim=fields["dim"], dtype=str(np.dtype(params.embedding_dtype)),
                classes=stores["train"].classes,
                flip_average=fields["flip_average"], precision=fields["precision"],
                engine=fields["engine"], short_side=stores["train"].meta["short_side"],
                versions=fields["versions"])
            write_json(tmp / "meta.json", meta.to_dict())
    seconds = time.perf_counter() - started
    if runtime.is_main:
        if store is not None:
            prune(store_root, int(params.store_max_gb * 1e9))
        # Timings are logged, not written: every output of this stage is deterministic and
        # DVC-cached, so a teammate's pushed run cache can restore it (DVC cannot restore runs
        # with uncached outputs from a remote).
        if not done["embedded"]:
            log.info("every image's embedding (%d) came from the embedding store, in %.1fs",
                     done["reused"], seconds)
        else:
            device = getattr(runtime, "device_type", None) or runtime.device.type
            log.info("embedded %d images (%d more from the embedding store) with %s (%d-d) "
                     "in %.1fs, %.1f images/s on %s x %d process(es) with %s (batch %d)",
                     done["embedded"], done["reused"], extraction.name, extraction.dim,
                     seconds, done["embedded"] / seconds, device, runtime.world_size,
                     extraction.engine, extraction.batch_size)


if __name__ == "__main__":
    run_stage(main)
