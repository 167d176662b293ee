"""Channels across real processes, under every start method."""

from __future__ import annotations

import multiprocessing
import pickle
from collections import Counter
from typing import Any

import anyio
import pytest

import aioshm

from . import workers
from .helpers import Context, join_all, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_producers_then_parent_closes_its_end(ctx: Context, backend: str) -> None:
    """Pattern 1: the parent starts producers with ``tx``, closes its own ``tx`` at once,
    then iterates ``rx``: it sees every message, then a clean end."""
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=256)
    procs = [ctx.Process(target=workers.produce, args=(tx, p, 300, backend)) for p in range(3)]
    for proc in procs:
        proc.start()
    tx.close()

    got: list[tuple[int, int]] = []

    async def main() -> None:
        async with rx:
            with anyio.fail_after(60):
                async for item in rx:
                    got.append(item)

    anyio.run(main, backend=backend)
    join_all(procs)
    per_producer: dict[int, list[int]] = {}
    for producer, i in got:
        per_producer.setdefault(producer, []).append(i)
    assert per_producer == {p: list(range(300)) for p in range(3)}


def test_consumer_and_producers_parent_closes_both(
    ctx: Context,
) -> None:
    """Pattern 2: one consumer child with ``rx``, producer children with ``tx``; the
    parent closes both ends. The consumer sees every message, then a clean end."""
    tx, rx = aioshm.open_channel[Any](capacity=8, max_message_size=256)
    report_tx, report_rx = aioshm.open_channel[Any](capacity=1, max_message_size=1 << 20)
    consumer = ctx.Process(target=workers.consume, args=(rx, report_tx, "asyncio"))
    producers = [
        ctx.Process(target=workers.produce_arrays, args=(tx, p, 400, "trio")) for p in range(2)
    ]
    consumer.start()
    for proc in producers:
        proc.start()
    tx.close()
    rx.close()
    report_tx.close()
    got = report_rx.recv_blocking(timeout=90)
    join_all([consumer, *producers])
    report_rx.close()
    assert sorted(got) == sorted((p, i) for p in range(2) for i in range(400))
    for p in range(2):
        assert [i for q, i in got if q == p] == list(range(400))  # each producer in order


@pytest.mark.slow
def test_mpmc_exactly_once(ctx: Context) -> None:
    """4 producer processes x 4 consumer processes x 10,000 messages: every message is
    received exactly once, and each producer's messages arrive in its own order."""
    count = 10_000
    tx, rx = aioshm.open_channel[Any](capacity=16, max_message_size=256)
    report_tx, report_rx = aioshm.open_channel[Any](capacity=4, max_message_size=4 << 20)
    consumers = [
        ctx.Process(target=workers.consume, args=(rx, report_tx, b))
        for b in ("asyncio", "trio", "asyncio", "trio")
    ]
    producers = [
        ctx.Process(target=workers.produce_arrays, args=(tx, p, count, b))
        for p, b in enumerate(("asyncio", "trio", "asyncio", "trio"))
    ]
    for proc in consumers + producers:
        proc.start()
    tx.close()
    rx.close()
    report_tx.close()
    reports = [report_rx.recv_blocking(timeout=100) for _ in consumers]
    join_all(consumers + producers)
    report_rx.close()

    received = Counter(item for report in reports for item in report)
    expected = {(p, i) for p in range(4) for i in range(count)}
    assert set(received) == expected
    assert all(n == 1 for n in received.values()), "a message was received twice"
    for report in reports:  # per consumer, each producer's messages are in order
        for p in range(4):
            mine = [i for q, i in report if q == p]
            assert mine == sorted(mine)


def test_inherited_handle_is_not_owned_under_fork() -> None:
    """Under fork, a handle the child merely inherited does not hold the stream open and
    cannot be used there; the error says to pass it as an argument."""
    global _INHERITED
    ctx = multiprocessing.get_context("fork")
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=64)
    flag_tx, flag_rx = aioshm.open_channel[Any](capacity=1, max_message_size=4096)
    _INHERITED = tx  # reachable in the child only through inheritance
    child = ctx.Process(target=_use_inherited_then_wait, args=(flag_tx,))
    child.start()
    flag_tx.close()
    try:
        outcome = flag_rx.recv_blocking(timeout=30)
        assert outcome.startswith("closed:")
        assert "pass it as an argument" in outcome
        # The child is alive and still has its inherited copy, yet closing ours ends it.
        assert child.is_alive()
        tx.close()
        with pytest.raises(anyio.EndOfStream):
            rx.recv_nowait()
    finally:
        child.kill()
        child.join(10)
        _INHERITED = None
        rx.close()
        flag_rx.close()


_INHERITED: Any = None


def _use_inherited_then_wait(flag: aioshm.SendChannel[Any]) -> None:
    workers.use_inherited(flag, _INHERITED)
    workers.hold_forever()


def test_passed_handle_is_owned_under_fork() -> None:
    """The same handle passed as an argument is the child's own: the child can send
    with it (its claim succeeded; a parent's reservation alone would count as open,
    but leave the child's handle unusable), and it keeps the stream open after the
    parent closes its copy, until the child dies."""
    ctx = multiprocessing.get_context("fork")
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=64)
    child = ctx.Process(target=workers.send_then_hold, args=(tx, "sent by the child"))
    child.start()
    tx.close()
    assert rx.recv_blocking(timeout=30) == "sent by the child"
    with pytest.raises(anyio.WouldBlock):  # the child's copy is open: no end of stream
        rx.recv_nowait()
    assert rx.statistics().open_send_streams == 1
    child.kill()
    wait_until(lambda: rx.statistics().open_send_streams == 0, what="the child's death")
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    child.join(10)
    rx.close()


def test_pickling_a_closed_handle_is_refused() -> None:
    """Outside a Process start a handle pickles (see test_reach.py), but a closed one
    raises ClosedResourceError, which says to pass a clone."""
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=64)
    tx.close()
    with rx, pytest.raises(anyio.ClosedResourceError, match=r"pass a clone"):
        pickle.dumps(tx)


def test_child_exit_without_close_counts_as_closing(
    ctx: Context,
) -> None:
    """A child that exits without closing its handle still ends the stream."""
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=64)
    child = ctx.Process(target=_send_and_exit_without_closing, args=(tx,))
    child.start()
    tx.close()

    async def main() -> list[Any]:
        with anyio.fail_after(30):
            return [item async for item in rx]

    assert anyio.run(main) == ["bye"]
    join_all([child])
    rx.close()


def _send_and_exit_without_closing(tx: aioshm.SendChannel[Any]) -> None:
    tx.send_blocking("bye", timeout=10)
