"""What a newcomer needs: ``async for`` over views, who holds handles, and an oversize
error that says what to do (issue 12)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import aioshm
from aioshm import HandleHolder

from . import workers
from .helpers import Context, wait_until

pytestmark = pytest.mark.timeout(60)


def intact(channel: aioshm.SendChannel[Any] | aioshm.ReceiveChannel[Any]) -> bool:
    stats = channel.statistics()
    return stats.free_slots == stats.max_buffer_size and stats.slots_in_use == 0


def inside_segment(
    channel: aioshm.SendChannel[Any] | aioshm.ReceiveChannel[Any], array: np.ndarray[Any, Any]
) -> bool:
    segment = channel._queue.segment
    start = int(array.__array_interface__["data"][0])
    return segment.address <= start < segment.address + segment.layout.size


# ---------------------------------------------------------------- rx.views()


@pytest.mark.anyio
async def test_views_iterates_in_place_until_the_stream_ends() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=4096)
    for i in range(4):
        await tx.send(np.full(8, i, dtype=np.int32))
    tx.close()
    seen = []
    async for frame in rx.views():
        assert inside_segment(rx, frame) and not frame.flags.writeable
        # valid until the next iteration: this view holds its slot, the previous one
        # was released before this one was taken
        stats = rx.statistics()
        assert stats.slots_in_use == 1, stats
        seen.append(int(frame[0]))
    assert seen == [0, 1, 2, 3]
    assert intact(rx)  # the end of the stream released the last view
    rx.close()


@pytest.mark.anyio
async def test_views_released_on_break_exception_and_cancellation() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=4096)
    await tx.send(np.ones(4))
    async for _ in rx.views():
        break
    assert intact(rx)  # at once: no garbage collection needed

    await tx.send(np.ones(4))
    with pytest.raises(KeyError):
        async for _ in rx.views():
            raise KeyError
    assert intact(rx)

    await tx.send(np.ones(4))
    with anyio.CancelScope() as scope:
        async for _ in rx.views():
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught and intact(rx)
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_views_cancelled_while_waiting_receives_nothing() -> None:
    """As with recv_view: a cancelled wait took nothing, and the previous view was
    already released when the wait began."""
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=4096)
    await tx.send(np.arange(3))
    got = []

    async def iterate() -> None:
        async for frame in rx.views():
            got.append(frame.tolist())

    async with anyio.create_task_group() as tg:
        tg.start_soon(iterate)
        while not (got and rx.statistics().tasks_waiting_receive):  # waiting for a 2nd
            await anyio.sleep(0.001)
        assert rx.statistics().slots_in_use == 0  # the first view was released already
        tg.cancel_scope.cancel()
    assert got == [[0, 1, 2]]
    assert intact(rx)
    await tx.send(np.arange(4))  # sent after the cancelled wait: still there
    assert (await rx.recv()).tolist() == [0, 1, 2, 3]
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_views_of_a_pickle_raises_and_leaves_it() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=4096)
    await tx.send({"not": "an array"})
    with pytest.raises(TypeError, match="pickled"):
        async for _ in rx.views():
            pass
    assert await rx.recv() == {"not": "an array"}
    assert intact(rx)
    tx.close()
    rx.close()


@pytest.mark.anyio
async def test_views_close_releases_a_kept_iterator() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=4096)
    await tx.send(np.ones(4))
    frames = rx.views()
    async for _ in frames:
        break
    assert rx.statistics().slots_in_use == 1  # the iterator is still referenced
    frames.close()
    frames.close()  # idempotent
    assert intact(rx)
    tx.close()
    rx.close()


def _send_frames(tx: aioshm.SendChannel[Any], count: int) -> None:
    async def main() -> None:
        async with tx:
            for i in range(count):
                async with tx.send_loan((16, 16), np.uint16) as frame:
                    frame[...] = i

    anyio.run(main)


def test_views_across_processes(ctx: Context) -> None:
    tx, rx = aioshm.open_channel[Any](capacity=3, max_message_size=4096)
    proc = ctx.Process(target=_send_frames, args=(tx, 200))
    proc.start()
    tx.close()

    async def main() -> list[int]:
        async with rx:
            return [int(frame[15, 15]) async for frame in rx.views()]

    assert anyio.run(main) == list(range(200))
    proc.join(30)
    assert proc.exitcode == 0


# ---------------------------------------------------------------- holders()


def test_holders_in_one_process() -> None:
    me = os.getpid()
    tx, rx = aioshm.open_channel[Any]()
    assert rx.holders() == [HandleHolder(me, 1, 1, None)]
    tx2 = tx.clone()
    assert tx.holders() == [
        HandleHolder(pid=me, send_handles=2, receive_handles=1, reserved_by=None)
    ]
    tx.close()
    tx2.close()
    assert tx.holders() == [HandleHolder(me, 0, 1, None)]  # a closed handle can ask
    rx.close()
    assert rx.holders() == []


def test_holders_names_the_child_that_keeps_the_stream_open(
    ctx: Context,
) -> None:
    me = os.getpid()
    tx, rx = aioshm.open_channel[Any]()
    clone = tx.clone()
    proc = ctx.Process(target=workers.hold_forever, args=(tx, clone))
    proc.start()
    tx.close()
    clone.close()
    try:
        wait_until(
            lambda: (
                rx.holders()
                == sorted([HandleHolder(me, 0, 1, None), HandleHolder(proc.pid or 0, 2, 0, None)])
            ),
            what=f"child {proc.pid} holding two send handles: {rx.holders()}",
        )
        assert rx.statistics().open_send_streams == 2
    finally:
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join(10)
    assert rx.holders() == [HandleHolder(me, 0, 1, None)]  # the dead are swept out
    rx.close()


# ---------------------------------------------------------------- the oversize error


def test_oversize_error_says_what_to_do() -> None:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=1000)
    with tx, rx:
        with pytest.raises(ValueError, match=r"open_channel\(max_message_size=8000\) or more"):
            tx.send_nowait(np.zeros(1000))
        with pytest.raises(ValueError, match=r"open_channel\(max_message_size=(\d+)\)") as info:
            tx.send_nowait(list(range(500)))
        with pytest.raises(ValueError, match=r"open_channel\(max_message_size=4000\) or more"):
            tx.send_loan((2, 500), np.float32)
        assert intact(tx)
    # the size it names is enough
    found = re.search(r"open_channel\(max_message_size=(\d+)\)", str(info.value))
    assert found
    needed = int(found[1])
    assert needed > 1000
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=needed)
    with tx, rx:
        tx.send_nowait(list(range(500)))
        assert rx.recv_nowait() == list(range(500))


# ---------------------------------------------------------------- one name in the docs


def test_recv_is_the_documented_name_and_receive_its_alias() -> None:
    rx_class: type[aioshm.ReceiveChannel[Any]] = aioshm.ReceiveChannel
    assert rx_class.receive is rx_class.recv
    assert rx_class.receive_nowait is rx_class.recv_nowait
    assert rx_class.receive_blocking is rx_class.recv_blocking
    assert rx_class.recv.__name__ == "recv"  # the API reference documents it as recv
    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    sources = sorted((root / "aioshm").glob("*.py"))
    wrong = re.compile(r"\.receive(_nowait|_blocking)?\(|:meth:`[\w.]*receive(_nowait|_blocking)?`")
    for path in pages + sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not wrong.search(line), f"{path.name}:{number} says receive: {line}"
    # the alias is documented once, in the class docstring
    assert "aliases" in (rx_class.__doc__ or "") and "``receive``" in (rx_class.__doc__ or "")


# ---------------------------------------------------------------- metadata on frames

FRAME = np.dtype([("seq", "<u8"), ("time", "<f8"), ("pixels", "u1", (108, 192, 3))])


@pytest.mark.anyio
async def test_structured_loan_carries_metadata_with_the_frame() -> None:
    """The cookbook's recipe: one record of a structured dtype, loaned with shape ()."""
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=FRAME.itemsize + 1024)
    for seq in (7, 8):
        async with tx.send_loan((), FRAME) as frame:
            assert frame.shape == () and frame["pixels"].flags.writeable
            frame["pixels"][...] = seq
            frame["seq"] = seq
            frame["time"] = 1.5
    async with rx.recv_view() as frame:  # in place
        assert inside_segment(rx, frame) and frame.dtype == FRAME
        assert (int(frame["seq"]), float(frame["time"])) == (7, 1.5)
        assert frame["pixels"].shape == (108, 192, 3) and frame["pixels"].min() == 7
    copied = await rx.recv()  # or copied out
    assert copied.dtype == FRAME and int(copied["seq"]) == 8
    assert int(copied["pixels"].max()) == 8
    assert intact(rx)
    # without the room for the dtype's description, the error names the size needed
    tx2, rx2 = aioshm.open_channel[Any](capacity=1, max_message_size=FRAME.itemsize)
    with tx2, rx2, pytest.raises(ValueError, match=r"max_message_size=\d+\) or more"):
        tx2.send_loan((), FRAME)
    tx.close()
    rx.close()
