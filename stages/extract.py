"""DVC stage ``extract``: embed every prepared image once with the frozen pretrained backbone."""

from __future__ import annotations

import logging
import time

import numpy as np
import timm
import torch
import torchvision

from transfer.artifacts import atomic_output, save_arrays, write_json
from transfer.backbones import compile_encoder, embed_batches, load_backbone, resolve_batch_size
from transfer.data import SPLITS, ImageStore
from transfer.embeddings import EmbeddingMeta, write_split
from transfer.engines import engine_named
from transfer.errors import run_stage
from transfer.layout import EMBEDDINGS_DIR, ONNX_CACHE, PARAMS, PREPARED_DIR
from transfer.params import load_params
from transfer.runtime import resolve_runtime, set_determinism

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS).backbone
    set_determinism(params.deterministic)
    backbone = load_backbone(params.name, params.weights)
    backbone.preprocessing = backbone.preprocessing.with_normalization(
        params.mean, params.std, params.allow_normalization_override)
    runtime = resolve_runtime("auto", params.precision, key="backbone.precision")
    batch_size = resolve_batch_size(backbone, params.batch_size, runtime)
    stores = {split: ImageStore(PREPARED_DIR, split) for split in SPLITS}
    short_side = stores["train"].meta["short_side"]
    if short_side < backbone.preprocessing.resize_size:
        log.warning("data.short_side=%d is below the %d pixels this backbone resizes to: "
                    "larger images were stored smaller than it could use", short_side,
                    backbone.preprocessing.resize_size)
    encoder = compile_encoder(backbone, engine_named(params.engine, ONNX_CACHE, "backbone.engine"),
                              runtime)
    started = time.perf_counter()
    with atomic_output(EMBEDDINGS_DIR) as tmp:
        tmp.mkdir()
        index = {}
        for split, store in stores.items():
            batches = embed_batches(encoder, store, backbone.preprocessing, batch_size, runtime,
                                    flip_average=params.flip_average, desc=f"extract {split}")
            write_split(tmp / f"{split}.npy", batches, len(store), backbone.num_features,
                        params.embedding_dtype)
            index[f"{split}_labels"] = store.labels
            index[f"{split}_ids"] = store.ids
        save_arrays(tmp / "index.npz", **index)
        meta = EmbeddingMeta(
            backbone=backbone.name, weights=backbone.weights_id,
            weights_sha256=backbone.weights_sha256,
            preprocessing=backbone.preprocessing.to_dict(), dim=backbone.num_features,
            dtype=str(np.dtype(params.embedding_dtype)), classes=stores["train"].classes,
            count={split: len(store) for split, store in stores.items()},
            flip_average=params.flip_average, precision=runtime.precision,
            engine=encoder.engine, short_side=short_side,
            versions={"timm": timm.__version__, "torch": torch.__version__,
                      "torchvision": torchvision.__version__, **encoder.versions})
        write_json(tmp / "meta.json", meta.to_dict())
    # Timings are logged, not written: every output of this stage is deterministic and
    # DVC-cached, so a teammate's pushed run cache can restore it (DVC cannot restore runs
    # with uncached outputs from a remote).
    seconds = time.perf_counter() - started
    total = sum(meta.count.values())
    log.info("embedded %d images with %s (%d-d) in %.1fs, %.1f images/s on %s with %s "
             "(batch %d)", total, backbone.name, backbone.num_features, seconds,
             total / seconds, runtime.device.type, encoder.engine, batch_size)


if __name__ == "__main__":
    run_stage(main)
