"""anyio's memory-object-stream test suite, run against aioshm as a peer's.

Adapted from anyio's ``tests/streams/test_memory.py`` (anyio 4.x): each test keeps its
name and its point; ``create_memory_object_stream(n)`` becomes :func:`channel`. Where
the upstream test differs, the docstring says how and why:

- anyio's default buffer is 0 (a rendezvous); a slot is a buffer of at least one. A
  test that uses the default only to have *some* stream runs here with a few slots; a
  test whose point is the rendezvous itself (a ``send_nowait`` that succeeds because a
  receiver waits, a ``receive_nowait`` that takes from a blocked sender) is skipped.
- anyio hands an item to a waiting task synchronously; aioshm wakes the waiter, which
  takes its item when it runs (it may be in another process). The tests that watch
  that moment wait for the state to settle (see ``ReceiveChannel.statistics``).
- anyio-only API (``item_type=``, its own error messages, static variance checks) is
  left out.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any, NoReturn

import anyio
import pytest
from anyio import (
    BrokenResourceError,
    CancelScope,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
    create_task_group,
    fail_after,
    wait_all_tasks_blocked,
)
from anyio.abc import TaskStatus

import aioshm

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

RENDEZVOUS = "needs a buffer of size 0 (a rendezvous); a slot is a buffer of at least one"


def channel(
    capacity: int = 4, kind: Any = Any
) -> tuple[aioshm.SendChannel[Any], aioshm.ReceiveChannel[Any]]:
    """The peer's ``create_memory_object_stream``: capacity is the buffer size."""
    return aioshm.open_channel[kind](capacity=capacity, max_message_size=256)


async def settled(condition: Callable[..., bool]) -> None:
    """Wait until a woken waiter has run (it takes its own slot, asynchronously).

    ``condition`` is called without arguments (a lambda binding its loop variables as
    defaults is one)."""
    with fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


def test_invalid_max_buffer() -> None:
    with pytest.raises(TypeError, match="capacity must be an integer"):
        aioshm.open_channel(1.0)  # type: ignore[arg-type]


def test_negative_max_buffer() -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        aioshm.open_channel(-1)


async def test_receive_then_send() -> None:
    """Upstream uses a rendezvous; a one-slot buffer keeps the point: the receiver
    waits first, and each send reaches it."""

    async def receiver() -> None:
        received_objects.append(await receive.receive())
        received_objects.append(await receive.receive())

    send, receive = channel(1)
    received_objects: list[str] = []
    async with create_task_group() as tg:
        tg.start_soon(receiver)
        await wait_all_tasks_blocked()
        await send.send("hello")
        await send.send("anyio")

    assert received_objects == ["hello", "anyio"]
    send.close()
    receive.close()


@pytest.mark.skip(reason=RENDEZVOUS)
async def test_receive_then_send_nowait() -> None:
    """send_nowait succeeds only because receivers wait."""


@pytest.mark.skip(reason=RENDEZVOUS)
async def test_send_then_receive_nowait() -> None:
    """receive_nowait takes the item from a blocked sender."""


async def test_send_is_unblocked_after_receive_nowait() -> None:
    send, receive = channel(1)
    send.send_nowait("hello")

    with fail_after(10):  # upstream: 1 s, on an unloaded machine
        async with create_task_group() as tg:
            tg.start_soon(send.send, "anyio")
            await wait_all_tasks_blocked()
            assert receive.receive_nowait() == "hello"

    assert receive.receive_nowait() == "anyio"
    send.close()
    receive.close()


async def test_send_nowait_then_receive_nowait() -> None:
    send, receive = channel(2)
    send.send_nowait("hello")
    send.send_nowait("anyio")
    assert receive.receive_nowait() == "hello"
    assert receive.receive_nowait() == "anyio"
    send.close()
    receive.close()


async def test_iterate() -> None:
    async def receiver() -> None:
        async for item in receive:
            received_objects.append(item)

    send, receive = channel()
    received_objects: list[str] = []
    async with create_task_group() as tg:
        tg.start_soon(receiver)
        await send.send("hello")
        await send.send("anyio")
        await send.aclose()

    assert received_objects == ["hello", "anyio"]
    receive.close()


async def test_receive_send_closed_send_stream() -> None:
    send, receive = channel()
    await send.aclose()
    with pytest.raises(EndOfStream):
        receive.receive_nowait()

    with pytest.raises(ClosedResourceError):
        await send.send(None)

    receive.close()


async def test_receive_send_closed_receive_stream() -> None:
    send, receive = channel()
    await receive.aclose()
    with pytest.raises(ClosedResourceError):
        receive.receive_nowait()

    with pytest.raises(BrokenResourceError):
        await send.send(None)

    send.close()


