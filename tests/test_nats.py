"""The channel over NATS JetStream, against real nats-server processes.

Each module-level server is started on free loopback ports with its JetStream store in
a temporary directory, and killed at teardown; every test uses a channel of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import pickle
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np
import pytest
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock

import aioshm
import aioshm.nats
from aioshm.nats import LocalServer
from aioshm.nats._link import Link, close_links

from . import nats_workers
from .helpers import Context

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One JetStream server for the module."""
    srv = LocalServer(tmp_path_factory.mktemp("nats"))
    srv.start()
    yield srv
    close_links()
    srv.close()
    assert srv.process is not None and srv.process.poll() is not None


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A JetStream server of the test's own (to stop and restart)."""
    srv = LocalServer(tmp_path / "store")
    srv.start()
    yield srv
    close_links()
    srv.close()
    assert srv.process is not None and srv.process.poll() is not None


def channel_url(server: LocalServer, query: str = "") -> str:
    return f"{server.url}/t{uuid.uuid4().hex[:12]}" + (f"?{query}" if query else "")


def link_of(rx: aioshm.ReceiveChannel[Any]) -> Link:
    """The link of ``rx``, an open receive handle that ``aioshm.open_channel`` gave for
    a NATS URL (a network channel's handle, typed as a shared-memory one)."""
    return cast(Link, cast(aioshm.nats.ReceiveChannel[Any], rx)._link)


# ---------------------------------------------------------------- basics


@pytest.mark.anyio
async def test_round_trip_of_every_kind(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[Any](name=channel_url(server), capacity=8)
    items: list[Any] = [
        1,
        "two",
        b"three",
        {"four": [4]},
        np.arange(12, dtype=np.int16).reshape(3, 4),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
    ]
    async with tx, rx:
        for item in items:
            await tx.send(item)
        for item in items:
            got = await rx.recv()
            if isinstance(item, np.ndarray):
                assert got.dtype == item.dtype and got.shape == item.shape
                assert got.flags.f_contiguous == item.flags.f_contiguous
                assert got.flags.writeable
                np.testing.assert_array_equal(got, item)
            else:
                assert got == item


@pytest.mark.anyio
async def test_eight_mib_array(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[np.ndarray[Any, Any]](
        name=channel_url(server), capacity=2, max_message_size=8 << 20
    )
    array = np.random.default_rng(1).random(1 << 20)
    async with tx, rx:
        await tx.send(array)
        got = await rx.recv()
        np.testing.assert_array_equal(got, array)
        with pytest.raises(ValueError, match="max_message_size"):
            await tx.send(np.zeros((8 << 20) + 1, np.uint8))
        assert tx.statistics().current_buffer_used == 0  # nothing was sent


@pytest.mark.anyio
async def test_end_of_stream_after_the_buffered_messages(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server))
    tx2 = tx.clone()
    await tx.send(1)
    tx.close()
    await tx2.send(2)
    tx2.close()
    with rx:
        assert [x async for x in rx] == [1, 2]
        with pytest.raises(EndOfStream):
            await rx.recv()


@pytest.mark.anyio
async def test_broken_when_every_receiver_is_gone(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server))
    rx2 = rx.clone()
    rx.close()
    with tx:
        await tx.send(1)
        rx2.close()
        with pytest.raises(BrokenResourceError):
            await tx.send(2)


@pytest.mark.anyio
async def test_waiting_sender_breaks_when_the_last_receiver_closes(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server), capacity=1)
    with tx:
        await tx.send(1)
        async with anyio.create_task_group() as tg:

            async def waiting_send() -> None:
                with pytest.raises(BrokenResourceError):
                    await tx.send(2)

            tg.start_soon(waiting_send)
            while tx.statistics().tasks_waiting_send == 0:
                await anyio.sleep(0.01)
            rx.close()


