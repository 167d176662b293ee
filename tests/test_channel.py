"""The public API within one process: every form of every operation, and bad input."""

from __future__ import annotations

import gc
import threading
import warnings
from typing import Any

import anyio
import numpy as np
import pytest

import aioshm

from .helpers import shared_sleepers

pytestmark = pytest.mark.timeout(30)


def test_open_channel_validates_sizes() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="capacity must be at least 1"):
            aioshm.open_channel(capacity=bad)
        with pytest.raises(ValueError, match="max_message_size must be at least 1"):
            aioshm.open_channel(max_message_size=bad)
    with pytest.raises(TypeError):
        aioshm.open_channel(capacity=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        aioshm.open_channel(capacity=True)
    tx, rx = aioshm.open_channel[Any](
        capacity=np.int64(2),  # type: ignore[arg-type]
        max_message_size=np.prod((8, 8)),  # type: ignore[arg-type]
    )
    assert tx.statistics().max_buffer_size == 2
    assert type(tx.statistics().max_message_size) is int
    tx.close()
    rx.close()


def test_generic_pair_and_abcs() -> None:
    tx, rx = aioshm.open_channel[int](capacity=2)
    with tx, rx:
        assert isinstance(tx, anyio.abc.ObjectSendStream)
        assert isinstance(rx, anyio.abc.ObjectReceiveStream)
        tx.send_nowait(1)
        assert rx.receive_nowait() == 1


def test_nowait_forms_and_fifo() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=3, max_message_size=128)
    with tx, rx:
        with pytest.raises(anyio.WouldBlock):
            rx.recv_nowait()
        for item in ("a", "b", "c"):
            tx.send_nowait(item)
        with pytest.raises(anyio.WouldBlock):
            tx.send_nowait("d")
        assert [rx.recv_nowait() for _ in range(3)] == ["a", "b", "c"]
        with pytest.raises(anyio.WouldBlock):
            rx.receive_nowait()


def test_blocking_forms_time_out_with_nothing_consumed() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=64)
    with tx, rx:
        with pytest.raises(TimeoutError):
            rx.recv_blocking(timeout=0.05)
        tx.send_blocking("x", timeout=1)
        with pytest.raises(TimeoutError):
            tx.send_blocking("y", timeout=0.05)
        stats = tx.statistics()
        assert (stats.current_buffer_used, stats.free_slots, stats.slots_in_use) == (1, 0, 0)
        assert rx.recv_blocking(timeout=1) == "x"
        assert tx.statistics().free_slots == 1


def test_blocking_threads_hand_over() -> None:
    tx, rx = aioshm.open_channel[int](capacity=2, max_message_size=64)
    got: list[int] = []

    def consumer() -> None:
        while True:
            try:
                got.append(rx.recv_blocking(timeout=10))
            except anyio.EndOfStream:
                return

    thread = threading.Thread(target=consumer)
    thread.start()
    for i in range(500):
        tx.send_blocking(i, timeout=10)
    tx.close()
    thread.join(20)
    rx.close()
    assert got == list(range(500))


@pytest.mark.anyio
async def test_async_forms_and_iteration() -> None:
    tx, rx = aioshm.open_channel[int](capacity=2, max_message_size=64)
    got: list[int] = []

    async def consumer() -> None:
        async with rx:
            async for item in rx:
                got.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        async with tx:
            for i in range(200):
                await tx.send(i)
    assert got == list(range(200))


@pytest.mark.anyio
async def test_receive_alias_and_end_of_stream() -> None:
    tx, rx = aioshm.open_channel[str](capacity=2)
    await tx.send("x")
    await tx.aclose()
    assert await rx.receive() == "x"
    with pytest.raises(anyio.EndOfStream):
        await rx.recv()
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    await rx.aclose()


@pytest.mark.anyio
async def test_broken_when_every_receiver_closed() -> None:
    tx, rx = aioshm.open_channel[str](capacity=2)
    rx2 = rx.clone()
    rx.close()
    await tx.send("still one receiver")
    rx2.close()
    with pytest.raises(anyio.BrokenResourceError):
        await tx.send("nobody")
    with pytest.raises(anyio.BrokenResourceError):
        tx.send_nowait("nobody")
    with pytest.raises(anyio.BrokenResourceError):
        tx.send_blocking("nobody", timeout=1)
    tx.close()


@pytest.mark.anyio
async def test_closed_handle_raises_and_clones_are_independent() -> None:
    tx, rx = aioshm.open_channel[int](capacity=4)
    tx2 = tx.clone()
    tx.close()
    tx.close()  # idempotent
    for call in (lambda: tx.send_nowait(1), lambda: tx.send_blocking(1), tx.clone):
        with pytest.raises(anyio.ClosedResourceError):
            call()
    with pytest.raises(anyio.ClosedResourceError):
        await tx.send(1)
    await tx2.send(2)  # the clone is still open
    assert rx.statistics().open_send_streams == 1
    tx2.close()
    assert rx.recv_nowait() == 2
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    rx.close()
    with pytest.raises(anyio.ClosedResourceError):
        rx.recv_nowait()
    with pytest.raises(anyio.ClosedResourceError):
        await rx.recv()


