"""From the audit's findings to lines of the curation files: what ``python -m stages.curate``
suggests, and appends where asked.

Each suggestion names an image by its id (which survives renames and moves, and names every
exact copy), with its path and the reason in a comment, so ``git diff`` of the curation file
reads as a review. Nothing here decides for the user: the lines are appended to the files
``prepare`` applies, where they can be edited or deleted before ``dvc repro``.

- ``leaks``: of each near-duplicate pair in different splits, the copy in the later split
  (train, then val, then test), so that training keeps its images and the scores are measured
  on pictures the model has not seen.
- ``labels``: each likely mislabelled image, relabelled as the audit suggests.
- ``outliers``: each image farther from the training images than the unfamiliar distance.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transfer.artifacts import atomic_output, read_json, read_utf8
from transfer.curation import RELABEL_HEADER, Entry, read_exclude, read_relabel, relative_to
from transfer.errors import PipelineError, counted, one_line

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Suggestion:
    """One image to exclude (``label`` empty) or to file under ``label``, and why."""

    image: str
    path: str
    why: str
    label: str = ""
    split: str = ""  # where the audit found it, where the kind says


def leaks(report: dict) -> list[Suggestion]:
    """The later-split copy of every near-duplicate pair listed across splits, once each."""
    found: dict[str, Suggestion] = {}
    for pair in report["near_duplicates"]:
        splits = pair["splits"]
        if splits[0] == splits[1]:
            continue
        later = int(SPLIT_ORDER[splits[1]] > SPLIT_ORDER[splits[0]])
        kept = 1 - later
        paths = (pair["a"], pair["b"])
        labels = "" if pair["labels"][0] == pair["labels"][1] else \
            f", labelled '{pair['labels'][later]}' against '{pair['labels'][kept]}'"
        why = (f"{splits[later]} copy of {paths[kept]} ({splits[kept]}), similarity "
               f"{pair['similarity']}{labels}")
        found.setdefault(pair["ids"][later], Suggestion(pair["ids"][later], paths[later], why))
    return list(found.values())


def label_fixes(report: dict) -> list[Suggestion]:
    """Every likely mislabelled image the report lists, with the label it suggests."""
    return [Suggestion(issue["id"], issue["path"],
                       f"{issue['split']}, labelled '{issue['given']}', likely "
                       f"'{issue['suggested']}' (score {issue['score']})", issue["suggested"],
                       issue["split"])
            for issue in report["label_issues"]]


def far_outliers(report: dict) -> list[Suggestion]:
    """The outliers farther than the distance that makes a new image unfamiliar: the first
    ``counts.unfamiliar`` of the list, which is ranked farthest first (counted on the exact
    distances, which the listed scores round)."""
    limit = report["settings"]["unfamiliar_distance"]
    return [Suggestion(o["id"], o["path"], f"{o['split']}, '{o['label']}', distance "
                                            f"{o['score']} (unfamiliar beyond {limit})")
            for o in report["outliers"][:report["counts"]["unfamiliar"]]]


@dataclass(frozen=True)
class Kind:
    """What one kind of finding becomes: the suggestions, and the file they go to."""

    find: Callable[[dict], list[Suggestion]]
    relabel: bool
    listed_as: str  # the key of the findings' list it reads


KINDS = {
    "leaks": Kind(leaks, False, "near_duplicates"),
    "labels": Kind(label_fixes, True, "label_issues"),
    "outliers": Kind(far_outliers, False, "outliers"),
}


def read_report(path: Path, kind: str) -> dict:
    """The audit's findings (``data/audit_findings.json``; ``reports/audit.json`` has the same
    form), checked for what ``kind`` reads; else one line saying why."""
    if not path.exists():
        raise PipelineError(f"{path}: missing; the audit stage writes it (dvc repro audit), "
                            "or fetch it from the team's remote (dvc pull audit)")
    report = read_json(path)
    if not isinstance(report, dict):
        raise PipelineError(f"{path}: not an audit report this version reads (a "
                            f"{type(report).__name__}, not an object); run dvc repro to write "
                            "it again")
    try:
        counts, settings = report["counts"], report["settings"]
        listed = KINDS[kind].listed_as
        if not isinstance(report[listed], list) or not isinstance(counts, dict) or \
                not isinstance(settings, dict):
            raise TypeError(listed)
        if kind == "outliers" and not (isinstance(counts["unfamiliar"], int)
                                       and counts["unfamiliar"] >= 0):
            raise TypeError("unfamiliar count")
    except (KeyError, TypeError) as err:
        raise PipelineError(f"{path}: not an audit report this version reads (no {err}); "
                            "run dvc repro to write it again") from err
    if kind == "labels" and counts.get("label_issues") is None:
        raise PipelineError(f"{path}: the audit did not search for label issues "
                            f"({settings.get('label_issues_not_searched')}), so there is "
                            "nothing to suggest")
    return report


def decided(entries: list[Entry], suggestion: Suggestion) -> bool:
    """Whether a curation file already names the suggestion's image, by id or path."""
    return any(e.image in (suggestion.image, suggestion.path) for e in entries)


