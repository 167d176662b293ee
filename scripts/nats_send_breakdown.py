"""Where aioshm over NATS spends its time on small messages, layer by layer.

    python scripts/nats_send_breakdown.py [ROUNDS] [COUNT]   # default: 3 rounds of 2,000

Against a local ``nats-server`` (``aioshm.nats.LocalServer``), each round measures, in
turn, messages of 10 x float64, as messages per second. One sender alone, awaiting
each message's storage (nobody receives):

``raw publish``         nats-py ``js.publish`` with a ``Nats-Msg-Id``, on a connection
                        and loop of its own, to a work-queue stream with a pull consumer
``raw, aioshm's conn``  the same publish on aioshm's connection, to the channel's stream,
                        run on aioshm's NATS thread
``Link.publish``        aioshm's publish (its retry loop around the same), awaited there
``send, NATS thread``   ``tx.send`` called on aioshm's NATS thread: the hand-over (a task
                        per publish, a wake-up back to the caller) without a thread switch
``send``                ``tx.send`` from the caller's own loop: what users run

Then one sender and one receiver task together (``recv_many(64)``), as in
``python -m aioshm.bench --network``: raw nats-py (awaited publishes, fetches with an
acknowledgement per message), aioshm with both tasks on aioshm's NATS thread (no thread
switch at all), and aioshm from the caller's loop.

It prints the median of each line and its ratio to the raw line above it. Needs
``aioshm[nats]``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

import aioshm.nats
from aioshm._codec import encode_bytes
from aioshm.bench.network import SMALL, _raw_jetstream
from aioshm.nats import _bridge
from aioshm.nats._call import Call
from aioshm.nats._link import close_links


async def _raw_publish(url: str, count: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"RAW{uuid.uuid4().hex[:8]}"
    await js.add_stream(
        StreamConfig(
            name=name,
            subjects=[name],
            retention=RetentionPolicy.WORK_QUEUE,
            max_msgs=1_000_000,
            discard=DiscardPolicy.NEW,
        )
    )
    await js.pull_subscribe(name, durable="raw", stream=name)
    payload = SMALL.tobytes()
    started = time.perf_counter()
    for i in range(count):
        await js.publish(name, payload, headers={"Nats-Msg-Id": f"raw.{i}"})
    rate = count / (time.perf_counter() - started)
    await js.delete_stream(name)
    await nc.close()
    return rate


async def _raw_on_link(tx: Any, count: int) -> float:
    link, payload = tx._link, encode_bytes(SMALL, 256)
    started = time.perf_counter()
    for i in range(count):
        await link.js.publish(link.subject, payload, timeout=2.0, headers={"Nats-Msg-Id": f"r{i}"})
    return count / (time.perf_counter() - started)


async def _link_publish(tx: Any, count: int) -> float:
    link, payload = tx._link, encode_bytes(SMALL, 256)
    started = time.perf_counter()
    for i in range(count):
        await link.publish(Call(), payload, f"l{i}")
    return count / (time.perf_counter() - started)


async def _send(tx: Any, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await tx.send(SMALL)
    return count / (time.perf_counter() - started)


async def _flow(tx: Any, rx: Any, count: int) -> float:
    started = time.perf_counter()

    async def produce() -> None:
        for _ in range(count):
            await tx.send(SMALL)

    producer = asyncio.ensure_future(produce())
    received = 0
    while received < count:
        received += len(await rx.recv_many(64))
    await producer
    return count / (time.perf_counter() - started)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    results: dict[str, list[float]] = {}
    with aioshm.nats.LocalServer() as server:
        url = server.url

        def channel(capacity: int) -> tuple[Any, Any]:
            name = f"{url}/breakdown{uuid.uuid4().hex[:8]}"
            return aioshm.nats.open_channel(name, capacity=capacity, max_message_size=256)

        def measure(
            label: str, run: Callable[..., Awaitable[float]], bridge: bool, flow: bool = False
        ) -> None:
            """``run`` on aioshm's NATS thread (``bridge``) or on a loop of this thread."""
            tx, rx = channel(64 if flow else count + 16)
            args = (tx, rx, count) if flow else (tx, count)
            coro: Any = run(*args)
            rate = _bridge.run(coro) if bridge else asyncio.run(coro)
            results.setdefault(label, []).append(rate)
            tx.close()
            rx.close()

        for _ in range(rounds):
            results.setdefault("raw publish", []).append(asyncio.run(_raw_publish(url, count)))
            measure("raw, aioshm's conn", _raw_on_link, bridge=True)
            measure("Link.publish", _link_publish, bridge=True)
            measure("send, NATS thread", _send, bridge=True)
            measure("send", _send, bridge=False)
            raw_flow = asyncio.run(_raw_jetstream(url, SMALL.tobytes(), count))
            results.setdefault("flow: raw", []).append(raw_flow)
            measure("flow: NATS thread", _flow, bridge=True, flow=True)
            measure("flow: send/recv", _flow, bridge=False, flow=True)
        close_links()
    print(f"median of {rounds} rounds of {count} messages (10 x float64)")
    base = 0.0
    for label, rates in results.items():
        median = statistics.median(rates)
        if label.startswith(("raw publish", "flow: raw")):
            base = median
        print(f"{label:20s} {median:8,.0f} msg/s  {median / base:.2f} x raw")


if __name__ == "__main__":
    main()
