"""Across machines: a producer and a consumer process joined by a NATS JetStream channel.

Each side connects by URL only, as it would from another machine; numpy frames travel as
raw bytes with their dtype and shape. With no URL, a local single-node ``nats-server``
(from ``pip install 'aioshm[nats]'``) is started for the run and stopped after it.

    python examples/across_machines.py [nats://host:4222/frames] [--frames 20]
                                       [--start-method spawn]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.process
import sys
import time
import uuid
from typing import Any

import anyio
import numpy as np

import aioshm.nats


def producer(url: str, frames: int, connected: Any) -> None:
    """Connect by URL and send ``frames`` 480x640 uint8 frames, then close."""
    tx = aioshm.nats.connect_send(url)
    connected.set()

    async def main() -> None:
        async with tx:
            for i in range(frames):
                await tx.send(np.full((480, 640), i % 256, dtype=np.uint8))
        print(f"producer: sent {frames} frames", flush=True)

    anyio.run(main)


def consumer(url: str, connected: Any) -> None:
    """Connect by URL and receive until every sender has closed (trio, for a change)."""
    rx = aioshm.nats.connect_receive(url)
    connected.set()

    async def main() -> None:
        count = 0
        async with rx:
            async for frame in rx:
                assert frame.shape == (480, 640) and frame.dtype == np.uint8
                assert (frame == count % 256).all(), "a frame out of order"
                count += 1
        print(f"consumer: received {count} frames, in order", flush=True)

    anyio.run(main, backend="trio")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="nats://host:port/CHANNEL (default: local)")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--start-method", default="spawn")
    args = parser.parse_args()
    ctx = multiprocessing.get_context(args.start_method)
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            server = stack.enter_context(aioshm.nats.LocalServer())
            url = f"{server.url}/frames-{uuid.uuid4().hex[:8]}"
            print("started a local nats-server", flush=True)
        # The channel is created here; its handles keep it open until both sides joined.
        tx, rx = aioshm.nats.open_channel(url, capacity=8, max_message_size=480 * 640)
        events = [ctx.Event(), ctx.Event()]
        procs: list[multiprocessing.process.BaseProcess] = [
            ctx.Process(target=consumer, args=(url, events[0])),
            ctx.Process(target=producer, args=(url, args.frames, events[1])),
        ]
        started = time.monotonic()
        for proc in procs:
            proc.start()
        for event in events:
            event.wait()
        tx.close()
        rx.close()
        for proc in procs:
            proc.join()
        print(f"done in {time.monotonic() - started:.1f} s", flush=True)
        return max(abs(proc.exitcode or 0) for proc in procs)


if __name__ == "__main__":
    sys.exit(main())
