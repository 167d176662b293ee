"""Layer 3: the wait bridge: async tasks waiting on a shared object's doorbell.

An operation that cannot proceed must sleep until another process changes the shared
state, and only a thread can sleep on a process-shared semaphore. Rather than lend one
worker thread to each waiting task, each process has one *hub* per (shared object, side):

* A waiting task first retries briefly on its own event loop (see :data:`SPIN`);
  then it queues up in the hub and awaits a wake-up of its own event loop (a bare future
  on asyncio, an anyio event on trio), so the loop never blocks and no thread is held
  per task.
* The hub's thread sleeps on the doorbell for all of them. When the shared object says
  ``n`` waiters could proceed, it wakes ``n`` tasks, oldest first; they retry their
  non-blocking operation, and a task that loses a race queues up again at the front.
  A wake-up that nobody here can use (its tasks were cancelled meanwhile), it passes
  on to another sleeper.
* The thread is aioshm's own: it never takes a token from anyio's default thread
  limiter, so waiting tasks cannot starve ``anyio.to_thread.run_sync`` callers. It
  exits after a short idle spell, or when the object's last local handle closes.

Cancellation is atomic: a waiting task holds nothing but its place in the queue. If it
is cancelled (anyio scope, trio, or native ``asyncio`` ``Task.cancel()``) after being
woken, it hands the wake-up on to the next waiting task, or rings the doorbell for
another process, so that no wake-up is lost.

If the hub's thread fails (an unexpected exception; nothing in aioshm raises one on
purpose), no task is left waiting for it: every task queued in the hub gets a
:class:`HubFailed` whose ``__cause__`` is the original, having done nothing, and the
next wait starts a new thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import anyio
from anyio import WouldBlock
from anyio.lowlevel import EventLoopToken, checkpoint, current_token

from . import _procs
from ._shared import SharedObject

__all__ = ["Hub", "HubFailed"]

T = TypeVar("T")

#: How long an idle hub thread waits for new work before it exits.
LINGER = 5.0
#: A task that must wait first keeps retrying on its event loop, a checkpoint before
#: each retry, for up to this long: a reply that comes back this fast costs no thread
#: hop. It spins only while waits have lately been short enough for that to pay (a
#: moving average under :data:`SPIN_WHILE_WAITS_UNDER`; a consumer that waits a
#: millisecond for each large message does not spin), and not while the other runnable
#: tasks of the machine can fill every CPU, where a spinning process would take the CPU
#: from the one it waits for.
SPIN = 100e-6
SPIN_WHILE_WAITS_UNDER = 4 * SPIN
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: This process's hub threads that are not asleep (they count as this process's own
#: running threads when deciding whether to spin; see
#: :func:`aioshm._procs.others_runnable`).
_awake = 0
_awake_lock = threading.Lock()


def _hub_awake(delta: int) -> None:
    global _awake
    with _awake_lock:
        _awake += delta


def _asleep(sleep: Callable[..., T], *args: object) -> T:
    """``sleep(*args)``, this hub thread not counted as awake meanwhile."""
    _hub_awake(-1)
    try:
        return sleep(*args)
    finally:
        _hub_awake(1)


def _reset_awake_in_child() -> None:
    global _awake, _awake_lock
    _awake, _awake_lock = 0, threading.Lock()  # no hub thread survives a fork


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_awake_in_child)


class HubFailed(RuntimeError):
    """The thread that waits on a shared object's doorbell for this process failed.

    The waiting operation did not happen; retrying it starts a new thread. The original
    exception is the ``__cause__``.
    """


class _Waiter:
    """A task waiting in a hub, on any event loop anyio runs (through an anyio event)."""

    __slots__ = ("error", "event", "tag", "token", "woken")

    def __init__(self, token: EventLoopToken, tag: object) -> None:
        self.token = token
        self.event = anyio.Event()
        self.tag = tag
        self.woken = False
        self.error: BaseException | None = None

    def notify(self) -> bool:
        """Wake the task from any thread; False if its event loop is gone."""
        try:
            self.token.backend_class.run_sync_soon(self.event.set, (), self.token.native_token)
        except (anyio.RunFinishedError, RuntimeError):
            return False
        return True

    async def wait(self) -> None:
        await self.event.wait()


class _AsyncioWaiter(_Waiter):
    """The same on an asyncio loop, through a bare future: no anyio machinery on the
    way. A cancelled task (anyio scope or ``Task.cancel()``) raises from :meth:`wait`
    exactly as it would from the event's, woken or not."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, tag: object) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.tag = tag
        self.woken = False
        self.error = None

    def notify(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # the loop is closed
            return False
        return True

    async def wait(self) -> None:
        await self.future


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # else cancelled meanwhile
        future.set_result(None)


def _new_waiter(tag: object) -> _Waiter:
    token = current_token()
    loop = token.native_token
    if isinstance(loop, asyncio.AbstractEventLoop):
        return _AsyncioWaiter(loop, tag)
    return _Waiter(token, tag)


class Hub:
    """All of one process's tasks waiting on one side of one shared object."""

    def __init__(self, obj: SharedObject, side: int) -> None:
        self._obj = obj
        self._side = side
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiters: deque[_Waiter] = deque()
        self._woken = 0  # woken waiters that have not finished retrying yet
        self._thread: threading.Thread | None = None
        self._closed = False
        self._typical_wait = 0.0  # a moving average of how long waits last

    @property
    def waiting(self) -> int:
        """Tasks waiting or woken and retrying.

        Read under the hub's lock: a wake-up moves a waiter from the queue to the woken
        count in two steps, and a reader between them would miss it.
        """
        with self._lock:
            return len(self._waiters) + self._woken

    async def retry(self, attempt: Callable[[], T], tag: object) -> T:
        """Wait for the doorbell, then call ``attempt`` until it stops raising
        ``WouldBlock``; return its result.

        ``tag`` identifies the caller for :meth:`wake_tagged` (a handle being closed).
        Cancellation: only the waits are cancellation points, and a cancelled wait
        leaves nothing behind. ``attempt`` must be non-blocking and do all or nothing.
        Raises :class:`HubFailed` (having done nothing) if the hub's thread failed
        while the task waited in it.
        """
        started = time.monotonic()
        if (
            self._typical_wait < SPIN_WHILE_WAITS_UNDER
            and _procs.others_runnable(1 + _awake) < CPUS
        ):
            spin_until = started + SPIN
            while True:
                await checkpoint()
                try:
                    result = attempt()
                except WouldBlock:
                    if time.monotonic() < spin_until:
                        continue
                    break
                self._waited(started)
                return result
        woken = again = False
        try:
            while True:
                await self._sleep(tag, front=again)
                woken = True
                try:
                    result = attempt()
                except WouldBlock:
                    self._retried()
                    woken = False
                    again = True  # lost a race: first in the queue next time
                    continue
                self._waited(started)
                return result
        finally:
            if woken:
                self._retried()

    def _waited(self, started: float) -> None:
        """Fold a wait's duration into the moving average that decides on spinning."""
        self._typical_wait += (time.monotonic() - started - self._typical_wait) / 4

    async def _sleep(self, tag: object, front: bool) -> None:
        waiter = _new_waiter(tag)
        with self._lock:
            if front:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"aioshm-hub-{self._side}", daemon=True
                )
                self._thread.start()
            else:
                self._work.notify()
        try:
            await waiter.wait()
        except BaseException:
            self._withdraw(waiter)
            raise
        if waiter.error is not None:
            raise HubFailed(
                f"aioshm's wait thread for this process failed: {waiter.error!r}"
            ) from waiter.error

    def _withdraw(self, waiter: _Waiter) -> None:
        """A waiter leaves without retrying; a wake-up it got goes to someone else."""
        successor = None
        with self._lock:
            if not waiter.woken:
                if waiter.error is None:  # else the failed hub took it off already
                    self._waiters.remove(waiter)
                return
            while self._waiters:
                successor = self._waiters.popleft()
                successor.woken = True
                if successor.notify():
                    return
                successor = None
            self._woken -= 1
        self._obj.forward(self._side)

    def _retried(self) -> None:
        with self._lock:
            self._woken -= 1

    def wake_tagged(self, tag: object) -> None:
        """Wake every task waiting for ``tag`` (its handle was closed)."""
        with self._lock:
            keep: deque[_Waiter] = deque()
            for waiter in self._waiters:
                if waiter.tag is tag:
                    waiter.woken = True
                    self._woken += 1
                    if not waiter.notify():
                        self._woken -= 1
                else:
                    keep.append(waiter)
            self._waiters = keep

    def close(self, blocking: bool = True) -> None:
        """Let the thread exit once no task waits any more.

        ``blocking=False`` is for finalizers, which may run while this thread holds the
        hub's lock: the lock is not waited for, and when it is busy the thread sees the
        flag at its next wake-up (at most :data:`LINGER` later) instead of at once.
        """
        self._closed = True
        if self._lock.acquire(blocking):
            try:
                self._work.notify()
            finally:
                self._lock.release()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiters = deque()
        self._woken = 0
        self._thread = None

    def _wake(self, count: int) -> int:
        """Wake up to ``count`` waiting tasks, oldest first; how many it woke."""
        woke = 0
        with self._lock:
            while self._waiters and woke < count:
                waiter = self._waiters.popleft()
                waiter.woken = True
                if waiter.notify():
                    self._woken += 1
                    woke += 1
        return woke

    def _reserved(self) -> int:
        """Woken tasks still retrying: what the doorbell's count leaves to them. Read
        under the shared object's mutex, not the hub's lock; a count just gone stale
        costs one spurious wake-up (the woken task queues up again first) or one more
        round on the doorbell."""
        return self._woken

    def _run(self) -> None:
        _hub_awake(1)
        try:
            self._serve()
        except BaseException as exc:  # handed to every waiting task
            self._fail(exc)
        finally:
            _hub_awake(-1)

    def _fail(self, exc: BaseException) -> None:
        """The thread failed: fail every queued task, so that none waits for ever, and
        let the next wait start a new thread."""
        with self._lock:
            if self._thread is threading.current_thread():
                self._thread = None
            failed, self._waiters = self._waiters, deque()
            for waiter in failed:
                waiter.error = exc
                waiter.notify()
        with contextlib.suppress(Exception):  # a wake-up it may have taken goes on
            self._obj.forward(self._side)

    def _serve(self) -> None:
        obj, side, reserved = self._obj, self._side, self._reserved
        ready = woke = 0
        while True:
            with self._lock:
                forward = ready != 0 and not woke and not self._waiters
                while not forward and not self._waiters:
                    idle = self._closed or not _asleep(self._work.wait, LINGER)
                    if idle and not self._waiters:
                        self._thread = None
                        return
            if forward:  # a wake-up nobody here can use
                obj.forward(side)
                ready = 0
                continue
            # Sleeps until rung or its turn to wake; a sleep that times out also sweeps.
            ready = _asleep(obj.wait, side, None, reserved)
            woke = self._wake(ready) if ready > 0 else 0
