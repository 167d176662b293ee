"""Handles cross every multiprocessing channel: pools' task arguments and results,
``loop.run_in_executor``, ``anyio.to_process``, ``multiprocessing.Queue``, ``Pipe`` and
manager proxies, under fork, spawn and forkserver.

For each: exactly-once delivery, ``EndOfStream`` once every sender is gone (never
before), the parent's early close (``q.put(rx.clone()); rx.close()``), a SIGKILLed
worker counting as closed, and nothing left behind in fds, threads or ``/dev/shm``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import multiprocessing
import multiprocessing.context
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.pool import ApplyResult
from typing import Any, cast

import anyio
import anyio.to_process
import pytest

import aioshm
from aioshm import _ownership

from . import reach_workers as w
from .helpers import Context, join_all, wait_until

pytestmark = pytest.mark.timeout(120)

DEADLINE = 1.0  # the bound for noticing a dead peer


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _aioshm_threads() -> list[str]:  # started by aioshm
    return [t.name for t in threading.enumerate() if t.name.startswith("aioshm")]


@contextlib.contextmanager
def nothing_left(method: str | None = None) -> Iterator[None]:
    """Check that the block leaves no fd, no thread and no /dev/shm entry behind."""
    if method == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()  # a socket of its own, for the life of the process
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    gc.collect()
    fds, threads = _fds(), {t.ident for t in threading.enumerate()}
    shm = {n for n in os.listdir("/dev/shm") if n.startswith("aioshm.")}
    yield
    gc.collect()
    # Every thread started meanwhile (pools', queues', aioshm's) exits.
    wait_until(lambda: {t.ident for t in threading.enumerate()} <= threads, what="threads to exit")
    try:
        wait_until(lambda: _fds() <= fds, what="fds to close")
    except AssertionError:
        raise AssertionError({fd: _readlink(fd) for fd in _fds() - fds}) from None
    assert {n for n in os.listdir("/dev/shm") if n.startswith("aioshm.")} <= shm


def _check_exactly_once(got: list[Any], tasks: int, count: int) -> None:
    per_task = collections.defaultdict(list)
    for task, i in got:
        per_task[task].append(i)
    assert len(got) == tasks * count
    assert {task: sorted(seqs) for task, seqs in per_task.items()} == {
        task: list(range(count)) for task in range(tasks)
    }


# ------------------------------------------------------------ ProcessPoolExecutor


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_run_in_executor_workers_stream_to_an_async_parent(method: str) -> None:
    """Each task gets ``tx.clone()``; the parent closes its own at once and receives
    every message exactly once, then ``EndOfStream`` when the last task closes."""
    tasks, count = 8, 40

    async def main() -> list[Any]:
        tx, rx = aioshm.open_channel[Any](capacity=4)
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(2, mp_context=ctx) as pool:
            futures = [
                loop.run_in_executor(pool, w.send_range, tx.clone(), task, count)
                for task in range(tasks)
            ]
            tx.close()
            async with rx:
                got = [item async for item in rx]
                # The end came only once every task was done with its handle.
                pids = await asyncio.gather(*futures)
        assert len(set(pids)) >= 1
        return got

    with nothing_left(method):
        got = asyncio.run(main())
    _check_exactly_once(got, tasks, count)


def test_a_task_that_returns_without_closing_does_not_hold_the_stream() -> None:
    """The rule: a handle that arrived by pickling is closed when the task's copy is
    collected, which in CPython is when the task returns."""

    async def main() -> list[Any]:
        tx, rx = aioshm.open_channel[Any](capacity=8)
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [
                loop.run_in_executor(pool, w.send_without_closing, tx.clone(), task)
                for task in range(3)
            ]
            tx.close()
            with anyio.fail_after(30):
                async with rx:
                    got = [item async for item in rx]
            await asyncio.gather(*futures)
        return got

    with nothing_left():
        got = asyncio.run(main())
    assert sorted(got) == [(0, 0), (1, 0), (2, 0)]


@pytest.mark.parametrize("pool_kind", ["executor", "pool"])
def test_a_task_that_raises_without_closing_does_not_hold_the_stream(pool_kind: str) -> None:
    ctx = multiprocessing.get_context("forkserver")
    tx, rx = aioshm.open_channel[Any](capacity=8)
    outcomes: list[Future[None]] | list[ApplyResult[None]]
    if pool_kind == "executor":
        executor = ProcessPoolExecutor(1, mp_context=ctx)
        outcomes = [executor.submit(w.send_and_raise, tx.clone(), task) for task in range(3)]
    else:
        pool = ctx.Pool(1)
        outcomes = [pool.apply_async(w.send_and_raise, (tx.clone(), task)) for task in range(3)]
    tx.close()
    with rx:
        got = []
        with pytest.raises(anyio.EndOfStream):
            while True:
                got.append(rx.recv_blocking(timeout=30))
    assert sorted(got) == [(0, 0), (1, 0), (2, 0)]
    for outcome in outcomes:
        with pytest.raises(ValueError, match="failed"):
            outcome.result(60) if isinstance(outcome, Future) else outcome.get(60)
    if pool_kind == "executor":
        executor.shutdown()
    else:
        pool.terminate()


def test_pickling_a_closed_handle_reaches_the_tasks_future() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=1)
    clone = tx.clone()
    clone.close()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(w.send_range, clone, 0, 1)
        with pytest.raises(anyio.ClosedResourceError, match="pass a clone"):
            future.result(timeout=60)
        # The pool survives: the next task runs.
        assert pool.submit(w.send_range, tx.clone(), 0, 1).result(timeout=60)
    tx.close()
    assert rx.recv_nowait() == (0, 0)
    rx.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_killed_worker_counts_as_closed_within_a_second(method: str) -> None:
    tx, rx = aioshm.open_channel[Any](capacity=4)
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method))
    future = pool.submit(w.send_then_hang, tx.clone())
    tx.close()

    async def main() -> float:
        with anyio.fail_after(60):
            pid = await rx.recv()  # the worker has claimed its handle
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with anyio.fail_after(30), pytest.raises(anyio.EndOfStream):
            await rx.recv()
        return time.monotonic() - killed_at

    with rx:
        elapsed = anyio.run(main)
    assert elapsed < DEADLINE + 0.5, elapsed
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=30)
    pool.shutdown()


# ------------------------------------------------------------ multiprocessing.Pool


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_task_arguments_and_results(method: str) -> None:
    with nothing_left(method):
        _pool_task_arguments_and_results(method)  # its locals are gone after it


def _pool_task_arguments_and_results(method: str) -> None:
    tasks, count = 6, 30
    ctx = multiprocessing.get_context(method)
    tx, rx = aioshm.open_channel[Any](capacity=8)
    with ctx.Pool(2) as pool:
        results = [
            pool.apply_async(w.send_range, (tx.clone(), task, count)) for task in range(tasks)
        ]
        tx.close()
        with rx:
            got = []
            with pytest.raises(anyio.EndOfStream):
                while True:
                    got.append(rx.recv_blocking(timeout=60))
        assert all(r.get(timeout=60) for r in results)
        # A handle as a task's *result*: made and pickled in the worker.
        returned = pool.apply(w.make_channel_and_return_receiver, (5,))
        with returned:
            assert [returned.recv_nowait() for _ in range(5)] == list(range(5))
            with pytest.raises(anyio.EndOfStream):
                returned.recv_nowait()
        pool.close()
        pool.join()
    _check_exactly_once(got, tasks, count)


def test_a_killed_pool_worker_counts_as_closed_within_a_second() -> None:
    ctx = multiprocessing.get_context("forkserver")
    tx, rx = aioshm.open_channel[Any](capacity=4)
    with ctx.Pool(1) as pool:
        pool.apply_async(w.send_then_hang, (tx.clone(),))
        tx.close()
        with rx:
            pid = rx.recv_blocking(timeout=60)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(anyio.EndOfStream):
                rx.recv_blocking(timeout=30)
            assert time.monotonic() - killed_at < DEADLINE + 0.5
        pool.terminate()


# ------------------------------------------------------------ anyio.to_process


@pytest.mark.anyio
async def test_anyio_to_process() -> None:
    """anyio's workers are unrelated processes (started with ``subprocess``): they map
    the channel through the parent's /proc/<pid>/fd."""
    tasks, count = 3, 20
    tx, rx = aioshm.open_channel[Any](capacity=4)
    async with anyio.create_task_group() as tg:
        for task in range(tasks):
            tg.start_soon(anyio.to_process.run_sync, w.anyio_send_range, tx.clone(), task, count)
        tx.close()
        async with rx:
            got = [item async for item in rx]
    _check_exactly_once(got, tasks, count)


