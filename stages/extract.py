"""DVC stage ``extract``: embed every prepared image once with the frozen pretrained backbone.

Images embedded before with the same configuration come from the embedding store
(``cache/embeddings/``); ``torchrun --nproc_per_node=N -m stages.extract`` shares the images
among N processes (GPUs or hosts), with the same result.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import timm
import torch
import torchvision

from transfer.artifacts import save_arrays, write_json
from transfer.backbones import compile_encoder, load_backbone, resolve_batch_size
from transfer.data import SPLITS, ImageStore
from transfer.embedding_store import EmbeddingStore, prune
from transfer.embeddings import EmbeddingMeta
from transfer.engines import engine_named
from transfer.errors import run_stage
from transfer.extraction import Extraction, extract_splits, shared_output
from transfer.layout import (
    EMBEDDING_STORE,
    EMBEDDINGS_DIR,
    ONNX_CACHE,
    PARAMS,
    PREPARED_DIR,
    shared_by_experiments,
)
from transfer.params import load_params
from transfer.runtime import end_process_group, resolve_runtime, set_determinism

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS).backbone
    set_determinism(params.deterministic)
    backbone = load_backbone(params.name, params.weights)
    backbone.preprocessing = backbone.preprocessing.with_normalization(
        params.mean, params.std, params.allow_normalization_override)
    runtime = resolve_runtime("auto", params.precision, key="backbone.precision",
                              distributed=True)
    batch_size = resolve_batch_size(backbone, params.batch_size, runtime)
    stores = {split: ImageStore(PREPARED_DIR, split) for split in SPLITS}
    short_side = stores["train"].meta["short_side"]
    if short_side < backbone.preprocessing.resize_size and runtime.is_main:
        log.warning("data.short_side=%d is below the %d pixels this backbone resizes to: "
                    "larger images were stored smaller than it could use", short_side,
                    backbone.preprocessing.resize_size)
    encoder = compile_encoder(backbone, engine_named(params.engine, ONNX_CACHE, "backbone.engine"),
                              runtime)
    extraction = Extraction(backbone, encoder, runtime, batch_size, params.flip_average)
    store_root = shared_by_experiments(EMBEDDING_STORE)
    store = EmbeddingStore(store_root, extraction.configuration(), backbone.num_features) \
        if params.store_max_gb > 0 else None
    started = time.perf_counter()
    with shared_output(EMBEDDINGS_DIR, runtime) as tmp:
        done = extract_splits(tmp, stores, extraction, params.embedding_dtype, store)
        if runtime.is_main:
            save_arrays(tmp / "index.npz", **{
                f"{split}_{kind}": getattr(image_store, kind)
                for split, image_store in stores.items() for kind in ("labels", "ids")})
            meta = EmbeddingMeta(
                backbone=backbone.name, weights=backbone.weights_id,
                weights_sha256=backbone.weights_sha256,
                preprocessing=backbone.preprocessing.to_dict(), dim=backbone.num_features,
                dtype=str(np.dtype(params.embedding_dtype)), classes=stores["train"].classes,
                count={split: len(image_store) for split, image_store in stores.items()},
                flip_average=params.flip_average, precision=runtime.precision,
                engine=encoder.engine, short_side=short_side,
                versions={"timm": timm.__version__, "torch": torch.__version__,
                          "torchvision": torchvision.__version__, **encoder.versions})
            write_json(tmp / "meta.json", meta.to_dict())
    seconds = time.perf_counter() - started
    if runtime.is_main:
        if store is not None:
            prune(store_root, int(params.store_max_gb * 1e9))
        _log_speed(done, seconds, backbone, runtime, encoder.engine, batch_size)
    end_process_group(runtime)


def _log_speed(done: dict[str, int], seconds: float, backbone, runtime, engine: str,
               batch_size: int) -> None:
    # Timings are logged, not written: every output of this stage is deterministic and
    # DVC-cached, so a teammate's pushed run cache can restore it (DVC cannot restore runs
    # with uncached outputs from a remote).
    log.info("embedded %d images (%d more from the embedding store) with %s (%d-d) in %.1fs, "
             "%.1f images/s on %s x %d process(es) with %s (batch %d)", done["embedded"],
             done["reused"], backbone.name, backbone.num_features, seconds,
             done["embedded"] / seconds, runtime.device.type, runtime.world_size, engine,
             batch_size)


if __name__ == "__main__":
    run_stage(main)
