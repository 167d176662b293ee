"""Locks, semaphores, events, conditions, values and arrays across real processes.

Every cross-process test runs under fork, spawn and forkserver (the ``ctx`` fixture).
Cancellation is exercised with anyio scopes (asyncio and trio) in the children and
native asyncio (``asyncio.wait_for``, ``asyncio.timeout``, ``Task.cancel()``, twice) in
the parent; deaths are real ``SIGKILL``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from anyio import WouldBlock

import aioshm
from aioshm import _condition

from . import primitive_workers as workers
from .helpers import Context, join_all, shared_sleepers, wait_until

pytestmark = pytest.mark.timeout(60)

Ctx = Context
DEADLINE = 1.0  # the bound for freeing a dead holder's lock


def kill(proc: multiprocessing.process.BaseProcess) -> float:
    """SIGKILL without reaping (a zombie must count as dead); return the time of it."""
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    return time.monotonic()


async def until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    """Poll ``predicate`` on the event loop until true; fail after ``timeout``."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


# ====================================================================== mutual exclusion


def test_value_increments_under_the_lock_are_exact(ctx: Ctx) -> None:
    """4 processes x 2,000 read-modify-write increments (yielding between the read and
    the write) under ``get_lock()``: exactly 8,000. The processes mix asyncio, trio and
    a blocking ``with lock:``."""
    counter = aioshm.Value("q", 0)
    modes = ["asyncio", "trio", "blocking", "asyncio"]
    procs = [ctx.Process(target=workers.increment, args=(counter, 2000, m)) for m in modes]
    for proc in procs:
        proc.start()
    join_all(procs, timeout=50)
    assert counter.value == 8000
    assert not counter.get_lock().locked()


def test_value_increments_without_a_lock_run(ctx: Ctx) -> None:
    """The same increments on ``Value(lock=False)``: it runs and never over-counts; it
    may well lose updates (that is why the lock matters), but a race is not asserted."""
    counter = aioshm.Value("q", 0, lock=False)
    assert not hasattr(counter, "get_lock")
    procs = [
        ctx.Process(target=workers.increment_raw, args=(counter, 2000, b))
        for b in ("asyncio", "trio", "asyncio", "trio")
    ]
    for proc in procs:
        proc.start()
    join_all(procs, timeout=50)
    assert 2000 <= counter.value <= 8000


# ====================================================================== cancellation storms


async def _native_hold(guard: workers.Guard, rng: random.Random) -> None:
    guard.enter()
    try:
        await asyncio.sleep(rng.uniform(0, 0.0015))
    finally:
        guard.leave()


async def _native_round(
    rng: random.Random,
    acquire: Callable[[], Awaitable[None]],
    release: Callable[[], None],
    hold: Callable[[], Awaitable[None]],
) -> None:
    """One acquire-hold-release under native asyncio cancellation: ``wait_for``,
    ``asyncio.timeout``, or ``Task.cancel()`` (half the time twice)."""
    timeout = rng.uniform(0, 0.004)
    mode = rng.randrange(3)
    if mode == 0:
        try:
            await asyncio.wait_for(acquire(), timeout)
        except TimeoutError:
            return
        try:
            await hold()
        finally:
            release()
    elif mode == 1:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await acquire()
                try:
                    await hold()
                finally:
                    release()
    else:

        async def body() -> None:
            await acquire()
            try:
                await hold()
            finally:
                release()

        task = asyncio.create_task(body())
        await asyncio.sleep(timeout)
        task.cancel()
        if rng.random() < 0.5:
            await asyncio.sleep(0)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _native_storm(tasks: int, rounds: int, seed: int, one_round: Any) -> None:
    async def one(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        for _ in range(rounds):
            await one_round(rng)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.uniform(0, 0.002))

    async with asyncio.timeout(50), asyncio.TaskGroup() as tg:
        for t in range(tasks):
            tg.create_task(one(t))


