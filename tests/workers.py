"""Target functions for child processes (importable, so spawn and forkserver work)."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import anyio
import numpy as np

import aioshm


def produce(tx: aioshm.SendChannel[Any], producer: int, count: int, backend: str) -> None:
    """Send ``(producer, i)`` for i in range(count), then close."""

    async def main() -> None:
        async with tx:
            for i in range(count):
                await tx.send((producer, i))

    anyio.run(main, backend=backend)


def produce_after(
    go: Any, tx: aioshm.SendChannel[Any], producer: int, count: int, backend: str
) -> None:
    """Wait for the event ``go``, then :func:`produce`."""
    if not go.wait(60):
        raise SystemExit(3)
    produce(tx, producer, count, backend)


def produce_counted(
    tx: aioshm.SendChannel[Any], producer: int, progress: Any, backend: str
) -> None:
    """Send ``(producer, i)`` for ever, counting in the shared ``progress`` the sends
    started (``progress[0]``) and the sends that returned (``progress[1]``)."""

    async def main() -> None:
        async with tx:
            i = 0
            while True:
                progress[0] = i + 1
                await tx.send((producer, i))
                progress[1] = i + 1
                i += 1

    anyio.run(main, backend=backend)


def produce_arrays(tx: aioshm.SendChannel[Any], producer: int, count: int, backend: str) -> None:
    async def main() -> None:
        async with tx:
            for i in range(count):
                await tx.send(np.array([producer, i], dtype=np.int64))

    anyio.run(main, backend=backend)


def consume(rx: aioshm.ReceiveChannel[Any], out: aioshm.SendChannel[Any], backend: str) -> None:
    """Receive until the end of the stream; then report everything received on ``out``."""

    async def main() -> None:
        got = []
        async with rx:
            async for item in rx:
                got.append(tuple(int(v) for v in item))
        async with out:
            await out.send(got)

    anyio.run(main, backend=backend)


def consume_and_count(rx: aioshm.ReceiveChannel[Any], backend: str) -> None:
    """Receive until the end of the stream and exit 0."""

    async def main() -> None:
        async with rx:
            async for _ in rx:
                pass

    anyio.run(main, backend=backend)


def hold_forever(*handles: Any) -> None:
    """Keep the handles open until killed."""
    time.sleep(3600)


def send_then_hold(tx: aioshm.SendChannel[Any], message: Any) -> None:
    """Send ``message`` with a handle passed to this process, then hold it until killed."""
    tx.send_blocking(message, timeout=10)
    time.sleep(3600)


def use_inherited(flag: aioshm.SendChannel[Any], inherited: aioshm.SendChannel[Any]) -> None:
    """Report how using an inherited (not passed) handle fails."""
    try:
        inherited.send_nowait("should not be sent")
        outcome = "sent"
    except anyio.ClosedResourceError as exc:
        outcome = f"closed: {exc}"
    with flag:
        flag.send_blocking(outcome, timeout=10)


def block_in_recv(rx: aioshm.ReceiveChannel[Any], ready: aioshm.SendChannel[Any]) -> None:
    """Signal readiness, then block in recv (on an empty channel) until killed."""

    async def main() -> None:
        await ready.send("ready")
        await rx.recv()

    anyio.run(main)


def block_in_send(tx: aioshm.SendChannel[Any], ready: aioshm.SendChannel[Any]) -> None:
    """Fill the channel, signal, then block in send until killed."""

    async def main() -> None:
        i = 0
        while True:
            try:
                tx.send_nowait(f"filler {i}")
            except anyio.WouldBlock:
                break
            i += 1
        await ready.send("ready")
        await tx.send("blocked")

    anyio.run(main)


def hold_loan(tx: aioshm.SendChannel[Any], ready: aioshm.SendChannel[Any]) -> None:
    """Take a loan (a claimed, unpublished slot), half-fill it, signal, wait to be killed."""
    with tx.send_loan_blocking((1024,), np.float64, timeout=10) as buf:
        buf[:512] = 7.0
        ready.send_blocking("ready", timeout=10)
        time.sleep(3600)


def hold_view(rx: aioshm.ReceiveChannel[Any], ready: aioshm.SendChannel[Any]) -> None:
    """Take a message as a view (slot held), signal, wait to be killed."""

    async def main() -> None:
        async with rx.recv_view():
            await ready.send("ready")
            await anyio.sleep(3600)

    anyio.run(main)


def hold_mutex(tx: aioshm.SendChannel[Any], ready: aioshm.SendChannel[Any]) -> None:
    """Take the channel's mutex mid-operation (state marked dirty), signal, wait."""
    queue = tx._queue
    ready.send_blocking("ready", timeout=10)  # before: afterwards the mutex is ours
    queue._mutex.acquire()
    queue._ctl[6] = -12345  # NFREE: scribble on derived state, as a half-done update would
    os.kill(os.getpid(), signal.SIGSTOP)  # stop here; the test kills us


