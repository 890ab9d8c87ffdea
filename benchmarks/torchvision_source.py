"""Writing a torchvision data set out for ``prepare`` (``data.source: torchvision:<Name>``), as
ratios measured in one run.

A torchvision data set reaches ``prepare`` as PNG files in a scratch folder. This times
``write_torchvision_dataset`` on ``torchvision:ImageFolder`` over a folder of photos
(``../shared/data/catsdogs`` when present, else generated 500x375 JPEGs), three ways, taking
turns for ``--rounds`` rounds: as it was (one process, Pillow's default PNG level 6), one
process at ``PNG_LEVEL``, and every core at ``PNG_LEVEL`` (as the pipeline now runs); prints
the best round of each, their ratios, the bytes written, and whether the three wrote the same
pixels.

    python -m benchmarks.torchvision_source [--images DIR] [--limit 600] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from benchmarks import MONKEYS
from transfer import sources
from transfer.machine import usable_cores

CATSDOGS = MONKEYS.parents[1] / "catsdogs"


def photo_folder(images: Path, limit: int, scratch: Path) -> Path:
    """An image-folder root of at most ``limit`` photos of ``images`` (links, not copies), or
    generated photo-like JPEGs where ``images`` is missing."""
    root = scratch / "ImageFolder"
    if images.is_dir():
        photos = sorted(p for p in images.glob("*/*") if p.is_file())
        for path in photos[::max(1, len(photos) // limit)][:limit]:
            (root / path.parent.name).mkdir(parents=True, exist_ok=True)
            (root / path.parent.name / path.name).symlink_to(path.resolve())
        return root
    rng = np.random.default_rng(0)
    for i in range(limit):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        base = np.linspace(0, 255, 500, dtype=np.float32)[None, :, None]
        pixels = np.clip(base + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return root


def pixels_digest(folder: Path) -> tuple[str, int]:
    """One SHA-256 over every written file's name and decoded pixels, and their bytes."""
    digest, size = hashlib.sha256(), 0
    for path in sorted(folder.rglob("*.png")):
        digest.update(str(path.relative_to(folder)).encode())
        with Image.open(path) as image:
            digest.update(image.tobytes())
        size += path.stat().st_size
    return digest.hexdigest(), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=CATSDOGS)
    parser.add_argument("--limit", type=int, default=600, help="photos written per way")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cores = usable_cores()
    ways = {"before: 1 process, PNG level 6": (1, 6),
            f"1 process, PNG level {sources.PNG_LEVEL}": (1, sources.PNG_LEVEL),
            f"{cores} processes, PNG level {sources.PNG_LEVEL} (the pipeline)":
                (cores, sources.PNG_LEVEL)}
    best = {name: float("inf") for name in ways}
    written = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        root = photo_folder(args.images, args.limit, scratch)
        count = sum(1 for _ in root.glob("*/*"))
        for round_ in range(args.rounds):
            for name, (workers, level) in ways.items():
                out = scratch / f"out-{round_}-{workers}-{level}"
                with mock.patch.object(sources, "PNG_LEVEL", level):
                    started = time.perf_counter()
                    sources.write_torchvision_dataset("ImageFolder", root, out, workers=workers)
                    best[name] = min(best[name], time.perf_counter() - started)
                written[name] = pixels_digest(out)
    source = args.images if args.images.is_dir() else "generated 500x375 JPEGs"
    print(f"torchvision:ImageFolder over {count} photos of {source}, best of {args.rounds} "
          f"rounds on {cores} cores")
    before = best[next(iter(ways))]
    for name in ways:
        digest, size = written[name]
        print(f"  {name:45s} {count / best[name]:7.1f} images/s  "
              f"{before / best[name]:5.2f}x  {size / 2**20:6.1f} MiB  pixels {digest[:12]}")
    same = len({digest for digest, _ in written.values()}) == 1
    print(f"  the same pixels all three ways: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
