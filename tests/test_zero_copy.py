"""Zero-copy receive (recv_view), preallocated receive (recv_into), batches
(send_many / recv_many) and zero-copy send (send_loan)."""

from __future__ import annotations

import multiprocessing
import random
import time
from typing import Any, cast

import anyio
import numpy as np
import pytest

import aioshm
from aioshm._layout import Segment

from .helpers import Context, join_all

pytestmark = pytest.mark.timeout(60)


def address(array: np.ndarray[Any, Any]) -> int:
    return int(array.__array_interface__["data"][0])


def inside_segment(channel: Any, array: np.ndarray[Any, Any]) -> bool:
    segment: Segment = channel._queue.segment
    return segment.address <= address(array) < segment.address + segment.layout.size


def intact(channel: Any) -> bool:
    stats: aioshm.ChannelStatistics = channel.statistics()
    return stats.free_slots == stats.max_buffer_size and stats.slots_in_use == 0


# ---------------------------------------------------------------- recv_view


@pytest.mark.anyio
async def test_recv_view_is_zero_copy_and_read_only() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=1 << 20)
    sent = np.arange(1000, dtype=np.float64).reshape(10, 100)
    await tx.send(sent)
    async with rx.recv_view() as view:
        assert inside_segment(rx, view)  # the data was not copied out of the slot
        assert np.array_equal(view, sent) and view.dtype == sent.dtype
        assert not view.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            view[0, 0] = 1.0
        assert rx.statistics().slots_in_use == 1
    assert intact(rx)
    await tx.send(b"raw bytes")
    async with rx.recv_view() as view:
        assert view.dtype == np.uint8 and view.tobytes() == b"raw bytes"
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_recv_view_releases_on_exception_and_cancellation() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=4096)
    await tx.send(np.ones(8))
    with pytest.raises(KeyError):
        async with rx.recv_view():
            raise KeyError
    assert intact(rx)
    await tx.send(np.ones(8))
    with anyio.CancelScope() as scope:
        async with rx.recv_view():
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught and intact(rx)
    with anyio.move_on_after(0.05) as scope:  # cancelled while waiting: nothing taken
        async with rx.recv_view():
            raise AssertionError("nothing to view")
    assert scope.cancelled_caught
    await tx.send(np.arange(3))
    assert (await rx.recv()).tolist() == [0, 1, 2]
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_recv_view_of_a_pickle_leaves_it_for_recv() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=4096)
    await tx.send({"not": "an array"})
    await tx.send("behind it")
    with pytest.raises(TypeError, match="pickled"):
        async with rx.recv_view():
            pass
    assert await rx.recv() == {"not": "an array"}  # still at the head
    assert await rx.recv() == "behind it"
    assert intact(rx)
    tx.close()
    rx.close()


# ---------------------------------------------------------------- recv_into


@pytest.mark.anyio
async def test_recv_into() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=1 << 20)
    out = np.empty((3, 4), dtype=np.int32)
    sent = np.arange(12, dtype=np.int32).reshape(3, 4)
    await tx.send(sent)
    assert await rx.recv_into(out) is out
    assert np.array_equal(out, sent)
    await tx.send(sent.astype(np.int64))
    await tx.send("behind it")
    with pytest.raises(ValueError, match="does not fit"):
        await rx.recv_into(out)
    with pytest.raises(ValueError, match="does not fit"):
        await rx.recv_into(np.empty((4, 3), np.int64))
    got = np.empty((3, 4), np.int64)
    await rx.recv_into(got)  # the message was still there, at the head
    assert np.array_equal(got, sent)
    assert await rx.recv() == "behind it"
    await tx.send(["pickled"])
    await tx.send("behind it")
    with pytest.raises(TypeError):
        await rx.recv_into(out)
    assert await rx.recv() == ["pickled"]
    assert await rx.recv() == "behind it"
    assert intact(rx)
    tx.close()
    rx.close()


# ---------------------------------------------------------------- batches


@pytest.mark.anyio
async def test_send_many_and_recv_many() -> None:
    tx, rx = aioshm.open_channel[int](capacity=64, max_message_size=256)
    await tx.send_many(range(50))
    assert rx.statistics().current_buffer_used == 50
    first = await rx.recv_many(20)
    rest = await rx.recv_many(1000)
    assert first == list(range(20)) and rest == list(range(20, 50))
    with pytest.raises(ValueError):
        await rx.recv_many(0)

    got: list[int] = []

    async def consumer() -> None:
        async with rx:
            while True:
                try:
                    got.extend(await rx.recv_many(7))
                except anyio.EndOfStream:
                    return

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        async with tx:
            for start in range(0, 1000, 100):  # batches larger than the capacity wait
                await tx.send_many(range(start, start + 100))
    assert got == list(range(1000))