@pytest.mark.anyio
async def test_bounded_send_waits_and_never_drops(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server), capacity=3)
    async with tx, rx:
        for i in range(3):
            await tx.send(i)
        done = anyio.Event()

        async def fourth() -> None:
            await tx.send(3)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(fourth)
            # The fourth send is waiting while three messages are stored.
            while tx.statistics().tasks_waiting_send == 0:
                await anyio.sleep(0.01)
            assert tx.statistics().current_buffer_used == 3
            assert not done.is_set()
            assert await rx.recv() == 0
        assert done.is_set()
        assert [await rx.recv() for _ in range(3)] == [1, 2, 3]


def test_blocking_forms_and_nowait(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[Any](name=channel_url(server), capacity=1)
    with tx, rx:
        with pytest.raises(WouldBlock):
            tx.send_nowait(1)
        with pytest.raises(WouldBlock):
            rx.recv_nowait()
        tx.send_blocking("a", timeout=10)
        with pytest.raises(TimeoutError):
            tx.send_blocking("b", timeout=0.3)
        assert rx.recv_blocking(timeout=10) == "a"
        with pytest.raises(TimeoutError):
            rx.recv_blocking(timeout=0.3)
        tx.send_blocking("c", timeout=10)
        assert rx.recv_blocking(timeout=10) == "c"  # "b" timed out: it was not sent


@pytest.mark.anyio
async def test_many(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server), capacity=32)
    async with tx, rx:
        await tx.send_many(range(20))
        got: list[int] = []
        while len(got) < 20:
            got += await rx.recv_many(8)
        assert got == list(range(20))
        with pytest.raises(ValueError):
            await rx.recv_many(0)


def test_blocking_batches(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server), capacity=2)
    with tx, rx:
        with pytest.raises(TimeoutError) as caught:
            tx.send_many_blocking([1, 2, 3], timeout=0.5)  # the third finds no room
        assert aioshm.items_sent(caught.value) == 2
        got: list[int] = []
        while len(got) < 2:
            got += rx.recv_many_blocking(8, timeout=10)
        assert got == [1, 2]
        with pytest.raises(TimeoutError):
            rx.recv_many_blocking(8, timeout=0.3)  # the third was not sent
        with pytest.raises(ValueError, match="max_items"):
            rx.recv_many_blocking(0)
        tx.send_many_blocking([4, 5], timeout=10)
        got = []
        while len(got) < 2:
            got += rx.recv_many_blocking(8, timeout=10)
        assert got == [4, 5]


@pytest.mark.anyio
async def test_shared_memory_only_methods_say_so(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[Any](name=channel_url(server))
    with tx, rx:
        with pytest.raises(TypeError, match="shared-memory"):
            tx.send_loan(4)
        with pytest.raises(TypeError, match="shared-memory"):
            rx.recv_view()
        with pytest.raises(TypeError, match="shared-memory"):
            await rx.recv_into(np.zeros(4))
        with pytest.raises(TypeError, match="shared-memory"):
            tx.send_loan_blocking(4)
        with pytest.raises(TypeError, match="shared-memory"):
            rx.recv_view_blocking(timeout=1)
        with pytest.raises(TypeError, match="shared-memory"):
            rx.recv_into_blocking(np.zeros(4), timeout=1)


@pytest.mark.anyio
async def test_closed_handles(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server))
    tx2 = tx.clone()
    tx.close()
    tx.close()
    with pytest.raises(ClosedResourceError):
        await tx.send(1)
    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            with pytest.raises(ClosedResourceError):
                await rx.recv()

        tg.start_soon(waiter)
        while rx.statistics().tasks_waiting_receive == 0:
            await anyio.sleep(0.01)
        rx.close()
    tx2.close()


# ---------------------------------------------------------------- cancellation


