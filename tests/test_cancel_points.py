"""Every async call is a cancel point (issue 13, section 1).

A call made while its task has a cancellation pending raises it and does nothing, even
when it could proceed at once: the trio rule, which anyio's memory streams follow. Each
operation is set up so that it *could* go through at once (a free slot, a buffered
message, a free lock, a set event), then called with a cancellation already pending, in
every way one can be pending:

- an anyio ``CancelScope`` cancelled before the call (asyncio and trio);
- ``anyio.move_on_after(0)`` (its deadline has passed when it is entered);
- a native asyncio ``Task.cancel()`` of the running task, before the call;
- ``asyncio.timeout(0)``, whose expiry is a callback already queued on the loop.

Then the test checks that the call raised and that nothing happened. The last test
checks that a call with nothing pending still goes through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any, NamedTuple

import anyio
import numpy as np
import pytest

import aioshm
from aioshm import _checkpoint

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class Case(NamedTuple):
    """``op()`` could proceed at once; ``happened()`` tells whether it did."""

    op: Callable[[], Awaitable[object]]
    happened: Callable[[], bool]


Maker = Callable[[], AbstractAsyncContextManager[Case]]
CASES: dict[str, Maker] = {}


def case(fn: Callable[[], AsyncIterator[Case]]) -> Callable[[], AsyncIterator[Case]]:
    CASES[fn.__name__] = asynccontextmanager(fn)
    return fn


@contextmanager
def _pair(kind: Any = Any) -> Iterator[tuple[Any, Any]]:
    tx, rx = aioshm.open_channel[kind](capacity=4, max_message_size=64)
    with tx, rx:
        yield tx, rx


def _buffered(rx: aioshm.ReceiveChannel[Any]) -> int:
    return rx.statistics().current_buffer_used


@case
async def send() -> AsyncIterator[Case]:
    with _pair() as (tx, rx):
        yield Case(lambda: tx.send(b"x"), lambda: _buffered(rx) != 0)


@case
async def send_many() -> AsyncIterator[Case]:
    with _pair() as (tx, rx):
        yield Case(lambda: tx.send_many([b"a", b"b"]), lambda: _buffered(rx) != 0)


@case
async def send_loan() -> AsyncIterator[Case]:
    with _pair() as (tx, rx):

        async def op() -> None:
            async with tx.send_loan(4):
                pass

        def happened() -> bool:
            stats: aioshm.ChannelStatistics = rx.statistics()
            return stats.current_buffer_used != 0 or stats.free_slots != 4

        yield Case(op, happened)


async def _filled(message: object) -> AsyncIterator[tuple[Any, Any]]:
    with _pair() as (tx, rx):
        tx.send_nowait(message)
        yield tx, rx


@case
async def recv() -> AsyncIterator[Case]:
    async for _tx, rx in _filled(b"x"):
        yield Case(rx.recv, lambda: _buffered(rx) != 1)


@case
async def recv_many() -> AsyncIterator[Case]:
    async for _tx, rx in _filled(b"x"):
        yield Case(lambda: rx.recv_many(4), lambda: _buffered(rx) != 1)


@case
async def recv_view() -> AsyncIterator[Case]:
    async for _tx, rx in _filled(np.arange(4.0)):

        async def op() -> None:
            async with rx.recv_view():
                pass

        yield Case(op, lambda: _buffered(rx) != 1 or rx.statistics().slots_in_use != 0)


@case
async def recv_into() -> AsyncIterator[Case]:
    async for _tx, rx in _filled(np.arange(4.0)):
        out = np.zeros(4)
        yield Case(lambda: rx.recv_into(out), lambda: _buffered(rx) != 1 or bool(out.any()))


@case
async def async_for() -> AsyncIterator[Case]:
    async for _tx, rx in _filled(b"x"):
        yield Case(rx.__anext__, lambda: _buffered(rx) != 1)


@case
async def lock_acquire() -> AsyncIterator[Case]:
    lock = aioshm.Lock()
    yield Case(lock.acquire, lock.locked)


@case
async def rlock_acquire() -> AsyncIterator[Case]:
    lock = aioshm.RLock()
    yield Case(lock.acquire, lock.locked)


@case
async def semaphore_acquire() -> AsyncIterator[Case]:
    sem = aioshm.Semaphore(1)
    yield Case(sem.acquire, lambda: sem.value != 1)


@case
async def semaphore_async_with() -> AsyncIterator[Case]:
    sem = aioshm.BoundedSemaphore(1)
    yield Case(sem.__aenter__, lambda: sem.value != 1)


@case
async def event_wait() -> AsyncIterator[Case]:
    event = aioshm.Event()
    event.set()
    yield Case(event.wait, lambda: False)  # no effect: only the raise is checked


@case
async def condition_wait() -> AsyncIterator[Case]:
    cond = aioshm.Condition()
    await cond.acquire()
    cond.notify()  # nobody waits: nothing to take, but the wait could begin

    def happened() -> bool:  # the lock was let go, or a wait was left behind
        return not cond.locked() or cond.statistics().waiting != 0

    yield Case(cond.wait, happened)
    cond.release()


@case
async def condition_wait_for() -> AsyncIterator[Case]:
    cond = aioshm.Condition()
    await cond.acquire()
    calls: list[int] = []

    def predicate() -> bool:
        calls.append(1)
        return True

    yield Case(lambda: cond.wait_for(predicate), lambda: bool(calls) or not cond.locked())
    cond.release()


@case
async def value_async_with() -> AsyncIterator[Case]:
    value = aioshm.Value("i", 0)
    yield Case(value.__aenter__, value.get_lock().locked)


NAMES = sorted(CASES)


@pytest.mark.parametrize("name", NAMES)
async def test_cancelled_scope(name: str) -> None:
    """anyio's test_receive_when_cancelled / test_send_when_cancelled, for every call."""
    async with CASES[name]() as c:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await c.op()
        assert scope.cancelled_caught, "the call did not raise the cancellation"
        assert not c.happened(), "the call went through"


