"""The training monitor: progress, TensorBoard, evaluations, checkpoints, stops."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from ptycho import checkpoints
from ptycho.progress import Progress

__all__ = ["TrainingMonitor", "stop_on_interrupt"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_interrupt(monitor):
    """While inside, the first Ctrl-C asks ``monitor`` (a :class:`TrainingMonitor`, a
    :class:`ptycho.refine.Refiner`: anything with ``request_stop()``) to stop after the
    current step.

    A KeyboardInterrupt raised in the middle of a TensorFlow call can leave the runtime
    in a state that crashes the interpreter at exit; a flag checked between steps does
    not. A second Ctrl-C interrupts at once. Outside the main thread (a launcher's
    worker) signals cannot be handled and nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first_interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("Ctrl-C: stopping after the current step (press again to stop at once)")
        monitor.request_stop()

    previous = signal.signal(signal.SIGINT, first_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class TrainingMonitor(keras.callbacks.Callback):
    """Everything that happens between epochs.

    Per step: the loss (every ``log_every_steps``), a NaN check that stops training at
    once, and a stop requested by :meth:`request_stop` (Ctrl-C, see
    :func:`stop_on_interrupt`): training ends after the current step (on every worker of
    a multi-worker run, ``agree_every_step``: a stop on one is agreed after each step),
    and an epoch cut short is neither checkpointed nor counted. Per epoch: loss,
    learning rate and samples/s to TensorBoard and the log; a checkpoint
    (:func:`ptycho.checkpoints.save`);
    every ``eval_every`` epochs, and after the epoch that crosses each of ``eval_minutes``
    (wall minutes since training began: quality against time), ``evaluate(model, step)``
    (which reconstructs, scores and logs the test scan, and returns the reconstruction).
    ``max_minutes`` stops training after the epoch that crosses it. The epoch training
    stops after is not evaluated here: the run evaluates its final model itself, the
    same way.
    """

    def __init__(
        self,
        *,
        checkpoint_dir: Path,
        writer,
        evaluate: Callable | None,
        epochs: int,
        samples_per_epoch: int,
        eval_every: int = 5,
        log_every_steps: int = 10,
        max_minutes: float | None = None,
        eval_minutes: tuple[float, ...] = (),
        history: list | None = None,
        stream=None,
        agree=None,
        agree_every_step: bool = False,
    ):
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.writer = writer
        self.evaluate = evaluate
        self.epochs = epochs
        self.samples_per_epoch = samples_per_epoch
        self.eval_every = eval_every if evaluate is not None else 0
        self.log_every_steps = max(1, log_every_steps)
        self.max_minutes = max_minutes
        self.eval_minutes = sorted(eval_minutes) if evaluate is not None else []
        # Workers of a multi-worker run must stop at the same epoch: a stop decided on
        # one (its clock) is made common (Distribution.agree); one process: as is.
        self.agree = agree or (lambda flag: flag)
        # ... and a Ctrl-C on one worker stops every worker after the same step.
        self.agree_every_step = agree_every_step
        self.nan_at: tuple[int, int] | None = None
        self.stop_requested = False
        self.cut_short = False  # the stop came in the middle of an epoch
        self.history: list[dict] = list(history or [])
        self._epoch = 0
        self._start = time.perf_counter()
        # A bar on a terminal; in logs, CI and batch jobs the epoch lines are the progress.
        self.progress_stream = sys.stdout if stream is None else stream
        self._progress: Progress | None = None
        self._drawn_at = 0.0

    # ---------------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()
        self._first_step = int(self.model.optimizer.iterations.numpy())
        steps = self.params.get("steps") or 1
        self._progress = Progress(
            self.epochs * steps,
            "train",
            stream=self.progress_stream,
            lines=False,
            initial=self._first_step,
        )

    def on_train_end(self, logs=None):
        if self._progress is not None:
            self._progress.close()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = time.perf_counter()

    def request_stop(self) -> None:
        """Stop training at the next step boundary (safe to call from a signal handler)."""
        self.stop_requested = True

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        step = int(self.model.optimizer.iterations.numpy())
        if not math.isfinite(loss):
            self.nan_at = (self._epoch + 1, batch + 1)
            self.model.stop_training = True
            return
        if self.agree_every_step and self.agree(self.stop_requested) and not self.stop_requested:
            log.warning("another worker was interrupted: stopping after this step")
            self.stop_requested = True
        if self.stop_requested:
            self.cut_short = batch + 1 < self.params.get("steps", batch + 1)
            self.model.stop_training = True
        if step % self.log_every_steps == 0:
            with self.writer.as_default(step=step):
                tf.summary.scalar("train/loss_step", loss)
        self._draw_progress(step)

    def _draw_progress(self, step: int) -> None:
        """Redraw the terminal bar (at most five times a second)."""
        now = time.perf_counter()
        if self._progress is None or not self._progress.tty or now - self._drawn_at < 0.2:
            return
        self._drawn_at = now
        steps = self.params.get("steps") or 1
        batch = self.samples_per_epoch / steps
        rate = (step - self._first_step) * batch / max(now - self._start, 1e-9)
        self._progress.update(
            step,
            f"epoch {self._epoch + 1}/{self.epochs}  step {step}  {rate:.0f} samples/s",
        )

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_at is not None:
            return  # keep the last good checkpoint; the app reports the failure
        if self.cut_short:
            return  # an epoch cut short by a stop is not a completed epoch
        record = self._epoch_record(epoch + 1, logs)
        stopping = self._stop_if_done(epoch + 1, record["minutes"])
        if self._evaluation_due(epoch + 1, record["minutes"]) and not stopping:
            record.update(self.evaluate(self.model, step=epoch + 1).metrics)
        self.history.append(record)
        checkpoints.save(self.model, self.checkpoint_dir, epoch + 1, self.history)
        self._log_epoch(record)
        if self.stop_requested:  # Ctrl-C during this epoch's evaluation or checkpoint
            self.model.stop_training = True

    def _epoch_record(self, epoch: int, logs) -> dict:
        """Loss, learning rate, speed and clock of a completed epoch, also to TensorBoard."""
        seconds = time.perf_counter() - self._epoch_start
        step = int(self.model.optimizer.iterations.numpy())
        record = {
            "epoch": epoch,
            "steps": step,
            "minutes": (time.perf_counter() - self._start) / 60,
            "loss": float(dict(logs or {}).get("loss", math.nan)),
            "learning_rate": self._learning_rate(step),
            "samples_per_s": self.samples_per_epoch / seconds if seconds > 0 else math.nan,
        }
        with self.writer.as_default(step=epoch):
            tf.summary.scalar("train/loss", record["loss"])
            tf.summary.scalar("train/learning_rate", record["learning_rate"])
            tf.summary.scalar("train/samples_per_s", record["samples_per_s"])
        return record

    def _evaluation_due(self, epoch: int, minutes: float) -> bool:
        """Every ``eval_every`` epochs, and after the epoch that crosses each of
        ``eval_minutes``."""
        crossed = False
        while self.eval_minutes and minutes >= self.eval_minutes[0]:
            self.eval_minutes.pop(0)
            crossed = True
        return crossed or (bool(self.eval_every) and epoch % self.eval_every == 0)

    def _log_epoch(self, record: dict) -> None:
        if self._progress is not None:
            self._progress.clear()
        extra = "".join(
            f"  {key} {record[key]:.4g}"
            for key in ("r_factor", "amp_ssim", "phase_ssim", "amp_psnr")
            if key in record
        )
        log.info(
            "epoch %d/%d  loss %.5g  lr %.3g  %.0f samples/s%s",
            record["epoch"],
            self.epochs,
            record["loss"],
            record["learning_rate"],
            record["samples_per_s"],
            extra,
        )

    def _stop_if_done(self, epoch: int, minutes: float) -> bool:
        """Whether training stops after this epoch (every worker asks, every epoch)."""
        late = self.max_minutes is not None and minutes >= self.max_minutes
        stop = self.agree(self.stop_requested or late)
        if stop and epoch != self.epochs and not self.stop_requested:
            why = f"{minutes:.1f} min >= train.max_minutes" if late else "another worker stops"
            log.info("stopping after epoch %d: %s", epoch, why)
        if stop:
            self.model.stop_training = True
        return stop or epoch == self.epochs

    def _learning_rate(self, step: int) -> float:
        rate = self.model.optimizer.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(step)
        return float(keras.ops.convert_to_numpy(rate))
