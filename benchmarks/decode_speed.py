"""Decoding speed of ``prepare``, as ratios measured in one run.

Images per second of ``prepare_store`` (read, decode, hash, resize to ``data.short_side``, store,
on every core)
against a plain single-process PIL loop over the same files (open, convert to RGB, the same
resize), on
``../shared/data/monkeys10`` (small 250-pixel JPEGs) when present, and on generated 1600x1200
JPEGs, the size of ordinary camera photos. Memory at scale is measured by ``benchmarks.scale``.

    python -m benchmarks.decode_speed
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import MONKEYS
from transfer.data import prepare_store
from transfer.pixels import fit_short_side
from transfer.sources import list_image_folder


def plain_pil_loop(paths: list[Path], short_side: int) -> None:
    for path in paths:
        with Image.open(path) as image:
            np.asarray(fit_short_side(image.convert("RGB"), short_side))


def generate(root: Path, count: int, size: tuple[int, int] = (320, 240),
             fmt: str = "jpg") -> None:
    """``count`` photo-like images in 10 class folders, no two alike even after decoding."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize(size, Image.Resampling.BILINEAR))
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image = smooth.copy()
        # A 16x16 stamp per image with the image number in its colour: survives JPEG too.
        image[:16, :16] = ((i * 37) % 256, (i // 256 * 53) % 256, (i // 65536 * 97) % 256)
        image[16:32, :16] = (i % 7 * 36, i % 11 * 23, i % 13 * 19)
        Image.fromarray(image).save(folder / f"{i:05d}.{fmt}", quality=90)


def run_prepare(root: Path, out: Path, generated: bool = True) -> float:
    listing = list_image_folder(root)
    started = time.perf_counter()
    report = prepare_store(listing, out, source=str(root), short_side=256, val_size=0.15,
                           test_size=0.15, seed=0, min_per_class=1, max_per_class=None)
    seconds = time.perf_counter() - started
    stored = sum(report["totals"].values())
    if generated and stored != len(listing):
        raise SystemExit(f"only {stored} of {len(listing)} generated images were kept")
    return seconds


def compare_speed(root: Path, out: Path, generated: bool) -> float:
    paths = [image.path for image in list_image_folder(root).images()]
    plain_pil_loop(paths, 256)  # warm the file cache for both
    started = time.perf_counter()
    plain_pil_loop(paths, 256)
    plain = time.perf_counter() - started
    ours = run_prepare(root, out, generated)
    print(f"{len(paths)} files from {root}")
    print(f"  plain PIL loop, 1 process : {len(paths) / plain:7.1f} images/s")
    print(f"  prepare_store, all cores  : {len(paths) / ours:7.1f} images/s")
    print(f"  prepare_store / plain loop = {plain / ours:.2f}")
    return plain / ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=MONKEYS,
                        help="an image-folder root to time (default: monkeys10/training)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        ratios = {}
        if args.images.is_dir():
            ratios["given"] = compare_speed(args.images, scratch / "store-given", False)
        generate(scratch / "photos", 300, size=(1600, 1200))
        ratios["photos"] = compare_speed(scratch / "photos", scratch / "store-photos", True)
    print(json.dumps({"speed_ratios": {k: round(v, 2) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