@pytest.mark.anyio
async def test_send_many_bad_item_sends_nothing() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=8, max_message_size=64)
    with pytest.raises(ValueError, match="max_message_size"):
        await tx.send_many([1, 2, b"x" * 100, 4])
    with pytest.raises(TypeError, match="pickled"):
        await tx.send_many([1, lambda: 2])
    assert rx.statistics().current_buffer_used == 0
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_cancelled_batches_report_or_did_not_happen() -> None:
    tx, rx = aioshm.open_channel[int](capacity=4, max_message_size=64)
    for i in range(4):
        await tx.send(-1 - i)
    # Cancelled before the first round: nothing was sent.
    with anyio.CancelScope() as scope:
        scope.deadline = anyio.current_time() + 0.05
        try:
            await tx.send_many(range(10))
        except anyio.get_cancelled_exc_class() as exc:
            assert aioshm.items_sent(exc) == 0
            raise
    assert scope.cancelled_caught
    assert await rx.recv_many(10) == [-1, -2, -3, -4]
    # Cancelled after rounds went through: they stay sent, and the count says how many.
    sent = -1
    with anyio.CancelScope() as scope:
        scope.deadline = anyio.current_time() + 0.05
        try:
            await tx.send_many(range(10))
        except anyio.get_cancelled_exc_class() as exc:
            sent = aioshm.items_sent(exc)
            raise
    assert sent == 4
    assert await rx.recv_many(10) == [0, 1, 2, 3]
    # A timeout raised in place of the cancellation carries the count too.
    with pytest.raises(TimeoutError) as caught:
        with anyio.fail_after(0.05):
            await tx.send_many(range(10, 20))
    assert aioshm.items_sent(caught.value) == 4
    assert await rx.recv_many(10) == [10, 11, 12, 13]
    # recv_many cancelled while waiting took nothing, and holds nothing afterwards.
    with anyio.move_on_after(0.05) as scope:
        await rx.recv_many(10)
    assert scope.cancelled_caught
    assert rx.statistics().tasks_waiting_receive == 0
    await tx.send_many([97, 98, 99])
    assert await rx.recv_many(10) == [97, 98, 99]
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_recv_many_racing_a_cancellation_takes_all_or_nothing() -> None:
    """Messages arrive as a blocked ``recv_many`` is cancelled: either the call returned
    them (a prefix of what was sent, in order), or it raised and every one of them is
    still in the channel, at the head; never some taken and lost."""
    rng = random.Random(4)
    tx, rx = aioshm.open_channel[int](capacity=8, max_message_size=64)
    outcomes = {"received": 0, "cancelled": 0}
    for i in range(150):
        batch = [10 * i + k for k in range(3)]
        got: list[int] = []
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def receiver() -> None:
                with scope:
                    got.extend(await rx.recv_many(10))

            tg.start_soon(receiver)
            await anyio.sleep(rng.choice((0, 0, 0.0005, 0.002)))
            tx.send_nowait(batch[0])
            tx.send_nowait(batch[1])
            for _ in range(rng.randrange(3)):
                await anyio.lowlevel.checkpoint()
            tx.send_nowait(batch[2])
            scope.cancel()
        outcomes["received" if got else "cancelled"] += 1
        left = []
        while True:
            try:
                left.append(rx.recv_nowait())
            except anyio.WouldBlock:
                break
        assert got + left == batch, (got, left)
    assert rx.statistics().tasks_waiting_receive == 0
    tx.close()
    rx.close()
    assert outcomes["received"] and outcomes["cancelled"], outcomes


# ---------------------------------------------------------------- send_loan


