"""Run ``infer.py`` and signal it when the refinement has done a given iteration.

``python tests/e2e/kill_at_iteration.py ITERATION [--signal=INT] infer.py [overrides ...]``:
a test-only wrapper, so that a crash lands at the same point of the refinement on any
machine. The process dies with SIGKILL (no handler run, as under ``kill -9``) as it
starts the progress pass of iteration ``ITERATION`` (set ``refine.eval_every=1``);
``--signal=INT`` sends SIGINT instead.
"""

import os
import runpy
import signal
import sys

from ptycho.refine import Refiner

kill_iteration = int(sys.argv[1])
sent = signal.SIGKILL
if sys.argv[2].startswith("--signal="):
    sent = getattr(signal, "SIG" + sys.argv.pop(2).split("=", 1)[1])
sys.argv = sys.argv[2:]
continue_record = Refiner._record


def _record(self, iteration, *args, **kwargs):
    if iteration == kill_iteration:
        os.kill(os.getpid(), sent)
    return continue_record(self, iteration, *args, **kwargs)


Refiner._record = _record
runpy.run_path(sys.argv[0], run_name="__main__")
