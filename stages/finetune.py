"""DVC stage ``finetune``: fine-tune the backbone with a new head; when disabled, only say so.

``models/finetune/`` holds ``model.safetensors`` (the best epoch by ``finetune.select_by``
on validation), ``model.json`` (how to rebuild and feed it), ``status.json`` and
``lr_range.csv`` (the range test of ``finetune.lr: auto``); ``dvclive/`` the per-epoch loss,
accuracy and learning rate, written after every epoch. Runs on several GPUs or hosts
under ``torchrun --nproc_per_node=N -m stages.finetune``. The disabled stage imports
nothing heavy and costs a fraction of a second.
"""

from __future__ import annotations

import logging

from transfer.artifacts import atomic_outputs, write_json
from transfer.errors import run_stage
from transfer.layout import (
    CHECKPOINT_DIR,
    EMBEDDINGS_DIR,
    FINETUNE_CHECKPOINTS,
    FINETUNE_CURVES,
    FINETUNE_DIR,
    FINETUNE_LR_RANGE,
    HEAD_PATH,
    PARAMS,
    PREPARED_DIR,
    write_missing_curves,
)
from transfer.lr_range import curve_text
from transfer.params import load_params

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS)
    if not params.finetune.enabled:
        with atomic_outputs(FINETUNE_DIR, FINETUNE_CURVES) as (tmp, curves_tmp):
            tmp.mkdir()
            write_json(tmp / "status.json", {"enabled": False, "status": "skipped",
                                             "reason": "finetune.enabled is false"})
            (tmp / FINETUNE_LR_RANGE.relative_to(FINETUNE_DIR)).write_text(
                curve_text(None), encoding="utf-8")
            write_missing_curves(curves_tmp)
        for checkpoint in CHECKPOINT_DIR.glob(FINETUNE_CHECKPOINTS):
            checkpoint.unlink()  # nothing will resume it
        log.info("fine-tuning skipped (finetune.enabled is false)")
        return
    from transfer.training import run_finetune

    run_finetune(params, prepared_dir=PREPARED_DIR, embeddings_dir=EMBEDDINGS_DIR,
                 head_path=HEAD_PATH, out_dir=FINETUNE_DIR, curves_dir=FINETUNE_CURVES,
                 checkpoint_dir=CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage(main)