@pytest.mark.anyio
async def test_a_killed_anyio_worker_counts_as_closed_within_a_second() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=4)
    broken: list[str] = []

    async def run(clone: aioshm.SendChannel[Any]) -> None:
        # anyio holds the arguments until the call returns: the clone in this process
        # is open until the worker's death is noticed (keep no traceback referring to it).
        try:
            await anyio.to_process.run_sync(w.send_then_hang, clone)
        except anyio.BrokenWorkerProcess as exc:
            broken.append(type(exc).__name__)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tx.clone())
        tx.close()
        async with rx:
            with anyio.fail_after(60):
                pid = await rx.recv()
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with anyio.fail_after(30), pytest.raises(anyio.EndOfStream):
                await rx.recv()
            assert time.monotonic() - killed_at < DEADLINE + 0.5
    assert broken


# ------------------------------------------------------------ Queue, Pipe, managers


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_queue_hand_off_with_the_parents_early_close(method: str) -> None:
    """``q.put(rx.clone()); rx.close()``: the clone object is dropped before the consumer
    has unpickled its copy, yet the receive side stays open, and the consumer gets every
    message and then ``EndOfStream``."""
    with nothing_left(method):
        _queue_hand_off_with_the_parents_early_close(method)


def _queue_hand_off_with_the_parents_early_close(method: str) -> None:
    ctx = cast(Context, multiprocessing.get_context(method))
    count = 50
    queue, results = ctx.Queue(), ctx.Queue()
    tx, rx = aioshm.open_channel[Any](capacity=64)
    queue.put(rx.clone())
    rx.close()
    # The feeder thread has pickled the clone, and the clone object is gone: only
    # the reservation keeps the side open.
    wait_until(lambda: tx.statistics().open_receive_streams == 1, what="the pickle")
    gc.collect()
    for i in range(count):
        tx.send_nowait(i)  # no BrokenResourceError: a receiver is on its way
    tx.close()
    consumer = ctx.Process(target=w.consume_from_queue, args=(queue, results))
    consumer.start()
    assert results.get(timeout=60) == ("ok", list(range(count)))
    join_all([consumer])
    for q in (queue, results):
        q.close()
        q.join_thread()


