"""One fine-tuning configuration measured on a prepared project, as one table row.

    python -m benchmarks.finetune_defaults PROJECT [finetune.KEY=VALUE ...] [--crop LOW]
                                           [--keep-last]

PROJECT is a project folder in which ``prepare`` and ``extract`` have run (its params.yaml
names ``data.source`` and ``head.C``). The command trains the head, fine-tunes with
``finetune.enabled: true`` and the given keys (the others at their defaults), evaluates on
the test split and prints one tab-separated row: the keys, the learning rate used, best epoch,
epochs run, raw or EMA weights, validation accuracy and loss of the kept epoch, test accuracy
and log loss of the fine-tuned model and of the probe, the fine-tuning wall time in seconds,
and the validation accuracy per epoch. ``--crop LOW`` trains with RandomResizedCrop scale
(LOW, 1) for ``augment: light``; ``--keep-last`` keeps the last epoch whatever validation
says (to see what the safeguard gives up). docs/finetune-defaults.md holds what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import yaml

from stages import evaluate, finetune, train_head
from transfer import training
from transfer.layout import EVALUATE_METRICS, FINETUNE_STATUS, PARAMS, curve_file


class _LastEpoch:
    """A criterion under which every epoch beats the ones before it."""

    name = "last epoch"

    def better(self, candidate, best) -> bool:
        return True

    def unbeatable(self, scores) -> bool:
        return False


def keep_last_epoch() -> None:
    """From now on, fine-tuning keeps its last epoch whatever validation says."""
    training.SELECT_BY = {name: _LastEpoch() for name in training.SELECT_BY}


def finetune_keys(items: list[str]) -> dict:
    """``finetune.KEY=VALUE`` (or ``KEY=VALUE``) arguments as {KEY: YAML value}."""
    chosen = {}
    for item in items:
        key, _, value = item.partition("=")
        chosen[key.removeprefix("finetune.")] = yaml.safe_load(value)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("keys", nargs="*", help="finetune keys as KEY=VALUE (YAML values)")
    parser.add_argument("--crop", type=float, help="RandomResizedCrop's lower scale (light)")
    parser.add_argument("--keep-last", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.chdir(args.project)
    params = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    chosen = finetune_keys(args.keys)
    params["finetune"] = {"enabled": True, **chosen}
    params["evaluate"] = {"split": "test"}
    PARAMS.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    if args.crop is not None:
        training.CROP_SCALE["light"] = (args.crop, 1.0)
    if args.keep_last:
        keep_last_epoch()

    train_head.main()
    started = time.perf_counter()
    finetune.main()
    seconds = time.perf_counter() - started
    evaluate.main()
    status = json.loads(FINETUNE_STATUS.read_text())
    metrics = json.loads(EVALUATE_METRICS.read_text())
    curve = curve_file("val/accuracy").read_text()
    per_epoch = [float(line.split("\t")[1]) for line in curve.splitlines()[1:]]
    options = [*args.keys, *([f"crop={args.crop}"] if args.crop is not None else []),
               *(["keep_last"] if args.keep_last else [])]
    print("\t".join(str(cell) for cell in [
        " ".join(options) or "defaults", f"{status['lr']:.3g}", status["best_epoch"],
        status["epochs_run"], status["best_weights"], f"{status['val_accuracy']:.4f}",
        f"{status['val_loss']:.4f}", f"{metrics['finetune']['accuracy']:.4f}",
        f"{metrics['finetune']['log_loss']:.4f}", f"{metrics['head']['accuracy']:.4f}",
        f"{metrics['head']['log_loss']:.4f}", f"{seconds:.0f}",
        "/".join(f"{a:.3f}" for a in per_epoch)]))


if __name__ == "__main__":
    main()
