"""The seed's FloatChannel demo, the async way.

A consumer process awaits ``recv()``; the parent awaits ``send()`` of
``[0.0, 1.0, ..., 9.0]``. It prints the seed's lines, in order: what is sent, the stored
length and values, what the consumer received, then ``done``.

    python examples/float_channel.py [--count 10] [--messages 1] [--start-method spawn]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys

import anyio

import aioshm


def say(*parts: object) -> None:
    """Print one line in one write, so that two processes' lines never interleave."""
    sys.stdout.write(" ".join(map(str, parts)) + "\n")
    sys.stdout.flush()


def consumer(ch: aioshm.FloatChannel, messages: int, backend: str) -> None:
    async def main() -> None:
        for _ in range(messages):
            values = await ch.recv()
            say("received:", values)

    anyio.run(main, backend=backend)
    ch.close()


async def produce(ch: aioshm.FloatChannel, values: list[float], messages: int) -> None:
    for _ in range(messages):
        say("sent:", values)
        say("stored length:", len(values))
        say(values)
        await ch.send(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maxsize", type=int, default=10000, help="most values per message")
    parser.add_argument("--count", type=int, default=10, help="values per message")
    parser.add_argument("--messages", type=int, default=1, help="messages to send")
    parser.add_argument("--start-method", default=multiprocessing.get_start_method())
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()

    ch = aioshm.FloatChannel(args.maxsize)
    ctx = multiprocessing.get_context(args.start_method)
    proc = ctx.Process(target=consumer, args=(ch, args.messages, args.backend))
    proc.start()
    values = [float(x) for x in range(args.count)]
    anyio.run(produce, ch, values, args.messages, backend=args.backend)
    proc.join()
    ch.close()
    say("done")
    return proc.exitcode or 0


if __name__ == "__main__":
    sys.exit(main())
