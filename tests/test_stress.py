"""Cancellation storm across processes: nothing lost, nothing duplicated, nothing torn,
and no slot or permit leaked afterwards."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from typing import Any

import pytest

import aioshm

from . import workers
from .helpers import join_all

PRODUCERS = CONSUMERS = 4
PER_PRODUCER = 25_000  # 100,000 messages in all


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_random_timeouts_exactly_once(backend: str) -> None:
    ctx = multiprocessing.get_context("fork")
    tx, rx = aioshm.open_channel[Any](capacity=8, max_message_size=256)
    report_tx, report_rx = aioshm.open_channel[Any](capacity=CONSUMERS, max_message_size=4 << 20)
    producers = [
        ctx.Process(target=workers.stress_sender, args=(tx, p, PER_PRODUCER, backend, p))
        for p in range(PRODUCERS)
    ]
    consumers = [
        ctx.Process(target=workers.stress_receiver, args=(rx, report_tx, backend, 100 + c))
        for c in range(CONSUMERS)
    ]
    for proc in producers + consumers:
        proc.start()
    tx.close()
    report_tx.close()
    reports = [report_rx.recv_blocking(timeout=240) for _ in consumers]
    join_all(producers + consumers)
    report_rx.close()

    received = Counter(value for got, _ in reports for value in got)
    expected = {p * 1_000_000 + i for p in range(PRODUCERS) for i in range(PER_PRODUCER)}
    assert sum(torn for _, torn in reports) == 0
    assert set(received) == expected, f"{len(expected - set(received))} lost"
    assert max(received.values()) == 1, "duplicates"
    stats = rx.statistics()
    assert stats.free_slots == stats.max_buffer_size == 8
    assert (stats.current_buffer_used, stats.slots_in_use) == (0, 0)
    assert (stats.open_send_streams, stats.open_receive_streams) == (0, 1)
    # No waiter left registered on either bell, in any process: the shared count (the
    # parent's own tasks_waiting_* were always 0). Those that exited asleep are taken
    # off by the sweep that finds them gone.
    rx._queue.sweep(force=True)
    assert rx._queue.wait_counters().sleepers == (0, 0)
    rx.close()