@pytest.mark.asyncio
async def test_lock_cancellation_storm(ctx: Ctx) -> None:
    """Three processes (native asyncio here, anyio on trio and on asyncio in two
    children), 12 tasks each, acquiring under random short timeouts: never two
    holders, and afterwards the lock is free with nobody waiting."""
    lock = aioshm.Lock()
    slots = aioshm.RawArray("q", workers.GUARD_SLOTS)
    entered = aioshm.RawArray("q", 3)
    procs = [
        ctx.Process(target=workers.lock_storm, args=(lock, slots, entered, i, i, 12, 40, backend))
        for i, backend in ((1, "trio"), (2, "asyncio"))
    ]
    for proc in procs:
        proc.start()
    guard = workers.Guard(slots, 1)

    async def one_round(rng: random.Random) -> None:
        await _native_round(rng, lock.acquire, lock.release, lambda: _native_hold(guard, rng))

    await _native_storm(12, 40, 0, one_round)
    entered[0] = guard.entered
    await anyio.to_thread.run_sync(join_all, procs)
    assert slots[workers.VIOLATIONS] == 0
    assert (slots[workers.INSIDE], slots[workers.MOST]) == (0, 1)
    assert all(n > 0 for n in entered), list(entered)
    stats = lock.statistics()
    assert (stats.locked, stats.depth, stats.tasks_waiting) == (False, 0, 0)
    lock.acquire_nowait()
    lock.release()


@pytest.mark.asyncio
async def test_semaphore_cancellation_storm(ctx: Ctx) -> None:
    """As the lock storm, on a Semaphore(3), half the acquires in ``async with`` and
    half bare: never more than 3 holders; afterwards the value is 3 again and no
    permit is held."""
    limit, tasks = 3, 12
    sem = aioshm.Semaphore(limit)
    slots = aioshm.RawArray("q", workers.GUARD_SLOTS)
    holders = aioshm.RawArray("q", 3 * tasks)
    entered = aioshm.RawArray("q", 3)
    procs = [
        ctx.Process(
            target=workers.semaphore_storm,
            args=(sem, slots, holders, entered, i, limit, i, tasks, 40, backend),
        )
        for i, backend in ((1, "trio"), (2, "asyncio"))
    ]
    for proc in procs:
        proc.start()
    guard = workers.SlotGuard(slots, holders, limit)
    guards = iter([guard.for_task(t) for t in range(tasks)])
    mine: dict[int, workers.SlotGuard] = {}

    def task_guard() -> workers.SlotGuard:
        task = id(asyncio.current_task())
        if task not in mine:
            mine[task] = next(guards)
        return mine[task]

    async def held_round(rng: random.Random) -> None:
        # async with: the held (tracked) permits
        timeout = rng.uniform(0, 0.004)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), sem:
                await _native_hold(task_guard(), rng)

    async def one_round(rng: random.Random) -> None:
        if rng.random() < 0.3:
            await held_round(rng)
        else:
            g = task_guard()
            await _native_round(rng, sem.acquire, sem.release, lambda: _native_hold(g, rng))

    await _native_storm(tasks, 40, 0, one_round)
    entered[0] = sum(g.entered for g in mine.values())
    await anyio.to_thread.run_sync(join_all, procs)
    assert slots[workers.VIOLATIONS] == 0
    assert sum(holders) == 0
    assert 1 < slots[workers.MOST] <= limit
    assert all(n > 0 for n in entered), list(entered)
    stats = sem.statistics()
    assert (stats.value, stats.held, stats.reclaimed, stats.tasks_waiting) == (limit, 0, 0, 0)


