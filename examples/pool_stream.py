"""Pool stream: a ``ProcessPoolExecutor`` fan-out whose workers stream results back to an
async parent while they work.

Each task gets a clone of the send handle, ``tx.clone()``, as an argument; the parent
closes its own ``tx`` at once. A task owns the copy it unpickles and closes it when it is
done (``with tx:``). The parent's ``async for`` ends by itself once every task is done:
no sentinels, no counting.

    python examples/pool_stream.py [--tasks 100] [--per-task 10] [--workers 2]
                                   [--capacity 16] [--start-method spawn]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import aioshm


def work(tx: aioshm.SendChannel[tuple[int, int, int]], task: int, per_task: int) -> int:
    """A task, in a worker process: stream ``per_task`` results as they are made."""
    with tx:  # this task's own handle: closed when the task is done with it
        for i in range(per_task):
            n = task * per_task + i
            tx.send_blocking((task, n, n * n))  # waits while the parent is behind
    return task


async def main(args: argparse.Namespace) -> int:
    tx, rx = aioshm.open_channel[tuple[int, int, int]](capacity=args.capacity)
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context(args.start_method)
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = [
            loop.run_in_executor(pool, work, tx.clone(), task, args.per_task)
            for task in range(args.tasks)
        ]
        tx.close()  # the clones keep the stream open until every task is done
        received, total = 0, 0
        async with rx:
            async for _task, _n, square in rx:  # results arrive while tasks still run
                received += 1
                total += square
        done = await asyncio.gather(*futures)
    print(f"{len(done)} tasks streamed {received} results; sum of squares {total}")
    return 0 if received == args.tasks * args.per_task else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--start-method", default=multiprocessing.get_start_method())
    sys.exit(asyncio.run(main(parser.parse_args())))