def test_oversize_message_names_both_sizes_and_leaves_channel_usable() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=1000)
    with tx, rx:
        for too_big in (np.zeros(126), b"x" * 1001, bytearray(2000), ["x" * 2000]):
            with pytest.raises(ValueError, match=r"\d+ bytes.*max_message_size of 1000"):
                tx.send_nowait(too_big)
        tx.send_nowait(np.zeros(125))  # exactly 1000 bytes of data fits
        tx.send_nowait(b"x" * 1000)
        stats = tx.statistics()
        assert (stats.current_buffer_used, stats.free_slots, stats.slots_in_use) == (2, 0, 0)
        assert rx.recv_nowait().nbytes == 1000
        assert rx.recv_nowait() == b"x" * 1000
        assert tx.statistics().free_slots == 2


@pytest.mark.anyio
async def test_unpicklable_object_is_a_clear_error_and_nothing_is_lost() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=1024)
    async with tx, rx:
        with pytest.raises(TypeError, match=r"cannot be pickled.*nothing was sent"):
            await tx.send(threading.Lock())
        with pytest.raises(TypeError, match="cannot be pickled"):
            tx.send_nowait(lambda: 1)
        await tx.send("fine")  # the only slot is still free
        assert await rx.recv() == "fine"
        assert tx.statistics().free_slots == 1


def test_statistics_fields() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=3, max_message_size=512)
    with tx, rx:
        tx.send_nowait(1)
        stats = rx.statistics()
        assert stats == aioshm.ChannelStatistics(
            current_buffer_used=1,
            max_buffer_size=3,
            open_send_streams=1,
            open_receive_streams=1,
            tasks_waiting_send=0,
            tasks_waiting_receive=0,
            free_slots=2,
            slots_in_use=0,
            max_message_size=512,
            reclaimed_slots=0,
            redelivered_messages=0,
        )


@pytest.mark.anyio
async def test_tasks_waiting_are_counted() -> None:
    tx, rx = aioshm.open_channel[int](capacity=1)
    async with tx, rx, anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(rx.recv)
        with anyio.fail_after(10):
            while rx.statistics().tasks_waiting_receive < 3:
                await anyio.sleep(0.01)
        for i in range(3):
            await tx.send(i)
    assert rx.statistics().tasks_waiting_receive == 0


def test_unclosed_handle_warns_and_counts_as_closed() -> None:
    tx, rx = aioshm.open_channel[int](capacity=1)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del tx
        gc.collect()
    with pytest.raises(anyio.EndOfStream):  # the stream ended with it
        rx.recv_nowait()
    rx.close()


def test_unclosed_handle_counts_as_closed_even_when_warnings_are_errors() -> None:
    tx, rx = aioshm.open_channel[int](capacity=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with pytest.raises(ResourceWarning):
            tx.__del__()  # what the collector runs, under ``-W error::ResourceWarning``
    with pytest.raises(anyio.EndOfStream):  # it was released before the warning
        rx.recv_nowait()
    rx.close()


def test_closed_handles_do_not_warn() -> None:
    tx, rx = aioshm.open_channel[int](capacity=1)
    tx.close()
    rx.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del tx, rx
        gc.collect()


@pytest.mark.anyio
async def test_fast_path_yields_to_other_tasks() -> None:
    """A task sending in a loop into a channel that never fills lets others run."""
    tx, rx = aioshm.open_channel[int](capacity=4096, max_message_size=64)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    async with tx, rx, anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0)
        start = ticks
        for i in range(4000):
            await tx.send(i)
        assert ticks - start >= 4000 // aioshm._checkpoint.YIELD_EVERY - 1
        tg.cancel_scope.cancel()


def test_float_channel_validates_input() -> None:
    ch = aioshm.FloatChannel(4)
    try:
        with pytest.raises(ValueError, match="more than this channel's maxsize of 4"):
            ch.send_blocking([1.0] * 5)
        with pytest.raises(TypeError):
            ch.send_blocking(["a", "b"])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            ch.send_blocking("abc")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ch.send_blocking([object()])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="one-dimensional"):
            ch.send_blocking([[1.0], [2.0]])  # type: ignore[list-item]
        ch.send_blocking((1, 2.5, np.float32(3)))  # type: ignore[arg-type]
        assert ch.recv_blocking(timeout=1) == [1.0, 2.5, 3.0]
    finally:
        ch.close()
    with pytest.raises(ValueError):
        aioshm.FloatChannel(0)


@pytest.mark.anyio
async def test_float_channel_async_roundtrip() -> None:
    ch = aioshm.FloatChannel(10000, capacity=2)
    values = [float(i) for i in range(10)]
    await ch.send(values)
    await ch.send(np.arange(3.0))
    assert await ch.recv() == values
    assert await ch.recv() == [0.0, 1.0, 2.0]
    ch.close()


@pytest.mark.anyio
async def test_sender_asleep_below_the_low_water_mark_still_gets_in() -> None:
    """Sleeping senders are woken once a quarter of the slots are free; one that is
    asleep when fewer free up (the receiver then stops) still gets in within a slice."""
    tx, rx = aioshm.open_channel[int](capacity=8, max_message_size=64)
    assert tx._queue.low_water == 2
    for i in range(8):
        tx.send_nowait(i)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tx.send, 8)
        with anyio.fail_after(10):
            while tx.statistics().tasks_waiting_send == 0:
                await anyio.sleep(0.005)
        with anyio.fail_after(10):  # asleep on the doorbell
            while shared_sleepers(tx, "send") == 0:
                await anyio.sleep(0.005)
        assert rx.recv_nowait() == 0  # one slot: below the low-water mark
        with anyio.fail_after(1):
            while tx.statistics().tasks_waiting_send:
                await anyio.sleep(0.005)
    assert [rx.recv_nowait() for _ in range(8)] == list(range(1, 9))
    tx.close()
    rx.close()