@pytest.mark.asyncio
async def test_condition_cancellation_storm(ctx: Ctx) -> None:
    """Patient consumers (no timeout) in three processes each wait for one token while
    bystanders wait on the same condition under random short timeouts (anyio scopes in
    the children; ``wait_for``, ``asyncio.timeout`` and double ``Task.cancel()`` here).
    The parent produces exactly one token per consumer, with ``notify(1)`` each: a
    notification lost on a cancelled bystander would strand a consumer and fail the
    deadline. Afterwards nothing is registered and the lock is free."""
    cond = aioshm.Condition()
    counters = aioshm.RawArray("q", workers.COND_SLOTS)
    stop = aioshm.Event()
    patient, impatient = 4, 8
    procs = [
        ctx.Process(
            target=workers.condition_storm,
            args=(cond, counters, stop, patient, impatient, i, backend),
        )
        for i, backend in ((1, "trio"), (2, "asyncio"))
    ]
    for proc in procs:
        proc.start()
    total = patient * 3

    async def consumer() -> None:
        async with cond:
            await cond.wait_for(lambda: counters[workers.TOKENS] > 0)
            counters[workers.TOKENS] -= 1
            counters[workers.TAKEN] += 1

    async def wait_then_hand_on() -> None:
        await cond.wait()
        cond.notify()  # not for me: pass it on

    async def bystander_round(rng: random.Random) -> None:
        timeout = rng.uniform(0, 0.004)
        mode = rng.randrange(3)
        if mode == 0:
            async with cond:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait_then_hand_on(), timeout)
        elif mode == 1:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout), cond:
                    await wait_then_hand_on()
        else:

            async def body() -> None:
                async with cond:
                    await wait_then_hand_on()

            task = asyncio.create_task(body())
            await asyncio.sleep(timeout)
            task.cancel()
            if rng.random() < 0.5:
                await asyncio.sleep(0)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def bystander(rng: random.Random) -> None:
        while not stop.is_set():
            await bystander_round(rng)
            await asyncio.sleep(rng.uniform(0, 0.001))

    async def produce() -> None:
        rng = random.Random(99)
        for _ in range(total):
            await asyncio.sleep(rng.uniform(0, 0.01))
            async with cond:
                counters[workers.TOKENS] += 1
                cond.notify(1)

    try:
        async with asyncio.timeout(40), asyncio.TaskGroup() as tg:
            for _ in range(patient):
                tg.create_task(consumer())
            for t in range(impatient):
                tg.create_task(bystander(random.Random(t)))
            await produce()
            while counters[workers.TAKEN] < total:
                await asyncio.sleep(0.01)
            stop.set()
    finally:
        stop.set()
    await anyio.to_thread.run_sync(join_all, procs)
    assert (counters[workers.TOKENS], counters[workers.TAKEN]) == (0, total)
    stats = cond.statistics()
    assert (stats.waiting, stats.granted, stats.tasks_waiting) == (0, 0, 0)
    assert stats.notified >= total
    assert not stats.lock_statistics.locked
    assert cond._state.segment.ctl[_condition._C_TIDIED] == 0  # no leftovers had to be cleared


# ====================================================================== notify and cancel


@pytest.mark.anyio
async def test_notify_on_a_cancelled_waiter_wakes_another() -> None:
    """Two waiters; notify(1) lands on the older one, which is then cancelled before it
    runs: the younger one wakes instead."""
    cond = aioshm.Condition()
    woke: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def waiter(name: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            async with cond:
                await cond.wait()
                woke.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "older")
        await until(lambda: cond.statistics().waiting == 1)
        tg.start_soon(waiter, "younger")
        await until(lambda: cond.statistics().waiting == 2)
        async with cond:
            cond.notify(1)
            scopes["older"].cancel()
        await until(lambda: woke == ["younger"], timeout=5, what="the younger waiter")
    stats = cond.statistics()
    assert (stats.waiting, stats.granted, stats.notified) == (0, 0, 1)
    assert not cond.locked()


def test_notify_on_a_cancelled_waiter_wakes_one_in_another_process(
    ctx: Ctx, anyio_backend: str
) -> None:
    """The older waiter is here, the younger in a child: notify(1) lands here, the
    waiter here is cancelled, and the notification is passed on to the child."""
    cond = aioshm.Condition()
    go = aioshm.Event()
    child = ctx.Process(target=workers.wait_on_condition, args=(cond, go, "trio"))
    child.start()  # before any event loop runs here: a forked child must not inherit one

    async def main() -> None:
        scope = anyio.CancelScope()

        async def older() -> None:
            with scope:
                async with cond:
                    await cond.wait()
            assert scope.cancelled_caught

        async with anyio.create_task_group() as tg:
            tg.start_soon(older)
            await until(lambda: cond.statistics().waiting == 1)
            go.set()
            await until(lambda: cond.statistics().waiting == 2, timeout=30, what="the child")
            async with cond:
                cond.notify(1)
                scope.cancel()

    anyio.run(main, backend=anyio_backend)
    join_all([child], timeout=15)
    stats = cond.statistics()
    assert (stats.waiting, stats.granted, stats.notified, stats.passed_on) == (0, 0, 1, 1)


