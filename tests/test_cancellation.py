"""Cancellation is atomic: a cancelled send or receive did not happen, and once the
cancelled call has raised, nothing is held on its behalf.

Covered: anyio cancel scopes (asyncio and trio), trio itself, and native asyncio
(``Task.cancel()``, a second ``cancel()`` while the first is handled, ``asyncio.timeout``,
``asyncio.wait_for``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import aioshm
from aioshm._shared import RECV

from .helpers import shared_sleepers, wait_until

pytestmark = pytest.mark.timeout(120)

ROUNDS = 60


async def blocked(rx_or_tx: Any, *, receiving: bool) -> None:
    """Wait until a task of this process is queued in the hub, and the hub's thread is
    registered asleep on the channel's doorbell (the shared sleeper count)."""
    side = "recv" if receiving else "send"
    with anyio.fail_after(10):
        while True:
            stats = rx_or_tx.statistics()
            waiting = stats.tasks_waiting_receive if receiving else stats.tasks_waiting_send
            if waiting > 0 and shared_sleepers(rx_or_tx, side) > 0:
                break
            await anyio.sleep(0.001)


# ---------------------------------------------------------------- anyio and trio


@pytest.mark.anyio
async def test_cancelled_recv_holds_nothing_anyio() -> None:
    """The issue's example: cancel a blocked recv, then send_nowait("last"), close the
    sender and recv_nowait() at once: it returns "last" every time (and with two
    messages sent, both, in order: nothing was taken from the head or the tail)."""
    for _ in range(ROUNDS):
        tx, rx = aioshm.open_channel[str](capacity=2, max_message_size=64)
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def receiver(scope: anyio.CancelScope = scope) -> None:
                with scope:
                    await rx.recv()
                    raise AssertionError("received from an empty channel")

            tg.start_soon(receiver)
            await blocked(rx, receiving=True)
            scope.cancel()
        tx.send_nowait("first")
        tx.send_nowait("last")
        tx.close()
        assert [rx.recv_nowait(), rx.recv_nowait()] == ["first", "last"]
        with pytest.raises(anyio.EndOfStream):
            rx.recv_nowait()
        rx.close()


@pytest.mark.anyio
async def test_racing_cancel_and_message_exactly_once() -> None:
    """A message arrives as the receive is cancelled: it is either received by that call
    or still in the channel, never both and never neither."""
    rng = random.Random(1)
    outcomes = {"received": 0, "cancelled": 0}
    tx, rx = aioshm.open_channel[int](capacity=1, max_message_size=64)
    for i in range(ROUNDS * 3):
        got: list[int] = []
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def receiver() -> None:
                with scope:
                    got.append(await rx.recv())

            tg.start_soon(receiver)
            await anyio.sleep(rng.choice((0, 0, 0.0005, 0.002)))
            tx.send_nowait(i)
            for _ in range(rng.randrange(3)):
                await anyio.lowlevel.checkpoint()
            scope.cancel()
        if got:
            outcomes["received"] += 1
            assert got == [i]
            with pytest.raises(anyio.WouldBlock):
                rx.recv_nowait()
        else:
            outcomes["cancelled"] += 1
            assert rx.recv_nowait() == i
    tx.close()
    rx.close()
    assert outcomes["received"] and outcomes["cancelled"], outcomes  # both races happened


@pytest.mark.anyio
async def test_cancelled_send_did_not_send() -> None:
    rng = random.Random(2)
    tx, rx = aioshm.open_channel[int](capacity=1, max_message_size=64)
    tx.send_nowait(-1)
    outcomes = {"sent": 0, "cancelled": 0}
    for i in range(ROUNDS * 3):
        done: list[int] = []
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def sender(i: int = i) -> None:
                with scope:
                    await tx.send(i)
                    done.append(i)

            tg.start_soon(sender)
            await anyio.sleep(rng.choice((0, 0.0005, 0.002)))
            previous = rx.recv_nowait()  # frees the slot as the cancel lands
            for _ in range(rng.randrange(3)):
                await anyio.lowlevel.checkpoint()
            scope.cancel()
        if done:
            outcomes["sent"] += 1
        else:
            outcomes["cancelled"] += 1
            tx.send_nowait(i)  # the slot is free: the cancelled send took nothing
        assert previous in (-1, i - 1)
    assert rx.recv_nowait() == ROUNDS * 3 - 1
    tx.close()
    rx.close()
    assert outcomes["sent"] and outcomes["cancelled"], outcomes


@pytest.mark.anyio
async def test_woken_then_cancelled_waiter_passes_the_wakeup_on() -> None:
    """Several tasks wait; a message arrives and the task most likely woken for it is
    cancelled at once: another waiter must receive it. On asyncio the wake-up of the
    cancelled task is still queued on the loop then, and finds its future cancelled:
    the loop reports no error in a callback."""
    loop_errors: list[dict[str, Any]] = []
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:  # trio
        loop = None
    if loop is None:
        await _woken_then_cancelled_rounds()
        return
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        await _woken_then_cancelled_rounds()
    finally:
        loop.set_exception_handler(previous)
    assert not loop_errors, loop_errors