@pytest.mark.anyio
async def test_cancelled_send_sent_nothing(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[str](name=channel_url(server), capacity=1)
    async with tx, rx:
        await tx.send("first")
        with anyio.move_on_after(0.3) as scope:
            await tx.send("cancelled")
        assert scope.cancelled_caught
        assert await rx.recv() == "first"
        await tx.send("after")
        assert await rx.recv() == "after"


@pytest.mark.anyio
async def test_cancelled_receive_took_nothing(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server), capacity=64)
    async with tx, rx:
        with anyio.move_on_after(0.2):
            await rx.recv()
        count = 200
        received: list[int] = []

        async def produce() -> None:
            for i in range(count):
                await tx.send(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            misses = 0
            while len(received) < count:
                # Many receives are cancelled while waiting, some right as a message is
                # handed over. The timeout doubles after each miss (a loaded machine
                # still makes progress) and starts small again after a success.
                with anyio.move_on_after(0.0005 * 2**misses):
                    received.append(await rx.recv())
                    misses = -1
                misses += 1
        assert received == list(range(count))


@pytest.mark.anyio
async def test_calls_in_a_cancelled_scope_raise_and_do_nothing(server: LocalServer) -> None:
    """Every async call is a cancel point, on the asyncio lane (once its connection is
    open) and under trio: made in a cancelled scope, it raises and does nothing."""
    tx, rx = aioshm.open_channel[str](name=channel_url(server), capacity=8)
    async with tx, rx:
        await tx.send("opened")  # the lane's connection is open: no wait on entry now
        assert await rx.recv() == "opened"
        await tx.send("kept")
        for call in (
            lambda: tx.send("never"),
            lambda: tx.send_many(["never"]),
            rx.recv,
            lambda: rx.recv_many(4),
        ):
            with anyio.CancelScope() as scope:
                scope.cancel()
                await call()
            assert scope.cancelled_caught
        assert rx.statistics().slots_in_use == 0  # no receive took "kept"
        assert await rx.recv() == "kept"
        with anyio.move_on_after(0.5):
            pytest.fail(f"a cancelled send was delivered: {await rx.recv()!r}")


def test_native_asyncio_cancellation_pending_on_entry(server: LocalServer) -> None:
    """A task cancelled (``Task.cancel()``) while it ran, before it calls: the call
    raises ``CancelledError`` at once and sends or takes nothing."""
    tx, rx = aioshm.open_channel[str](name=channel_url(server), capacity=8)

    async def cancelled_then(call: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await call()

    async def main() -> None:
        await tx.send("opened")
        assert await rx.recv() == "opened"
        await tx.send("kept")
        for call in (lambda: tx.send("never"), rx.recv):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.ensure_future(cancelled_then(call))
        assert await rx.recv() == "kept"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                pytest.fail(f"a cancelled send was delivered: {await rx.recv()!r}")

    with tx, rx:
        asyncio.run(main())


def test_native_asyncio_cancellation(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[Any](name=channel_url(server), capacity=1)

    async def main() -> None:
        recv = asyncio.ensure_future(rx.recv())
        await asyncio.sleep(0.2)
        recv.cancel()
        with pytest.raises(asyncio.CancelledError):
            await recv
        await tx.send("one")
        send = asyncio.ensure_future(tx.send("cancelled"))
        await asyncio.sleep(0.2)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        assert await rx.recv() == "one"
        await tx.send("two")
        assert await rx.recv() == "two"
        # Many native cancellations racing with deliveries lose nothing.
        got: list[int] = []

        async def produce() -> None:
            for i in range(100):
                await tx.send(i)

        producer = asyncio.ensure_future(produce())
        misses = 0
        while len(got) < 100:
            try:
                got.append(await asyncio.wait_for(rx.recv(), 0.0005 * 2**misses))
                misses = 0
            except TimeoutError:
                misses += 1
        await producer
        assert got == list(range(100))

    with tx, rx:
        asyncio.run(main())


def test_send_cancelled_once_on_the_wire_completes(server: LocalServer) -> None:
    """On asyncio, a send publishes from its own task; once its publish is on the wire,
    a native cancellation waits for the server's answer and the send completes (the
    cancellation is not raised again): the message is stored, once."""
    tx, rx = aioshm.open_channel[str](name=channel_url(server), capacity=8)

    async def main() -> list[Any]:
        await tx.send("before")  # this loop's connection is up
        send: asyncio.Task[Any] = asyncio.ensure_future(tx.send("on the wire"))
        while tx.statistics().tasks_waiting_send == 0:  # not yet on the wire
            await asyncio.sleep(0)
        # It counts itself waiting just before its publish, which nats-py queues before
        # its first suspension: it is awaiting the server's answer now.
        send.cancel()
        assert await send is None
        tx.close()
        return [item async for item in rx]

    with tx, rx:
        assert asyncio.run(main()) == ["before", "on the wire"]


def test_receive_cancelled_as_messages_are_handed_to_it_returns_them(
    server: LocalServer,
) -> None:
    """On asyncio, a receive waits in its own task; messages handed to it are past the
    point of no return: a native cancellation that comes before the task runs again is
    deferred, and the messages returned."""
    tx, rx = aioshm.open_channel[str](name=channel_url(server), capacity=8)

    async def main() -> Any:
        msg = await _deliver_without_ack(link_of(rx))  # held here, not pulled by the receive
        recv = asyncio.ensure_future(rx.recv())
        while rx.statistics().tasks_waiting_receive == 0:
            await asyncio.sleep(0.01)
        lane = await link_of(rx).lane_here()
        assert lane is not None  # the waiting receive is on this loop's lane
        lane.buffer.append((msg, time.monotonic()))
        lane._match()  # handed over...
        recv.cancel()  # ...and cancelled before the receive's task runs again
        return await recv

    with tx, rx:
        tx.send_blocking("handed", 10)
        assert asyncio.run(main()) == "handed"


# ---------------------------------------------------------------- processes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "producers", "consumers"), [("spawn", 2, 3), ("fork", 2, 2), ("forkserver", 1, 1)]
)
def test_handles_passed_to_processes_are_owned_there(
    server: LocalServer, method: str, producers: int, consumers: int
) -> None:
    """Producer and consumer processes: every message once, in order per producer at
    every consumer; the parent closes its handles at once."""
    ctx = cast(Context, multiprocessing.get_context(method))
    tx, rx = aioshm.open_channel[tuple[int, int]](name=channel_url(server), capacity=16)
    out = ctx.Queue()
    count = 60
    procs = [
        ctx.Process(target=nats_workers.produce, args=(tx, p, count, "asyncio"))
        for p in range(producers)
    ] + [
        ctx.Process(target=nats_workers.consume, args=(rx, out, backend))
        for backend in ("asyncio", "trio", "asyncio")[:consumers]
    ]
    for proc in procs:
        proc.start()
    tx.close()
    rx.close()
    results = [out.get(timeout=50) for _ in range(consumers)]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    everything = sorted(item for got in results for item in got)
    assert everything == sorted((p, i) for p in range(producers) for i in range(count))
    for got in results:
        for p in range(producers):
            mine = [i for q, i in got if q == p]
            assert mine == sorted(mine)


def test_pickled_handle_is_owned_where_unpickled(server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server))
    data = pickle.dumps(tx)
    tx.close()
    tx2 = pickle.loads(data)  # as another process, on any machine, would
    with rx:
        tx2.send_blocking(5, 10)
        tx2.close()
        assert rx.recv_blocking(10) == 5
        with pytest.raises(EndOfStream):
            rx.recv_blocking(10)


@pytest.mark.slow
def test_dead_sender_ends_the_stream_within_the_heartbeat(server: LocalServer) -> None:
    url = channel_url(server, "heartbeat=2")
    tx, rx = aioshm.open_channel[str](name=url)
    ctx = multiprocessing.get_context("forkserver")
    ready = ctx.Event()
    child = ctx.Process(target=nats_workers.hold_given_sender, args=(tx, ready))
    child.start()
    tx.close()
    with rx:
        while not ready.wait(0.1):
            assert child.exitcode is None, "the child failed"
        assert rx.recv_blocking(10) == "from the child"
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        killed = time.monotonic()
        with pytest.raises(EndOfStream):
            rx.recv_blocking(30)
        # The documented bound: the heartbeat, plus the server's expiry and the
        # receiver's check (and slack for a loaded machine).
        assert time.monotonic() - killed < 2 + 4


@pytest.mark.slow
def test_dead_receiver_message_is_delivered_again(server: LocalServer) -> None:
    url = channel_url(server, "ack_wait=1&prefetch=4&heartbeat=2")
    tx, rx = aioshm.open_channel[int](name=url, capacity=16)
    with tx:
        for i in range(10):
            tx.send_blocking(i, 10)
    child = multiprocessing.get_context("fork").Process(
        target=nats_workers.take_one_then_stop, args=(url,)
    )
    child.start()
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # stopped, holding
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
    with rx:
        got = [x for x in iter(lambda: _recv_or_none(rx), None)]
        assert sorted(got) == list(range(1, 10))  # 0 was taken by the dead child
        assert rx.statistics().redelivered_messages == 4


def _recv_or_none(rx: aioshm.ReceiveChannel[Any] | aioshm.nats.ReceiveChannel[Any]) -> Any:
    try:
        return rx.recv_blocking(30)
    except EndOfStream:
        return None


# ---------------------------------------------------------------- server faults


async def _deliver_without_ack(link: Any) -> Any:
    """One message of ``link``'s channel, delivered to a connection of its own and not
    acknowledged: a receiver's copy of it (a lane acknowledges it from its own
    connection, as any message)."""
    import nats

    nc = await nats.connect(link.address.servers[0])
    sub = await nc.jetstream().pull_subscribe_bind(link.consumer, link.stream)
    [msg] = await sub.fetch(1, timeout=10)
    await nc.close()
    return msg


@pytest.mark.slow
def test_acknowledgement_applied_but_unconfirmed_while_no_server_answers(
    own_server: LocalServer,
) -> None:
    """The reply to an applied acknowledgement is lost, and no server answers for
    longer than ``ack_wait``: the message is the receiver's still (it is gone from the
    server, so giving up on it would lose it)."""
    from aioshm.nats import _bridge

    url = channel_url(own_server, "ack_wait=1&heartbeat=30")
    tx, rx = aioshm.open_channel[str](name=url, capacity=8)
    with tx, rx:
        tx.send_blocking("only", 10)
        link = link_of(rx)
        msg = _bridge.run(_deliver_without_ack(link), 20)
        arrived = time.monotonic()
        _bridge.run(link.nc.request(msg.reply, b"+ACK", timeout=5), 10)  # applied...
        assert own_server.process is not None
        own_server.process.send_signal(signal.SIGSTOP)  # ...and no server answers
        try:
            pending = _bridge.submit(link.bridge_lane.acknowledge([(msg, arrived)]))
            # The outage outlasts ack_wait, and every retry so far went unanswered.
            with contextlib.suppress(concurrent.futures.TimeoutError):
                pending.result(link.ack_wait * 2)
        finally:
            own_server.process.send_signal(signal.SIGCONT)
        assert pending.result(30) == [msg]


@pytest.mark.slow
def test_late_acknowledgement_of_a_message_delivered_again_elsewhere(
    server: LocalServer,
) -> None:
    """A receiver's acknowledgement is confirmed after ``ack_wait``, when the message
    went to another receiver that returned it: the late one does not return it too."""
    from aioshm.nats import _bridge

    url = channel_url(server, "ack_wait=1&heartbeat=30")
    tx, rx = aioshm.open_channel[str](name=url, capacity=8)
    with tx, rx:
        tx.send_blocking("once", 10)
        link = link_of(rx)
        first = _bridge.run(_deliver_without_ack(link), 20)
        arrived = time.monotonic()
        assert rx.recv_blocking(30) == "once"  # delivered again, after ack_wait
        assert _bridge.run(link.bridge_lane.acknowledge([(first, arrived)]), 30) == []
        assert rx.statistics().redelivered_messages == 1


def test_restarted_server_keeps_file_backed_messages(own_server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(own_server, "heartbeat=30"), capacity=8)
    with tx, rx:
        for i in range(3):
            tx.send_blocking(i, 10)
        own_server.stop()
        own_server.start()
        tx.send_blocking(3, 30)  # waits for the reconnection
        assert [rx.recv_blocking(30) for _ in range(4)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_send_waits_while_no_server_is_reachable(own_server: LocalServer) -> None:
    tx, rx = aioshm.open_channel[str](name=channel_url(own_server, "heartbeat=30"), capacity=8)
    with tx, rx:
        own_server.kill()

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tx.send, "while down")
                await anyio.sleep(0.5)
                own_server.start()
            assert await rx.recv() == "while down"

        anyio.run(main)


@pytest.mark.slow
def test_connect_timeout_names_the_url() -> None:
    url = f"nats://127.0.0.1:{aioshm.nats._server.free_port()}/nobody"
    started = time.monotonic()
    with pytest.raises(OSError, match=r"nats://127\.0\.0\.1:\d+/nobody"):
        aioshm.nats.open_channel(url, connect_timeout=0.5)
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:4222/x", "unknown scheme"),
        ("nats://127.0.0.1:4222", "no channel name"),
        ("nats://127.0.0.1/x", "not host:port"),
        ("nats://127.0.0.1:99999/x", "out of range"),
        ("nats://127.0.0.1:4222/a.b", "letters, digits"),
        ("nats://127.0.0.1:4222/x?replicas=zero", "not a number"),
        ("nats://127.0.0.1:4222/x?storage=disk", "file or memory"),
        ("nats://127.0.0.1:4222/x?colour=red", "unknown parameter"),
        ("127.0.0.1:4222/x", "no scheme"),
    ],
)
def test_malformed_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aioshm.nats.open_channel(url)