@pytest.mark.asyncio
async def test_cancelled_while_taking_the_lock_back_passes_the_notification_on() -> None:
    """Native asyncio: a waiter is notified, then cancelled twice while it waits to
    take the lock back (the notifier still holds it). It holds the lock again before
    the cancellation propagates, and its notification goes to the other waiter."""
    cond = aioshm.Condition()
    woke: list[str] = []

    async def waiter(name: str) -> None:
        async with cond:
            await cond.wait()
            woke.append(name)

    first = asyncio.create_task(waiter("first"))
    await until(lambda: cond.statistics().waiting == 1)
    second = asyncio.create_task(waiter("second"))
    await until(lambda: cond.statistics().waiting == 2)
    await cond.acquire()
    cond.notify(1)  # to "first"
    await until(lambda: cond.statistics().granted == 0)  # "first" took it...
    await until(lambda: cond.lock.statistics().tasks_waiting == 1)  # ...and waits for the lock
    first.cancel()
    await asyncio.sleep(0.01)
    first.cancel()  # a second cancellation while it takes the lock back
    await asyncio.sleep(0.01)
    assert not first.done()  # it cannot leave before it holds the lock again
    cond.release()
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(5):
        await second
    assert woke == ["second"]
    stats = cond.statistics()
    assert (stats.waiting, stats.granted, stats.passed_on) == (0, 0, 1)
    assert not cond.locked()


def test_notification_for_a_killed_waiter_goes_to_a_live_one(ctx: Ctx, anyio_backend: str) -> None:
    """The older waiter is a child, killed before notify(1) lands on its ticket: the
    liveness sweep passes the notification on to the waiter here."""
    cond = aioshm.Condition()
    child = ctx.Process(target=workers.wait_on_condition, args=(cond, None, "asyncio"))
    child.start()
    woke = False

    async def younger() -> None:
        nonlocal woke
        async with cond:
            await cond.wait()
        woke = True

    async def main() -> float:
        await until(lambda: cond.statistics().waiting == 1, timeout=30, what="the child")
        async with anyio.create_task_group() as tg:
            tg.start_soon(younger)
            await until(lambda: cond.statistics().waiting == 2)
            killed_at = kill(child)
            async with cond:
                cond.notify(1)
            await until(lambda: woke, timeout=5, what="the live waiter")
        return time.monotonic() - killed_at

    elapsed = anyio.run(main, backend=anyio_backend)
    assert elapsed < 2 * DEADLINE, elapsed
    child.join(10)
    stats = cond.statistics()
    assert (stats.waiting, stats.granted) == (0, 0)


@pytest.mark.anyio
async def test_condition_needs_the_lock() -> None:
    cond = aioshm.Condition(aioshm.RLock())
    with pytest.raises(RuntimeError):
        await cond.wait()
    with pytest.raises(RuntimeError):
        cond.notify()
    with pytest.raises(RuntimeError):
        cond.notify_all()
    async with cond, cond:  # an RLock: the same task may enter twice
        cond.notify_all()  # nobody waits: nothing happens
        assert cond.lock.statistics().depth == 2
    assert not cond.locked()
    with pytest.raises(TypeError):
        aioshm.Condition(threading.Lock())  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_condition_wait_with_an_rlock_restores_the_depth() -> None:
    cond = aioshm.Condition(aioshm.RLock())
    ready = False

    async def notifier() -> None:
        nonlocal ready
        await until(lambda: cond.statistics().waiting == 1)
        async with cond:
            assert cond.lock.statistics().depth == 1  # the waiter released both levels
            ready = True
            cond.notify_all()

    async with anyio.create_task_group() as tg:
        tg.start_soon(notifier)
        async with cond, cond:
            assert await cond.wait_for(lambda: ready) is True
            assert cond.lock.statistics().depth == 2
    assert not cond.locked()


# ====================================================================== events


