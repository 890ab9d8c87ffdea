"""Peak memory of the extract stage at 1,000 against 10,000 images (goal: under 1.2x).

Images are read one by one from the prepared store and embeddings stream to disk batch by
batch, so memory should not grow with the number of images. Each size runs
``python -m stages.extract`` in a fresh process on a generated store; its max RSS is read
with ``getrusage``.

    python -m benchmarks.extraction_memory [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.decode_speed import generate
from transfer.data import prepare_store
from transfer.sources import list_image_folder

RUN_EXTRACT = ("import resource, runpy; "
               "runpy.run_module('stages.extract', run_name='__main__'); "
               "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def measure(count: int, scratch: Path) -> tuple[float, float]:
    project = scratch / f"project{count}"
    generate(project / "images", count, size=(96, 72), fmt="png")
    report = prepare_store(list_image_folder(project / "images"),
                           project / "data" / "prepared", source="generated", short_side=256,
                           val_size=0.1, test_size=0.1, seed=0, min_per_class=1,
                           max_per_class=None)
    if sum(report["totals"].values()) != count:
        raise SystemExit(f"only {sum(report['totals'].values())} of {count} images were kept")
    (project / "params.yaml").write_text("seed: 0\n")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUN_EXTRACT], cwd=project, check=True,
                            capture_output=True, text=True,
                            env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                 "PATH": "/usr/bin:/bin"})
    seconds = time.perf_counter() - started
    kib = int(result.stdout.split("maxrss_kib")[-1].split()[0])
    return kib / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000])
    args = parser.parse_args()
    small, large = args.sizes
    with tempfile.TemporaryDirectory() as scratch:
        results = {n: measure(n, Path(scratch)) for n in (small, large)}
    for n, (mib, seconds) in results.items():
        print(f"extract, {n:6,d} images: peak {mib:7.1f} MiB, {seconds:6.1f} s "
              f"({n / seconds:.1f} images/s with start-up)")
    print(f"peak memory {large:,} / {small:,} images = {results[large][0] / results[small][0]:.2f}")


if __name__ == "__main__":
    main()