def test_a_killed_queue_consumer_counts_as_closed_within_a_second() -> None:
    """The consumer got its receive handle from a Queue; killed, it breaks the sender."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    tx, rx = aioshm.open_channel[Any](capacity=1)
    ready = ctx.Event()
    consumer = ctx.Process(target=w.hold_from_queue, args=(queue, ready))
    consumer.start()
    queue.put(rx.clone())
    rx.close()
    assert ready.wait(60)  # the consumer has claimed its handle
    gc.collect()
    assert tx.statistics().open_receive_streams == 1
    tx.send_nowait("fills the only slot")
    assert consumer.pid is not None
    os.kill(consumer.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with tx, pytest.raises(anyio.BrokenResourceError):
        tx.send_blocking("blocked until the consumer is found dead", timeout=30)
    assert time.monotonic() - killed_at < DEADLINE + 0.5
    consumer.join(10)
    queue.close()
    queue.join_thread()


def test_a_closed_handle_on_a_queue_raises_at_the_readers_get() -> None:
    """A plain Queue would print the pickling error and drop the item, and its reader
    would wait for ever: the reader's ``get()`` raises it instead."""
    ctx = multiprocessing.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    tx, rx = aioshm.open_channel[Any](capacity=1)
    tx.close()  # closed before the feeder thread pickles it
    queue.put(tx)
    consumer = ctx.Process(target=w.consume_from_queue, args=(queue, results))
    consumer.start()
    status, name, message = results.get(timeout=60)
    assert (status, name) == ("error", "ClosedResourceError")
    assert "pass a clone" in message
    join_all([consumer])
    rx.close()


