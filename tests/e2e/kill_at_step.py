"""Run ``train.py`` and SIGKILL it when training reaches a given optimizer step.

``python tests/e2e/kill_at_step.py STEP train.py [overrides ...]``: a test-only wrapper, so
that a crash lands at the same point of training on any machine (a timer would not).
The process dies at the start of step ``STEP`` (0-based count of completed steps), with
no handler run, as under ``kill -9`` or an out-of-memory kill.
"""

import os
import runpy
import signal
import sys

from ptycho.monitor import TrainingMonitor

kill_step = int(sys.argv[1])
sys.argv = sys.argv[2:]
continue_step = TrainingMonitor.on_train_batch_begin


def on_train_batch_begin(self, batch, logs=None):
    if int(self.model.optimizer.iterations.numpy()) == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return continue_step(self, batch, logs)


TrainingMonitor.on_train_batch_begin = on_train_batch_begin
runpy.run_path(sys.argv[0], run_name="__main__")
