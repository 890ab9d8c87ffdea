"""Time and peak memory of the audit's similarity pass (near-duplicates and outliers) at scale.

    python -m benchmarks.audit_scale [--images 50000] [--dim 1280] [--classes 100] [--full]

Synthetic embeddings shaped like real ones (non-negative, one cluster per class, 20 planted
pairs of near-copies) stand in for a cache of that many images. Prints the seconds and the peak
resident memory of the pass, beside the size of the embeddings themselves; the whole audit
(label issues too) with ``--full``. Each measurement runs in a fresh process, so the peaks do
not mix.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, 1.0, size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    features = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 4096):  # a block at a time: no float64 copy of the whole
        block = labels[start:start + 4096]
        noise = rng.gamma(1.0, 1.0, size=(len(block), dim)).astype(np.float32)
        features[start:start + 4096] = 0.5 * centres[block] + noise
    copies = np.arange(0, n, n // 20)[:20]
    features[copies + 1] = features[copies] * 1.01  # 20 planted pairs of near-copies
    return features, labels


def measure(n: int, dim: int, classes: int, full: bool) -> dict:
    from transfer.audit import (
        AuditImages,
        AuditSettings,
        power_normalised,
        run_audit,
        scan,
        unit_rows,
    )
    from transfer.embeddings import EmbeddingMeta

    features, labels = synthetic(n, dim, classes)
    splits = np.where(np.arange(n) % 10 < 7, "train", np.where(np.arange(n) % 10 < 8.5, "val",
                                                                 "test"))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if full:
        ids = np.array([f"{i:016x}" for i in range(n)])
        meta = EmbeddingMeta("synthetic", "", None, {}, dim, "float32",
                             [str(c) for c in range(classes)], False, "float32", "torch",
                             256, {})
        settings = AuditSettings(folds=5, C=0.1, duplicate_margin=0.1, neighbours=5,
                                 unfamiliar_percentile=99.0, max_listed=50)
        report = run_audit(AuditImages(features, labels, splits, ids, ids),
                           meta.classes, settings, 0, meta).report
        pairs = report["counts"]["near_duplicate_pairs"]
    else:
        unit = unit_rows(features, power_normalised(features[splits == "train"]).mean(axis=0))
        found, _ = scan(unit, splits, labels, 0.1, 5, 50)
        pairs = found.total
    return {"seconds": time.perf_counter() - started, "pairs": pairs,
            "embeddings_mib": features.nbytes / 2**20,
            "rss_before_mib": baseline / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--full", action="store_true", help="the whole audit, not the pass only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.images, args.dim, args.classes, args.full)))
        return
    command = [sys.executable, "-m", "benchmarks.audit_scale", "--child",
               "--images", str(args.images), "--dim", str(args.dim),
               "--classes", str(args.classes)] + (["--full"] if args.full else [])
    result = json.loads(subprocess.run(command, check=True, capture_output=True,
                                       text=True).stdout)
    what = "whole audit" if args.full else "similarity pass"
    print(f"{what}, {args.images} images x {args.dim} dims, {args.classes} classes: "
          f"{result['seconds']:.1f} s, {result['pairs']} near-duplicate pairs; embeddings "
          f"{result['embeddings_mib']:.0f} MiB, resident memory {result['rss_before_mib']:.0f} "
          f"MiB before the pass and {result['peak_rss_mib']:.0f} MiB at its peak")


if __name__ == "__main__":
    main()
