"""Where aioshm over NATS spends its time on small messages, layer by layer.

    python scripts/nats_send_breakdown.py [ROUNDS] [COUNT]   # default: 3 rounds of 2,000

Against a local ``nats-server`` (``aioshm.nats.LocalServer``), each round measures, in
turn, messages of 10 x float64, as messages per second. One sender alone, awaiting
each message's storage (nobody receives):

``raw publish``        nats-py ``js.publish`` with a ``Nats-Msg-Id``, on a connection
                       and loop of its own, to a work-queue stream with a pull consumer
``Lane.publish``       aioshm's publish (its retry loop around the same request), awaited
                       on the caller's loop, on that loop's own connection (its lane)
``send, asyncio``      ``tx.send`` on asyncio: the same, through the handle
``send, trio``         ``tx.send`` under trio: handed over to aioshm's NATS thread (a
                       task per publish there, a wake-up back per result, a thread switch
                       each way)

Then one sender and one receiver task together (``recv_many(64)``), as in
``python -m aioshm.bench --network``: raw nats-py (awaited publishes, fetches with an
acknowledgement per message), aioshm on asyncio (the benchmark's case), and aioshm
under trio.

It prints the median of each line and its ratio to the raw line above it. Needs
``aioshm[nats]`` and trio.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import nats
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

import aioshm.nats
from aioshm._codec import encode_bytes
from aioshm.bench.network import SMALL, _raw_jetstream
from aioshm.nats._lane import Here
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


async def _lane_publish(tx: Any, count: int) -> float:
    lane = await tx._link.lane_here()
    payload = encode_bytes(SMALL, 256)
    started = time.perf_counter()
    for i in range(count):
        await lane.publish(Here(), payload, f"l{i}")
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

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        received = 0
        while received < count:
            received += len(await rx.recv_many(64))
    return count / (time.perf_counter() - started)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    results: dict[str, list[float]] = {}
    with aioshm.nats.LocalServer() as server:
        url = server.url

        def measure(
            label: str, run: Callable[..., Awaitable[float]], backend: str, flow: bool = False
        ) -> None:
            name = f"{url}/breakdown{uuid.uuid4().hex[:8]}"
            tx, rx = aioshm.nats.open_channel(name, capacity=64 if flow else count + 16)
            args = (tx, rx, count) if flow else (tx, count)
            results.setdefault(label, []).append(anyio.run(run, *args, backend=backend))
            tx.close()
            rx.close()

        for _ in range(rounds):
            results.setdefault("raw publish", []).append(asyncio.run(_raw_publish(url, count)))
            measure("Lane.publish", _lane_publish, "asyncio")
            measure("send, asyncio", _send, "asyncio")
            measure("send, trio", _send, "trio")
            raw_flow = asyncio.run(_raw_jetstream(url, SMALL.tobytes(), count))
            results.setdefault("flow: raw", []).append(raw_flow)
            measure("flow: asyncio", _flow, "asyncio", flow=True)
            measure("flow: trio", _flow, "trio", flow=True)
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
