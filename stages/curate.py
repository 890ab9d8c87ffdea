"""Turn the audit's findings into lines of the curation files (not a DVC stage).

    python -m stages.curate leaks              # print what it would append to data.exclude
    python -m stages.curate leaks --apply      # append it; review with git diff, then dvc repro
    python -m stages.curate labels --apply     # likely mislabelled images, to data.relabel
    python -m stages.curate outliers --top 5   # the 5 farthest beyond the unfamiliar distance

Reads ``data/audit_findings.json``, every finding of the last audit (``reports/audit.json``
lists ``audit.max_listed`` of each); each line names an image by its id, with its path and the
reason in a comment. Images the file already names (by id or path) are left out, so running it
again adds nothing. The files are those ``params.yaml`` names (``data.exclude``, ``data.relabel``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transfer.errors import ArgumentParser, counted, run_stage
from transfer.layout import AUDIT_FINDINGS, PARAMS
from transfer.params import load_params
from transfer.sources import source_root
from transfer.suggestions import (
    KINDS,
    append,
    current_text,
    new_text,
    plan,
    suggested,
    summary,
)

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stages.curate",
                            description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=list(KINDS),
                        help="leaks: the later-split copy of each near-duplicate pair across "
                             "splits (to data.exclude); labels: likely mislabelled images "
                             "(to data.relabel); outliers: images beyond the unfamiliar "
                             "distance (to data.exclude)")
    parser.add_argument("--apply", action="store_true",
                        help="append the lines to the file instead of printing them")
    parser.add_argument("--top", type=int, metavar="N",
                        help="at most N suggestions (the audit's order: strongest first)")
    args = parser.parse_args(argv)
    if args.top is not None and args.top < 1:
        parser.error("--top must be 1 or more")
    data = load_params(PARAMS).data
    spec = KINDS[args.kind]
    file = Path(data.relabel if spec.relabel else data.exclude)
    found = suggested(AUDIT_FINDINGS, args.kind)
    suggestions, already = plan(found, args.kind, file, args.top, source_root(data.source))
    if suggestions and args.apply:
        append(file, suggestions, spec.relabel)
    elif suggestions:
        sys.stdout.write(new_text(current_text(file), suggestions, spec.relabel).lstrip("\n"))
    log.info("%s", summary(args.kind, file, len(suggestions), already, args.apply))
    tests = sum(s.split == "test" for s in suggestions if s.label)
    if tests:
        log.warning("%s: the suggested label is the probe's own answer, so a wrong one "
                    "makes the test score look better than it is; look at each before "
                    "keeping its line", counted(tests, "test image"))
    if args.apply and suggestions:
        log.info("review with git diff %s, then dvc repro", file)


if __name__ == "__main__":
    run_stage(main)
