"""DVC stage ``prepare``: decode, check and split the source images into the prepared store."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from stages.artifacts import write_json
from stages.data import BUILTIN_SOURCES, prepare_store, source_files
from stages.errors import run_stage
from stages.params import load_params

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
REPORT = Path("reports/data.json")


def main() -> None:
    params = load_params(PARAMS)
    data = params.data
    source = Path(data.source)
    if data.source not in BUILTIN_SOURCES and RAW_DIR.resolve() not in source.resolve().parents:
        log.warning("data.source '%s' is outside %s/: DVC will not notice when it changes",
                    data.source, RAW_DIR)
    with tempfile.TemporaryDirectory(prefix="prepare-") as scratch:
        files = source_files(data.source, Path(scratch))
        report = prepare_store(files, PREPARED_DIR, source=data.source,
                               short_side=data.short_side, val_size=data.val_size,
                               test_size=data.test_size, seed=params.seed,
                               max_per_class=data.max_per_class)
    write_json(REPORT, report)
    totals = {split: sum(per_class.values()) for split, per_class in report["counts"].items()}
    log.info("prepared %d classes: %s; skipped %d, duplicates %d",
             len(report["classes"]), totals, len(report["skipped"]), len(report["duplicates"]))


if __name__ == "__main__":
    run_stage(main)
