"""Memory and time of ``train_head`` on 5,000 to 200,000 cached embeddings, per head kind.

Goal: see which heads keep peak memory flat as the training set grows (``logistic,
streamed`` is the logistic head past ``head.in_memory_gb``, forced with 0). Each size gets a
temporary project with a synthetic embedding cache (1,280-dimensional float32 rows, five
Gaussian classes, split 70/15/15, written as ``extract`` writes it) and, per head
configuration, its own ``params.yaml``; ``train_head`` runs there as DVC runs it, in a fresh
process, and reports its own peak RSS (VmHWM) and CPU time (see ``benchmarks.scale``).

    python -m benchmarks.head_memory [--sizes 5000 50000 200000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import yaml

from benchmarks.scale import run_stage
from transfer.artifacts import save_arrays, write_json
from transfer.embeddings import EmbeddingMeta, write_split
from transfer.layout import TRAIN_HEAD_REPORT

DIM = 1280
CLASSES = 5
# The MLPs run a fixed 3 epochs (patience above it): memory is the question, and time per
# epoch is linear in the rows.
HEADS = {"logistic": {"kind": "logistic"},
         "logistic, streamed": {"kind": "logistic", "in_memory_gb": 0},
         "mlp, 256 hidden units": {"kind": "mlp", "hidden_units": 256, "max_iter": 3,
                                   "patience": 100},
         "mlp, no hidden layer": {"kind": "mlp", "hidden_units": 0, "max_iter": 3,
                                  "patience": 100}}


def write_cache(directory: Path, rows: int, seed: int = 0, spread: float = 40.0) -> None:
    """A cache of ``rows`` embeddings: Gaussian class centres, each about ``spread`` units
    from the origin, and unit noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0 / np.sqrt(DIM), size=(CLASSES, DIM)).astype(np.float32) * spread
    counts = {"train": rows * 70 // 100, "val": rows * 15 // 100}
    counts["test"] = rows - counts["train"] - counts["val"]
    directory.mkdir(parents=True)
    index = {}
    for split, n in counts.items():
        labels = rng.integers(0, CLASSES, size=n)
        batches = (centres[labels[i:i + 4096]] + rng.normal(size=(len(labels[i:i + 4096]), DIM))
                   for i in range(0, n, 4096))
        write_split(directory / f"{split}.npy", batches, rows=n, dim=DIM, dtype="float32")
        index[f"{split}_labels"] = labels
        index[f"{split}_ids"] = np.asarray([f"{split}/{i:07d}.png" for i in range(n)])
    save_arrays(directory / "index.npz", **index)
    write_json(directory / "meta.json", EmbeddingMeta(
        backbone="synthetic", weights="none", weights_sha256=None, preprocessing={}, dim=DIM,
        dtype="float32", classes=[f"class{i}" for i in range(CLASSES)],
        flip_average=False, precision="float32", engine="torch", short_side=256,
        versions={}).to_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 200000])
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the stage")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS),
                        metavar="HEAD", help=f"which heads (default all: {', '.join(HEADS)})")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    scratch = Path(tempfile.mkdtemp(prefix="head-memory-"))
    heads = {name: HEADS[name] for name in args.heads}
    results: dict[str, dict[int, tuple[float, float, float]]] = {name: {} for name in heads}
    for size in sizes:
        project = scratch / f"project{size}"
        write_cache(project / "data" / "embeddings", size)
        for name, head in heads.items():
            (project / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "head": head}))
            run = run_stage("train_head", project, args.threads)
            metrics = json.loads((project / TRAIN_HEAD_REPORT).read_text())
            results[name][size] = (run.seconds, run.cpu_seconds, run.peak_mib)
            print(f"{size:8,d} rows, {name:22s}: {run.seconds:6.1f} s, CPU {run.cpu_seconds:6.1f}"
                  f" s, peak {run.peak_mib:6.0f} MiB, val accuracy "
                  f"{metrics['val']['accuracy']:.4f}, {metrics['n_iter']} iterations/epochs, "
                  f"C {metrics['regularisation'].get('C', '-')}, search "
                  f"{metrics['regularisation'].get('iterations', '-')} iterations",
                  flush=True)
    small, large = sizes[0], sizes[-1]
    cache_mib = large * 70 // 100 * DIM * 4 / 2**20
    print(f"\n{large:,} / {small:,} rows ({large / small:.0f}x; the largest training cache is "
          f"{cache_mib:.0f} MiB):")
    for name, by_size in results.items():
        a, b = by_size[small], by_size[large]
        print(f"  {name:22s} peak memory {b[2] / a[2]:5.2f}x ({a[2]:.0f} -> {b[2]:.0f} MiB), "
              f"CPU time {b[1] / a[1]:5.2f}x")
    subprocess.run(["rm", "-rf", str(scratch)], check=True)


if __name__ == "__main__":
    main()
