"""Keeping TensorFlow's native start-up notices off the terminal.

TensorFlow's C++ runtime writes a few notices to file descriptor 2 while it loads and
when it first looks for devices: the absl "log messages before InitializeLog" warning,
the oneDNN notice, the CUDA stub and ``failed call to cuInit`` on machines without a
GPU, and the CPU-feature notice. They are written before absl's logging is set up, so
``TF_CPP_MIN_LOG_LEVEL`` does not silence them (measured with TF 2.21), and the
``E0000 ... cuInit`` line reads like a failure. :func:`native_notices_filtered`
captures descriptor 2 while such code runs and writes back every line that is not one
of those known notices: anything else (a real error) still reaches the terminal. Set
``PTYCHO_VERBOSE=1`` (the entry points do for ``verbose=true``) to see everything.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

__all__ = ["NOTICES", "is_notice", "native_notices_filtered"]

NOTICES = tuple(
    re.compile(pattern)
    for pattern in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
        r"STDERR$",
        r"^I\d{4} .* port\.cc:\d+\] oneDNN custom operations are on",
        r"^I\d{4} .* cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
        r"^I\d{4} .* cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
        r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate "
        r"compiler flags\.$",
        r"^E\d{4} .* cuda_platform\.cc:\d+\] failed call to cuInit: .*(UNKNOWN ERROR \(303\)|"
        r"CUDA_ERROR_NO_DEVICE)",
    )
)


def is_notice(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's known start-up notices."""
    return any(pattern.search(line.rstrip("\n")) for pattern in NOTICES)


@contextlib.contextmanager
def native_notices_filtered():
    """Capture file descriptor 2 while inside; on leaving, write back every captured
    line except TensorFlow's known start-up notices (all of them with
    ``PTYCHO_VERBOSE=1``)."""
    if os.environ.get("PTYCHO_VERBOSE") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (embedded interpreters): nothing to do
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not is_notice(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