def test_password_is_hidden_in_messages() -> None:
    address = aioshm.nats.parse("nats://me:secret@h1:1,h2:2/c?replicas=3&storage=memory")
    assert "secret" not in address.url and "secret" not in repr(address)
    assert address.servers == ("nats://h1:1", "nats://h2:2")
    assert (address.user, address.password, address.replicas, address.storage) == (
        "me",
        "secret",
        3,
        "memory",
    )


def test_missing_channel(server: LocalServer) -> None:
    with pytest.raises(FileNotFoundError, match="no channel named"):
        aioshm.nats.connect_receive(channel_url(server))
    with pytest.raises(FileNotFoundError, match="no channel named"):
        aioshm.nats.connect_send(channel_url(server))


def test_existing_channel_with_other_sizes(server: LocalServer) -> None:
    url = channel_url(server)
    tx, rx = aioshm.open_channel[int](name=url, capacity=4)
    with tx, rx, pytest.raises(ValueError, match="capacity=4"):
        aioshm.open_channel(name=url, capacity=5)


def test_server_without_jetstream(tmp_path: Path) -> None:
    with LocalServer(tmp_path, jetstream=False) as plain:
        with pytest.raises(OSError, match="JetStream"):
            aioshm.open_channel(name=channel_url(plain))
        with pytest.raises(OSError, match="JetStream"):
            aioshm.nats.connect_send(channel_url(plain))


