"""Wall time of the pipeline as a new user meets it, measured in one run on a fresh clone.

Clones this repository's committed ``main`` into a temporary folder, then times
``dvc repro`` from nothing, a second (no-op) ``dvc repro``, a head-only experiment
``dvc exp run -S head.C=0.1``, an experiment that changes nothing (DVC's own cost) and one
with another head (``head.C=1``: evaluate re-runs too). Prints seconds and the ratios to the
full run. With
``--images DIR`` the clone first gets a copy of that image folder as ``data/raw/images``
(``dvc add``-ed and set as ``data.source``, as a user would), instead of the built-in digits.

    python -m benchmarks.pipeline_times [--images ../shared/data/monkeys10] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return seconds, result.stdout + result.stderr


def reran(log: str) -> list[str]:
    """The stages (of ``dvc.yaml``, in its order) a ``dvc`` command's output says it ran."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return [s for s in stages if f"Running stage '{s}'" in log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone and print its path")
    parser.add_argument("--images", type=Path, help="an image folder to use instead of digits")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pipeline-times-"))
    clone = scratch / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if args.images:
        shutil.copytree(args.images, clone / "data" / "raw" / "images")
        timed(["dvc", "add", "-q", "data/raw/images"], clone)
        params = clone / "params.yaml"
        params.write_text(params.read_text().replace("source: digits",
                                                     "source: data/raw/images"))
        timed(["git", "add", "-A"], clone)
        timed(["git", "commit", "-qm", "use the given images"], clone)

    full, _ = timed(["dvc", "repro"], clone)
    noop, noop_log = timed(["dvc", "repro"], clone)
    head, head_log = timed(["dvc", "exp", "run", "-S", "head.C=0.1"], clone)
    metrics = json.loads((clone / "metrics" / "evaluate.json").read_text())
    floor, _ = timed(["dvc", "exp", "run"], clone)
    other, other_log = timed(["dvc", "exp", "run", "-S", "head.C=1"], clone)
    print(f"dvc repro from nothing      : {full:7.1f} s")
    print(f"dvc repro again (no-op)     : {noop:7.2f} s  = {noop / full:.3f} x full"
          f"  ({'ran nothing' if 'Running stage' not in noop_log else 'RAN STAGES'})")
    print(f"dvc exp run -S head.C=0.1   : {head:7.1f} s  = {head / full:.3f} x full"
          f"  (re-ran: {', '.join(reran(head_log))}; full / head-only = {full / head:.1f})")
    print(f"dvc exp run (nothing to do) : {floor:7.1f} s  = {floor / full:.3f} x full")
    print(f"dvc exp run -S head.C=1     : {other:7.1f} s  = {other / full:.3f} x full"
          f"  (re-ran: {', '.join(reran(other_log))})")
    print(f"head test accuracy (C=0.1)  : {metrics['head']['accuracy']:.4f}")
    if args.keep:
        print(f"clone kept at {clone}")
    else:
        subprocess.run(["rm", "-rf", str(scratch)], check=True)


if __name__ == "__main__":
    main()
