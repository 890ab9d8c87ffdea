"""DVC stage ``prepare``: decode, check and split the source images into the prepared store."""

from __future__ import annotations

import logging
import sqlite3

from transfer.artifacts import atomic_outputs, scratch_directory, write_json
from transfer.curation import read_curation
from transfer.data import prepare_store
from transfer.errors import PipelineError, counted, run_stage
from transfer.layout import DATA_REPORT, PARAMS, PREPARED_DIR
from transfer.params import load_params
from transfer.sources import check_source, list_source, source_root

log = logging.getLogger(__name__)


def main() -> None:
    params = load_params(PARAMS)
    data = params.data
    check_source(data.source)
    curation = read_curation(data.exclude, data.relabel)
    root = source_root(data.source)
    if root is not None:  # paths written from the repository, or absolute, too
        curation = curation.relative_to(root)
    try:
        # Generated sources (digits, torchvision) are written to a scratch folder beside the
        # store, where the next run removes it should this one be killed; the store and the
        # report appear together, or neither.
        with scratch_directory(PREPARED_DIR) as scratch, \
                list_source(data.source, scratch) as listing, \
                atomic_outputs(PREPARED_DIR, DATA_REPORT) as (store, report_file):
            report = prepare_store(listing, store, source=data.source,
                                   short_side=data.short_side, val_size=data.val_size,
                                   test_size=data.test_size, seed=params.seed,
                                   min_per_class=data.min_per_class,
                                   max_per_class=data.max_per_class, curation=curation)
            write_json(report_file, report)
    except sqlite3.OperationalError as err:  # the catalog's database ran out of room
        raise PipelineError(f"prepare's temporary catalog failed ({err}); it lives in $TMPDIR "
                            "(else /var/tmp): free space there or set TMPDIR to a larger "
                            "disk") from err
    for line in summarize(report):
        log.info("%s", line)
    for line in copies_left(report["curation"]) + not_applied(report["curation"]):
        log.warning("%s", line)
    missing = report["missing_from_split"]
    if missing.get("train"):
        log.warning("no training image for class %s: the model can never predict it; add "
                    "images or lower data.val_size/data.test_size", ", ".join(missing["train"]))
    for split, unseen in (("val", "the head's regularisation and temperature and the "
                                  "fine-tuned epoch kept are chosen without it"),
                          ("test", "evaluate cannot measure how well it is recognised")):
        if missing.get(split):
            log.warning("no %s image for class %s: %s", split, ", ".join(missing[split]), unseen)


def copies_left(curated: dict) -> list[str]:
    """Warnings for files a curation file named by their path whose exact copies (another
    path, the same pixels) it left as they were: only the picture's id reaches every copy."""
    lines = []
    for kind, effect in (("exclude", "stay in"),
                         ("relabel", "keep their label, so every copy is set aside as filed "
                                     "under two labels")):
        for left in curated[kind]["copies_left"]:
            copies = left["copies"]
            shown = ", ".join(copies[:3]) + (f" and {len(copies) - 3} more"
                                             if len(copies) > 3 else "")
            lines.append(f"{left['entry']}: '{left['path']}' has exact copies that {effect}: "
                         f"{shown}; to {kind} every copy, name the picture by its id, "
                         f"{left['id']}")
    return lines


def not_applied(curated: dict) -> list[str]:
    """Warnings for curation entries that changed nothing: those naming no image of the source
    (a typo, or rows for another data set) and relabels of excluded images."""
    lines = []
    for kind in ("exclude", "relabel"):
        missing = curated[kind].get("unmatched") or []
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            verb = "names" if len(missing) == 1 else "name"
            lines.append(f"{curated[kind]['file']}: {counted(len(missing), 'line')} {verb} no "
                         f"image of data.source (a typo, or rows for another data set?): "
                         f"{', '.join(missing[:3])}{more}")
    lines += [f"{named['entry']}: '{named['path']}' is excluded, so it is not relabelled"
              for named in curated["relabel"].get("of_excluded") or []]
    return lines


def summarize(report: dict) -> list[str]:
    """A few lines a person reads at the end of the stage; the details are in the report."""
    totals = ", ".join(f"{split} {n}" for split, n in report["totals"].items())
    total = counted(sum(report["totals"].values()), "image")
    lines = [f"{len(report['classes'])} classes, {total}: {totals}"]
    reasons: dict[str, int] = {}
    for item in report["skipped"]:
        reason = item["reason"].split(" (")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        lines.append("skipped: " + ", ".join(f"{r} ({n})" for r, n in sorted(reasons.items())))
    if report["duplicates"]:
        lines.append(f"{len(report['duplicates'])} exact duplicates kept once")
    if report["conflicts"]:
        lines.append(f"{counted(len(report['conflicts']), 'image')} under several labels excluded")
    if report["small_images"]["count"]:
        lines.append(f"{counted(report['small_images']['count'], 'image')} smaller than "
                     f"{report['small_images']['min_side_below']} px on a side")
    for kind, done in (("exclude", "excluded"), ("relabel", "relabelled")):
        changes = report["curation"][kind]
        if changes["entries"]:
            lines.append(f"{changes['file']}: {counted(len(changes[done]), 'image')} {done}")
    if report["left_out_by_max_per_class"]:
        lines.append(f"{counted(report['left_out_by_max_per_class'], 'image')} left out by "
                     "data.max_per_class")
    lines.append(f"details: {DATA_REPORT}")
    return lines


if __name__ == "__main__":
    run_stage(main)
