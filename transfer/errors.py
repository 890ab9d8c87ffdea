"""The one error type users see, and the wrapper that turns it into one line and an exit code."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


class PipelineError(Exception):
    """Bad input or configuration: the message alone tells the user what to fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main()``; a ``PipelineError`` becomes one ``error:`` line and exit code 1,
    and so does a full disk (outputs are written atomically: nothing half-written is left).

    Anything else is a bug in the pipeline and keeps its traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except PipelineError as err:
        log.debug("stage failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        log.debug("stage failed", exc_info=True)
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: no space left on the disk{where}; free space and run the stage again",
              file=sys.stderr)
        sys.exit(1)
