"""How fast embedding extraction runs, as ratios measured in one run on the same images.

1. ``embed_batches`` over the prepared store (read, resize, crop, normalize, forward) against
   the bare forward pass over tensors already preprocessed and in memory, same model and
   batch: how close extraction gets to the backbone's own speed.
2. ``embed_batches`` against a naive loop as tutorials write it: open each file with PIL,
   transform it, one image per forward call.

    python -m benchmarks.extraction_speed [--images DIR] [--count 256] [--batch-size 8]

Images: an image-folder root (default ``../shared/data/monkeys10/training`` when present,
else the built-in digits), prepared into a temporary store first (not timed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks import MONKEYS, training_store
from transfer.backbones import embed_batches, load_backbone
from transfer.runtime import resolve_runtime


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=MONKEYS)
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        store, root = training_store(args.images, Path(scratch))
        images = [store[i] for i in range(min(args.count, len(store)))]
        files = [root / str(i) for i in store.ids[:len(images)]]

        backbone = load_backbone(args.backbone)
        runtime = resolve_runtime()
        device = runtime.device
        backbone.to(device)
        transform = backbone.preprocessing.eval_transform()
        tensors = torch.stack([transform(Image.fromarray(image)) for image in images])
        batches = list(torch.split(tensors, args.batch_size))

        def forward_only() -> None:
            with torch.inference_mode():
                for batch in batches:
                    backbone.embed(batch.to(device, memory_format=torch.channels_last)).cpu()

        def pipeline() -> None:
            for _ in embed_batches(backbone, images, args.batch_size, runtime):
                pass

        naive_model = load_backbone(args.backbone).encoder.to(device)  # default memory layout

        def naive_loop() -> None:
            with torch.no_grad():
                for path in files:
                    image = Image.open(path).convert("RGB")
                    naive_model(transform(image).unsqueeze(0).to(device)).cpu()

        forward_only()  # warm-up: first calls allocate and pick kernels
        timings: dict[str, list[float]] = {"forward": [], "extract": [], "naive": []}
        for _ in range(2):  # interleaved, so all three see the same machine load
            for name, fn in (("forward", forward_only), ("extract", pipeline),
                             ("naive", naive_loop)):
                timings[name].append(timed(fn))
    best = {name: min(values) for name, values in timings.items()}
    n = len(images)
    print(f"device {device.type}, {n} images from {root}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"backbone forward only (tensors in memory) : {n / best['forward']:7.1f} images/s")
    print(f"extraction (embed_batches over the store) : {n / best['extract']:7.1f} images/s")
    print(f"naive loop (PIL open + transform, 1/call) : {n / best['naive']:7.1f} images/s")
    print(f"extraction / forward = {best['forward'] / best['extract']:.2f}")
    print(f"extraction / naive   = {best['naive'] / best['extract']:.2f}")


if __name__ == "__main__":
    main()
