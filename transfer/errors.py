"""The one error type users see, and the wrapper that turns it into one line and an exit code."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import unicodedata
from collections.abc import Callable
from typing import NoReturn

log = logging.getLogger(__name__)

# Unicode categories that break a line or cannot be shown: control characters (newline, tab,
# escape, DEL, NEL ...), line and paragraph separators, and the lone surrogates Python uses for
# file-name bytes that are not UTF-8.
UNPRINTABLE_CATEGORIES = ("Cc", "Zl", "Zp", "Cs")
# The exit status of a process stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130
# ... and of one whose output's reader went away (128 + SIGPIPE), as for `yes | head`.
BROKEN_PIPE_EXIT_CODE = 141


class PipelineError(Exception):
    """Bad input or configuration: the message alone tells the user what to fix."""

    exit_code = 1


class ParamsError(PipelineError):
    """``params.yaml`` is malformed, has an unknown key, or a value out of range."""


# Said after a ParamsError in an experiment DVC runs in the workspace: after a failed run,
# DVC leaves the values `-S` set in params.yaml, and the next `dvc exp run -S` (of another
# key) fails on them again; Git may not even show the file as changed (docs/experiments.md).
# The `touch` is in both commands: without it Git may trust its index, see no change, and
# `git checkout` puts back nothing.
AFTER_A_FAILED_EXPERIMENT = ("; a value `dvc exp run -S` set stays in params.yaml after a "
                             "failed run (`touch params.yaml && git diff params.yaml` shows it; "
                             "`touch params.yaml && git checkout params.yaml` puts back the "
                             "committed file, without any edit of yours)")


class UsageError(PipelineError):
    """A command-line argument that is missing or not valid."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse``, except that a bad argument is one ``error:`` line (exit code 2, as
    argparse's own), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries add hints and context below it),
    or the name of its type when it has none."""
    return (str(err).splitlines() or [type(err).__name__])[0]


def unprintable(text: str) -> list[str]:
    """The characters of ``text`` that would break its line or cannot be shown, in order."""
    return [c for c in text if unicodedata.category(c) in UNPRINTABLE_CATEGORIES]


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1: "1 image", "3 images"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def one_line(text: str) -> str:
    """``text`` with every unprintable character written as its escape (``\\n``, ``\\udcff``)."""
    bad = set(unprintable(text))
    return "".join(c.encode("unicode_escape").decode("ascii") if c in bad else c
                   for c in text) if bad else text


def without_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (Python's stand-in for a byte of a file name that is
    not UTF-8) written as its escape, ``\\udce9``: the rest as it is, and all of it
    writable as UTF-8; inside a JSON string the escape reads back as the same character."""
    return "".join(f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c for c in text) \
        if any("\ud800" <= c <= "\udfff" for c in text) else text


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's or command's ``main()``; bad input ends as one ``error:`` line on stderr
    and a non-zero exit code, without a traceback.

    - ``PipelineError``: its message, exit code 1 (2 for a bad command-line argument).
    - A full disk: the file being written, exit code 1.
    - The reader of standard output gone (``predict ... | head``): silence, exit code 141, as
      command-line tools stop.
    - Ctrl-C (``KeyboardInterrupt``): "interrupted; nothing was written", exit code 130.
      Outputs are written to temporaries and renamed into place together at the end, so an
      interrupt leaves the previous outputs as they were (one that comes during the renames
      waits for them, and says so).

    Anything else is a bug in the pipeline and keeps its traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except PipelineError as err:
        hint = AFTER_A_FAILED_EXPERIMENT if isinstance(err, ParamsError) and \
            _in_a_workspace_experiment() else ""
        _fail(str(err) + hint + _outputs_dvc_deleted(), err.exit_code)
    except KeyboardInterrupt as err:
        # An interrupt held back while outputs were renamed into place says so in its message.
        _fail(str(err) or "interrupted; nothing was written", INTERRUPTED_EXIT_CODE, prefix="")
    except BrokenPipeError:
        # Nothing more can be written there; point standard output at nothing so that the
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(BROKEN_PIPE_EXIT_CODE)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        _fail(f"no space left on the disk{where}; free space and run it again", 1)


def _in_a_workspace_experiment() -> bool:
    """Whether DVC runs this stage for `dvc exp run` in the workspace itself (DVC names the
    experiment in ``DVC_EXP_NAME``); a queued experiment runs in a temporary copy, whose
    params.yaml is thrown away."""
    return bool(os.environ.get("DVC_EXP_NAME")) and _run_by_dvc_in_the_workspace()


def _run_by_dvc_in_the_workspace() -> bool:
    root = os.environ.get("DVC_ROOT")
    if not root:
        return False
    try:
        return os.path.samefile(root, os.getcwd())
    except OSError:
        return False


def _outputs_dvc_deleted() -> str:
    """The way back to the outputs DVC deleted before running the stage that failed (DVC
    names it in ``DVC_STAGE``): `dvc repro` removes a stage's outputs before its command runs,
    so a stage stopped by bad input leaves none, not the previous ones (the stages themselves
    write nothing until they succeed). Only outputs ``dvc.lock`` records (those a run made,
    which `dvc checkout` can bring back) and that are gone now are named; nothing is said
    outside DVC, in a queued experiment's copy, or when nothing of the kind is missing."""
    stage = os.environ.get("DVC_STAGE")
    if not stage or not _run_by_dvc_in_the_workspace():
        return ""
    import yaml

    try:
        with open("dvc.lock", encoding="utf-8") as f:
            recorded = [out["path"] for out in yaml.safe_load(f)["stages"][stage]["outs"]]
        with open("dvc.yaml", encoding="utf-8") as f:
            spec = yaml.safe_load(f)["stages"][stage]
        uncached = {path for kind in ("outs", "metrics", "plots")
                    for entry in spec.get(kind) or [] if isinstance(entry, dict)
                    for path, options in entry.items()
                    if isinstance(options, dict) and options.get("cache") is False}
        gone = [path for path in recorded if not os.path.lexists(path)]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return ""
    cached = [path for path in gone if path not in uncached]
    in_git = [path for path in gone if path in uncached]
    ways = ([f"`dvc checkout {stage}` brings back {', '.join(cached)}"] if cached else []) + \
        ([f"`git checkout -- {' '.join(in_git)}` the files Git keeps"] if in_git else [])
    return f"; DVC deleted this stage's outputs before it ran: {' and '.join(ways)}" \
        if ways else ""


def _fail(message: str, code: int, prefix: str = "error: ") -> NoReturn:
    log.debug("stopped", exc_info=True)
    print(f"{prefix}{one_line(message)}", file=sys.stderr)
    sys.exit(code)