@pytest.mark.anyio
async def test_loan_is_zero_copy_end_to_end() -> None:
    """With one slot, the loaned buffer is the very memory the receiver views."""
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=1 << 20)
    async with tx.send_loan((256, 256), np.float32) as buf:
        assert inside_segment(tx, buf)
        assert buf.flags.c_contiguous and buf.flags.writeable
        buf[:] = 3.0
        loaned_at = address(buf)
    with pytest.raises(ValueError, match="read-only"):
        buf[0, 0] = 1.0  # after the block: caught
    async with rx.recv_view() as view:
        assert address(view) == loaned_at
        assert view.shape == (256, 256) and view.dtype == np.float32
        assert (view == 3.0).all()
    assert intact(rx)
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_loan_exit_by_exception_or_cancellation_sends_nothing() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=4096)
    with pytest.raises(RuntimeError):
        async with tx.send_loan(8) as buf:
            buf[:] = 1
            raise RuntimeError
    assert intact(tx)
    with anyio.CancelScope() as scope:
        async with tx.send_loan(8):
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught and intact(tx)
    await tx.send("fills the only slot")
    with anyio.move_on_after(0.05) as scope:  # cancelled while waiting for a slot
        async with tx.send_loan(8):
            raise AssertionError("no slot was free")
    assert scope.cancelled_caught
    assert await rx.recv() == "fills the only slot"
    with pytest.raises(anyio.WouldBlock):
        rx.recv_nowait()
    assert intact(tx)
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_held_loan_holds_up_no_one() -> None:
    """While a loan is held, other senders' messages flow past it; order is the order
    of publication."""
    tx, rx = aioshm.open_channel[Any](capacity=3, max_message_size=4096)
    tx2 = tx.clone()
    async with tx.send_loan(4, np.int64) as buf:
        buf[:] = 42
        for i in range(10):  # more messages than slots go through meanwhile
            await tx2.send(i)
            assert await rx.recv() == i
        assert tx.statistics().slots_in_use == 1
    await tx2.send("after")
    assert (await rx.recv()).tolist() == [42] * 4
    assert await rx.recv() == "after"
    for handle in (tx, tx2, rx):
        handle.close()


@pytest.mark.anyio
async def test_loan_errors_and_bounds() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=1024)
    await tx.send(1)
    await tx.send(2)  # full: an oversize loan must fail at once, not wait for a slot
    with pytest.raises(ValueError, match="max_message_size of 1024"):
        tx.send_loan(129, np.float64)  # the call itself raises
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(ValueError, match="max_message_size of 1024"):
        async with tx.send_loan(129, np.float64):
            raise AssertionError("an oversize loan was granted")
    with (
        pytest.raises(ValueError, match="max_message_size of 1024"),
        tx.send_loan_blocking(129, np.float64, timeout=10),
    ):
        raise AssertionError("an oversize loan was granted")
    assert time.monotonic() - started < 1  # neither waited for a slot to free up
    assert tx.statistics().tasks_waiting_send == 0
    with pytest.raises(TypeError):
        tx.send_loan(4, object)
    assert rx.recv_nowait() == 1
    assert rx.recv_nowait() == 2
    async with tx.send_loan(4) as a, tx.send_loan(4) as b:  # up to capacity loans at once
        a[:] = 1
        b[:] = 2
        with anyio.move_on_after(0.05) as scope:  # asking for more waits
            async with tx.send_loan(4):
                pass
        assert scope.cancelled_caught
    assert {float(rx.recv_nowait()[0]) for _ in range(2)} == {1.0, 2.0}
    with pytest.raises(TimeoutError):
        tx.send_blocking("x")
        tx.send_blocking("y")
        with tx.send_loan_blocking(4, timeout=0.05):
            pass
    rx.close()
    with pytest.raises(anyio.BrokenResourceError):
        async with tx.send_loan(4):
            pass
    tx.close()
    with pytest.raises(anyio.ClosedResourceError):
        async with tx.send_loan(4):
            pass


@pytest.mark.anyio
async def test_closing_during_a_loan_returns_the_slot() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=1024)
    with pytest.raises(anyio.ClosedResourceError):
        async with tx.send_loan(4):
            tx.close()
    assert intact(rx)
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    rx.close()


def _fill_loans(tx: aioshm.SendChannel[Any], count: int) -> None:
    with tx:
        for i in range(count):
            with tx.send_loan_blocking((512, 512), np.uint8, timeout=30) as buf:
                buf.fill(i % 256)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_loans_across_processes(method: str) -> None:
    ctx = cast(Context, multiprocessing.get_context(method))
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=512 * 512)
    child = ctx.Process(target=_fill_loans, args=(tx, 20))
    child.start()
    tx.close()

    async def main() -> list[int]:
        seen = []
        with anyio.fail_after(30):
            while True:
                try:
                    async with rx.recv_view() as view:
                        assert (view == view[0, 0]).all()  # never a torn message
                        seen.append(int(view[0, 0]))
                except anyio.EndOfStream:
                    return seen

    assert anyio.run(main) == list(range(20))
    join_all([child])
    rx.close()


@pytest.mark.asyncio
async def test_native_timeout_reports_a_partial_batch() -> None:
    import asyncio

    tx, rx = aioshm.open_channel[int](capacity=3, max_message_size=64)
    with pytest.raises(TimeoutError) as caught:
        async with asyncio.timeout(0.05):
            await tx.send_many(range(10))
    assert aioshm.items_sent(caught.value) == 3
    with pytest.raises(TimeoutError) as caught:
        await asyncio.wait_for(tx.send_many(range(5)), 0.05)
    assert aioshm.items_sent(caught.value) == 0  # the channel was full: nothing went
    assert await rx.recv_many(10) == [0, 1, 2]
    tx.close()
    rx.close()