async def test_cancel_receive() -> None:
    """Upstream checks with send_nowait on a rendezvous that the cancelled receiver no
    longer waits; here the item sent afterwards must still be there."""
    send, receive = channel(1)
    async with create_task_group() as tg:
        tg.start_soon(receive.receive)
        await wait_all_tasks_blocked()
        tg.cancel_scope.cancel()

    send.send_nowait("hello")
    with pytest.raises(WouldBlock):
        send.send_nowait("hello")  # the one slot still holds it: nobody took it
    assert receive.statistics().tasks_waiting_receive == 0
    send.close()
    receive.close()


async def test_cancel_send() -> None:
    """Upstream blocks the sender on a rendezvous; here on a full one-slot buffer."""
    send, receive = channel(1)
    send.send_nowait("first")
    async with create_task_group() as tg:
        tg.start_soon(send.send, "hello")
        await wait_all_tasks_blocked()
        tg.cancel_scope.cancel()

    assert receive.receive_nowait() == "first"
    with pytest.raises(WouldBlock):
        receive.receive_nowait()

    send.close()
    receive.close()


async def test_clone() -> None:
    send1, receive1 = channel(1)
    send2 = send1.clone()
    receive2 = receive1.clone()
    await send1.aclose()
    await receive1.aclose()
    send2.send_nowait("hello")
    assert receive2.receive_nowait() == "hello"
    send2.close()
    receive2.close()


async def test_clone_closed() -> None:
    send, receive = channel(1, NoReturn)
    await send.aclose()
    await receive.aclose()
    with pytest.raises(ClosedResourceError):
        send.clone()
    with pytest.raises(ClosedResourceError):
        receive.clone()


async def test_close_send_while_receiving() -> None:
    send, receive = channel(1, NoReturn)
    with pytest.raises(ExceptionGroup) as exc:
        async with create_task_group() as tg:
            tg.start_soon(receive.receive)
            await wait_all_tasks_blocked()
            await send.aclose()

    assert len(exc.value.exceptions) == 1
    assert isinstance(exc.value.exceptions[0], EndOfStream)
    receive.close()


async def test_close_receive_while_sending() -> None:
    """Upstream blocks the sender on a rendezvous; here on a full one-slot buffer.
    ``None`` is sent, as upstream (a regression test for anyio #731)."""
    send, receive = channel(1, None)
    send.send_nowait(None)
    with pytest.raises(ExceptionGroup) as exc:
        async with create_task_group() as tg:
            tg.start_soon(send.send, None)
            await wait_all_tasks_blocked()
            await receive.aclose()

    assert len(exc.value.exceptions) == 1
    assert isinstance(exc.value.exceptions[0], BrokenResourceError)
    send.close()


async def test_receive_after_send_closed() -> None:
    send, receive = channel(1)
    await send.send("hello")
    await send.aclose()
    assert await receive.receive() == "hello"
    receive.close()


async def test_receive_when_cancelled() -> None:
    """receive() in a cancelled scope raises and takes nothing (upstream's two
    senders block on a rendezvous; here their items are buffered)."""
    send, receive = channel()
    async with create_task_group() as tg:
        tg.start_soon(send.send, "hello")
        await wait_all_tasks_blocked()
        tg.start_soon(send.send, "world")
        await wait_all_tasks_blocked()

        with CancelScope() as scope:
            scope.cancel()
            await receive.receive()

        assert scope.cancelled_caught
        assert await receive.receive() == "hello"
        assert await receive.receive() == "world"

    send.close()
    receive.close()


async def test_send_when_cancelled() -> None:
    """send() in a cancelled scope raises and sends nothing."""

    async def receiver() -> None:
        received.append(await receive.receive())

    received: list[str] = []
    send, receive = channel()
    async with create_task_group() as tg:
        tg.start_soon(receiver)
        with CancelScope() as scope:
            scope.cancel()
            await send.send("hello")

        await send.send("world")

    assert received == ["world"]
    send.close()
    receive.close()


async def test_cancel_during_receive() -> None:
    """Cancelling a pending receive() does not lose an item sent at that moment.

    Upstream the item is handed to the waiting receiver before the cancellation, so it
    is received. Here the woken receiver takes it only when it runs, and the
    cancellation comes first: the item stays in the channel. Either way, exactly once.
    """

    async def scoped_receiver(task_status: TaskStatus[CancelScope]) -> None:
        with CancelScope() as cancel_scope:
            task_status.started(cancel_scope)
            received.append(await receive.receive())

        assert cancel_scope.cancel_called

    received: list[str] = []
    send, receive = channel()
    with send, receive:
        async with create_task_group() as tg:
            receiver_scope = await tg.start(scoped_receiver)
            await wait_all_tasks_blocked()
            send.send_nowait("hello")
            receiver_scope.cancel()

        left = [receive.receive_nowait()] if receive.statistics().current_buffer_used else []
        assert received + left == ["hello"]


