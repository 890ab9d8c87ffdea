"""Scale: prepare, extract and train_head on 5,000 to 50,000 generated images, in one run.

Goal: time grows about linearly with the number of images and peak memory stays flat. Small
PNGs (32x32 by default; five classes told apart by colour and texture; every image unique) go
into a temporary project per size with its own ``params.yaml``, and each stage runs there as
DVC runs it, ``python -m stages.<stage>``, in a fresh process. Per stage it records the wall
time and the CPU time of the stage and its workers (both with imports and model loading; CPU
time is what other work on a shared machine disturbs least), the peak RSS of the stage's
process and, for prepare, of its largest decode worker. Then it prints ratios of the largest
size to the smallest.
(Other stages' children are short ``ldconfig -p`` calls made by ctypes; a forked child's peak
counts its parent's pages, so it is not shown.)

    python -m benchmarks.scale [--sizes 5000 20000 50000] [--backbone NAME] [--threads N]
                               [--until prepare|extract|train_head] [--keep]

``--backbone`` times another timm model instead of the default EfficientNet-Lite0, with
random weights saved from ``timm.create_model(NAME)`` to a local state-dict file that
``backbone.weights`` points at: a real configuration of the pipeline, cheaper to run; the
accuracy it reaches means nothing. ``--threads N`` sets ``OMP_NUM_THREADS`` for the stages: on
a machine others are using too, PyTorch's threads spin while waiting for each other, and one
thread gave steadier (and there, faster) figures than two.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "extract", "train_head")
DEFAULT_BACKBONE = "tf_efficientnet_lite0"
CLASSES = ("hstripes", "vstripes", "checks", "rings", "blotches")
# Runs one stage as `python -m stages.<stage>` does, then reports its peak RSS (VmHWM, KiB), the
# largest peak RSS of its finished children and the CPU seconds of both. Not ru_maxrss for the
# stage itself: Linux starts that at the peak of the process that launched it (this benchmark).
RUN_STAGE = ("import resource, runpy, sys; "
             "runpy.run_module('stages.' + sys.argv[1], run_name='__main__', alter_sys=True); "
             "peak = next(line.split()[1] for line in open('/proc/self/status') "
             "if line.startswith('VmHWM:')); "
             "usage = [resource.getrusage(w) for w in "
             "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]; "
             "print('usage', peak, usage[1].ru_maxrss, "
             "*(u.ru_utime + u.ru_stime for u in usage))")


def synthetic_image(i: int, side: int = 32) -> np.ndarray:
    """Image ``i`` of class ``i % 5``: a class texture in a class colour, jittered per image.

    The image number is written into the first three pixels of the red channel, so no two
    images are alike, in pixels or in bytes.
    """
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    period = rng.uniform(4.0, 8.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    kind = i % len(CLASSES)
    if kind == 0:
        wave = np.sin(2 * np.pi * y / period + phase)
    elif kind == 1:
        wave = np.sin(2 * np.pi * x / period + phase)
    elif kind == 2:
        wave = np.sign(np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period))
    elif kind == 3:
        cy, cx = rng.uniform(side * 0.3, side * 0.7, size=2)
        wave = np.sin(2 * np.pi * np.hypot(y - cy, x - cx) / period + phase)
    else:
        coarse = rng.uniform(-1.0, 1.0, size=(4, 4)).astype(np.float32)
        wave = np.asarray(Image.fromarray(coarse, mode="F").resize((side, side),
                                                                  Image.Resampling.BICUBIC))
    colours = np.array([[220, 60, 40], [40, 190, 70], [50, 80, 220], [230, 200, 40],
                        [150, 60, 170]], dtype=np.float32)
    colour = colours[kind] + rng.uniform(-25, 25, size=3)
    pixels = colour * (0.6 + 0.4 * wave[..., None]) + rng.normal(0, 6, size=(side, side, 3))
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    image[0, :3, 0] = (i & 255, (i >> 8) & 255, (i >> 16) & 255)
    return image


def generate_pool(root: Path, count: int, side: int) -> list[Path]:
    """Write images 0..count-1 as ``root/<class>/<i>.png``; the sizes share one pool."""
    paths = []
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = root / CLASSES[i % len(CLASSES)] / f"{i:06d}.png"
        Image.fromarray(synthetic_image(i, side)).save(path, compress_level=1)
        paths.append(path)
    return paths


def make_project(project: Path, pool: list[Path], count: int, backbone: dict) -> None:
    """A project with the first ``count`` pool images (hard links) under data/raw/images."""
    raw = project / "data" / "raw" / "images"
    for path in pool[:count]:
        target = raw / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    params = {"seed": 0, "data": {"source": "data/raw/images"}, "backbone": backbone}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass
class StageRun:
    seconds: float
    cpu_seconds: float
    peak_mib: float
    child_peak_mib: float
    log: str


def run_stage(stage: str, project: Path, threads: int | None) -> StageRun:
    env = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's stages, whatever is installed
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUN_STAGE, stage], cwd=project, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed in {project}:\n{result.stderr[-3000:]}")
    own_kib, child_kib, own_cpu, child_cpu = result.stdout.split("usage")[-1].split()
    return StageRun(seconds, float(own_cpu) + float(child_cpu), int(own_kib) / 1024,
                    int(child_kib) / 1024, result.stderr)


def backbone_params(name: str, scratch: Path) -> dict:
    """``backbone.*`` for ``name``: the default with its packaged weights, else random weights
    saved to a local file."""
    if name == DEFAULT_BACKBONE:
        return {"name": name}
    import timm
    import torch

    torch.manual_seed(0)
    path = scratch / f"{name}-random.pth"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), path)
    return {"name": name, "weights": str(path)}


def measure(count: int, scratch: Path, pool: list[Path], backbone: dict,
            threads: int | None, stages: tuple[str, ...]) -> dict[str, StageRun]:
    project = scratch / f"project{count}"
    make_project(project, pool, count, backbone)
    runs = {}
    for stage in stages:
        runs[stage] = run_stage(stage, project, threads)
        print(f"  {count:6,d} images, {stage:10s}: {runs[stage].seconds:7.1f} s, "
              f"CPU {runs[stage].cpu_seconds:7.1f} s, peak {runs[stage].peak_mib:6.0f} MiB, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    report = json.loads((project / "reports" / "data.json").read_text())
    stored = sum(report["totals"].values())
    if stored != count:
        raise SystemExit(f"only {stored} of {count} generated images were stored "
                         f"({len(report['duplicates'])} duplicates, {len(report['skipped'])} "
                         "skipped): the generator must make every image unique")
    return runs


def logged_figures(runs: dict[str, StageRun]) -> str:
    """The stages' own figures, without start-up: extraction speed, head iterations."""
    extract = re.search(r"in ([\d.]+)s, ([\d.]+) images/s",
                        runs["extract"].log if "extract" in runs else "")
    head = re.search(r"val accuracy ([\d.]+) \((\d+) iterations, ([\d.]+)s\)",
                     runs["train_head"].log if "train_head" in runs else "")
    parts = []
    if extract:
        parts.append(f"extraction loop {extract.group(1)} s ({extract.group(2)} images/s)")
    if head:
        parts.append(f"head fit {head.group(3)} s, {head.group(2)} iterations, "
                     f"val accuracy {head.group(1)}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--side", type=int, default=32, help="image width and height in pixels")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                        help="a timm model name; other than the default, with random weights")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS for the stages (default: as set, else all cores)")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1],
                        help="the last stage to run and time")
    parser.add_argument("--keep", action="store_true", help="keep the projects, print the path")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    stages = STAGES[:STAGES.index(args.until) + 1]
    scratch = Path(tempfile.mkdtemp(prefix="scale-"))
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; "
          f"OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}")
    started = time.perf_counter()
    pool = generate_pool(scratch / "pool", sizes[-1], args.side)
    print(f"generated {len(pool):,} {args.side}x{args.side} PNGs in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    backbone = backbone_params(args.backbone, scratch)
    results = {n: measure(n, scratch, pool, backbone, args.threads, stages) for n in sizes}
    print(f"load average at end: {os.getloadavg()[0]:.2f}")

    print(f"\nbackbone: {json.dumps(backbone)}")
    print(f"{'stage':10s} {'images':>7s} {'wall s':>8s} {'ms/image':>9s} {'CPU s':>8s} "
          f"{'CPU ms/image':>13s} {'peak MiB':>9s} "
          f"{'workers MiB':>12s}")
    for n, runs in results.items():
        for stage, run in runs.items():
            workers = f"{run.child_peak_mib:12.0f}" if stage == "prepare" else f"{'-':>12s}"
            print(f"{stage:10s} {n:7,d} {run.seconds:8.1f} {1000 * run.seconds / n:9.2f} "
                  f"{run.cpu_seconds:8.1f} {1000 * run.cpu_seconds / n:13.2f} "
                  f"{run.peak_mib:9.0f} {workers}")
    for n, runs in results.items():
        if logged_figures(runs):
            print(f"{n:7,d} images: {logged_figures(runs)}")
    small, large = sizes[0], sizes[-1]
    print(f"\n{large:,} / {small:,} images = {large / small:.1f}x the images:")
    ratios = {}
    for stage in stages:
        a, b = results[small][stage], results[large][stage]
        ratios[stage] = {"time": round(b.seconds / a.seconds, 2),
                         "cpu_time": round(b.cpu_seconds / a.cpu_seconds, 2),
                         "peak_memory": round(b.peak_mib / a.peak_mib, 2)}
        print(f"  {stage:10s} time {b.seconds / a.seconds:5.2f}x   "
              f"CPU time {b.cpu_seconds / a.cpu_seconds:5.2f}x   "
              f"peak memory {b.peak_mib / a.peak_mib:5.2f}x "
              f"({a.peak_mib:.0f} -> {b.peak_mib:.0f} MiB)")
    print(json.dumps({"sizes": sizes, "ratios": ratios}))
    if args.keep:
        print(f"projects kept in {scratch}")
    else:
        subprocess.run(["rm", "-rf", str(scratch)], check=True)


if __name__ == "__main__":
    main()