# ---------------------------------------------------------------- the blocking forms


def _send_batches(tx: aioshm.SendChannel[Any], count: int) -> None:
    """A child with no event loop: ``count`` 4 by 3 int64 arrays in batches of 8."""
    with tx:
        for start in range(0, count, 8):
            batch = [np.full((4, 3), i, np.int64) for i in range(start, min(start + 8, count))]
            tx.send_many_blocking(batch, timeout=30)


def test_blocking_batch_view_and_into_forms_across_processes(ctx: Context) -> None:
    """A child sends with ``send_many_blocking``; with no event loop either, the parent
    takes the messages by ``recv_many_blocking``, ``recv_view_blocking`` and
    ``recv_into_blocking`` in turn, in order, with nothing held after."""
    tx, rx = aioshm.open_channel[np.ndarray[Any, Any]](capacity=4, max_message_size=1024)
    child = ctx.Process(target=_send_batches, args=(tx, 60))
    child.start()
    tx.close()
    seen: list[int] = []
    out = np.empty((4, 3), np.int64)
    with rx:
        while True:
            try:
                for message in rx.recv_many_blocking(3, timeout=30):
                    seen.append(int(message[0, 0]))
                with rx.recv_view_blocking(timeout=30) as frame:
                    assert inside_segment(rx, frame) and not frame.flags.writeable
                    assert rx.statistics().slots_in_use == 1
                    seen.append(int(frame[0, 0]))
                assert rx.recv_into_blocking(out, timeout=30) is out
                assert (out == out[0, 0]).all()
                seen.append(int(out[0, 0]))
            except anyio.EndOfStream:
                break
        assert intact(rx)
    assert seen == list(range(60))
    join_all([child])


def test_blocking_forms_time_out_or_fail_having_taken_and_held_nothing() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=256)
    with tx, rx:
        with pytest.raises(TimeoutError):
            rx.recv_many_blocking(4, timeout=0.05)
        with pytest.raises(TimeoutError), rx.recv_view_blocking(timeout=0.05):
            pytest.fail("entered a view of nothing")
        with pytest.raises(TimeoutError):
            rx.recv_into_blocking(np.empty(4), timeout=0.05)
        with pytest.raises(ValueError, match="max_items"):
            rx.recv_many_blocking(0)
        assert intact(rx)

        # A batch that does not all fit: the first round stays sent, and says so.
        with pytest.raises(TimeoutError) as caught:
            tx.send_many_blocking([np.arange(4.0), np.arange(4.0) + 1, "third"], timeout=0.05)
        assert aioshm.items_sent(caught.value) == 2
        # A mismatched out leaves the message at the head; a view left by an exception
        # gives its slot back.
        with pytest.raises(ValueError):
            rx.recv_into_blocking(np.empty(5), timeout=1)
        with pytest.raises(KeyError), rx.recv_view_blocking(timeout=1):
            raise KeyError("the consumer's own error")
        assert rx.statistics().slots_in_use == 0
        got = np.empty(4)
        assert np.array_equal(rx.recv_into_blocking(got, timeout=1), np.arange(4.0) + 1)
        with pytest.raises(TimeoutError):
            rx.recv_many_blocking(1, timeout=0.05)  # "third" never went
        assert intact(rx)

        # A bad item fails the batch at once, with nothing sent.
        with pytest.raises(TypeError):
            tx.send_many_blocking([1, lambda: 0], timeout=1)
        assert tx.statistics().current_buffer_used == 0


@pytest.mark.anyio
async def test_a_loan_or_view_entered_by_the_other_form_says_which_and_takes_nothing() -> None:
    """``with`` on ``recv_view()``/``send_loan()`` would block the event loop's thread,
    and ``async with`` on a blocking form would drop its timeout: both raise at once."""
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=1024)
    with tx, rx:
        await tx.send(np.arange(4.0))
        with pytest.raises(TypeError, match="would block the event loop"), rx.recv_view():
            pytest.fail("entered")
        with pytest.raises(TypeError, match=r"async with rx\.recv_view"):
            async with rx.recv_view_blocking():
                pytest.fail("entered")
        with pytest.raises(TypeError, match="would block the event loop"), tx.send_loan(4):
            pytest.fail("entered")
        with pytest.raises(TypeError, match=r"async with tx\.send_loan"):
            async with tx.send_loan_blocking(4):
                pytest.fail("entered")
        stats = rx.statistics()
        assert (stats.current_buffer_used, stats.slots_in_use) == (1, 0)
        async with rx.recv_view() as view:
            assert np.array_equal(view, np.arange(4.0))
        assert intact(rx)
