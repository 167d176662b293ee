"""A three-stage pipeline on trio: a source, worker processes, a sink.

The parent runs ``trio.run``: in one trio nursery, a source task sends numbers to the
workers and a sink task collects their results. Each worker process runs trio too:
``async for`` over the jobs, ``await send`` of each result. Every stream ends by being
closed: the source closes the jobs channel, so each worker's ``async for`` ends; each
worker then closes its results handle, which ends the sink's. aioshm works with trio
directly (through anyio): no adapter, no asyncio.

    python examples/trio_pipeline.py [--jobs 10000] [--workers 2] [--capacity 64]
                                     [--start-method spawn]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys

import trio

import aioshm


def worker(
    jobs: aioshm.ReceiveChannel[int], results: aioshm.SendChannel[tuple[int, int]], ident: int
) -> None:
    """A child process: square every number it receives, until the jobs stream ends."""

    async def work() -> int:
        handled = 0
        async with jobs, results:
            async for n in jobs:
                await results.send((n, n * n))
                handled += 1
        return handled

    # trio.run(work), with SIGINT ignored: on Ctrl-C the parent stops the source, and
    # this worker ends with the jobs stream instead of printing a traceback of its own
    handled = aioshm.run_child(work, backend="trio")
    # One write per line, newline included, so that the workers' lines never interleave.
    print(f"worker {ident}: {handled} jobs\n", end="", flush=True)


async def pipeline(
    jobs: int, jobs_tx: aioshm.SendChannel[int], results_rx: aioshm.ReceiveChannel[tuple[int, int]]
) -> tuple[int, int]:
    """The parent's two stages, in one trio nursery; returns (results, their sum)."""
    received = total = 0

    async def source() -> None:
        async with jobs_tx:  # closing it ends the workers' streams
            for n in range(jobs):
                await jobs_tx.send(n)

    async def sink() -> None:
        nonlocal received, total
        async with results_rx:
            async for n, square in results_rx:  # ends once every worker has closed
                if square != n * n:
                    raise RuntimeError(f"{n} squared is not {square}")
                received += 1
                total += square

    async with trio.open_nursery() as nursery:
        nursery.start_soon(source)
        nursery.start_soon(sink)
    return received, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000, help="numbers to square")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--capacity", type=int, default=64, help="messages in flight at once")
    parser.add_argument("--start-method", default=multiprocessing.get_start_method())
    args = parser.parse_args()

    jobs_tx, jobs_rx = aioshm.open_channel[int](args.capacity)
    results_tx, results_rx = aioshm.open_channel[tuple[int, int]](args.capacity)
    # Start the processes before trio.run: a child forked from inside a running trio
    # loop cannot run trio itself (under spawn and forkserver, either way works).
    ctx = multiprocessing.get_context(args.start_method)
    procs = [
        ctx.Process(target=worker, args=(jobs_rx, results_tx, ident))
        for ident in range(args.workers)
    ]
    for proc in procs:
        proc.start()
    # The children own the ends passed to them; the parent keeps only its own two.
    jobs_rx.close()
    results_tx.close()

    received, total = trio.run(pipeline, args.jobs, jobs_tx, results_rx)
    for proc in procs:
        proc.join()
    expected = sum(n * n for n in range(args.jobs))
    print(f"sink: {received} results, sum of squares {total}")
    print(f"expected: {args.jobs} results, sum of squares {expected}")
    ok = (received, total) == (args.jobs, expected)
    return 0 if ok and not any(proc.exitcode for proc in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