def test_event_set_in_one_process_is_seen_in_three_others(ctx: Ctx) -> None:
    """Three children wait (4 async tasks and one blocking thread each, on asyncio or
    trio). Round 1: the parent sets the event and at once clears it: every waiter still
    returns. Round 2: a plain set()."""
    event = aioshm.Event()
    ready = aioshm.Semaphore(0)
    procs = [
        ctx.Process(target=workers.wait_event, args=(event, ready, 2, 4, backend))
        for backend in ("asyncio", "trio", "asyncio")
    ]
    for proc in procs:
        proc.start()
    for _ in range(3):
        assert ready.acquire_blocking(timeout=30)
    event.set()
    event.clear()  # a pulse: waiters woken by the set() must return even so
    for _ in range(3):
        assert ready.acquire_blocking(timeout=30)
    event.set()
    join_all(procs, timeout=30)
    assert event.is_set()


@pytest.mark.anyio
async def test_event_basics() -> None:
    event = aioshm.Event()
    assert not event.is_set()
    assert not event.wait_blocking(timeout=0.05)
    with anyio.move_on_after(0.05) as scope:
        await event.wait()
    assert scope.cancelled_caught
    assert event.statistics().tasks_waiting == 0
    event.set()
    event.set()
    await event.wait()
    assert event.wait_blocking(timeout=0)
    event.clear()
    assert not event.is_set()


# ====================================================================== RLock ownership


@pytest.mark.anyio
async def test_rlock_is_reentrant_per_task_and_owned() -> None:
    rlock = aioshm.RLock()
    other_done = anyio.Event()

    async def other_task() -> None:
        with pytest.raises(RuntimeError):
            rlock.release()  # held by the main task
        with pytest.raises(WouldBlock):
            rlock.acquire_nowait()  # another task is another owner
        other_done.set()

    await rlock.acquire()
    await rlock.acquire()
    rlock.acquire_nowait()
    assert rlock.statistics().depth == 3
    async with anyio.create_task_group() as tg:
        tg.start_soon(other_task)
    assert other_done.is_set()
    # A thread blocked in acquire_blocking is another owner, even in this process.
    assert not await anyio.to_thread.run_sync(rlock.acquire_blocking, 0.1)
    for _ in range(3):
        rlock.release()
    assert not rlock.locked()
    with pytest.raises(RuntimeError):
        rlock.release()

    # A thread's holding is its own: re-entrant for that thread, not for this task.
    acquired, release = threading.Event(), threading.Event()

    def in_thread() -> None:
        assert rlock.acquire_blocking(timeout=5)
        assert rlock.acquire_blocking(timeout=5)
        acquired.set()
        release.wait(10)
        rlock.release()
        rlock.release()

    thread = threading.Thread(target=in_thread)
    thread.start()
    assert await anyio.to_thread.run_sync(acquired.wait, 10)
    assert rlock.statistics().depth == 2
    with pytest.raises(RuntimeError):
        rlock.release()  # the thread holds it, not this task
    with pytest.raises(WouldBlock):
        rlock.acquire_nowait()
    release.set()
    await anyio.to_thread.run_sync(thread.join, 10)
    assert not rlock.locked()


def test_rlock_cannot_be_released_by_another_process(ctx: Ctx) -> None:
    rlock = aioshm.RLock()
    assert rlock.acquire_blocking()
    child = ctx.Process(target=workers.release_foreign, args=(rlock,))
    child.start()
    join_all([child], timeout=30)
    assert rlock.locked()
    rlock.release()


@pytest.mark.anyio
async def test_lock_semantics() -> None:
    """A Lock (unlike an RLock) may be released by another task, like asyncio.Lock and
    multiprocessing.Lock; releasing it unlocked raises."""
    lock = aioshm.Lock()
    with pytest.raises(RuntimeError):
        lock.release()
    await lock.acquire()
    with pytest.raises(WouldBlock):
        lock.acquire_nowait()
    assert not lock.acquire_blocking(timeout=0.05)

    async def releaser() -> None:
        lock.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(releaser)
    assert not lock.locked()
    with lock:  # the blocking form
        assert lock.locked()
    assert not lock.locked()


@pytest.mark.asyncio
async def test_lock_with_native_wait_for_can_be_released_by_the_caller() -> None:
    """On Python 3.11 asyncio.wait_for runs the acquire in a task of its own; the
    caller must still be able to release what it acquired."""
    lock = aioshm.Lock()
    await asyncio.wait_for(lock.acquire(), 1)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


# ====================================================================== semaphores


