"""A plain blocking producer process, with no event loop, feeds an async consumer.

The producer is ordinary synchronous code (a sensor loop, a legacy library, a
``multiprocessing`` worker): it calls ``tx.send_blocking(...)``, which waits for a free
slot by blocking its thread. The consumer is an asyncio program that receives with
``async for``. The stream ends when the producer's ``with tx:`` block closes its handle.

    python examples/mixed_sync_async.py [--messages 1000] [--size 1024] [--capacity 8]
                                        [--start-method spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time

import numpy as np

import aioshm


def producer(tx: aioshm.SendChannel[np.ndarray], messages: int, size: int) -> None:
    """A child process with no event loop: blocking sends only."""
    with tx:  # closing the only send handle ends the stream
        for i in range(messages):
            reading = np.full(size, float(i))  # a "reading" of `size` float64 values
            tx.send_blocking(reading, timeout=30)  # TimeoutError if nobody reads for 30 s
    print(f"producer: sent {messages} arrays of {size} float64, no event loop", flush=True)


async def consume(rx: aioshm.ReceiveChannel[np.ndarray]) -> tuple[int, float]:
    """Receive until the stream ends; return how many arrays, and the sum of their values."""
    count = 0
    total = 0.0
    async with rx:
        async for reading in rx:
            total += float(reading.sum())
            count += 1
    return count, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="arrays to send")
    parser.add_argument("--size", type=int, default=1024, help="float64 values per array")
    parser.add_argument("--capacity", type=int, default=8, help="messages in flight at once")
    parser.add_argument("--start-method", default=multiprocessing.get_start_method())
    args = parser.parse_args()

    tx, rx = aioshm.open_channel[np.ndarray](capacity=args.capacity, max_message_size=8 * args.size)
    ctx = multiprocessing.get_context(args.start_method)
    proc = ctx.Process(target=producer, args=(tx, args.messages, args.size))
    started = time.perf_counter()
    proc.start()
    tx.close()  # the child owns the handle passed to it

    count, total = asyncio.run(consume(rx))
    seconds = time.perf_counter() - started
    proc.join()
    expected = float(args.size * sum(range(args.messages)))
    print(f"consumer: received {count} arrays in {seconds:.2f} s, sum {total:.0f}")
    print(f"expected: {args.messages} arrays, sum {expected:.0f}")
    return 0 if (count, total) == (args.messages, expected) and not proc.exitcode else 1


if __name__ == "__main__":
    sys.exit(main())