async def _woken_then_cancelled_rounds() -> None:
    for _ in range(ROUNDS // 2):
        tx, rx = aioshm.open_channel[str](capacity=1, max_message_size=64)
        got: list[str] = []
        async with anyio.create_task_group() as tg:
            first = anyio.CancelScope()

            async def waiter(scope: anyio.CancelScope | None) -> None:
                if scope is None:
                    got.append(await rx.recv())
                    return
                with scope:
                    got.append(await rx.recv())

            tg.start_soon(waiter, first)
            await blocked(rx, receiving=True)
            for _ in range(3):
                tg.start_soon(waiter, None)
            with anyio.fail_after(10):
                while rx.statistics().tasks_waiting_receive < 4:
                    await anyio.sleep(0.001)
            tx.send_nowait("one")
            # Block the loop until the hub has woken the oldest waiter...
            hub = rx._channel.hubs[RECV]
            wait_until(lambda: hub._woken == 1, what="the hub to wake a waiter")
            first.cancel()  # ...which is cancelled before it can run
            with anyio.fail_after(5):
                while not got:
                    await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
        assert got == ["one"]
        tx.close()
        rx.close()


@pytest.mark.anyio
async def test_closing_a_handle_wakes_its_blocked_tasks() -> None:
    tx, rx = aioshm.open_channel[str](capacity=1, max_message_size=64)
    rx_other = rx.clone()
    errors: list[type[BaseException]] = []

    async def receive(handle: aioshm.ReceiveChannel[str]) -> None:
        try:
            await handle.recv()
        except anyio.ClosedResourceError as exc:
            errors.append(type(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive, rx)
        tg.start_soon(receive, rx)
        await blocked(rx, receiving=True)
        with anyio.fail_after(0.5):
            rx.close()
            while len(errors) < 2:
                await anyio.sleep(0.001)
        tx.send_nowait("for the clone")  # other handles are unaffected
        assert await rx_other.recv() == "for the clone"
    tx.send_nowait("fills")
    woke_at: list[float] = []
    async with anyio.create_task_group() as tg:

        async def send() -> None:
            with pytest.raises(anyio.ClosedResourceError):
                await tx.send("blocked")
            woke_at.append(time.monotonic())

        tg.start_soon(send)
        await blocked(tx, receiving=False)
        closed_at = time.monotonic()
        tx.close()
        with anyio.fail_after(10):
            while not woke_at:
                await anyio.sleep(0.001)
    # The blocked sender was woken and raised within 0.5 s of the close.
    assert woke_at[0] - closed_at < 0.5
    rx_other.close()


# ---------------------------------------------------------------- native asyncio


async def _native_rounds(cancel: Callable[[asyncio.Task[Any]], Awaitable[None]]) -> None:
    for _ in range(ROUNDS):
        tx, rx = aioshm.open_channel[str](capacity=2, max_message_size=64)
        task = asyncio.create_task(rx.recv())
        await blocked(rx, receiving=True)
        await cancel(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        tx.send_nowait("first")
        tx.send_nowait("last")
        tx.close()
        assert [rx.recv_nowait(), rx.recv_nowait()] == ["first", "last"]
        assert rx.statistics().tasks_waiting_receive == 0
        rx.close()


@pytest.mark.asyncio
async def test_native_task_cancel() -> None:
    async def cancel(task: asyncio.Task[Any]) -> None:
        task.cancel()

    await _native_rounds(cancel)


@pytest.mark.asyncio
async def test_native_second_cancel_while_handling_the_first() -> None:
    async def cancel(task: asyncio.Task[Any]) -> None:
        task.cancel()
        await asyncio.sleep(0)  # the first cancellation is being handled...
        task.cancel()  # ...when the second lands

    await _native_rounds(cancel)


@pytest.mark.asyncio
async def test_native_timeout_and_wait_for() -> None:
    for _ in range(ROUNDS):
        tx, rx = aioshm.open_channel[str](capacity=2, max_message_size=64)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.003):
                await rx.recv()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rx.recv(), 0.003)
        tx.send_nowait("first")
        tx.send_nowait("last")
        tx.close()
        assert [rx.recv_nowait(), rx.recv_nowait()] == ["first", "last"]
        rx.close()


@pytest.mark.asyncio
async def test_native_racing_timeout_exactly_once() -> None:
    rng = random.Random(3)
    tx, rx = aioshm.open_channel[int](capacity=4, max_message_size=64)
    received = missed = 0
    for i in range(ROUNDS * 3):

        async def feed(i: int = i) -> None:
            await asyncio.sleep(rng.choice((0, 0.001, 0.002)))
            tx.send_nowait(i)

        feeder = asyncio.create_task(feed())
        try:
            got = await asyncio.wait_for(rx.recv(), rng.choice((0.0005, 0.001, 0.002)))
            assert got == i
            received += 1
        except TimeoutError:
            await feeder
            assert rx.recv_nowait() == i  # still there: the timed-out call took nothing
            missed += 1
        await feeder
        with pytest.raises(anyio.WouldBlock):
            rx.recv_nowait()
    tx.close()
    rx.close()
    assert received and missed


# ---------------------------------------------------------------- many waiters


@pytest.mark.anyio
async def test_many_waiters_do_not_starve_to_thread() -> None:
    """200 tasks blocked in recv leave anyio.to_thread callers unblocked; then all 200
    receive their messages."""
    tx, rx = aioshm.open_channel[int](capacity=8, max_message_size=64)
    got: list[int] = []

    async def receiver() -> None:
        got.append(await rx.recv())

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(receiver)
        with anyio.fail_after(10):
            while rx.statistics().tasks_waiting_receive < 200:
                await anyio.sleep(0.01)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as threads:
                for _ in range(60):  # more than the default limiter's 40 tokens
                    threads.start_soon(anyio.to_thread.run_sync, lambda: None)
        with anyio.fail_after(20):
            for i in range(200):
                await tx.send(i)
    assert sorted(got) == list(range(200))
    tx.close()
    rx.close()