@pytest.mark.parametrize("name", NAMES)
async def test_move_on_after_zero(name: str) -> None:
    async with CASES[name]() as c:
        with anyio.move_on_after(0) as scope:
            await c.op()
        assert scope.cancelled_caught
        assert not c.happened()


@pytest.mark.parametrize("name", NAMES)
async def test_cancelled_outer_scope_through_an_inner_one(name: str) -> None:
    """The cancelled scope is not the innermost one."""
    async with CASES[name]() as c:
        with anyio.CancelScope() as outer:
            outer.cancel()
            with anyio.CancelScope():
                await c.op()
        assert outer.cancelled_caught
        assert not c.happened()


#: Calls that can go through at once (a wait on a condition always waits).
IMMEDIATE = [name for name in NAMES if name != "condition_wait"]


@pytest.mark.parametrize("name", IMMEDIATE)
async def test_shielded_scope_proceeds(name: str) -> None:
    """A shield hides an outer cancellation: the call goes through, as any checkpoint
    would."""
    async with CASES[name]() as c:
        with anyio.CancelScope() as outer:
            outer.cancel()
            with anyio.CancelScope(shield=True):
                assert not _checkpoint.cancel_pending()  # no needless yield either
                await c.op()
                assert c.happened() or name == "event_wait"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_cancel_of_the_running_task(name: str) -> None:
    """``Task.cancel()`` of the running task (``_must_cancel``), before the call."""
    async with CASES[name]() as c:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await c.op()
        task.uncancel()
        assert not c.happened()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_timeout_zero(name: str) -> None:
    async with CASES[name]() as c:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):
                await c.op()
        assert not c.happened()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_expired_timeout_of_another_task_is_not_ours() -> None:
    """An expiry callback queued for another task does not cancel this one."""
    async with CASES["recv"]() as c:
        loop = asyncio.get_running_loop()
        entered: asyncio.Future[asyncio.Timeout] = loop.create_future()

        async def waits_with_timeout() -> None:
            async with asyncio.timeout(10) as timeout:
                entered.set_result(timeout)
                await loop.create_future()

        task = asyncio.create_task(waits_with_timeout())
        timeout = await entered
        timeout.reschedule(loop.time())  # the other task's expiry is queued now
        assert _checkpoint.cancel_pending() is False
        await c.op()
        assert c.happened()
        with pytest.raises(TimeoutError):
            await task


@pytest.mark.parametrize("name", IMMEDIATE)
async def test_nothing_pending_goes_through(name: str) -> None:
    """The cancel check does not stop a call that has nothing pending."""
    async with CASES[name]() as c:
        await c.op()
        assert c.happened() or name == "event_wait"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_long_ready_queue_makes_the_call_yield_not_fail() -> None:
    """Past READY_SCAN_LIMIT queued callbacks the check answers yes rather than scan
    them all: the call then yields (running them) and goes through."""
    loop = asyncio.get_running_loop()
    ran: list[int] = []
    for i in range(_checkpoint.READY_SCAN_LIMIT + 1):
        loop.call_soon(ran.append, i)
    assert _checkpoint.cancel_pending() is True
    async with CASES["recv"]() as c:
        await c.op()
        assert c.happened()
    assert len(ran) == _checkpoint.READY_SCAN_LIMIT + 1  # the call yielded: they ran
