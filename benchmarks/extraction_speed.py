"""How fast embedding extraction runs, per engine, as ratios measured in one run on the same
images.

For each engine (``backbone.engine``: ``torch``, ``onnxruntime``):

1. extraction (``embed_batches`` over the prepared store: read, resize, crop, forward) against
   the bare forward pass of the same compiled network over pixel batches already resized,
   cropped and in memory, same batch size: how close extraction gets to the engine's speed.
2. extraction with ONNX Runtime against extraction with PyTorch.
3. extraction against a naive loop as tutorials write it: open each file with PIL, transform
   it, one image per forward call, PyTorch's default (NCHW) layout.

    python -m benchmarks.extraction_speed [--images DIR] [--count 256] [--batch-size 8]
                                          [--rounds 3] [--backbone NAME [--random-weights]]

Images: an image-folder root (default ``../shared/data/monkeys10/training`` when present,
else the built-in digits), prepared into a temporary store first (not timed). Every timing is
the best of ``--rounds`` rounds, the variants interleaved in each, so all see the same load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks import MONKEYS, training_store
from transfer.backbones import compile_encoder, embed_batches, load_backbone, pixel_batches
from transfer.engines import ENGINES
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--random-weights", action="store_true",
                        help="the architecture with random weights (no download; the speed is "
                             "the same)")
    args = parser.parse_args()
    started_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        store, root = training_store(args.images, Path(scratch))
        images = [store[i] for i in range(min(args.count, len(store)))]
        files = [root / str(i) for i in store.ids[:len(images)]]
        pretrained = not args.random_weights
        backbone = load_backbone(args.backbone, pretrained=pretrained)
        runtime = resolve_runtime()
        preprocessing = backbone.preprocessing
        batches = list(pixel_batches(images, preprocessing, args.batch_size, runtime, "pixels"))
        encoders = {name: compile_encoder(backbone, cls(Path(scratch) / "onnx"), runtime)
                    for name, cls in ENGINES.items()}
        runs = {}
        for name, encoder in encoders.items():
            def forward_only(encoder=encoder) -> None:
                for batch in batches:
                    encoder(batch)

            def extraction(encoder=encoder) -> None:
                for _ in embed_batches(encoder, images, preprocessing, args.batch_size, runtime):
                    pass

            runs[f"forward {name}"], runs[f"extract {name}"] = forward_only, extraction
        # PyTorch's default memory layout
        naive_model = load_backbone(args.backbone, pretrained=pretrained).encoder
        transform = preprocessing.eval_transform()

        def naive_loop() -> None:
            with torch.no_grad():
                for path in files:
                    image = Image.open(path).convert("RGB")
                    naive_model(transform(image).unsqueeze(0).to(runtime.device)).cpu()

        runs["naive"] = naive_loop
        for encoder in encoders.values():
            encoder(batches[0])  # warm-up: first calls allocate and pick kernels
        timings: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):  # interleaved, so every variant sees the same load
            for name, fn in runs.items():
                timings[name].append(timed(fn))
    n = len(images)
    speed = {name: n / min(values) for name, values in timings.items()}
    print(f"{args.backbone}, device {runtime.device.type}, {n} images from {root}, batch "
          f"{args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, best of {args.rounds} rounds, load "
          f"average {started_load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    for name in runs:
        print(f"{name:<22}: {speed[name]:7.1f} images/s")
    for name in encoders:
        print(f"extract {name} / forward {name} = "
              f"{speed[f'extract {name}'] / speed[f'forward {name}']:.2f}")
    print(f"extract onnxruntime / extract torch = "
          f"{speed['extract onnxruntime'] / speed['extract torch']:.2f}")
    for name in encoders:
        print(f"extract {name} / naive = {speed[f'extract {name}'] / speed['naive']:.2f}")


if __name__ == "__main__":
    main()
