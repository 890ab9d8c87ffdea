"""Compare experiments in a table that fits a terminal: ``python -m stages.compare``.

One row per commit and experiment that ``dvc exp show`` lists (the workspace only where it
differs from its commit), one column per parameter that differs between them, then each
model's accuracy, log loss and calibration error (``--all``: every headline number), and the
fine-tuning's kept epoch. The best value of each metric column is starred.

    python -m stages.compare [--sort-by head.log_loss] [--all] [--format table|md|csv]
        [-A | --rev REV ...]
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfer import layout
from transfer.errors import ArgumentParser, PipelineError, run_stage
from transfer.experiments import Experiment, dvc, experiments

MODELS = ("head", "finetune")
SHORT = ("accuracy", "log_loss", "ece")
LOWER_IS_BETTER = ("log_loss", "ece")
TITLES = {"accuracy": "acc", "balanced_accuracy": "bal acc", "macro_f1": "macro F1",
          "log_loss": "log loss", "ece": "ECE"}
KEPT_EPOCH = "ft epoch"


def lower_is_better(metric: str) -> bool:
    return metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER


def changed_params(rows: Sequence[Experiment]) -> list[str]:
    """The parameters whose value differs between the rows that have them, in
    ``params.yaml``'s order (a key that older commits lack is no change by itself)."""
    keys = list(dict.fromkeys(key for row in rows for key in row.params))
    return [key for key in keys if len({json.dumps(row.params[key], sort_keys=True)
                                        for row in rows if key in row.params}) > 1]


def metric_columns(rows: Sequence[Experiment], names: Sequence[str]) -> list[str]:
    """``model.metric`` for each model some row has, each of ``names``."""
    return [f"{model}.{name}" for model in MODELS
            if any(f"{model}.accuracy" in row.metrics for row in rows) for name in names]


def kept_epoch(row: Experiment) -> Any:
    """The fine-tuning's kept epoch, from the row's ``reports/evaluate.json`` (Git-tracked,
    read at its commit; the workspace's from disk)."""
    report = row.report(layout.EVALUATE_REPORT)
    return (report.get(layout.FINETUNE_STATUS_KEY) or {}).get("best_epoch")


def sort_rows(rows: list[Experiment], key: str) -> list[Experiment]:
    """By ``key`` (a metric or parameter), best first for a metric; rows without it last."""
    def value(row: Experiment) -> Any:
        return row.metrics.get(key, row.params.get(key))

    present, missing = [], []
    for row in rows:
        (present if isinstance(value(row), (int, float)) else missing).append(row)
    reverse = any(key in row.metrics for row in rows) and not lower_is_better(key)
    return sorted(present, key=value, reverse=reverse) + missing


def title(column: str) -> str:
    model, _, metric = column.partition(".")
    return f"{'ft' if model == 'finetune' else model} {TITLES.get(metric, metric)}"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def build_table(rows: Sequence[Experiment], metrics: Sequence[str], star: bool
                ) -> tuple[list[str], list[list[str]]]:
    """The header and the cells: the experiment, the changed parameters, the metrics, the
    kept epoch where a row has fine-tuning metrics."""
    params = changed_params(rows)
    header = ["experiment", *params, *(title(m) for m in metrics)]
    with_epochs = any(m.startswith("finetune.") for m in metrics)
    if with_epochs:
        header.append(KEPT_EPOCH)
    best = {}
    for metric in metrics:
        values = [row.metrics[metric] for row in rows
                  if isinstance(row.metrics.get(metric), (int, float))]
        if star and len(set(values)) > 1:
            best[metric] = min(values) if lower_is_better(metric) else max(values)
    body = []
    for row in rows:
        name = row.name + (f" ({row.state})" if row.state else "")
        line = [name, *(cell(row.params.get(key)) for key in params)]
        for metric in metrics:
            value = row.metrics.get(metric)
            line.append(cell(value) + ("*" if metric in best and value == best[metric] else ""))
        if with_epochs:
            line.append(cell(kept_epoch(row)) if "finetune.accuracy" in row.metrics else "-")
        body.append(line)
    return header, body


def render(header: list[str], body: list[list[str]], form: str) -> str:
    if form == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *body])
        return out.getvalue()
    if form == "md":
        lines = [header, ["---"] + ["---:"] * (len(header) - 1), *body]
        return "".join("| " + " | ".join(line) + " |\n" for line in lines)
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    text = [f"{line[0]:<{widths[0]}}  " + "  ".join(
        f"{value:>{width}}" for value, width in zip(line[1:], widths[1:], strict=True))
        for line in (header, *body)]
    return "\n".join(line.rstrip() for line in text) + "\n"


def drop_unchanged_workspace(rows: list[Experiment]) -> list[Experiment]:
    """The workspace row, unless it holds what its commit (the next row) holds."""
    if len(rows) > 1 and rows[0].rev is None and \
            (rows[0].params, rows[0].metrics) == (rows[1].params, rows[1].metrics):
        return rows[1:]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.compare",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--sort-by", metavar="KEY",
                        help="a metric (head.log_loss; lowest first for log loss and ECE, "
                             "highest first for the others) or a parameter (head.C)")
    parser.add_argument("--all", action="store_true",
                        help="every headline number (balanced accuracy and macro F1 too)")
    parser.add_argument("--format", choices=("table", "md", "csv"), default="table",
                        help="table (the default: aligned, the best of each metric starred), "
                             "md (Markdown) or csv")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("-A", "--all-commits", action="store_true",
                       help="the experiments of every commit, not only the last one's")
    which.add_argument("--rev", nargs="+", metavar="REV",
                       help="the experiments of these commits or branches")
    args = parser.parse_args(argv)
    if not Path("dvc.yaml").is_file():
        raise PipelineError("run python -m stages.compare from the project root (no dvc.yaml "
                            "here)")
    show = ["exp", "show", "--json"] + (["--all-commits"] if args.all_commits else []) + \
        [arg for rev in args.rev or [] for arg in ("--rev", rev)]
    rows = drop_unchanged_workspace(experiments(json.loads(dvc(*show) or "[]")))
    metrics = metric_columns(rows, layout.HEADLINE_METRICS if args.all else SHORT)
    if args.sort_by:
        known = {key for row in rows for key in (*row.metrics, *row.params)}
        if args.sort_by not in known:
            options = ", ".join(metric_columns(rows, layout.HEADLINE_METRICS)) or "no metrics yet"
            parser.error(f"--sort-by: '{args.sort_by}' is neither a metric nor a parameter "
                         f"of these experiments; metrics: {options}")
        rows = sort_rows(rows, args.sort_by)
    header, body = build_table(rows, metrics, star=args.format == "table")
    sys.stdout.write(render(header, body, args.format))


if __name__ == "__main__":
    run_stage(main)
