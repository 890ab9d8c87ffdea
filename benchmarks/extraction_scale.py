"""Extraction as data grows and processes multiply, as ratios measured in one run.

1. Incremental extraction: a project holding 95% of an image folder runs ``prepare`` and
   ``extract`` (empty embedding store: a full extraction); the other 5% are added, ``prepare``
   runs again, and ``extract`` embeds only them. Prints that extraction's wall time as a share
   of the full one and of a full one of the grown set without the store (whose files must be
   byte-identical to the incremental ones).
2. Sharded extraction, store off, on the grown set: ``torchrun --nproc_per_node=2`` with one
   thread per process against one process with two threads (images/s of the whole stage).

Every extraction is ``python -m stages.extract`` in a subprocess, as ``dvc repro`` runs it.
``--copies K`` turns each photo into K distinct ones (mirrored and shifted crops) for a larger
set; ``--no-sharding`` skips part 2.

    python -m benchmarks.extraction_scale [--images ../shared/data/monkeys10] [--rounds 2]
                                          [--copies 1] [--no-sharding]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import MONKEYS

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def stage(project: Path, threads: int, *launcher: str, module: str = "stages.extract") -> float:
    """Seconds ``python [launcher] -m module`` takes in ``project`` with ``threads`` threads."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *launcher, "-m", module], cwd=project, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{module} failed:\n{result.stdout}{result.stderr}")
    return time.perf_counter() - started


def write_copies(images: Path, out: Path, copies: int) -> None:
    """``copies`` distinct JPEGs of each photo under ``images``: the photo itself, then crops
    shifted by a few pixels, every other one mirrored."""
    from PIL import Image, ImageOps

    for path in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        target = out / path.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        with Image.open(path) as opened:
            photo = ImageOps.exif_transpose(opened).convert("RGB")
        for k in range(1, copies):
            shift = 2 * k
            copy = photo.crop((shift, shift, photo.width - shift, photo.height - shift))
            if k % 2:
                copy = ImageOps.mirror(copy)
            copy.save(target.with_name(f"{target.stem}-{k}.jpg"), quality=90)


def set_store(project: Path, max_gb: float) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["backbone"]["store_max_gb"] = max_gb
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def embeddings(project: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((project / "data" / "embeddings").iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=MONKEYS.parent)
    parser.add_argument("--rounds", type=int, default=2, help="of the sharding comparison")
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--no-sharding", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        project = Path(scratch) / "project"
        images = project / "data" / "raw" / "images"
        source = args.images
        if args.copies > 1:
            source = Path(scratch) / "copies"
            write_copies(args.images, source, args.copies)
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        later = files[::20]  # 5%, spread over every class
        for path in set(files) - set(later):
            target = images / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        shutil.copy(REPO / "params.yaml", project / "params.yaml")
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"]["source"] = "data/raw/images"
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

        stage(project, 2, module="stages.prepare")
        set_store(project, 0)
        warm_up = stage(project, 2)  # exports the ONNX graph once: not an extraction cost
        set_store(project, 4)
        full = stage(project, 2)
        for path in later:
            target = images / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        stage(project, 2, module="stages.prepare")
        incremental = stage(project, 2)
        grown = embeddings(project)
        set_store(project, 0)
        scratch_full = stage(project, 2)
        identical = embeddings(project) == grown

        torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
        one, two = [], []
        for _ in range(0 if args.no_sharding else args.rounds):  # interleaved: the same load
            one.append(stage(project, 2))
            two.append(stage(project, 1, *torchrun))
    n, added = len(files), len(later)
    print(f"{args.images} x {args.copies}: {n - added} images, then {added} added "
          f"({added / n:.1%}); "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    print(f"warm-up extraction (ONNX export), store off : {warm_up:7.1f} s")
    print(f"full extraction, empty store                : {full:7.1f} s")
    print(f"extraction after the addition (store)       : {incremental:7.1f} s = "
          f"{incremental / full:.3f} x full, {incremental / scratch_full:.3f} x a full one of "
          f"the grown set ({scratch_full:.1f} s, store off); files identical: {identical}")
    if args.no_sharding:
        return
    best_one, best_two = min(one), min(two)
    print(f"1 process x 2 threads : {n / best_one:6.1f} images/s ({best_one:.1f} s, best of "
          f"{args.rounds})")
    print(f"2 processes x 1 thread: {n / best_two:6.1f} images/s ({best_two:.1f} s, torchrun)"
          f" = {best_one / best_two:.2f} x 1 process")


if __name__ == "__main__":
    main()
