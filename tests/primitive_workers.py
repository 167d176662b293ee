"""Child-process targets for tests/test_primitives.py (module-level, so that spawn and
forkserver can import them). A child reports failure through its exit code."""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

import aioshm
from aioshm import _lock

#: Guard slots in the shared ``RawArray('q', GUARD_SLOTS)`` the storms use.
INSIDE, MOST, VIOLATIONS, ENTERED = range(4)
GUARD_SLOTS = 4


def run(main: Any, backend: str) -> None:
    anyio.run(main, backend=backend)


# ---------------------------------------------------------------------- counters


def increment(value: aioshm.SynchronizedValue, count: int, mode: str) -> None:
    """``count`` read-modify-write increments of ``value`` under its lock. ``mode`` is
    a backend, or "blocking" (``with lock:`` from a plain thread). The increment yields
    between its read and its write, so that a broken lock loses updates."""
    lock = value.get_lock()
    if mode == "blocking":
        for i in range(count):
            with lock:
                seen = value.value
                if i % 4 == 0:
                    time.sleep(0)
                value.value = seen + 1
        return

    async def main() -> None:
        for i in range(count):
            async with lock:
                seen = value.value
                if i % 4 == 0:
                    await checkpoint()
                value.value = seen + 1

    run(main, mode)


def increment_raw(value: aioshm.RawValue, count: int, backend: str) -> None:
    """The same increments with no lock at all."""

    async def main() -> None:
        for i in range(count):
            seen = value.value
            if i % 4 == 0:
                await checkpoint()
            value.value = seen + 1

    run(main, backend)


# ---------------------------------------------------------------------- holders


def hold_lock(
    lock: aioshm.Lock | aioshm.RLock, depth: int, held: aioshm.Event, backend: str
) -> None:
    """Acquire ``depth`` times, say so, and wait to be killed."""

    async def main() -> None:
        for _ in range(depth):
            await lock.acquire()
        held.set()
        await anyio.sleep(60)

    run(main, backend)


def hold_permit(sem: aioshm.Semaphore, scoped: bool, held: aioshm.Event) -> None:
    """Take a permit (in ``async with``, or bare), say so, and wait to be killed."""

    async def main() -> None:
        if scoped:
            async with sem:
                held.set()
                await anyio.sleep(60)
        else:
            await sem.acquire()
            held.set()
            await anyio.sleep(60)

    run(main, "asyncio")


def release_foreign(lock: aioshm.RLock) -> None:
    """Try to release an RLock another process holds: must raise RuntimeError."""
    try:
        lock.release()
    except RuntimeError:
        sys.exit(0)
    sys.exit(3)


# ---------------------------------------------------------------------- events


def wait_event(
    event: aioshm.Event, ready: aioshm.Semaphore, rounds: int, tasks: int, backend: str
) -> None:
    """``rounds`` times: ``tasks`` async waiters and one blocking waiter wait for the
    event; once all of them wait, release ``ready``; all must return within 10 s."""

    async def main() -> None:
        for round_ in range(rounds):
            woke = 0

            async def waiter() -> None:
                nonlocal woke
                await event.wait()
                woke += 1

            def blocking_waiter() -> None:
                nonlocal woke
                if event.wait_blocking(timeout=10):
                    woke += 1

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for _ in range(tasks):
                        tg.start_soon(waiter)
                    tg.start_soon(anyio.to_thread.run_sync, blocking_waiter)
                    while event.statistics().tasks_waiting < tasks + 1:
                        await anyio.sleep(0.005)
                    ready.release()
            assert woke == tasks + 1, woke
            while round_ + 1 < rounds and event.is_set():  # cleared before the next round
                await anyio.sleep(0.005)

    run(main, backend)


# ---------------------------------------------------------------------- storms


class Guard:
    """Counts holders inside a critical section, in shared memory, and records any
    moment with more than ``limit`` inside. Only correct if the primitive is."""

    def __init__(self, slots: aioshm.RawArray, limit: int) -> None:
        self.slots = slots
        self.limit = limit
        self.entered = 0

    def enter(self) -> None:
        inside = self.slots[INSIDE] + 1
        self.slots[INSIDE] = inside
        self.slots[MOST] = max(self.slots[MOST], inside)
        if inside > self.limit:
            self.slots[VIOLATIONS] += 1
        self.entered += 1

    def leave(self) -> None:
        self.slots[INSIDE] -= 1


class SlotGuard(Guard):
    """For a semaphore, several holders are inside at once: each task has a slot of its
    own, set while it holds a permit (set after acquiring, cleared before releasing),
    and a holder that counts more than ``limit`` slots set records a violation."""

    def __init__(self, slots: aioshm.RawArray, holders: aioshm.RawArray, limit: int) -> None:
        super().__init__(slots, limit)
        self.holders = holders
        self.mine = -1

    def for_task(self, index: int) -> SlotGuard:
        guard = SlotGuard(self.slots, self.holders, self.limit)
        guard.mine = index
        return guard

    def enter(self) -> None:
        self.holders[self.mine] = 1
        inside = sum(self.holders)
        self.slots[MOST] = max(self.slots[MOST], inside)
        if inside > self.limit:
            self.slots[VIOLATIONS] += 1
        self.entered += 1

    def leave(self) -> None:
        self.holders[self.mine] = 0


