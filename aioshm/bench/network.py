"""The network section of the benchmark: aioshm over NATS JetStream, on loopback.

``python -m aioshm.bench.network [--url nats://host:port] [--quick]`` measures, against
one ``nats-server`` (started on free loopback ports when no URL is given):

* aioshm's network channel: small messages (10 float64) and 8 MiB arrays, one sender
  and one receiver task, messages per second; and the round trip of a ping-pong;
* raw ``nats-py`` JetStream: awaited publishes, and pull-fetches in batches with an
  acknowledgement per message: the floor that aioshm's guarantees add to (aioshm waits
  for each acknowledgement to be confirmed, and holds the channel to ``capacity``);
* pyzmq ``zmq.asyncio`` PUSH/PULL over ``tcp://`` (when pyzmq is installed): no server,
  no storage, no acknowledgements.

Each line reports messages per second (or microseconds per round trip) and, for the
throughputs, the ratio to raw JetStream in the same run. Needs ``aioshm[nats]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import anyio
import numpy as np

from .contenders import peer

__all__ = ["main"]

SMALL = np.arange(10, dtype=np.float64)
LARGE = np.ones(1 << 20, dtype=np.float64)  # 8 MiB


async def _aioshm_throughput(url: str, item: Any, count: int) -> float:
    import aioshm.nats

    tx, rx = aioshm.nats.open_channel(
        f"{url}/bench{uuid.uuid4().hex[:8]}", capacity=64, max_message_size=item.nbytes + 64
    )
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:

        async def produce() -> None:
            async with tx:
                for _ in range(count):
                    await tx.send(item)

        tg.start_soon(produce)
        async with rx:
            received = 0
            while received < count:
                received += len(await rx.recv_many(64))
    return count / (time.perf_counter() - started)


async def _aioshm_rtt(url: str, count: int) -> float:
    import aioshm.nats

    name = uuid.uuid4().hex[:8]
    ping_tx, ping_rx = aioshm.nats.open_channel(f"{url}/ping{name}", capacity=1)
    pong_tx, pong_rx = aioshm.nats.open_channel(f"{url}/pong{name}", capacity=1)
    async with ping_tx, ping_rx, pong_tx, pong_rx, anyio.create_task_group() as tg:

        async def echo() -> None:
            for _ in range(count):
                await pong_tx.send(await ping_rx.recv())

        tg.start_soon(echo)
        started = time.perf_counter()
        for _ in range(count):
            await ping_tx.send(SMALL)
            await pong_rx.recv()
        elapsed = time.perf_counter() - started
    return elapsed / count * 1e6


async def _raw_jetstream(url: str, payload: bytes, count: int) -> float:
    import nats
    from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

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
            max_msg_size=len(payload) + 4096,
        )
    )
    sub = await js.pull_subscribe(name, durable="raw", stream=name)
    started = time.perf_counter()

    async def produce() -> None:
        for _ in range(count):
            await js.publish(name, payload)

    producer = asyncio.ensure_future(produce())
    received = 0
    while received < count:
        with contextlib.suppress(nats.errors.TimeoutError):
            for msg in await sub.fetch(64, timeout=1):
                await msg.ack()
                received += 1
    await producer
    rate = count / (time.perf_counter() - started)
    await js.delete_stream(name)
    await nc.close()
    return rate


async def _zmq(payload: bytes, count: int) -> float:
    zmq = peer("zmq")
    context = peer("zmq.asyncio").Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    started = time.perf_counter()

    async def produce() -> None:
        for _ in range(count):
            await push.send(payload, copy=len(payload) < 65536)

    producer = asyncio.ensure_future(produce())
    for _ in range(count):
        await pull.recv(copy=False)
    await producer
    rate = count / (time.perf_counter() - started)
    push.close(0)
    pull.close(0)
    context.term()
    return rate


def _best(
    rounds: int, measure: Callable[[], Coroutine[Any, Any, float]], lower: bool = False
) -> float:
    results: list[float] = [asyncio.run(measure()) for _ in range(rounds)]
    return min(results) if lower else max(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--url", help="nats://host:port of a JetStream server (default: local)")
    parser.add_argument("--quick", action="store_true", help="a few messages, one round")
    args = parser.parse_args(argv)
    from aioshm.nats import LocalServer
    from aioshm.nats._link import close_links

    small, large, rtt, rounds = (200, 4, 50, 1) if args.quick else (5000, 60, 1000, 3)
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            url = stack.enter_context(LocalServer()).url
        print(f"network benchmark against {url} (best of {rounds})")
        for label, item, count in (("10 x float64", SMALL, small), ("8 MiB array", LARGE, large)):
            raw = _best(rounds, partial(_raw_jetstream, url, item.tobytes(), count))
            ours = _best(rounds, partial(_aioshm_throughput, url, item, count))
            print(f"{label}: raw JetStream {raw:,.0f} msg/s")
            print(f"{label}: aioshm over NATS {ours:,.0f} msg/s ({ours / raw:.2f} x raw JetStream)")
            try:
                zmq_rate = _best(rounds, partial(_zmq, item.tobytes(), count))
            except ImportError:
                print(f"{label}: zmq.asyncio tcp:// not installed (pip install pyzmq)")
            else:
                ratio = zmq_rate / raw
                print(f"{label}: zmq.asyncio tcp:// {zmq_rate:,.0f} msg/s ({ratio:.2f} x raw)")
        micros = _best(rounds, partial(_aioshm_rtt, url, rtt), lower=True)
        print(f"round trip: aioshm over NATS {micros:,.0f} us")
        close_links()
    return 0


if __name__ == "__main__":
    sys.exit(main())
