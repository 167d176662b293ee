"""Guarantees of docs/guarantees.md that no other test showed on its own: a view held
while other messages flow; no message torn by the copy done outside the mutex, with
several consumer processes; a drain after the last sender closed in another process;
``notify_all`` across processes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import numpy as np
import pytest

import aioshm
from aioshm._slotqueue import LOCKED_COPY_LIMIT

from . import primitive_workers
from .helpers import Context, join_all, wait_until

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- a view held


@pytest.mark.anyio
async def test_held_view_holds_up_no_one() -> None:
    """While a receiver holds a view, more messages than there are slots flow past it
    through the other slots, in order; the viewed message stays intact meanwhile (its
    slot is not reused), and its slot comes back when the view is released."""
    tx, rx = aioshm.open_channel[Any](capacity=3, max_message_size=4096)
    rx2 = rx.clone()
    held = np.arange(64, dtype=np.int64) * 3
    await tx.send(held)
    async with rx.recv_view() as view:
        for i in range(10):  # more than the capacity: slots are reused around the view
            await tx.send(np.full(64, i, dtype=np.int64))
            await tx.send(f"text {i}")
            assert (await rx2.recv()).tolist() == [i] * 64
            assert await rx2.recv() == f"text {i}"
        stats = rx.statistics()
        assert (stats.slots_in_use, stats.free_slots) == (1, 2)
        assert np.array_equal(view, held)  # untouched by the traffic
    stats = rx.statistics()
    assert (stats.slots_in_use, stats.free_slots) == (0, 3)
    for handle in (tx, rx, rx2):
        handle.close()


# ---------------------------------------------------------------- large copies


LARGE = 4 * LOCKED_COPY_LIMIT  # copied in and out with the mutex free


def _send_large(tx: aioshm.SendChannel[Any], producer: int, count: int, backend: str) -> None:
    """Send ``count`` large arrays, each filled with one value (producer, i): a torn
    message would mix values."""

    async def main() -> None:
        async with tx:
            for i in range(count):
                await tx.send(np.full(LARGE // 8, producer * 1_000_000 + i, dtype=np.int64))

    anyio.run(main, backend=backend)


def _receive_large(
    rx: aioshm.ReceiveChannel[Any],
    report: aioshm.SendChannel[Any],
    backend: str,
    started: Any,
    consumers: int,
) -> None:
    """Receive until the end of the stream, checking that every message is whole.
    After its first message, wait until every consumer has had one (``started``
    counts them), so that all of them race for the rest."""

    async def main() -> None:
        got: list[int] = []
        torn = 0
        async with rx:
            async for message in rx:
                if message.shape != (LARGE // 8,) or not (message == message[0]).all():
                    torn += 1
                got.append(int(message[0]))
                if len(got) == 1:
                    with started.get_lock():
                        started.value += 1
                    with anyio.fail_after(30):
                        while started.value < consumers:
                            await anyio.sleep(0.001)
        async with report:
            await report.send((got, torn))

    anyio.run(main, backend=backend)


def test_large_messages_are_never_torn_with_several_consumers(
    ctx: Context,
) -> None:
    """Messages larger than the locked-copy limit are copied in and out of their slot
    with the mutex free. With 2 producer and 3 consumer processes racing over 4 slots,
    every message arrives whole, exactly once, each producer's in its order."""
    count = 150
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=LARGE)
    report_tx, report_rx = aioshm.open_channel[Any](capacity=3, max_message_size=1 << 16)
    producers = [
        ctx.Process(target=_send_large, args=(tx, p, count, backend))
        for p, backend in enumerate(("asyncio", "trio"))
    ]
    started = ctx.Value("i", 0)
    consumers = [
        ctx.Process(target=_receive_large, args=(rx, report_tx, backend, started, 3))
        for backend in ("asyncio", "trio", "asyncio")
    ]
    for proc in producers + consumers:
        proc.start()
    tx.close()
    rx.close()
    report_tx.close()
    reports = [report_rx.recv_blocking(timeout=90) for _ in consumers]
    join_all(producers + consumers)
    report_rx.close()
    assert sum(torn for _, torn in reports) == 0
    received = Counter(value for got, _ in reports for value in got)
    assert set(received) == {p * 1_000_000 + i for p in range(2) for i in range(count)}
    assert max(received.values()) == 1
    assert all(got for got, _ in reports)  # every consumer took part
    for got, _ in reports:
        for p in range(2):
            mine = [v for v in got if v // 1_000_000 == p]
            assert mine == sorted(mine)


# ---------------------------------------------------------------- drain after close


def _fill_and_close(tx: aioshm.SendChannel[Any], count: int) -> None:
    with tx:
        for i in range(count):
            tx.send_blocking(i if i % 2 else np.full(LARGE // 8, i, dtype=np.int64), timeout=10)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_drain_after_the_last_sender_closed_elsewhere(ctx: Context, backend: str) -> None:
    """The only sender, in another process, fills the channel (small and large
    messages) and closes. After the close is seen here, everything it sent is still
    received, in order, and only then ``EndOfStream``, for ever after."""
    count = 6
    tx, rx = aioshm.open_channel[Any](capacity=count, max_message_size=LARGE)
    child = ctx.Process(target=_fill_and_close, args=(tx, count))
    child.start()
    tx.close()
    join_all([child])
    wait_until(lambda: rx.statistics().open_send_streams == 0, what="the close")
    assert rx.statistics().current_buffer_used == count

    async def main() -> list[Any]:
        got = []
        with anyio.fail_after(10):
            async for item in rx:
                got.append(item)
            for _ in range(3):
                with pytest.raises(anyio.EndOfStream):
                    await rx.recv()
        return got

    got = anyio.run(main, backend=backend)
    assert [g if isinstance(g, int) else int(g[0]) for g in got] == list(range(count))
    assert all((g == g[0]).all() for g in got[::2])
    stats = rx.statistics()
    assert (stats.free_slots, stats.current_buffer_used) == (count, 0)
    rx.close()


# ---------------------------------------------------------------- notify_all


def test_notify_all_wakes_waiters_in_every_process(
    ctx: Context,
) -> None:
    """Waiters in three child processes (asyncio, trio) and two tasks here: one
    ``notify_all()`` wakes every one of them."""
    cond = aioshm.Condition()
    children = [
        ctx.Process(target=primitive_workers.wait_on_condition, args=(cond, None, backend))
        for backend in ("asyncio", "trio", "asyncio")
    ]
    for child in children:
        child.start()
    woken = 0

    async def local_waiter() -> None:
        nonlocal woken
        async with cond:
            await cond.wait()
        woken += 1

    async def main() -> None:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(local_waiter)
                tg.start_soon(local_waiter)
                while cond.statistics().waiting < 5:
                    await anyio.sleep(0.005)
                async with cond:
                    cond.notify_all()

    anyio.run(main)
    join_all(children, timeout=30)  # each exits 0 once notified (1 if not, after 30 s)
    assert woken == 2
    stats = cond.statistics()
    assert (stats.waiting, stats.granted) == (0, 0)
    assert stats.notified == 5
