"""DVC stage ``finetune``: optional fine-tuning of the backbone; when disabled it only says so.

It imports nothing heavy at the top, so the disabled stage costs a fraction of a second.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.artifacts import atomic_output, write_json
from stages.errors import PipelineError, run_stage
from stages.params import load_params

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
FINETUNE_DIR = Path("models/finetune")


def main() -> None:
    params = load_params(PARAMS)
    if params.finetune.enabled:
        raise PipelineError("finetune.enabled: true, but fine-tuning is not built yet "
                            "(see the README, 'Not built yet'); set finetune.enabled: false")
    with atomic_output(FINETUNE_DIR) as tmp:
        tmp.mkdir()
        write_json(tmp / "status.json", {"enabled": False, "status": "skipped",
                                         "reason": "finetune.enabled is false"})
    log.info("fine-tuning skipped (finetune.enabled is false)")


if __name__ == "__main__":
    run_stage(main)