def test_unknown_option(server: LocalServer) -> None:
    with pytest.raises(TypeError, match="colour"):
        aioshm.nats.open_channel(channel_url(server), colour="red")


# ---------------------------------------------------------------- docs and example


def test_across_machines_page_snippets_run(server: LocalServer, tmp_path: Path) -> None:
    """Every python block of docs/across-machines.md runs, in order, against a live
    server (its address put in place of 127.0.0.1:4222); a ```text block right after
    one is its exact output."""
    from .test_examples import _BLOCK, ROOT, run

    text = (ROOT / "docs" / "across-machines.md").read_text()
    blocks = list(_BLOCK.finditer(text))
    ran = 0
    for i, block in enumerate(blocks):
        if block[1] != "python":
            continue
        code = block[2].replace("127.0.0.1:4222", f"127.0.0.1:{server.port}")
        script = tmp_path / f"snippet{i}.py"
        script.write_text(code)
        result = run(str(script), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if following is not None and following[1] == "text":
            assert result.stdout.splitlines() == following[2].splitlines()
        ran += 1
    assert ran == 2


def test_across_machines_example_with_a_url(server: LocalServer) -> None:
    from .test_examples import run

    result = run(
        "examples/across_machines.py",
        channel_url(server),
        "--frames",
        "5",
        "--start-method",
        "fork",
    )
    assert result.returncode == 0, result.stderr
    assert "started a local nats-server" not in result.stdout
    assert "consumer: received 5 frames, in order" in result.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["aioshm.bench.network", "aioshm.bench --network"])
