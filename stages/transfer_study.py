"""The transfer study: how much of the network to fine-tune, measured on your data set.

``python -m stages.transfer_study`` queues one DVC experiment per row (``scratch``, ``head``,
``last_k`` for each ``--k``, ``full``) on top of the current workspace, runs the queue, and
writes a Markdown table of the results next to the linear probe of the baseline.
Every row stays an ordinary experiment: ``dvc exp show``, ``dvc exp apply`` and
``dvc exp push`` work on it afterwards.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer import layout
from transfer.artifacts import atomic_output
from transfer.errors import ArgumentParser, PipelineError, run_stage
from transfer.evaluation import FINETUNE_STATUS_KEY
from transfer.experiments import Experiment, dvc, experiments
from transfer.strategies import STRATEGIES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What the table shows of one revision: its headline metrics (``dvc exp show``, as
    ``head.accuracy``), and the Git-tracked reports beside them, read at the revision."""

    metrics: dict[str, Any]
    evaluation: dict[str, Any]  # reports/evaluate.json, the fine-tuning status included
    head_training: dict[str, Any]  # reports/train_head.json

    @classmethod
    def of(cls, row: Experiment) -> Outcome:
        return cls(row.metrics, row.report(layout.EVALUATE_REPORT),
                   row.report(layout.TRAIN_HEAD_REPORT))

    @property
    def finetune_status(self) -> dict[str, Any]:
        return self.evaluation.get(FINETUNE_STATUS_KEY, {})


@dataclass(frozen=True)
class StudyRow:
    """One experiment of the study: a fine-tuning strategy and what it trains."""

    strategy: str
    unfreeze_k: int | None = None

    @property
    def label(self) -> str:
        return STRATEGIES[self.strategy].label(self.unfreeze_k)

    @property
    def slug(self) -> str:
        name = self.strategy.replace("_k", "")  # experiment names: last-1, not last_k-1
        return name if self.unfreeze_k is None else f"{name}-{self.unfreeze_k}"

    @property
    def what_trains(self) -> str:
        return STRATEGIES[self.strategy].what_trains.format(k=self.unfreeze_k)

    def set_params(self, epochs: int) -> list[str]:
        """The ``-S key=value`` overrides of ``dvc exp run`` for this row."""
        values = {"finetune.enabled": "true", "finetune.strategy": self.strategy,
                  "finetune.epochs": str(epochs)}
        if self.unfreeze_k is not None:
            values["finetune.unfreeze_k"] = str(self.unfreeze_k)
        return [arg for key, value in values.items() for arg in ("-S", f"{key}={value}")]


def study_rows(ks: list[int]) -> list[StudyRow]:
    """Every strategy once, the one that takes ``unfreeze_k`` once per ``k``; the random
    start first, as the baseline pretraining is measured against."""
    ordered = sorted(STRATEGIES.values(), key=lambda s: s.pretrained)
    return [StudyRow(s.name, k) for s in ordered
            for k in (ks if s.uses_unfreeze_k() else [None])]


def queue_and_run(rows: list[StudyRow], epochs: int, jobs: int, prefix: str) -> list[str]:
    """Queue one experiment per row and run the queue; returns the experiment names."""
    names = []
    for row in rows:
        name = f"{prefix}-{row.slug}"
        dvc("exp", "run", "--queue", "--name", name, *row.set_params(epochs))
        names.append(name)
        log.info("queued %s", name)
    log.info("running %d experiments, %d at a time (this is the long part)", len(rows), jobs)
    started = time.perf_counter()
    dvc("exp", "run", "--run-all", "--jobs", str(jobs))
    log.info("all experiments finished in %.1f minutes", (time.perf_counter() - started) / 60)
    return names


def collect(rows: list[Experiment]) -> tuple[Experiment | None, dict[str, Experiment]]:
    """The baseline commit (the first commit ``dvc exp show`` lists) and each experiment by
    name."""
    commits = [row for row in rows if row.rev is not None and row.baseline is None]
    named = {row.name: row for row in rows if row.baseline is not None}
    return (commits[0] if commits else None), named


def markdown_table(rows: list[StudyRow], names: list[str], baseline: Outcome,
                   experiments: dict[str, Outcome], split: str) -> str:
    """The study as Markdown: the linear probe first, then one line per experiment."""
    header = ("| Row | What trains | Trainable parameters | Epochs run (best) | Val accuracy | "
              f"{split.capitalize()} accuracy | Experiment |\n"
              "|---|---|---:|---:|---:|---:|---|\n")
    probe_val = baseline.head_training.get("val", {}).get("accuracy")
    lines = [f"| linear probe | logistic regression on frozen embeddings | - | - | "
             f"{_fmt(probe_val)} | {_fmt(baseline.metrics.get('head.accuracy'))} | baseline |"]
    for row, name in zip(rows, names, strict=True):
        outcome = experiments.get(name)
        what = row.what_trains
        if outcome is None:
            lines.append(f"| {row.label} | {what} | failed or missing | | | | {name} |")
            continue
        status = outcome.finetune_status
        epochs = f"{status.get('epochs_run', '-')} ({status.get('best_epoch', '-')})"
        scored = outcome.metrics.get("finetune.accuracy")
        lines.append(
            f"| {row.label} | {what} | {status.get('trainable_parameters', '-'):,} | {epochs} | "
            f"{_fmt(status.get('val_accuracy'))} | {_fmt(scored)} | {name} |")
    return header + "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.transfer_study",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per row (default 3)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3],
                        help="last_k rows: blocks unfrozen from the top (default 1 3)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="experiments run at once (default 1; each uses every core)")
    parser.add_argument("--output", type=Path, default=layout.TRANSFER_STUDY_REPORT)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.jobs < 1 or any(k < 1 for k in args.k):
        parser.error("--epochs, --jobs and every --k must be 1 or more")
    if not Path("dvc.yaml").is_file():
        raise PipelineError("run the transfer study from the project root (no dvc.yaml here)")
    rows = study_rows(args.k)
    prefix = f"study-{time.strftime('%m%d-%H%M%S')}"
    names = queue_and_run(rows, args.epochs, args.jobs, prefix)
    baseline_row, named = collect(experiments(json.loads(dvc("exp", "show", "--json") or "[]")))
    baseline = Outcome.of(baseline_row) if baseline_row else Outcome({}, {}, {})
    outcomes = {name: Outcome.of(named[name]) for name in names if name in named}
    evaluated_split = baseline.evaluation.get("head", {}).get("split") or "test"
    table = markdown_table(rows, names, baseline, outcomes, evaluated_split)
    with atomic_output(args.output) as tmp:
        tmp.write_text(f"# Transfer study ({args.epochs} epochs per row)\n\n{table}",
                       encoding="utf-8")
    sys.stdout.write(table)
    rev = (baseline_row.rev or "")[:7] if baseline_row else ""
    since = f" --rev {rev}" if rev else ""
    log.info("wrote %s (git add it to keep it); compare the rows with `python -m "
             "stages.compare%s` (or `dvc exp show --only-changed%s`)", args.output, since, since)


if __name__ == "__main__":
    run_stage(main)
