"""Data-parallel training across devices and machines with TensorFlow's own strategies.

``distribute=none`` trains on one device. ``distribute=mirrored`` replicates the model
on every GPU of this machine (``tf.distribute.MirroredStrategy``); on a machine without
GPUs, ``distribute.cpu_devices=K`` splits the CPU into K logical devices, which is how
the data-parallel path is tested without accelerators. ``distribute=multiworker`` spans
machines (``MultiWorkerMirroredStrategy``): one process per machine, the cluster read
from ``TF_CONFIG`` or, on SLURM, from the job's environment (``SlurmClusterResolver``;
``hydra/launcher=slurm`` with ``tasks_per_node: 1`` and ``nodes: K``).

Keras does the rest: under the strategy's scope the variables are mirrored, ``fit``
splits every global batch (``train.batch_size``) across the replicas and all-reduces the
gradients, and the loss is averaged over the global batch, so the learning rate and the
logged loss mean what they mean on one device. Only the chief (worker 0) writes the run
folder; the other workers keep their checkpoints in a temporary folder.

``infer.py distribute=multiworker`` uses the same cluster to split a reconstruction and
a refinement over the workers (:func:`ptycho.inference.reconstruct`,
:class:`ptycho.refine.Refiner`) through :meth:`Distribution.all_sum`; a collective that
a worker does not join within :data:`COLLECTIVE_TIMEOUT_S` fails on the others, and
:func:`lost_worker` names the lost worker in one line.

A process makes its :class:`Distribution` once, at start-up (a multi-worker strategy sets
up its collectives before any other TensorFlow work), and passes it down.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import tensorflow as tf

from ptycho.errors import ConfigError, require

__all__ = [
    "DistributeOptions",
    "Distribution",
    "Strategy",
    "configure_devices",
    "dataset_options",
    "fitting",
    "lost_worker",
    "make_distribution",
]


COLLECTIVE_TIMEOUT_S = 60.0
"""A collective (gradient all-reduce, canvas sum, stop agreement) that a worker has not
joined after this long fails on the others: a lost worker stops the run within it."""


class _ExpectedTracing(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning about
    :meth:`Distribution.all_sum`, whose one compiled all-reduce is traced once per kind
    of call (a handful: a refinement step's sums and gathers, the positions' exchange,
    the progress pass; several in a row as a run starts), which that warning counts as
    too frequent. Every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("retracing" in message and "Distribution.all_sum" in message)


logging.getLogger("tensorflow").addFilter(_ExpectedTracing())


class Strategy(StrEnum):
    none = "none"
    mirrored = "mirrored"
    multiworker = "multiworker"


@dataclass
class DistributeOptions:
    """The ``distribute`` section: data-parallel training with ``tf.distribute``."""

    strategy: Strategy = Strategy.none
    """``none`` (one device), ``mirrored`` (every GPU of this machine, or
    ``cpu_devices`` logical CPUs) or ``multiworker`` (one process per machine; the cluster
    from ``TF_CONFIG`` or SLURM)."""
    cpu_devices: int = 0
    """>= 2: split the CPU into that many logical devices (tests, a CPU-only dry run)."""

    def check(self) -> None:
        require([(self.cpu_devices >= 0, f"cpu_devices={self.cpu_devices}: must be >= 0")])


def configure_devices(cpu_devices: int) -> None:
    """Split the CPU into ``cpu_devices`` logical devices (>= 2; 0 or 1: leave it).

    Must run before TensorFlow initialises its devices (the entry points call it before
    anything else touches TensorFlow); afterwards a split that is already in place is
    accepted and any other refused with a ConfigError.
    """
    if cpu_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * cpu_devices
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as error:  # devices already initialised
        present = len(tf.config.list_logical_devices("CPU"))
        if present != cpu_devices:
            raise ConfigError(
                f"distribute.cpu_devices={cpu_devices}: TensorFlow's devices were already "
                f"initialised with {present} CPU device(s); set it when the process starts "
                "(train.py does)"
            ) from error


@dataclass
class Distribution:
    """A strategy and this process's place in it."""

    strategy: tf.distribute.Strategy
    kind: str = Strategy.none
    worker: int = 0
    workers: int = 1
    _sum: object = None  # compiled all-reduce of all_sum()

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def chief(self) -> bool:
        """Worker 0 writes the run folder (TensorBoard, checkpoints, outputs)."""
        return self.worker == 0

    def output_dir(self, run_dir: Path) -> Path:
        """Where this process writes: the run folder on the chief, a temporary folder
        on the other workers (their checkpoints are needed only by the strategy)."""
        if self.chief:
            return Path(run_dir)
        return Path(tempfile.mkdtemp(prefix=f"ptycho-worker{self.worker}-"))

    def agree(self, flag: bool) -> bool:
        """True on every worker when it is True on any (a stop after ``train.max_minutes``
        must happen at the same epoch everywhere, or the collectives would wait)."""
        if self.workers == 1:
            return flag
        return bool(self.all_sum([np.float32(flag)])[0] > 0)

    def all_sum(self, values: list) -> list[np.ndarray]:
        """The element-wise sums over the workers of ``values`` (arrays of any shapes,
        the same on every worker), as NumPy arrays; the values themselves with one
        worker. Every worker must call it at the same point (it is a collective)."""
        if self.workers == 1:
            return [np.asarray(value) for value in values]
        if self._sum is None:
            strategy = self.strategy

            @tf.function(autograph=False)
            def total(tensors):
                local = strategy.run(lambda t: [tf.identity(x) for x in t], args=(tensors,))
                return [
                    strategy.reduce(tf.distribute.ReduceOp.SUM, part, axis=None) for part in local
                ]

            self._sum = total
        tensors = [tf.convert_to_tensor(value) for value in values]
        return [np.asarray(value) for value in self._sum(tensors)]

    def all_gather(self, value) -> np.ndarray:
        """(workers, ...) every worker's ``value`` (one shape on all), in worker order."""
        value = np.asarray(value)
        slots = np.zeros((self.workers, *value.shape), value.dtype)
        slots[self.worker] = value
        return self.all_sum([slots])[0]

    def share(self, count: int) -> slice:
        """This worker's contiguous share of ``count`` items (all of them with one
        worker; shares differ by at most one item)."""
        bounds = np.linspace(0, count, self.workers + 1).round().astype(int)
        return slice(int(bounds[self.worker]), int(bounds[self.worker + 1]))

    def describe(self) -> str:
        if self.kind == Strategy.none:
            return "distribute=none (one device)"
        devices = ", ".join(getattr(self.strategy.extended, "worker_devices", ()))
        return (
            f"distribute={self.kind}: {self.replicas} replicas ({devices}), "
            f"worker {self.worker} of {self.workers}"
        )