def test_bounded_semaphore_refuses_to_overflow() -> None:
    sem = aioshm.BoundedSemaphore(2)
    with pytest.raises(ValueError, match="initial value"):
        sem.release()
    assert sem.value == 2
    assert sem.acquire_blocking(timeout=0)
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    assert sem.value == 2
    plain = aioshm.Semaphore(0)
    plain.release()  # an unbounded one may grow
    assert plain.value == 1
    with pytest.raises(ValueError):
        aioshm.Semaphore(-1)


@pytest.mark.anyio
async def test_semaphore_basics() -> None:
    sem = aioshm.Semaphore(2)
    await sem.acquire()
    async with sem:
        assert sem.value == 0
        assert sem.statistics().held == 1
        with pytest.raises(WouldBlock):
            sem.acquire_nowait()
        assert not sem.acquire_blocking(timeout=0.05)
    assert sem.value == 1
    sem.release()
    assert sem.statistics() == aioshm.SemaphoreStatistics(2, 0, 0, 0)


# ====================================================================== dead holders


def test_lock_of_a_killed_holder_is_freed_within_a_second(ctx: Ctx, anyio_backend: str) -> None:
    """A child acquires the lock, says so through an aioshm Event, and is killed: a
    task waiting here gets the lock within 1 s and sees ``owner_died``."""
    lock = aioshm.Lock()
    held = aioshm.Event()
    child = ctx.Process(target=workers.hold_lock, args=(lock, 1, held, anyio_backend))
    child.start()

    async def main() -> float:
        with anyio.fail_after(30):
            await held.wait()
        assert lock.locked() and not lock.owner_died
        got_it = anyio.Event()

        async def waiter() -> None:
            await lock.acquire()
            got_it.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await until(lambda: lock.statistics().tasks_waiting == 1)
            await until(lambda: shared_sleepers(lock) == 1)  # asleep on the lock's doorbell
            killed_at = kill(child)
            with anyio.fail_after(10):
                await got_it.wait()
            elapsed = time.monotonic() - killed_at
        return elapsed

    elapsed = anyio.run(main, backend=anyio_backend)
    assert elapsed < DEADLINE, elapsed
    assert lock.owner_died
    stats = lock.statistics()
    assert (stats.locked, stats.recoveries, stats.depth) == (True, 1, 1)
    lock.release()
    assert not lock.owner_died  # cleared by a normal release
    child.join(10)


def test_rlock_of_a_killed_holder_is_freed_for_a_blocked_thread(ctx: Ctx) -> None:
    """The same with an RLock held twice, and a plain thread in acquire_blocking."""
    rlock = aioshm.RLock()
    held = aioshm.Event()
    child = ctx.Process(target=workers.hold_lock, args=(rlock, 2, held, "trio"))
    child.start()
    assert held.wait_blocking(timeout=30)
    assert rlock.statistics().depth == 2
    result: list[float] = []

    def waiter() -> None:
        assert rlock.acquire_blocking(timeout=10)
        result.append(time.monotonic())

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: rlock.statistics().tasks_waiting == 1)
    wait_until(lambda: shared_sleepers(rlock) == 1)  # asleep on the lock's doorbell
    killed_at = kill(child)
    thread.join(15)
    assert result and result[0] - killed_at < DEADLINE
    assert rlock.owner_died
    assert rlock.statistics().depth == 1
    child.join(10)


def test_lock_of_a_killed_holder_with_nobody_waiting(ctx: Ctx) -> None:
    """Nobody waits when the holder dies: the next acquirer frees it, even a
    non-blocking one, at its first attempt."""
    lock = aioshm.Lock()
    held = aioshm.Event()
    child = ctx.Process(target=workers.hold_lock, args=(lock, 1, held, "asyncio"))
    child.start()
    assert held.wait_blocking(timeout=30)
    kill(child)
    child.join(10)  # reaped: the pid is gone altogether
    lock.acquire_nowait()
    assert lock.owner_died
    lock.release()


