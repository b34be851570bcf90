"""Running an app function from an entry point: one clear line on failure, exit codes.

Exit code 2: a configuration problem (:class:`ptycho.config.ConfigError`); 1: a failure
while running. The full traceback is printed only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import logging
import os
import sys

from ptycho.config import ConfigError

__all__ = ["run_job"]

log = logging.getLogger("ptycho")


def run_job(function, *args):
    """Call ``function(*args)``; turn failures into one line on stderr and an exit code."""
    try:
        return function(*args)
    except ConfigError as error:
        _fail(error, 2)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001 - reported as one line, code 1
        _fail(error, 1)


def _fail(error: Exception, code: int) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    message = f"error: {error}"
    log.error(message)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)