def test_queue_producer_side() -> None:
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    tx, rx = aioshm.open_channel[Any](capacity=4)
    producer = ctx.Process(target=w.produce_from_queue, args=(queue, 20))
    producer.start()
    queue.put(tx.clone())
    tx.close()
    with rx:
        got = []
        with pytest.raises(anyio.EndOfStream):
            while True:
                got.append(rx.recv_blocking(timeout=60))
    assert got == list(range(20))
    join_all([producer])


def test_pipe_and_manager_proxies() -> None:
    ctx = multiprocessing.get_context("spawn")
    tx, rx = aioshm.open_channel[Any](capacity=4)
    # A Pipe: pickled at once, by the caller.
    here, there = ctx.Pipe()
    here.send(tx.clone())
    copy = there.recv()
    copy.send_nowait("through a pipe")
    copy.close()
    here.close()
    there.close()
    # A manager's queue: the manager process unpickles and pickles again.
    with ctx.Manager() as manager:
        shared = manager.Queue()
        shared.put(tx.clone())
        copy = shared.get(timeout=60)
        copy.send_nowait("through a manager")
        copy.close()
    tx.close()
    with rx:
        assert rx.recv_nowait() == "through a pipe"
        assert rx.recv_nowait() == "through a manager"
        with pytest.raises(anyio.EndOfStream):
            rx.recv_nowait()


def test_a_handle_through_an_aioshm_channel() -> None:
    """Sending a handle through a channel is allowed: the receiver owns its copy."""
    carrier_tx, carrier_rx = aioshm.open_channel[Any](capacity=2)
    tx, rx = aioshm.open_channel[Any](capacity=2)
    carrier_tx.send_nowait(tx)
    tx.close()
    got = carrier_rx.recv_nowait()
    got.send_nowait("hello")
    got.close()
    assert rx.recv_nowait() == "hello"
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    for handle in (carrier_tx, carrier_rx, rx):
        handle.close()


def test_a_pickle_is_claimed_once() -> None:
    """Unpickling the same bytes twice gives one usable handle; the second raises
    ``BrokenResourceError`` when used (its reservation was claimed already)."""
    tx, rx = aioshm.open_channel[Any](capacity=2)
    data = pickle.dumps(tx)
    first, second = pickle.loads(data), pickle.loads(data)
    first.send_nowait(1)
    with pytest.raises(anyio.BrokenResourceError, match="unpickled once already"):
        second.send_nowait(2)
    for handle in (first, second, tx):
        handle.close()
    assert rx.recv_nowait() == 1
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    rx.close()


def test_an_unclaimed_pickle_keeps_the_side_open_only_while_its_pickler_lives() -> None:
    """A handle pickled by a process that exits before anyone unpickles it stops
    counting as open (a sweep finds its pickler dead)."""
    ctx = multiprocessing.get_context("spawn")
    tx, rx = aioshm.open_channel[Any](capacity=2)
    queue = ctx.Queue()
    pickler = ctx.Process(target=_pickle_and_exit, args=(tx, queue))
    pickler.start()
    tx.close()
    data = queue.get(timeout=60)  # pickled in the child; never unpickled
    join_all([pickler])
    with rx, pytest.raises(anyio.EndOfStream):
        rx.recv_blocking(timeout=30)
    assert data


def _pickle_and_exit(tx: aioshm.SendChannel[Any], queue: Any) -> None:
    with tx:
        queue.put(pickle.dumps(tx))