def make_distribution(options: DistributeOptions | None = None) -> Distribution:
    """The :class:`Distribution` of the ``distribute`` section: the CPU split first
    (:func:`configure_devices`), then the strategy. Make it once per process, before
    other TensorFlow work, and pass it on."""
    options = options or DistributeOptions()
    configure_devices(options.cpu_devices)
    kind = Strategy(options.strategy)
    if kind == Strategy.none:
        return Distribution(tf.distribute.get_strategy())
    if kind == Strategy.mirrored:
        return Distribution(tf.distribute.MirroredStrategy(devices=_mirrored_devices()), kind)
    return _multiworker()


def _mirrored_devices() -> list[str] | None:
    """Every GPU; without GPUs every logical CPU when the CPU is split, else None (the
    strategy's own choice: the one CPU)."""
    if tf.config.list_logical_devices("GPU"):
        return None
    cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
    return cpus if len(cpus) > 1 else None


def _multiworker() -> Distribution:
    resolver = _cluster_resolver()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO,
        timeout_seconds=COLLECTIVE_TIMEOUT_S,
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )
    spec = resolver.cluster_spec().as_dict()
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    task = resolver.task_type, int(resolver.task_id or 0)
    worker = task[1] + (1 if task[0] == "worker" and "chief" in spec else 0)
    return Distribution(strategy, "multiworker", worker=worker, workers=max(workers, 1))