async def _hold_for(guard: Guard, rng: random.Random) -> None:
    guard.enter()
    try:
        await anyio.sleep(rng.uniform(0, 0.0015))
    finally:
        guard.leave()


def lock_storm(
    lock: aioshm.Lock,
    slots: aioshm.RawArray,
    entered: aioshm.RawArray,
    index: int,
    seed: int,
    tasks: int,
    rounds: int,
    backend: str,
) -> None:
    """``tasks`` tasks x ``rounds`` acquires, each under a random short anyio timeout;
    ``entered[index]`` gets how many got in."""
    guard = Guard(slots, 1)

    async def one(rng: random.Random) -> None:
        for _ in range(rounds):
            with anyio.move_on_after(rng.uniform(0, 0.004)):
                async with lock:
                    await _hold_for(guard, rng)
            if rng.random() < 0.3:
                await anyio.sleep(rng.uniform(0, 0.002))

    async def main() -> None:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for t in range(tasks):
                    tg.start_soon(one, random.Random(seed * 1000 + t))
        entered[index] = guard.entered

    run(main, backend)


def semaphore_storm(
    sem: aioshm.Semaphore,
    slots: aioshm.RawArray,
    holders: aioshm.RawArray,
    entered: aioshm.RawArray,
    index: int,
    limit: int,
    seed: int,
    tasks: int,
    rounds: int,
    backend: str,
) -> None:
    """As :func:`lock_storm`, half the acquires held (``async with``), half bare; task
    ``t`` uses holder slot ``index * tasks + t``."""
    guards = [SlotGuard(slots, holders, limit).for_task(index * tasks + t) for t in range(tasks)]

    async def one(guard: SlotGuard, rng: random.Random) -> None:
        for i in range(rounds):
            with anyio.move_on_after(rng.uniform(0, 0.004)):
                if i % 2:
                    async with sem:
                        await _hold_for(guard, rng)
                else:
                    await sem.acquire()
                    try:
                        await _hold_for(guard, rng)
                    finally:
                        sem.release()
            if rng.random() < 0.3:
                await anyio.sleep(rng.uniform(0, 0.002))

    async def main() -> None:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for t in range(tasks):
                    tg.start_soon(one, guards[t], random.Random(seed * 1000 + t))
        entered[index] = sum(guard.entered for guard in guards)

    run(main, backend)


# Condition storm: shared counters in a RawArray('q', COND_SLOTS).
TOKENS, TAKEN, COND_SLOTS = 0, 1, 2


def condition_storm(
    cond: aioshm.Condition,
    counters: aioshm.RawArray,
    stop: aioshm.Event,
    patient: int,
    impatient: int,
    seed: int,
    backend: str,
) -> None:
    """``patient`` consumers each wait, with no timeout, for one token; ``impatient``
    tasks wait on the same condition under random short timeouts until ``stop`` is set,
    and hand on any notification they get (they never take a token). A notification
    lost on a cancelled waiter leaves a token nobody is woken for: a patient consumer
    then waits for ever, and the test fails on its deadline."""

    async def consumer() -> None:
        async with cond:
            await cond.wait_for(lambda: counters[TOKENS] > 0)
            counters[TOKENS] -= 1
            counters[TAKEN] += 1

    async def bystander(rng: random.Random) -> None:
        while not stop.is_set():
            with anyio.move_on_after(rng.uniform(0, 0.004)):
                async with cond:
                    await cond.wait()
                    cond.notify()  # not for me: pass it on
            await anyio.sleep(rng.uniform(0, 0.001))

    async def main() -> None:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(patient):
                    tg.start_soon(consumer)
                for t in range(impatient):
                    tg.start_soon(bystander, random.Random(seed * 1000 + t))

    run(main, backend)


def wait_on_condition(cond: aioshm.Condition, go: aioshm.Event | None, backend: str) -> None:
    """Once ``go`` is set (if given), wait once to be notified; exit 0 when notified."""
    if go is not None and not go.wait_blocking(timeout=30):
        sys.exit(5)

    async def main() -> None:
        with anyio.fail_after(30):
            async with cond:
                await cond.wait()

    run(main, backend)


# ---------------------------------------------------------------------- values


def fill_array(array: aioshm.SynchronizedArray, value: aioshm.SynchronizedValue) -> None:
    """Write through a numpy view in the child; the parent must see it."""
    view = array.numpy()
    view[:] = view * 10 + 1
    value.value = len(array)
    if array.get_lock() is not value.get_lock():
        sys.exit(4)  # one lock passed twice must stay one object


def die_inside_critical_section(obj: Any, ready: aioshm.Event) -> None:
    """Take the object's own mutex, make half of a change, say so, and wait to be
    killed: a Semaphore gets a held permit counted but not its value lowered; a Lock
    is acquired (committed) with the mutex still held."""
    state = obj._state
    entry = state.my_entry()
    state._mutex.acquire()
    if isinstance(obj, aioshm.Semaphore):
        state.held[entry] += 1  # the commit of a held acquire; the value is not lowered
    else:
        ctl = state.segment.ctl
        ctl[_lock._L_OWNER] = -1
        ctl[_lock._L_COUNT] = 1
        ctl[_lock._L_ENTRY] = entry + 1
    ready.set()
    time.sleep(60)