def stress_sender(
    tx: aioshm.SendChannel[Any], producer: int, count: int, backend: str, seed: int
) -> None:
    """Send ``count`` numbered payloads, each send under a random short timeout; retry
    whatever was cancelled."""
    rng = random.Random(seed)

    async def main() -> None:
        async with tx:
            i = 0
            while i < count:
                payload = np.full(4, producer * 1_000_000 + i, dtype=np.int64)
                with anyio.move_on_after(rng.choice((0, 0.0001, 0.001, 0.01))):
                    await tx.send(payload)
                    i += 1

    anyio.run(main, backend=backend)


def stress_receiver(
    rx: aioshm.ReceiveChannel[Any], out: aioshm.SendChannel[Any], backend: str, seed: int
) -> None:
    """Receive under random short timeouts until the end of the stream; report."""
    rng = random.Random(seed)

    async def main() -> None:
        got: list[int] = []
        torn = 0
        async with rx:
            while True:
                with anyio.move_on_after(rng.choice((0, 0.0001, 0.001, 0.01))):
                    try:
                        payload = await rx.recv()
                    except anyio.EndOfStream:
                        break
                    if not (payload == payload[0]).all():
                        torn += 1
                    got.append(int(payload[0]))
        async with out:
            await out.send((got, torn))

    anyio.run(main, backend=backend)


def close_after(
    handle: Any, report: aioshm.SendChannel[float], delay: float, send_first: int = 0
) -> None:
    """Optionally send some messages, wait, close ``handle`` and report when (monotonic)."""
    for i in range(send_first):
        handle.send_blocking(i, timeout=10)
    time.sleep(delay)
    closed_at = time.monotonic()
    handle.close()
    with report:
        report.send_blocking(closed_at, timeout=10)


def loop_ends_with_blocked_tasks(
    rx: aioshm.ReceiveChannel[Any], tx: aioshm.SendChannel[Any], report: aioshm.SendChannel[Any]
) -> None:
    """Run an event loop whose tasks block in recv and send; let the loop end; exit."""
    import asyncio

    async def main() -> None:
        tx.send_nowait("fills the slot")
        tasks = [asyncio.create_task(rx.recv()) for _ in range(5)]
        tasks += [asyncio.create_task(tx.send("blocked")) for _ in range(5)]
        while True:  # until everyone is asleep in the hubs
            recv_stats, send_stats = rx.statistics(), tx.statistics()
            if (recv_stats.tasks_waiting_receive, send_stats.tasks_waiting_send) == (5, 5):
                break
            await asyncio.sleep(0.001)
        assert not any(task.done() for task in tasks)
        # returning ends the loop: asyncio.run cancels the blocked tasks

    asyncio.run(main())
    report.send_blocking(time.monotonic(), timeout=10)
    report.close()


def die_copying_in(tx: aioshm.SendChannel[Any], ready: aioshm.SendChannel[Any], size: int) -> None:
    """Send a large message, but stop in the middle of copying it into its slot (done
    with the mutex free): signal, and wait to be killed there."""
    from aioshm import _codec

    def stuck(self: Any, slot: memoryview) -> None:
        slot[self.start : self.start + 64] = b"\xee" * 64  # half-written
        ready.send_blocking("ready", timeout=10)
        time.sleep(3600)

    _codec.Encoded.write = stuck  # type: ignore[method-assign]
    tx.send_blocking(np.zeros(size // 8), timeout=10)


def die_copying_out(rx: aioshm.ReceiveChannel[Any], ready: aioshm.SendChannel[Any]) -> None:
    """Receive a large message, but stop in the middle of copying it out of its slot
    (done with the mutex free): signal, and wait to be killed there."""
    from aioshm import _channel

    def stuck(message: memoryview | bytearray, owned: bool) -> Any:
        ready.send_blocking("ready", timeout=10)
        time.sleep(3600)

    _channel.decode = stuck  # type: ignore[attr-defined]
    rx.recv_blocking(timeout=10)


def produce_filled(tx: aioshm.SendChannel[Any], count: int, size: int) -> None:
    """Send ``count`` float64 arrays of ``size`` elements, array ``i`` filled with ``i``."""
    with tx:
        for i in range(count):
            tx.send_blocking(np.full(size, float(i)))


def pool_is_empty_after_fork(result: aioshm.SendChannel[Any]) -> None:
    """Report whether this forked child's receive-buffer pool started empty."""
    from aioshm import _recvbuf

    with result:
        result.send_blocking(_recvbuf.kept())
