"""Reconstruction and refinement split over workers give what one worker gives: K
workers' summed minibatch gradients are one worker's gradient of the union, and their
canvases add up to one canvas. The workers run as threads of this process, their
collectives a barrier (the 2-process TensorFlow run: tests/e2e/test_distribute.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ptycho.data import simulate
from ptycho.distribute import Distribution
from ptycho.inference import reconstruct
from ptycho.model import ModelConfig, build_model
from ptycho.refine import RefineOptions, Refiner


def threaded_workers(count: int, job):
    """``job(distribution)`` on ``count`` threads, each with a Distribution whose
    ``all_sum`` adds up the threads' values; the results in worker order."""
    barrier, slots = threading.Barrier(count, timeout=120), [None] * count
    results, errors = [None] * count, []

    def member(worker: int) -> Distribution:
        distribution = Distribution(None, "multiworker", worker=worker, workers=count)

        def all_sum(values):
            slots[worker] = [np.asarray(v, np.float64) for v in values]
            barrier.wait()
            total = [sum(parts) for parts in zip(*slots, strict=True)]
            barrier.wait()  # every worker has read the slots before they are reused
            return [t.astype(np.asarray(v).dtype) for t, v in zip(total, values, strict=True)]

        distribution.all_sum = all_sum
        return distribution

    def run(worker: int) -> None:
        try:
            results[worker] = job(member(worker))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def scan():
    return simulate(n=64, n_positions=144, step=0.125, nphotons=1e6, seed=5)


def test_shares_cover_the_items_once():
    shares = [Distribution(None, worker=k, workers=3).share(10) for k in range(3)]
    covered = np.concatenate([np.arange(10)[share] for share in shares])
    np.testing.assert_array_equal(covered, np.arange(10))
    assert Distribution(None).share(10) == slice(0, 10)


@pytest.mark.parametrize("mode", ["object", "full"])
def test_two_workers_refine_as_one_with_their_minibatches_together(scan, mode):
    options = RefineOptions(mode=mode, iterations=3, batch_size=16, eval_every=3)
    one = Refiner(scan, RefineOptions(**{**vars(options), "batch_size": 32}), compile_mode="graph")
    expected = one.run()

    def job(distribution):
        return Refiner(scan, options, compile_mode="graph", distribution=distribution).run()

    first, second = threaded_workers(2, job)
    scale = np.abs(expected.obj).max()
    np.testing.assert_allclose(first.obj, second.obj, atol=1e-6 * scale)  # one update
    np.testing.assert_allclose(first.obj, expected.obj, atol=2e-4 * scale)
    np.testing.assert_allclose(
        first.probe, expected.probe, atol=2e-4 * np.abs(expected.probe).max()
    )
    assert first.r_factor == pytest.approx(expected.r_factor, rel=1e-3)
    if mode == "full":  # positions: moved by their worker, exchanged every iteration
        moved = np.stack([expected.xcoords, expected.ycoords], 1) - scan.positions
        got = np.stack([first.xcoords, first.ycoords], 1) - scan.positions
        np.testing.assert_allclose(
            got, np.stack([second.xcoords, second.ycoords], 1) - scan.positions
        )
        assert np.abs(got - moved).max() < 0.05 + 0.2 * np.abs(moved).max()


def test_a_stop_requested_on_one_worker_stops_both_at_the_same_step(scan):
    """Ctrl-C on worker 1 (``request_stop``, as its signal handler calls it) during the
    progress pass after iteration 2: both workers leave at the first step of iteration 3,
    neither waiting for the other, their canvases those the uninterrupted run has after
    iteration 2 (the stop took no step of the third)."""
    options = RefineOptions(mode="object", iterations=4, batch_size=16, eval_every=1)

    def interrupted(distribution):
        refiner = Refiner(scan, options, compile_mode="graph", distribution=distribution)

        def on_record(record):
            if distribution.worker == 1 and record["iteration"] == 2:
                refiner.request_stop()

        try:
            refiner.run(on_record=on_record)
        except KeyboardInterrupt:
            return refiner.canvas.numpy()
        return None  # finished: not stopped

    def uninterrupted(distribution):
        every = RefineOptions(**{**vars(options), "checkpoint_seconds": 0})
        refiner = Refiner(scan, every, compile_mode="graph", distribution=distribution)
        states = []
        refiner.run(on_checkpoint=states.append)
        return states[1]  # after iteration 2

    first, second = threaded_workers(2, interrupted)
    assert first is not None and second is not None
    reference = threaded_workers(2, uninterrupted)[0]
    assert reference.iteration == 2
    scale = np.abs(reference.arrays["canvas"]).max()
    for canvas in (first, second):
        np.testing.assert_allclose(canvas, reference.arrays["canvas"], atol=1e-6 * scale)


