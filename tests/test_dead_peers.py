"""Processes killed with SIGKILL at every awkward moment: the survivors carry on.

A killed child is deliberately *not* reaped before the checks (it stays a zombie),
because a zombie must count as dead too.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from typing import Any

import anyio
import numpy as np
import pytest

import aioshm
from aioshm._slotqueue import LOCKED_COPY_LIMIT

from . import workers
from .helpers import Context, mutex_held, shared_sleepers, wait_until

pytestmark = pytest.mark.timeout(60)

DEADLINE = 1.0  # the bound for noticing a dead peer
LARGE = 4 * LOCKED_COPY_LIMIT  # copied in and out of its slot with the mutex free


def kill(proc: multiprocessing.process.BaseProcess) -> float:
    """SIGKILL without reaping; return the time of the kill."""
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    return time.monotonic()


def ready_channel() -> tuple[aioshm.SendChannel[str], aioshm.ReceiveChannel[str]]:
    return aioshm.open_channel[str](capacity=1, max_message_size=64)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_killed_sole_sender_ends_the_stream_after_drain(ctx: Context, backend: str) -> None:
    tx, rx = aioshm.open_channel[str](capacity=2, max_message_size=64)
    ready_tx, ready_rx = ready_channel()
    child = ctx.Process(target=workers.block_in_send, args=(tx, ready_tx))
    child.start()
    tx.close()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    wait_until(lambda: rx.statistics().free_slots == 0, what="the child to fill the channel")
    wait_until(lambda: shared_sleepers(rx, "send") >= 1, what="the child to sleep in send")

    async def main() -> float:
        killed_at = kill(child)  # blocked in send, the channel full
        got = [await rx.recv(), await rx.recv()]  # what was sent is delivered...
        assert got == ["filler 0", "filler 1"]  # in order
        with pytest.raises(anyio.EndOfStream):  # ...then the stream ends
            with anyio.fail_after(10):
                await rx.recv()
        return time.monotonic() - killed_at

    assert anyio.run(main, backend=backend) < DEADLINE
    assert rx.statistics().open_send_streams == 0
    child.join(10)
    rx.close()
    ready_rx.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_killed_receiver_blocked_in_recv_counts_as_closed(ctx: Context, backend: str) -> None:
    """The sole receiver dies blocked in ``recv``: senders then get ``BrokenResourceError``
    (at the latest when they would wait for room)."""
    tx, rx = aioshm.open_channel[str](capacity=2, max_message_size=64)
    ready_tx, ready_rx = ready_channel()
    child = ctx.Process(target=workers.block_in_recv, args=(rx, ready_tx))
    child.start()
    rx.close()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    wait_until(lambda: tx.statistics().open_receive_streams == 1, what="the child's claim")
    wait_until(lambda: shared_sleepers(tx, "recv") >= 1, what="the child to sleep in recv")

    async def main() -> float:
        killed_at = kill(child)
        with pytest.raises(anyio.BrokenResourceError), anyio.fail_after(10):
            while True:
                await tx.send("into the void")
        return time.monotonic() - killed_at

    assert anyio.run(main, backend=backend) < DEADLINE
    assert tx.statistics().open_receive_streams == 0
    child.join(10)
    tx.close()
    ready_rx.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_killed_sole_receiver_breaks_blocked_senders(ctx: Context, backend: str) -> None:
    """Senders blocked on a full channel get ``BrokenResourceError`` within 1 s of the
    death of the last process that could receive."""
    tx, rx = aioshm.open_channel[str](capacity=1, max_message_size=64)
    child = ctx.Process(target=workers.hold_forever, args=(rx,))
    child.start()
    rx.close()
    wait_until(lambda: tx.statistics().open_receive_streams == 1, what="the child's claim")

    async def main() -> float:
        killed_at = 0.0

        async def blocked_sender() -> None:
            with pytest.raises(anyio.BrokenResourceError), anyio.fail_after(10):
                await tx.send("blocked")

        await tx.send("fills the slot")
        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_sender)
            tg.start_soon(blocked_sender)
            with anyio.fail_after(10):
                while tx.statistics().tasks_waiting_send < 2:
                    await anyio.sleep(0.005)
            killed_at = kill(child)
        return time.monotonic() - killed_at

    assert anyio.run(main, backend=backend) < DEADLINE
    child.join(10)
    tx.close()


def test_killed_loan_holder_gives_its_slot_back(ctx: Context) -> None:
    """Killed between taking a slot and publishing it: the slot is recovered, the
    half-written message is never seen, and the other senders carry on."""
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=8192)
    ready_tx, ready_rx = ready_channel()
    child = ctx.Process(target=workers.hold_loan, args=(tx, ready_tx))
    child.start()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    assert tx.statistics().slots_in_use == 1
    with pytest.raises(TimeoutError):
        tx.send_blocking("no room while the loan is held", timeout=0.1)
    killed_at = kill(child)
    tx.send_blocking("after the kill", timeout=10)  # waits for the sweep to free the slot
    assert time.monotonic() - killed_at < DEADLINE
    assert rx.recv_blocking(timeout=1) == "after the kill"  # never the half-written loan
    stats = rx.statistics()
    assert (stats.reclaimed_slots, stats.free_slots, stats.slots_in_use) == (1, 1, 0)
    child.join(10)
    for handle in (tx, rx, ready_rx):
        handle.close()


def test_killed_view_holder_has_its_message_redelivered(
    ctx: Context,
) -> None:
    """The message goes back to the *head* of the queue: it is received before the
    messages that were behind it."""
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=1024)
    ready_tx, ready_rx = ready_channel()
    child = ctx.Process(target=workers.hold_view, args=(rx, ready_tx))
    tx.send_nowait(np.arange(4))
    child.start()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    assert rx.statistics().slots_in_use == 1
    tx.send_nowait("second")  # queued behind the viewed message
    tx.send_nowait("third")
    killed_at = kill(child)
    wait_until(lambda: rx.statistics().redelivered_messages == 1, what="the redelivery")
    assert time.monotonic() - killed_at < DEADLINE
    got = rx.recv_nowait()  # ahead of the messages queued behind it meanwhile
    assert got.tolist() == [0, 1, 2, 3]
    assert [rx.recv_nowait(), rx.recv_nowait()] == ["second", "third"]
    assert rx.statistics().redelivered_messages == 1
    child.join(10)
    for handle in (tx, rx, ready_rx):
        handle.close()


def test_killed_while_copying_a_large_message_in(
    ctx: Context,
) -> None:
    """Killed while copying a large message into its slot (outside the mutex): the slot
    is freed, counted in ``reclaimed_slots``; the half-written message is never seen,
    and the messages around it flow in order."""
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=LARGE)
    ready_tx, ready_rx = ready_channel()
    tx.send_nowait("before")
    child = ctx.Process(target=workers.die_copying_in, args=(tx, ready_tx, LARGE))
    child.start()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    stats = rx.statistics()
    assert (stats.slots_in_use, stats.free_slots, stats.current_buffer_used) == (1, 0, 1)
    killed_at = kill(child)
    wait_until(lambda: rx.statistics().reclaimed_slots == 1, what="the slot to be reclaimed")
    assert time.monotonic() - killed_at < DEADLINE
    tx.send_nowait("after")
    assert [rx.recv_nowait(), rx.recv_nowait()] == ["before", "after"]
    with pytest.raises(anyio.WouldBlock):
        rx.recv_nowait()
    stats = rx.statistics()
    assert (stats.slots_in_use, stats.free_slots, stats.redelivered_messages) == (0, 2, 0)
    child.join(10)
    for handle in (tx, rx, ready_rx):
        handle.close()


def test_killed_while_copying_a_large_message_out(
    ctx: Context,
) -> None:
    """Killed while copying a large message out of its slot (outside the mutex): the
    receive had not returned, so the message goes back to the head of the queue and is
    delivered, whole, exactly once, ahead of the message behind it."""
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=LARGE)
    ready_tx, ready_rx = ready_channel()
    large = np.arange(LARGE // 8, dtype=np.float64)
    tx.send_nowait(large)
    child = ctx.Process(target=workers.die_copying_out, args=(rx, ready_tx))
    child.start()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    tx.send_nowait("behind it")
    stats = rx.statistics()
    assert (stats.slots_in_use, stats.current_buffer_used) == (1, 1)
    killed_at = kill(child)
    wait_until(lambda: rx.statistics().redelivered_messages == 1, what="the redelivery")
    assert time.monotonic() - killed_at < DEADLINE
    assert np.array_equal(rx.recv_nowait(), large)
    assert rx.recv_nowait() == "behind it"
    with pytest.raises(anyio.WouldBlock):
        rx.recv_nowait()
    stats = rx.statistics()
    assert (stats.slots_in_use, stats.free_slots, stats.reclaimed_slots) == (0, 2, 0)
    child.join(10)
    for handle in (tx, rx, ready_rx):
        handle.close()


def test_killed_while_holding_the_mutex(ctx: Context) -> None:
    """A process killed inside a critical section, with the shared state half-updated:
    the next holder is told (EOWNERDEAD), repairs the state, and everyone carries on."""
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=256)
    ready_tx, ready_rx = ready_channel()
    for i in range(2):
        tx.send_nowait(i)
    child = ctx.Process(target=workers.hold_mutex, args=(tx, ready_tx))
    child.start()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    wait_until(lambda: mutex_held(tx._queue), what="the child to take the mutex")
    killed_at = kill(child)
    assert rx.recv_blocking(timeout=5) == 0  # blocks on the mutex until the kill, then repairs
    assert time.monotonic() - killed_at < DEADLINE
    tx.send_nowait(2)
    assert [rx.recv_nowait(), rx.recv_nowait()] == [1, 2]
    stats = rx.statistics()
    assert (stats.free_slots, stats.current_buffer_used) == (4, 0)
    assert stats.open_send_streams == 1  # the dead child's handle no longer counts
    child.join(10)
    for handle in (tx, rx, ready_rx):
        handle.close()


def test_survivors_carry_on_and_nothing_published_is_lost(
    ctx: Context,
) -> None:
    """One of two senders is killed mid-stream: every message it published before the
    kill is delivered once, and the other sender's stream completes.

    The victim counts in shared memory the sends it started and the sends that
    returned; a message whose send had returned before the kill must arrive, and one
    whose send never started must not."""
    tx, rx = aioshm.open_channel[Any](capacity=8, max_message_size=256)
    progress = ctx.RawArray("q", 2)  # [sends started, sends returned]
    victim = ctx.Process(target=workers.produce_counted, args=(tx, 0, progress, "asyncio"))
    go = ctx.Event()  # the survivor starts once the victim's stream is flowing
    survivor = ctx.Process(target=workers.produce_after, args=(go, tx, 1, 3000, "trio"))
    victim.start()
    survivor.start()
    tx.close()
    got: list[tuple[int, int]] = []

    async def main() -> None:
        killed = heard_from_victim = heard_from_survivor = False
        with anyio.fail_after(60):
            async for item in rx:
                got.append(item)
                if not heard_from_victim and item[0] == 0:
                    heard_from_victim = True
                    go.set()
                heard_from_survivor = heard_from_survivor or item[0] == 1
                if not killed and heard_from_survivor and len(got) >= 500:
                    # Receive nothing until the channel is full, kill, and receive
                    # nothing until the death is noticed: what the victim published is
                    # still queued when its entry is reclaimed.
                    while rx.statistics().free_slots > 0:
                        await anyio.sleep(0.001)
                    killed_at = kill(victim)
                    killed = True
                    while rx.statistics().open_send_streams == 2:
                        await anyio.sleep(0.005)
                    assert time.monotonic() - killed_at < DEADLINE
                    assert rx.statistics().current_buffer_used == 8  # nothing dropped

    anyio.run(main)
    started, returned = progress[0], progress[1]  # final: the victim is dead
    survivor.join(10)
    victim.join(10)
    rx.close()
    assert (victim.exitcode, survivor.exitcode) == (-signal.SIGKILL, 0)
    mine = [i for p, i in got if p == 1]
    theirs = [i for p, i in got if p == 0]
    assert mine == list(range(3000))
    assert theirs == list(range(len(theirs)))  # a prefix: no loss, no duplicate
    # Everything published before the kill, and nothing else: at most the one send in
    # flight when the kill landed may or may not have gone through.
    assert returned <= len(theirs) <= started, (returned, len(theirs), started)
    assert returned >= 1


def test_zombie_counts_as_dead() -> None:
    """``os.kill(pid, 0)`` succeeds on a zombie; aioshm must not be fooled."""
    from aioshm import _procs

    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=workers.hold_forever)
    child.start()
    assert child.pid is not None
    started = _procs.start_time(child.pid)
    assert _procs.is_alive(child.pid, started)
    kill(child)
    wait_until(lambda: _state(child.pid) == "Z", what="the child to become a zombie")
    os.kill(child.pid, 0)  # the naive check still says "alive"
    assert not _procs.is_alive(child.pid, started)
    assert not _procs.is_alive(child.pid, started + 1)  # nor a recycled pid
    child.join(10)
    assert not _procs.is_alive(child.pid, started)


def _state(pid: int | None) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
