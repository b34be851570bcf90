"""Run ``train.py`` (or ``infer.py``) and signal it at a given point of its work.

``python tests/e2e/kill_at_step.py STEP [--signal=INT] [--refinement] SCRIPT [overrides
...]``: a test-only wrapper, so that a crash (or a Ctrl-C) lands at the same point on
any machine (a timer would not). By default the process dies at the start of training
step ``STEP`` (0-based count of completed steps) with SIGKILL, no handler run, as under
``kill -9`` or an out-of-memory kill; ``--refinement`` counts refinement iterations
instead: the process dies as it starts the progress pass after iteration ``STEP`` (set
``refine.eval_every=1``). ``--signal=INT`` sends SIGINT instead, as Ctrl-C in its
terminal would.
"""

import os
import runpy
import signal
import sys

from ptycho.monitor import TrainingMonitor
from ptycho.refine import Refiner

kill_step = int(sys.argv[1])
sent, refinement = signal.SIGKILL, False
while sys.argv[2].startswith("--"):
    option = sys.argv.pop(2)
    if option.startswith("--signal="):
        sent = getattr(signal, "SIG" + option.split("=", 1)[1])
    else:
        refinement = option == "--refinement"
sys.argv = sys.argv[2:]
continue_step = TrainingMonitor.on_train_batch_begin
continue_record = Refiner._record


def on_train_batch_begin(self, batch, logs=None):
    if int(self.model.optimizer.iterations.numpy()) == kill_step:
        os.kill(os.getpid(), sent)
    return continue_step(self, batch, logs)


def _record(self, iteration, *args, **kwargs):
    if iteration == kill_step:
        os.kill(os.getpid(), sent)
    return continue_record(self, iteration, *args, **kwargs)


if refinement:
    Refiner._record = _record
else:
    TrainingMonitor.on_train_batch_begin = on_train_batch_begin
runpy.run_path(sys.argv[0], run_name="__main__")
