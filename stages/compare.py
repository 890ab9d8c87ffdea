"""Compare experiments in a table that fits a terminal: ``python -m stages.compare``.

One row per commit and experiment that ``dvc exp show`` lists (the workspace only where it
differs from its commit), one column per parameter that differs between them, then each
model's accuracy, log loss and calibration error (``--all``: every headline number), and the
fine-tuning's kept epoch. The best value of each metric column is starred. The table's header
has two lines, the section of each column (``head``, ``finetune``, ...) over its name, so that
no column is wider than its values need; ``--drop`` and ``--keep`` choose columns by name. A
table wider than the terminal is printed in blocks of columns that fit it.

    python -m stages.compare [--sort-by head.log_loss] [--all] [--format table|md|csv]
        [--drop REGEX] [--keep REGEX] [--width N] [-A | --rev REV ...]
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfer import layout
from transfer.errors import ArgumentParser, PipelineError, run_stage
from transfer.experiments import Experiment, dvc, experiments

log = logging.getLogger(__name__)

MODELS = ("head", "finetune")
SHORT = ("accuracy", "log_loss", "ece")
LOWER_IS_BETTER = ("log_loss", "ece")
TITLES = {"accuracy": "acc", "balanced_accuracy": "bal acc", "macro_f1": "macro F1",
          "log_loss": "log loss", "ece": "ECE"}
KEPT_EPOCH = "ft epoch"
GAP = "  "
# The table's sections over the metric columns, apart from the parameters' own (head.C).
SECTIONS = {"head": "head model", "ft": "fine-tuned model"}


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


def selected(columns: Sequence[str], drop: str | None, keep: str | None) -> list[str]:
    """``columns`` (``head.C``, ``head.log_loss``) without those ``drop`` matches, unless
    ``keep`` matches them too (as ``dvc exp show --drop/--keep``); matched anywhere in the
    name."""
    return [c for c in columns
            if not (drop and re.search(drop, c)) or (keep and re.search(keep, c))]


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


def build_table(rows: Sequence[Experiment], metrics: Sequence[str], star: bool,
                params: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """The header and the cells: the experiment, the changed parameters (or ``params``), the
    metrics, the kept epoch where a row has fine-tuning metrics."""
    params = changed_params(rows) if params is None else params
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


def sections(header: Sequence[str]) -> tuple[list[str], list[str]]:
    """Each title split into its section and its name: ``head.C`` into ``head`` and ``C``,
    ``ft log loss`` into ``fine-tuned model`` and ``log loss``; a title without one has an
    empty section."""
    tops, names = [], []
    for i, column in enumerate(header):
        parameter = "." in column
        top, separator, name = column.partition("." if parameter else " ")
        if i == 0 or not separator:  # the experiment's name
            top, name = "", column
        elif not parameter:
            top = SECTIONS.get(top, top)
        tops.append(top)
        names.append(name)
    return tops, names


def render(header: list[str], body: list[list[str]], form: str) -> str:
    if form == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *body])
        return out.getvalue()
    if form == "md":
        lines = [header, ["---"] + ["---:"] * (len(header) - 1), *body]
        return "".join("| " + " | ".join(line) + " |\n" for line in lines)
    tops, names = sections(header)
    widths = [max(len(line[i]) for line in (names, *body)) for i in range(len(header))]
    # A section's title stands over its columns, from the first one's left edge: where they
    # are narrower than it, the last of them widens.
    starts = [i for i in range(len(tops)) if tops[i] and (i == 0 or tops[i] != tops[i - 1])]
    for start in starts:
        end = start
        while end + 1 < len(tops) and tops[end + 1] == tops[start]:
            end += 1
        span = sum(widths[start:end + 1]) + len(GAP) * (end - start)
        widths[end] += max(0, len(tops[start]) - span)
    top_line = ""
    for i, width in enumerate(widths):
        top_line += (tops[i] if i in starts else "").ljust(width) + GAP
    text = [f"{line[0]:<{widths[0]}}{GAP}" + GAP.join(
        f"{value:>{width}}" for value, width in zip(line[1:], widths[1:], strict=True))
        for line in (names, *body)]
    lines = [top_line] * any(tops) + text
    return "\n".join(line.rstrip() for line in lines) + "\n"


def width_of(table: str) -> int:
    return max(map(len, table.splitlines()), default=0)


def wrapped(header: list[str], body: list[list[str]], width: int) -> str:
    """The aligned table, or, where it is wider than ``width`` characters, its columns in
    blocks that fit, one under the other with a blank line between, each led by the
    experiment column (as pandas prints a wide frame). A column too wide for ``width`` beside
    the experiment column gets a block of its own. ``width`` 0: one table, however wide."""

    def block(start: int, end: int) -> str:
        columns = [0, *range(start, end)]
        return render([header[i] for i in columns],
                      [[line[i] for i in columns] for line in body], "table")

    table = render(header, body, "table")
    if not width or width_of(table) <= width:
        return table
    blocks, start = [], 1
    while start < len(header):
        end = start + 1
        while end < len(header) and width_of(block(start, end + 1)) <= width:
            end += 1
        blocks.append(block(start, end))
        start = end
    return "\n".join(blocks)


def terminal_width() -> int:
    """The terminal's width in characters when printing to one; 0 (no limit) into a pipe or
    a file, so that scripts get one table."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else 0


def wider_than_the_terminal(table: str) -> str | None:
    """A hint for a table wider than the terminal it is printed on (none when not one)."""
    columns, width = terminal_width(), width_of(table)
    if not columns or width <= columns:
        return None
    return (f"the table is {width} characters wide, the terminal {columns}: --drop "
            "REGEX leaves out the columns it matches (e.g. --drop 'audit|backbone'), --format "
            "csv keeps them all")


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
    parser.add_argument("--drop", metavar="REGEX",
                        help="leave out the parameter and metric columns this matches "
                             "(e.g. 'audit|head.C'; as dvc exp show --drop)")
    parser.add_argument("--keep", metavar="REGEX",
                        help="keep the columns this matches, even where --drop matches them")
    parser.add_argument("--width", type=int, metavar="N",
                        help="wrap a wider table into blocks of columns at most N characters "
                             "wide, each led by the experiment column (default: the "
                             "terminal's width when printing to one; 0: one table)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("-A", "--all-commits", action="store_true",
                       help="the experiments of every commit, not only the last one's")
    which.add_argument("--rev", nargs="+", metavar="REV",
                       help="the experiments of these commits or branches")
    args = parser.parse_args(argv)
    if args.width is not None and args.width < 0:
        parser.error(f"--width: {args.width} is not a width; give a number of characters, or "
                     "0 for one table however wide")
    for option, pattern in (("--drop", args.drop), ("--keep", args.keep)):
        try:
            re.compile(pattern or "")
        except re.error as error:
            parser.error(f"{option}: '{pattern}' is not a regular expression: {error}")
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
    metrics = selected(metrics, args.drop, args.keep)
    params = selected(changed_params(rows), args.drop, args.keep)
    header, body = build_table(rows, metrics, star=args.format == "table", params=params)
    table = wrapped(header, body, terminal_width() if args.width is None else args.width) \
        if args.format == "table" else render(header, body, args.format)
    sys.stdout.write(table)
    hint = wider_than_the_terminal(table) if args.format == "table" else None
    if hint:
        log.info(hint)


if __name__ == "__main__":
    run_stage(main)