def test_semaphore_permits_of_a_killed_process(ctx: Ctx) -> None:
    """Semaphore(2): one child holds a permit in ``async with`` and another took one
    with a bare acquire(); both are killed. The held permit comes back (a waiter here
    gets it within 1 s); the consumed one does not."""
    sem = aioshm.Semaphore(2)
    held = [aioshm.Event(), aioshm.Event()]
    children = [
        ctx.Process(target=workers.hold_permit, args=(sem, scoped, event))
        for scoped, event in zip((True, False), held, strict=True)
    ]
    for child in children:
        child.start()

    async def main() -> float:
        with anyio.fail_after(30):
            for event in held:
                await event.wait()
        assert sem.statistics()[:2] == (0, 1)  # value 0, one permit held
        got_it = anyio.Event()

        async def waiter() -> None:
            await sem.acquire()
            got_it.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await until(lambda: sem.statistics().tasks_waiting == 1)
            killed_at = min(kill(child) for child in children)
            with anyio.fail_after(10):
                await got_it.wait()
            elapsed = time.monotonic() - killed_at
        # Both children dead and reaped, and a sweep forced: any (wrong) return of
        # the consumed permit has happened by now.
        for child in children:
            child.join(10)
        assert sem._state.sweep(force=True) is False  # nothing left to reclaim
        return elapsed

    assert anyio.run(main) < DEADLINE
    stats = sem.statistics()
    assert (stats.value, stats.held, stats.reclaimed) == (0, 0, 1)
    for child in children:
        child.join(10)


@pytest.mark.parametrize("kind", ["Semaphore", "Lock"])
def test_killed_inside_a_critical_section(ctx: Ctx, kind: str) -> None:
    """A child dies holding the object's own mutex, its change half made (a Semaphore:
    a held permit counted, the value not lowered; a Lock: acquired). The next process
    to take the mutex repairs the state, and the dead child's holding is given back:
    the semaphore's value is whole again, the lock free with ``owner_died``."""
    obj: Any = aioshm.Semaphore(2) if kind == "Semaphore" else aioshm.Lock()
    ready = aioshm.Event()
    child = ctx.Process(target=workers.die_inside_critical_section, args=(obj, ready))
    child.start()
    assert ready.wait_blocking(timeout=30)
    killed_at = kill(child)
    assert obj.acquire_blocking(timeout=5)  # blocks on the mutex until the kill
    assert time.monotonic() - killed_at < DEADLINE
    if kind == "Semaphore":
        stats = obj.statistics()
        assert (stats.value, stats.held, stats.reclaimed) == (1, 0, 1)
        obj.release()
        assert obj.value == 2
    else:
        assert obj.owner_died
        obj.release()
        assert not obj.locked()
    child.join(10)


# ====================================================================== threads and loops


@pytest.mark.anyio
async def test_blocked_waiters_do_not_starve_to_thread() -> None:
    """50 tasks blocked on acquire() (more than anyio's 40 worker threads) leave
    ``anyio.to_thread.run_sync`` free, and use one thread of aioshm's own."""
    lock = aioshm.Lock()
    await lock.acquire()
    threads_before = set(threading.enumerate())
    done = 0

    async def waiter() -> None:
        nonlocal done
        async with lock:
            done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(waiter)
        await until(lambda: lock.statistics().tasks_waiting == 50)
        with anyio.fail_after(5):
            assert await anyio.to_thread.run_sync(lambda: 42) == 42
        new = set(threading.enumerate()) - threads_before
        hubs = [t for t in new if t.name.startswith("aioshm-hub")]
        assert hubs == [lock._state.hub._thread]  # one thread of aioshm's own for all 50
        lock.release()
    assert done == 50
    assert lock.statistics().tasks_waiting == 0


@pytest.mark.anyio
async def test_fast_paths_take_no_thread() -> None:
    lock, rlock, sem, event = aioshm.Lock(), aioshm.RLock(), aioshm.Semaphore(1), aioshm.Event()
    event.set()
    for _ in range(50):
        async with lock, rlock, rlock, sem:
            pass
        await event.wait()
    for obj in (lock, rlock, sem, event):
        assert obj._state.hub._thread is None


