"""How close embedding extraction runs to the backbone's own forward-pass speed.

Both are timed in one run on the same images: (a) the bare forward pass over tensors that are
already preprocessed and in memory, and (b) ``extract_embeddings`` over the prepared store,
which also reads, resizes, crops and normalizes every image. Prints the ratio b/a.

    python benchmarks/extraction_speed.py [--images 256] [--batch-size 64]

Needs the prepared store (``dvc repro prepare``).
"""

from __future__ import annotations

import argparse
import time

import torch

from stages.backbones import extract_embeddings, load_backbone, pick_device
from stages.data import ImageStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--store", default="data/prepared")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = parser.parse_args()

    store = ImageStore(args.store, "train")
    images = [store[i] for i in range(min(args.images, len(store)))]
    backbone = load_backbone(args.backbone)
    device = pick_device()
    backbone.to(device)
    transform = backbone.preprocessing.eval_transform()
    from PIL import Image

    tensors = torch.stack([transform(Image.fromarray(image)) for image in images])
    batches = list(torch.split(tensors, args.batch_size))

    def forward_only() -> None:
        with torch.inference_mode():
            for batch in batches:
                backbone.embed(batch.to(device, memory_format=torch.channels_last)).cpu()

    def pipeline() -> None:
        extract_embeddings(backbone, images, args.batch_size, device)

    forward_only()  # warm-up: first calls allocate and pick kernels
    timings = {"forward": [], "extract": []}
    for _ in range(3):  # interleaved, so both see the same machine load
        for name, fn in (("forward", forward_only), ("extract", pipeline)):
            started = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - started)
    forward, extract = min(timings["forward"]), min(timings["extract"])
    n = len(images)
    print(f"device {device.type}, {n} images ({store.meta['source']}), "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"backbone forward only : {n / forward:7.1f} images/s")
    print(f"extract_embeddings    : {n / extract:7.1f} images/s")
    print(f"extraction speed / forward speed = {forward / extract:.2f}")
    spread = {k: f"{(max(v) - min(v)) / min(v):.0%}" for k, v in timings.items()}
    print(f"run-to-run spread (max-min)/min over 3 runs: {spread}")


if __name__ == "__main__":
    main()