def test_network_benchmark_runs(module: str) -> None:
    from .test_examples import run

    result = run("-m", *module.split(), "--quick")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("10 x float64", "8 MiB array"):
        assert f"{label}: raw JetStream" in out
        assert f"{label}: aioshm over NATS" in out
    assert "round trip: aioshm over NATS" in out


@pytest.mark.slow
def test_serve_nats_command() -> None:
    """``python -m aioshm serve-nats`` serves channels, and takes its server down
    with it on SIGTERM."""
    import subprocess
    import sys

    port = aioshm.nats._server.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioshm", "serve-nats", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(
            f"nats-server with JetStream at nats://127.0.0.1:{port}"
        )
        tx, rx = aioshm.nats.open_channel(f"nats://127.0.0.1:{port}/served")
        with tx, rx:
            tx.send_blocking("hello", 10)
            assert rx.recv_blocking(10) == "hello"
        close_links()
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError, match=str(port)):  # the server went with it
        aioshm.nats.connect_send(f"nats://127.0.0.1:{port}/served", connect_timeout=0.5)


@pytest.mark.slow
def test_tls(tmp_path: Path) -> None:
    """``tls://`` with a CA file: a channel works; without the CA, the connection is
    refused with an OSError naming the URL."""
    import subprocess

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    key = ["-newkey", "rsa:2048", "-nodes"]
    openssl("req", "-x509", *key, "-days", "1", "-subj", "/CN=test CA", "-keyout", "ca.key",
            "-out", "ca.pem")  # fmt: skip
    openssl("req", *key, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "san.ext",
            "-out", "server.pem")  # fmt: skip
    tls = (str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    with LocalServer(tmp_path / "store", tls=tls) as secure:
        url = f"{secure.url}/secure"
        assert url.startswith("tls://")
        tx, rx = aioshm.nats.open_channel(url, tls_ca=str(tmp_path / "ca.pem"))
        with tx, rx:
            tx.send_blocking(np.arange(3), 10)
            np.testing.assert_array_equal(rx.recv_blocking(10), np.arange(3))
        close_links()
        with pytest.raises(OSError, match="tls://127"):
            aioshm.nats.connect_send(url, connect_timeout=1)


def test_sender_that_closes_and_exits_ends_the_stream_at_once(server: LocalServer) -> None:
    """A closed handle counts out when it closes, not when its heartbeat expires (30 s
    here), even if its process exits right after."""
    tx, rx = aioshm.open_channel[tuple[int, int]](name=channel_url(server, "heartbeat=30"))
    child = multiprocessing.get_context("fork").Process(
        target=nats_workers.produce, args=(tx, 0, 3, "asyncio")
    )
    child.start()
    tx.close()
    with rx:
        assert [rx.recv_blocking(10) for _ in range(3)] == [(0, 0), (0, 1), (0, 2)]
        child.join(30)
        assert child.exitcode == 0
        exited = time.monotonic()
        with pytest.raises(EndOfStream):
            rx.recv_blocking(30)
        assert time.monotonic() - exited < 10


def test_closing_receiver_gives_back_what_it_pulled_ahead(server: LocalServer) -> None:
    """Messages pulled ahead by a receiver that closes and exits go to the others at
    once, not after ack_wait (30 s here)."""
    url = channel_url(server, "ack_wait=30&prefetch=4")
    tx, rx = aioshm.open_channel[int](name=url, capacity=16)
    with tx:
        for i in range(10):
            tx.send_blocking(i, 10)
    child = multiprocessing.get_context("fork").Process(
        target=nats_workers.take_one_then_close, args=(url,)
    )
    child.start()
    child.join(30)
    assert child.exitcode == 0
    exited = time.monotonic()
    with rx:
        got = [x for x in iter(lambda: _recv_or_none(rx), None)]
    assert sorted(got) == list(range(1, 10))
    assert time.monotonic() - exited < 10


def test_ended_event_loop_gives_back_what_its_connection_pulled_ahead(
    server: LocalServer,
) -> None:
    """asyncio callers receive on a connection of their loop's own. Messages it pulled
    ahead go to the other receivers once the loop ends (``asyncio.run`` returns), not
    after ack_wait (30 s here, past the receives' timeout)."""
    url = channel_url(server, "ack_wait=30&prefetch=4")
    tx, rx = aioshm.open_channel[int](name=url, capacity=16)
    with tx, rx:
        for i in range(6):
            tx.send_blocking(i, 10)

        async def take_one() -> Any:
            first = await rx.recv()
            while rx.statistics().slots_in_use < 4:  # the four pulled ahead are here
                await asyncio.sleep(0.01)
            return first

        assert asyncio.run(take_one()) == 0
        assert sorted(rx.recv_blocking(10) for _ in range(5)) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_dead_receiver_process_breaks_the_channel_within_the_heartbeat(
    server: LocalServer,
) -> None:
    tx, rx = aioshm.open_channel[int](name=channel_url(server, "heartbeat=2"), capacity=10_000)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=nats_workers.hold_receiver, args=(rx, ready))
    child.start()
    rx.close()
    with tx:
        while not ready.wait(0.1):
            assert child.exitcode is None, "the child failed"
        tx.send_blocking(0, 10)  # a receiver is open: no error
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        killed = time.monotonic()
        with pytest.raises(BrokenResourceError):
            while time.monotonic() - killed < 30:
                tx.send_blocking(1, 10)
        # The bound: the heartbeat and a sender's recheck (a quarter of it), plus slack.
        assert time.monotonic() - killed < 2 * 1.25 + 4