def _cluster_resolver():
    """TF_CONFIG when set; otherwise SLURM's environment inside a SLURM job."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_NUM_TASKS"):
        # The resolver would ask nvidia-smi (absent on CPU nodes) for the GPU count.
        gpus = len(glob.glob("/dev/nvidia[0-9]*"))
        return tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=8888, gpus_per_node=gpus, auto_set_gpu=gpus > 0
        )
    raise ConfigError(
        "distribute=multiworker needs a cluster: set TF_CONFIG (one process per worker), "
        "or run inside a SLURM job (hydra/launcher=slurm)"
    )


_TASK = re.compile(r"/job:(worker|chief)/replica:\d+/task:(\d+)")
_COLLECTIVE_FAILURE = ("Collective", "unhealthy", "heartbeat", "is down", "Deadline")


def lost_worker(error: BaseException) -> str | None:
    """One line for a collective that failed because a worker was lost (killed,
    crashed, stopped with Ctrl-C, or silent for :data:`COLLECTIVE_TIMEOUT_S`), naming
    it; None for any other error. TensorFlow's health check names the task that stopped
    sending heartbeats ("/job:worker/replica:0/task:1"); its address comes from
    ``TF_CONFIG``."""
    if not isinstance(error, tf.errors.OpError):
        return None
    text = str(error)
    if not any(word in text for word in _COLLECTIVE_FAILURE):
        return None
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster, own = config.get("cluster", {}), config.get("task", {})
    own = (own.get("type"), int(own.get("index", -1)))
    tasks = sorted({(job, int(task)) for job, task in _TASK.findall(text)} - {own})
    names = []
    for job, task in tasks:
        number = task + (1 if job == "worker" and "chief" in cluster else 0)
        addresses = cluster.get(job, [])
        where = f" ({addresses[task]})" if task < len(addresses) else ""
        names.append(f"worker {number}{where}")
    lost = " and ".join(names) if names else "a worker"
    return (
        f"{lost} stopped answering the other workers (killed, crashed, interrupted or "
        f"silent for {COLLECTIVE_TIMEOUT_S:.0f} s); this worker stopped too and the run "
        "wrote no results. Start every worker again: the same command with resume=true "
        "continues from the last checkpoint (training's epoch, the refinement's iteration)"
    )


@contextlib.contextmanager
def fitting(model, dataset: tf.data.Dataset, distribution: Distribution):
    """While inside, Keras's ``fit`` can run under ``MultiWorkerMirroredStrategy``.

    Keras 3's TensorFlow trainer builds the model before training from one batch of the
    distributed dataset, averaged across workers with ``strategy.reduce("MEAN", batch)``;
    the multi-worker strategy's reduce refuses a nested batch (``{"diffraction": ...}``):
    "Attempt to convert a value ({'diffraction': PerReplica ...". The batch is only used
    for its shapes, so the model is built from a local batch of the same dataset instead.
    The same trainer averages each step's scalar outputs (the loss) across workers with
    ``strategy.reduce("MEAN", value, axis=0)``, which fails on a scalar ("Invalid
    reduction dimension 0 for input with 0 dimensions"); scalars are averaged with
    ``axis=None`` instead (the mean over replicas: what ``axis=0`` means for a batch).
    Both patches are undone on leaving; other strategies are left alone.
    """
    if distribution.kind != Strategy.multiworker:
        yield
        return
    example = next(iter(dataset.take(1)))

    def build(iterator=None, data_batch=None):
        with distribution.strategy.scope():
            model._symbolic_build(data_batch=example)

    model._maybe_symbolic_build = build
    try:
        with _scalars_averaged_across_workers():
            yield
    finally:
        del model._maybe_symbolic_build  # the class's own method again


@contextlib.contextmanager
def _scalars_averaged_across_workers():
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(
            strategy
        ):
            return original(values, strategy, reduction)

        def mean(value):
            if value.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original(value, strategy, reduction)

        return tf.nest.map_structure(mean, values)

    trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        trainer.reduce_per_replica = original


def dataset_options() -> tf.data.Options:
    """Shard the in-memory dataset by data (there are no files to shard by)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options
