"""The training monitor: progress lines, TensorBoard, evaluation, checkpoints, NaN stop."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ptycho import figures
from ptycho.inference import Evaluation, make_predict_fn
from ptycho.outputs import save_model, write_json
from ptycho.progress import Progress
from ptycho.stitch import illumination

__all__ = ["TrainingMonitor", "stop_on_interrupt"]

log = logging.getLogger(__name__)

CHECKPOINT = "last.keras"
STATE = "state.json"


@contextlib.contextmanager
def stop_on_interrupt(monitor: TrainingMonitor):
    """While inside, the first Ctrl-C asks ``monitor`` to stop after the current step.

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
    :func:`stop_on_interrupt`): training ends after the current step, and an epoch cut
    short is neither checkpointed nor counted. Per epoch: loss, learning rate and
    samples/s to TensorBoard and the log; a checkpoint (``checkpoints/last.keras`` and
    ``state.json``, written atomically); every ``eval_every`` epochs, the test scan is
    reconstructed and its metrics and images logged, and after the epoch that crosses
    each of ``eval_minutes`` (wall minutes since training began: quality against time).
    ``max_minutes`` stops training after the epoch that crosses it.
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        evaluation: Evaluation,
        epochs: int,
        samples_per_epoch: int,
        eval_every: int = 5,
        log_every_steps: int = 10,
        max_minutes: float | None = None,
        eval_minutes: tuple[float, ...] = (),
        log_probe: bool = False,
        stream=None,
        agree=None,
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.evaluation = evaluation
        self.epochs = epochs
        self.samples_per_epoch = samples_per_epoch
        self.eval_every = eval_every
        self.log_every_steps = max(1, log_every_steps)
        self.max_minutes = max_minutes
        self.eval_minutes = sorted(eval_minutes)
        self.log_probe = log_probe
        # Workers of a multi-worker run must stop at the same epoch: a stop decided on
        # one (its clock) is made common (Distribution.agree); one process: as is.
        self.agree = agree or (lambda flag: flag)
        self.writer = tf.summary.create_file_writer(str(self.run_dir / "tb"))
        self.nan_at: tuple[int, int] | None = None
        self.stop_requested = False
        self.cut_short = False  # the stop came in the middle of an epoch
        self.last_metrics: dict = {}
        self.history: list[dict] = []
        self._predict = None
        self._epoch = 0
        self._start = time.perf_counter()
        # A bar on a terminal; in logs, CI and batch jobs the epoch lines are the progress.
        self.progress_stream = sys.stdout if stream is None else stream
        self._progress: Progress | None = None
        self._drawn_at = 0.0
        self._truth_logged = False

    # ---------------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()
        self._predict = make_predict_fn(self.model, self.evaluation.compile_mode)
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
        if self._evaluation_due(epoch + 1, record["minutes"]):
            record.update(self.evaluate(epoch + 1))
        self.history.append(record)
        self._save_checkpoint(epoch + 1)
        self._log_epoch(record)
        self._stop_if_done(epoch + 1, record["minutes"])

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
        ``eval_minutes``; never after the last epoch (the app evaluates the result)."""
        crossed = False
        while self.eval_minutes and minutes >= self.eval_minutes[0]:
            self.eval_minutes.pop(0)
            crossed = True
        periodic = bool(self.eval_every) and epoch % self.eval_every == 0
        return (periodic or crossed) and epoch != self.epochs

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

    def _stop_if_done(self, epoch: int, minutes: float) -> None:
        late = self.max_minutes is not None and minutes >= self.max_minutes
        stop = self.agree(self.stop_requested or late)  # every worker asks, every epoch
        if self.stop_requested:  # requested during this epoch's evaluation or checkpoint
            self.model.stop_training = True
        elif stop and epoch != self.epochs:
            why = f"{minutes:.1f} min >= train.max_minutes" if late else "another worker stops"
            log.info("stopping after epoch %d: %s", epoch, why)
            self.model.stop_training = True

    # ---------------------------------------------------------------------------------

    def evaluate(self, epoch: int) -> dict:
        """Reconstruct the test scan; log metrics and images at ``epoch``; return them."""
        result, values = self.evaluation(self.model, predict_fn=self._predict)
        self.last_metrics = values
        with self.writer.as_default(step=epoch):
            for key, value in values.items():
                if math.isfinite(value):
                    tf.summary.scalar(f"test/{key}", value)
            for tag, image in self._images(result).items():
                tf.summary.image(tag, image)
            if self.log_probe:
                probe = self.model.get_layer("illumination").probe.numpy()
                tf.summary.image("probe/amplitude", figures.grey_image(np.abs(probe)))
                tf.summary.image("probe/phase", figures.grey_image(np.angle(probe)))
        self.writer.flush()
        return values

    def _images(self, result) -> dict:
        """TensorBoard images of an evaluation: the reconstruction; with ground truth the
        truth (first time only), the errors on a symmetric scale and the FRC curves;
        without, the illumination coverage and measured / predicted patterns."""
        scan = self.evaluation.scan
        images = {
            "test/amplitude": figures.grey_image(np.abs(result.obj), result.mask),
            "test/phase": figures.grey_image(np.angle(result.obj), result.mask),
        }
        if scan.object is None:
            coverage = illumination(scan.xcoords, scan.ycoords, scan.probe, result.obj.shape)
            images["test/coverage"] = figures.grey_image(coverage)
            if result.diffraction_pairs:
                images["test/diffraction"] = figures.diffraction_image(result.diffraction_pairs)
            return images
        comparison = figures.compare_scan(
            scan,
            result.obj,
            register=self.evaluation.register,
            remove_phase_ramp=self.evaluation.remove_phase_ramp,
        )
        if not self._truth_logged:
            images["test/amplitude_truth"] = figures.grey_image(comparison["amplitude_truth"])
            images["test/phase_truth"] = figures.grey_image(comparison["phase_truth"])
            self._truth_logged = True
        images["test/amplitude_error"] = figures.diverging_image(comparison["amplitude_error"])
        images["test/phase_error"] = figures.diverging_image(comparison["phase_error"])
        images["test/frc"] = figures.frc_image(comparison["frc"])
        return images

    def _learning_rate(self, step: int) -> float:
        rate = self.model.optimizer.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(step)
        return float(keras.ops.convert_to_numpy(rate))

    def _save_checkpoint(self, epoch: int) -> None:
        save_model(self.model, self.checkpoint_dir / CHECKPOINT)
        write_json({"epoch": epoch, "history": self.history}, self.checkpoint_dir / STATE)
