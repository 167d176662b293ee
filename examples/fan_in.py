"""Fan-in: N producer processes send to one async consumer, which counts what each sent.

The send handle is passed to every producer as a ``Process`` argument, which makes each
child the owner of a handle of its own; the parent closes its own right after starting
them. The stream ends by itself once every producer has closed its handle (or exited):
no sentinel values, no counting on the consumer's side.

    python examples/fan_in.py [--producers 4] [--messages 10000] [--capacity 64]
                              [--start-method spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import sys
import time

import aioshm


def producer(tx: aioshm.SendChannel[tuple[int, int]], ident: int, messages: int) -> None:
    """A child process: send ``(ident, sequence number)`` tuples, then close."""

    async def main() -> None:
        async with tx:
            for seq in range(messages):
                await tx.send((ident, seq))

    aioshm.run_child(main)  # asyncio.run(main()), Ctrl-C left to the parent


async def consume(rx: aioshm.ReceiveChannel[tuple[int, int]]) -> dict[int, int]:
    """Count messages per producer, checking that each producer's arrive in its order."""
    counts: collections.Counter[int] = collections.Counter()
    async with rx:
        async for ident, seq in rx:  # ends once every producer has closed its handle
            if seq != counts[ident]:
                raise RuntimeError(f"producer {ident}: got message {seq}, not {counts[ident]}")
            counts[ident] += 1
    return dict(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=4, help="producer processes")
    parser.add_argument("--messages", type=int, default=10000, help="messages per producer")
    parser.add_argument("--capacity", type=int, default=64, help="messages in flight at once")
    parser.add_argument("--start-method", default=multiprocessing.get_start_method())
    args = parser.parse_args()

    tx, rx = aioshm.open_channel[tuple[int, int]](capacity=args.capacity)
    ctx = multiprocessing.get_context(args.start_method)
    procs = [
        ctx.Process(target=producer, args=(tx, ident, args.messages))
        for ident in range(args.producers)
    ]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    tx.close()  # each child owns the handle passed to it; the parent sends nothing

    counts = asyncio.run(consume(rx))
    seconds = time.perf_counter() - started
    for proc in procs:
        proc.join()

    for ident in range(args.producers):
        print(f"producer {ident}: {counts.get(ident, 0)} messages, in order")
    total = sum(counts.values())
    print(f"total: {total} messages from {len(counts)} producers in {seconds:.2f} s")
    failed = [proc.exitcode for proc in procs if proc.exitcode]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
