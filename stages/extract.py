"""DVC stage ``extract``: embed every prepared image once with the frozen pretrained backbone."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import timm
import torch

from stages.artifacts import atomic_output, save_arrays, write_json
from stages.backbones import extract_embeddings, load_backbone, pick_device
from stages.data import SPLITS, ImageStore
from stages.errors import run_stage
from stages.params import load_params

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
PREPARED_DIR = Path("data/prepared")
EMBEDDINGS_DIR = Path("data/embeddings")
METRICS = Path("metrics/extract.json")


def main() -> None:
    params = load_params(PARAMS)
    backbone = load_backbone(params.backbone.name, params.backbone.weights)
    device = pick_device()
    stores = {split: ImageStore(PREPARED_DIR, split) for split in SPLITS}
    short_side = stores["train"].meta["short_side"]
    needed = min(backbone.preprocessing.input_size[1:])
    if short_side < needed:
        log.warning("data.short_side=%d is below the backbone's input size %d: images are "
                    "upscaled before embedding", short_side, needed)
    started = time.perf_counter()
    with atomic_output(EMBEDDINGS_DIR) as tmp:
        tmp.mkdir()
        for split, store in stores.items():
            features = extract_embeddings(backbone, store, params.backbone.batch_size, device,
                                          desc=f"extract {split}")
            save_arrays(tmp / f"{split}.npz", features=features, labels=store.labels,
                        ids=store.ids)
        write_json(tmp / "meta.json", {
            "backbone": backbone.name,
            "weights": backbone.weights_id,
            "weights_sha256": backbone.weights_sha256,
            "preprocessing": backbone.preprocessing.to_dict(),
            "dim": backbone.num_features,
            "classes": stores["train"].classes,
            "count": {split: len(store) for split, store in stores.items()},
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        })
    seconds = time.perf_counter() - started
    total = sum(len(store) for store in stores.values())
    write_json(METRICS, {"images": total, "seconds": round(seconds, 2),
                         "images_per_second": round(total / seconds, 1), "device": device.type})
    log.info("embedded %d images with %s (%d-d) in %.1fs on %s",
             total, backbone.name, backbone.num_features, seconds, device.type)


if __name__ == "__main__":
    run_stage(main)