async def test_cancel_during_receive_buffered() -> None:
    """An item sent when the receiver next in line has been cancelled is not lost."""

    async def scoped_receiver(
        receive: aioshm.ReceiveChannel[str], task_status: TaskStatus[CancelScope]
    ) -> None:
        with CancelScope() as cancel_scope:
            task_status.started(cancel_scope)
            await receive.receive()

    send, receive = channel(1)
    with send, receive:
        async with create_task_group() as tg:
            cancel_scope = await tg.start(scoped_receiver, receive)
            await wait_all_tasks_blocked()
            cancel_scope.cancel()
            send.send_nowait("item")

        assert receive.receive_nowait() == "item"


async def test_close_receive_after_send() -> None:
    async def send() -> None:
        async with send_stream:
            await send_stream.send("test")

    async def receive() -> None:
        async with receive_stream:
            assert await receive_stream.receive() == "test"

    send_stream, receive_stream = channel()
    async with create_task_group() as tg:
        tg.start_soon(send)
        tg.start_soon(receive)


async def test_statistics() -> None:
    """Upstream's checks, with the documented difference: a woken waiter is counted
    (and its item not yet buffered) until it has run, so each check after a
    ``*_nowait`` waits for that."""
    send_stream, receive_stream = channel(1, None)
    streams: list[Any] = [send_stream, receive_stream]
    for stream in streams:
        statistics = stream.statistics()
        assert statistics.max_buffer_size == 1
        assert statistics.current_buffer_used == 0
        assert statistics.open_send_streams == 1
        assert statistics.open_receive_streams == 1
        assert statistics.tasks_waiting_send == 0
        assert statistics.tasks_waiting_receive == 0

    for stream in streams:
        async with create_task_group() as tg:
            send_stream.send_nowait(None)
            assert stream.statistics().current_buffer_used == 1
            tg.start_soon(send_stream.send, None)
            await wait_all_tasks_blocked()
            assert stream.statistics().current_buffer_used == 1
            assert stream.statistics().tasks_waiting_send == 1
            receive_stream.receive_nowait()
            await settled(lambda s=stream: s.statistics().tasks_waiting_send == 0)
            assert stream.statistics().current_buffer_used == 1
            receive_stream.receive_nowait()
            assert stream.statistics().current_buffer_used == 0

            tg.start_soon(receive_stream.receive)
            await wait_all_tasks_blocked()
            assert stream.statistics().tasks_waiting_receive == 1
            send_stream.send_nowait(None)
            await settled(lambda s=stream: s.statistics().tasks_waiting_receive == 0)

        async with create_task_group() as tg:
            send_stream.send_nowait(None)
            assert stream.statistics().tasks_waiting_send == 0
            for _ in range(3):
                tg.start_soon(send_stream.send, None)

            await wait_all_tasks_blocked()
            assert stream.statistics().tasks_waiting_send == 3
            for i in range(2, -1, -1):
                receive_stream.receive_nowait()
                await settled(lambda s=stream, i=i: s.statistics().tasks_waiting_send == i)
                await settled(lambda s=stream: s.statistics().current_buffer_used == 1)

            receive_stream.receive_nowait()

        assert stream.statistics().current_buffer_used == 0
        assert stream.statistics().tasks_waiting_send == 0
        assert stream.statistics().tasks_waiting_receive == 0

    send_stream.close()
    receive_stream.close()


async def test_sync_close() -> None:
    send_stream, receive_stream = channel(1, None)
    with send_stream, receive_stream:
        pass

    with pytest.raises(ClosedResourceError):
        send_stream.send_nowait(None)

    with pytest.raises(ClosedResourceError):
        receive_stream.receive_nowait()


async def test_not_closed_warning() -> None:
    send, receive = channel()

    with pytest.warns(ResourceWarning, match="unclosed <SendChannel"):
        del send
        gc.collect()

    with pytest.warns(ResourceWarning, match="unclosed <ReceiveChannel"):
        del receive
        gc.collect()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_send_to_natively_cancelled_receiver() -> None:
    """An item sent after a waiting receiver was natively cancelled goes to the next
    receiver, not to the cancelled one."""
    send, receive = channel(1)
    with send, receive:
        receive_task = asyncio.create_task(receive.receive())
        await wait_all_tasks_blocked()
        receive_task.cancel()
        send.send_nowait("hello")
        with pytest.raises(asyncio.CancelledError):
            await receive_task

        assert receive.receive_nowait() == "hello"
