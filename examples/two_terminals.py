"""Two terminals: two separately started programs joined by a channel's name.

In one terminal, start the consumer; it creates the channel ``demo`` and waits::

    python examples/two_terminals.py consume demo

In another, start the producer; it joins by name (waiting up to ``--wait`` seconds for
the consumer, so either may start first)::

    python examples/two_terminals.py produce demo --count 5

They share nothing but the name. The consumer's ``async for`` ends when the producer
closes its handle, or exits, or is killed. The name goes with the last handle: nothing is
left in ``/dev/shm`` (see ``python -m aioshm list``).
"""

from __future__ import annotations

import argparse
import sys

import anyio

import aioshm


async def consume(name: str) -> None:
    tx, rx = aioshm.open_channel[str](capacity=8, name=name)
    print(f"channel {name!r} open; waiting for a producer", flush=True)
    async with rx:
        async with tx:  # our own send handle keeps the stream open until a producer
            first = await rx.recv()  # has joined: it has once its first message is here
        print(f"got: {first}", flush=True)
        async for line in rx:  # ends once every producer is gone
            print(f"got: {line}", flush=True)
    print("the producer is gone", flush=True)


async def produce(name: str, count: int, wait: float) -> None:
    tx = await anyio.to_thread.run_sync(lambda: aioshm.connect_send(name, timeout=wait))
    async with tx:
        for i in range(count):
            await tx.send(f"message {i}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["consume", "produce"])
    parser.add_argument("name")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--wait", type=float, default=30, help="seconds to wait for the name")
    args = parser.parse_args()
    if args.role == "consume":
        anyio.run(consume, args.name)
    else:
        anyio.run(produce, args.name, args.count, args.wait)
    sys.exit(0)