def test_keeper_thread_exits_when_nothing_is_pending() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2)
    copy = pickle.loads(pickle.dumps(tx))
    wait_until(lambda: _ownership._keeper is None, what="the keeper to exit")
    wait_until(lambda: "aioshm-keeper" not in _aioshm_threads(), what="its thread to end")
    for handle in (copy, tx, rx):
        handle.close()


# ------------------------------------------------------------ issue 11, item 3


def test_a_spawn_child_killed_while_starting_counts_as_closed_while_the_parent_joins() -> None:
    """The parent closes its ends and sits in ``join()``: it never sweeps. The child's
    pid is recorded as soon as ``start()`` returns, so the consumer finds the producer
    dead (it was killed before it claimed its handle) and its stream ends."""
    ctx = multiprocessing.get_context("spawn")
    tx, rx = aioshm.open_channel[Any](capacity=2)
    ready = ctx.Event()
    consumer = ctx.Process(target=w.drain_and_exit, args=(rx, ready))
    consumer.start()
    assert ready.wait(60)
    producer = ctx.Process(target=w.child_with_slow_start, args=(w.SlowToUnpickle(60), tx))
    producer.start()
    tx.close()
    rx.close()
    assert producer.pid is not None
    os.kill(producer.pid, signal.SIGKILL)  # still unpickling its first argument
    killed_at = time.monotonic()
    consumer.join(30)
    elapsed = time.monotonic() - killed_at
    assert consumer.exitcode == 0, consumer.exitcode
    assert elapsed < DEADLINE + 0.5, elapsed
    producer.join(10)


def test_a_pickled_handle_outlives_every_handle_of_its_pickler() -> None:
    """The parent pickles both ends onto a queue and drops every handle before a child
    unpickles them: the memory stays mapped in the parent until they are claimed."""
    ctx = multiprocessing.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    tx, rx = aioshm.open_channel[Any](capacity=8)
    clones = [tx.clone(), rx.clone()]
    refs = [weakref.ref(clone) for clone in clones]
    for clone in clones:
        queue.put(clone)
    tx.close()
    rx.close()
    del tx, rx, clones, clone
    # Pickled by the feeder thread, then dropped: the parent has no handle left.
    wait_until(lambda: all(ref() is None for ref in refs), what="the clones to be dropped")
    gc.collect()
    child = ctx.Process(target=w.loop_back, args=(queue, results, 5))
    child.start()
    assert results.get(timeout=60) == list(range(5))
    join_all([child])
    wait_until(lambda: not _ownership._kept, what="the parent to let go")


def test_a_full_process_table_is_a_clear_error() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=1)
    pickles = []
    with pytest.raises(RuntimeError, match="smaller batches"):
        for _ in range(200):
            pickles.append(pickle.dumps(tx))
    assert len(pickles) == 127  # one entry is this process's own
    for data in pickles:  # each is still good, and releases its entry when closed
        pickle.loads(data).close()
    tx.close()
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    rx.close()


def test_a_process_holds_one_entry_however_many_handles_it_unpickles() -> None:
    """Claims fold into the process's entry: 300 handles unpickled and held at once fit
    in the 128-entry table, and each still counts."""
    tx, rx = aioshm.open_channel[Any](capacity=1)
    held = [pickle.loads(pickle.dumps(tx)) for _ in range(300)]
    assert rx.statistics().open_send_streams == 301
    for handle in held:
        handle.close()
    assert rx.statistics().open_send_streams == 1
    tx.close()
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    rx.close()


_INHERITED: list[Any] = []


def _put_inherited(queue: Any) -> None:
    queue.put(_INHERITED[0])  # inherited through fork, not passed: not this child's
    queue.close()
    queue.join_thread()


def test_an_inherited_handle_on_a_queue_raises_at_the_readers_get() -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    tx, rx = aioshm.open_channel[Any](capacity=1)
    _INHERITED.append(tx)
    try:
        child = ctx.Process(target=_put_inherited, args=(queue,))
        child.start()
        with pytest.raises(anyio.ClosedResourceError, match="inherited through fork"):
            queue.get(timeout=60)
        join_all([child])
    finally:
        _INHERITED.clear()
        tx.close()
        rx.close()