def test_workers_agree_on_the_time_limit(scan):
    """``refine.max_seconds`` is met on each worker's own clock: when one is out of time
    every worker stops after the same iteration (otherwise the others would wait for it
    at their next step)."""
    results = threaded_workers(
        2,
        lambda distribution: Refiner(
            scan,
            RefineOptions(
                mode="object",
                iterations=4,
                batch_size=16,
                max_seconds=1e-6 if distribution.worker == 1 else 1e6,
            ),
            compile_mode="graph",
            distribution=distribution,
        ).run(),
    )
    assert [result.history[-1]["iteration"] for result in results] == [1, 1]


@pytest.mark.parametrize("align", [False, True])
def test_two_workers_reconstruct_as_one(scan, align):
    config = ModelConfig(n=64, filters=4, precision="float32")
    model, _ = build_model(config, probe=scan.probe, norm_factor=0.01)
    options = dict(compile_mode="graph", batch_size=8, align_phase=align)
    expected = reconstruct(model, scan, **options)
    first, second = threaded_workers(
        2, lambda distribution: reconstruct(model, scan, distribution=distribution, **options)
    )
    np.testing.assert_array_equal(first.obj, second.obj)
    assert first.r_factor == pytest.approx(expected.r_factor, rel=1e-6)
    np.testing.assert_array_equal(first.mask, expected.mask)
    scale = np.abs(expected.obj).max()
    if not align:  # the same sums in another order: float32 noise
        np.testing.assert_allclose(first.obj, expected.obj, atol=1e-5 * scale)
    else:  # each worker's share aligned as one to the other: the same object up to a
        # constant phase and the groups' alignments, which differ where a group's
        # reference differs (an untrained network: a random phase per group, the worst
        # case; measured 0.16 % of the maximum, median)
        rotation = np.vdot(first.obj, expected.obj)
        aligned = first.obj * rotation / abs(rotation)
        error = np.abs(aligned - expected.obj)[expected.mask]
        assert np.median(error) < 5e-3 * scale


def test_a_lost_worker_is_named_with_its_address(monkeypatch):
    import json

    import tensorflow as tf

    from ptycho.distribute import lost_worker

    cluster = {"worker": ["host0:2222", "host1:2222", "host2:2222"]}
    task = {"type": "worker", "index": 0}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    error = tf.errors.UnavailableError(  # this worker (task 0) is named too: left out
        None,
        None,
        "Collective ops is aborted by: The following tasks are unhealthy (stopped sending "
        "heartbeats):\n/job:worker/replica:0/task:2\nThe tasks have crashed. "
        "[/job:worker/replica:0/task:0/device:CPU:0]",
    )
    message = lost_worker(error)
    assert message.startswith("worker 2 (host2:2222) stopped answering")
    assert "\n" not in message and "resume=true" in message
    assert lost_worker(ValueError("Collective")) is None  # not TensorFlow's
    assert lost_worker(tf.errors.InvalidArgumentError(None, None, "bad shape")) is None


def test_only_the_all_sums_tracing_warning_is_kept_out(caplog):
    """TensorFlow warns when a function was traced in 5 of its last 6 calls, which
    all_sum's all-reduce is, once per kind of call, as a run starts: that warning is
    dropped, the same warning about any other function is not."""
    import logging

    import ptycho.distribute  # noqa: F401 - installs the filter

    def warning(function):
        return (
            f"5 out of the last 6 calls to <function {function} at 0x7f> triggered "
            "tf.function retracing. Tracing is expensive"
        )

    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        logging.getLogger("tensorflow").warning(warning("Distribution.all_sum.<locals>.total"))
        logging.getLogger("tensorflow").warning(warning("train_step"))
        logging.getLogger("tensorflow").warning("Distribution.all_sum: something else")
    assert [record.getMessage() for record in caplog.records] == [
        warning("train_step"),
        "Distribution.all_sum: something else",
    ]
