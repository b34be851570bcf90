"""Run ``train.py`` and signal it when training reaches a given optimizer step.

``python tests/e2e/kill_at_step.py STEP [--signal=INT] train.py [overrides ...]``: a
test-only wrapper, so that a crash (or a Ctrl-C) lands at the same point of training on
any machine (a timer would not). By default the process dies at the start of step
``STEP`` (0-based count of completed steps) with SIGKILL, no handler run, as under
``kill -9`` or an out-of-memory kill; ``--signal=INT`` sends SIGINT instead, as Ctrl-C
in its terminal would.
"""

import os
import runpy
import signal
import sys

from ptycho.monitor import TrainingMonitor

kill_step = int(sys.argv[1])
sent = signal.SIGKILL
if sys.argv[2].startswith("--signal="):
    sent = getattr(signal, "SIG" + sys.argv.pop(2).split("=", 1)[1])
sys.argv = sys.argv[2:]
continue_step = TrainingMonitor.on_train_batch_begin


def on_train_batch_begin(self, batch, logs=None):
    if int(self.model.optimizer.iterations.numpy()) == kill_step:
        os.kill(os.getpid(), sent)
    return continue_step(self, batch, logs)


TrainingMonitor.on_train_batch_begin = on_train_batch_begin
runpy.run_path(sys.argv[0], run_name="__main__")