def new_text(existing: str, suggestions: list[Suggestion], relabel: bool) -> str:
    """The lines to append to a curation file whose text is ``existing``: a comment and a
    row for each suggestion (the relabel header first where the file has none)."""
    out = io.StringIO()
    if existing and not existing.endswith("\n"):
        out.write("\n")
    writer = csv.writer(out, lineterminator="\n")
    if relabel and not any(line.strip() and not line.lstrip().startswith("#")
                           for line in existing.splitlines()):
        writer.writerow(RELABEL_HEADER)
    for s in suggestions:
        why = one_line(f"{s.path}: {s.why}")
        if relabel:
            out.write(f"# {why}\n")
            writer.writerow([s.image, s.label])
        else:
            out.write(f"{s.image}  # {why}\n")
    return out.getvalue()


def suggested(path: Path, kind: str) -> list[Suggestion]:
    """Every suggestion of ``kind`` in the audit's findings at ``path``, strongest first; a
    file with entries this version does not write (edited by hand, or from another version)
    is one line saying so."""
    report = read_report(path, kind)
    spec = KINDS[kind]
    try:
        found = spec.find(report)
        for s in found:
            if not all(isinstance(v, str) for v in (s.image, s.path, s.label)):
                raise TypeError(f"{s.image!r} is not an image id and path")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise PipelineError(f"{path}: an entry of '{spec.listed_as}' is not one this version "
                            f"writes ({type(err).__name__}: {err}); run dvc repro audit to "
                            "write it again") from err
    return found


def plan(found: list[Suggestion], kind: str, file: Path, top: int | None,
         root: str | None) -> tuple[list[Suggestion], int]:
    """The suggestions ``found`` not yet in ``file`` (at most ``top``), and how many were; a
    path the file writes from the repository or absolute is read against the source's
    ``root``, as ``prepare`` reads it."""
    spec = KINDS[kind]
    entries = (read_relabel if spec.relabel else read_exclude)(file)
    if root is not None:
        entries = [relative_to(e, root) for e in entries]
    fresh = [s for s in found if not decided(entries, s)]
    return fresh[:top], len(found) - len(fresh)


def current_text(file: Path) -> str:
    """What a curation file holds now: nothing where it does not exist yet."""
    try:
        return read_utf8(file)
    except FileNotFoundError:
        return ""


def append(file: Path, suggestions: list[Suggestion], relabel: bool) -> None:
    """Append the suggestions' lines to ``file`` (created where missing), all or nothing."""
    existing = current_text(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(file) as tmp:
        tmp.write_text(existing + new_text(existing, suggestions, relabel), encoding="utf-8")


def summary(kind: str, file: Path, added: int, already: int, applied: bool) -> str:
    verb = "appended to" if applied else "to append to"
    there = f"; {already} already named there" if already else ""
    return f"{counted(added, 'image')} {verb} {file} ({kind}){there}"