def test_no_waiter_left_after_the_loop_ends() -> None:
    """Tasks still waiting when their loop ends (asyncio cancels them) leave nothing
    behind, and a process with waiters blocked at exit exits at once."""
    lock = aioshm.Lock()
    assert lock.acquire_blocking()

    async def main() -> None:
        for _ in range(10):
            asyncio.get_running_loop().create_task(lock.acquire())
        await until(lambda: lock.statistics().tasks_waiting == 10)

    asyncio.run(main())  # cancels the 10 waiting tasks on the way out
    assert lock.statistics().tasks_waiting == 0
    lock.release()
    assert lock.acquire_blocking(timeout=1)  # no stale waiter took it
    lock.release()

    # At exit: the loop is left with 5 tasks still waiting, a daemon thread blocks in
    # acquire_blocking, and the hub thread sleeps on the doorbell: the interpreter
    # still exits at once.
    script = textwrap.dedent(
        """
        import asyncio, threading, aioshm
        lock = aioshm.Lock()
        lock.acquire_blocking()
        threading.Thread(target=lock.acquire_blocking, daemon=True).start()
        loop = asyncio.new_event_loop()
        async def main():
            for _ in range(5):
                loop.create_task(lock.acquire())
            while lock.statistics().tasks_waiting < 6:
                await asyncio.sleep(0.01)
        loop.run_until_complete(main())
        print("waiting", lock.statistics().tasks_waiting, flush=True)
        """
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "waiting 6"
    assert time.monotonic() - start < 15


# ====================================================================== values and arrays


def test_array_numpy_view_is_shared(ctx: Ctx) -> None:
    """A child writes through ``numpy()``; the parent sees it. A lock given to two
    objects stays one lock in the child."""
    lock = aioshm.Lock()
    array = aioshm.Array("d", [1.0, 2.0, 3.0, 4.0], lock=lock)
    value = aioshm.Value("i", 0, lock=lock)
    assert array.get_lock() is lock and value.get_lock() is lock
    view = array.numpy()
    child = ctx.Process(target=workers.fill_array, args=(array, value))
    child.start()
    join_all([child], timeout=30)
    assert view.tolist() == [11.0, 21.0, 31.0, 41.0]  # the same memory, no copy
    assert array[:] == [11.0, 21.0, 31.0, 41.0]
    assert value.value == 4


def test_value_and_array_api() -> None:
    v = aioshm.Value("d", 1.5)
    assert v.value == 1.5
    v.value = 2.5
    assert v.get_obj().value == 2.5
    assert isinstance(v.get_lock(), aioshm.Lock)
    assert aioshm.Value(ctypes.c_int).value == 0

    class Point(ctypes.Structure):
        _fields_ = (("x", ctypes.c_double), ("y", ctypes.c_int))

    p = aioshm.Value(Point, 1.0, 2)
    assert (p.get_obj().x, p.get_obj().y) == (1.0, 2)

    a = aioshm.Array("i", 5)
    assert a[:] == [0] * 5 and len(a) == 5
    a[1:3] = [7, 8]
    assert list(a) == [0, 7, 8, 0, 0]
    a.numpy()[4] = 9
    assert a[4] == 9
    assert a.numpy().dtype == np.intc
    raw = aioshm.Array("c", b"hello", lock=False)
    assert raw.value == b"hello" and not hasattr(raw, "get_lock")
    assert isinstance(raw, aioshm.RawArray)
    assert aioshm.RawValue("i", 3).value == 3
    assert aioshm.RawArray("d", 2)[:] == [0.0, 0.0]
    with pytest.raises(ValueError):
        aioshm.Value("z")
    with pytest.raises(TypeError):
        aioshm.Value(int)
    with pytest.raises(TypeError):
        aioshm.Value("i", lock=threading.Lock())  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "make",
    [
        aioshm.Lock,
        aioshm.RLock,
        aioshm.Semaphore,
        aioshm.BoundedSemaphore,
        aioshm.Event,
        aioshm.Condition,
        lambda: aioshm.Value("i"),
        lambda: aioshm.Array("i", 3),
        lambda: aioshm.RawValue("i"),
    ],
)
def test_pickling_outside_process_start_is_refused(make: Callable[[], object]) -> None:
    obj = make()
    with pytest.raises(RuntimeError, match=r"multiprocessing\.Process"):
        pickle.dumps(obj)


def test_shared_counter_example_runs() -> None:
    root = Path(__file__).resolve().parent.parent
    args = ["--procs", "3", "--increments", "300", "--start-method", "forkserver"]
    result = subprocess.run(
        [sys.executable, "examples/shared_counter.py", *args, "--backend", "trio"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "with the lock:    final count 900, expected 900"
    assert lines[-1] == "correct"