def test_server_dies_with_its_owner_even_when_killed() -> None:
    """A SIGKILLed owner (an OOM kill, say) leaves no nats-server behind."""
    import subprocess
    import sys

    code = "import aioshm.nats, sys, time; s = aioshm.nats.LocalServer().start(); "
    code += "print(s.process.pid, flush=True); time.sleep(60)"
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    server_pid = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server_pid}").exists():
        stat = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if stat == "Z":  # dead, waiting for init to reap it
            break
        assert time.monotonic() < deadline, "the server outlived its killed owner"
        time.sleep(0.02)


def test_one_dispatch_for_every_name(server: LocalServer) -> None:
    """aioshm's own entry points take NATS URLs; an unknown scheme names the known."""
    with pytest.raises(ValueError, match=r"unknown scheme 'http'.*nats://"):
        aioshm.open_channel(name="http://127.0.0.1:1/x")
    url = channel_url(server)
    tx, rx = aioshm.open_channel[str](name=url)
    assert isinstance(tx, aioshm.nats.SendChannel)
    with tx, rx, aioshm.connect_send(url) as tx2, aioshm.connect_receive(url) as rx2:
        tx2.send_blocking("via connect_send", 10)
        assert rx2.recv_blocking(10) == "via connect_send"
    with pytest.raises(FileNotFoundError):
        aioshm.connect_receive(channel_url(server), timeout=0.2)
