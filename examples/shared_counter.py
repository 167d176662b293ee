"""Count from many processes into one shared ``aioshm.Value``, under its lock.

Each worker process runs an event loop (asyncio or trio) and increments the counter
``--increments`` times with the idiom::

    async with counter.get_lock():
        counter.value += 1

The script prints the final count and the expected one, and exits 0 when they match.
``--compare-unlocked`` also runs the same increments on ``Value(lock=False)``, to show
the updates a race loses (for information: that count is not checked).

    python examples/shared_counter.py --procs 4 --increments 2000
    python examples/shared_counter.py --start-method spawn --backend trio --compare-unlocked
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

import aioshm


def locked_worker(counter: aioshm.SynchronizedValue, increments: int, backend: str) -> None:
    async def main() -> None:
        for _ in range(increments):
            async with counter.get_lock():
                counter.value += 1

    anyio.run(main, backend=backend)


def unlocked_worker(counter: aioshm.RawValue, increments: int, backend: str) -> None:
    async def main() -> None:
        for i in range(increments):
            seen = counter.value
            if i % 4 == 0:
                await checkpoint()  # another process may write meanwhile
            counter.value = seen + 1

    anyio.run(main, backend=backend)


def run(ctx: Any, target: object, counter: object, args: argparse.Namespace) -> tuple[float, bool]:
    """Run ``target`` in ``--procs`` processes; return the time and whether all exited 0."""
    procs = [
        ctx.Process(target=target, args=(counter, args.increments, args.backend))
        for _ in range(args.procs)
    ]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return time.perf_counter() - start, all(proc.exitcode == 0 for proc in procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--increments", type=int, default=2000, help="increments per process (default 2000)"
    )
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], default="spawn")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument(
        "--compare-unlocked",
        action="store_true",
        help="also run the increments without a lock (informational)",
    )
    args = parser.parse_args()
    if args.procs < 1 or args.increments < 0:
        parser.error("--procs must be at least 1 and --increments at least 0")
    ctx = multiprocessing.get_context(args.start_method)
    expected = args.procs * args.increments
    what = f"{args.procs} processes x {args.increments} increments"
    where = f"({args.start_method}, {args.backend})"

    counter = aioshm.Value("q", 0)
    elapsed, clean = run(ctx, locked_worker, counter, args)
    print(f"with the lock:    final count {counter.value}, expected {expected}")
    print(f"                  {what} {where} in {elapsed:.2f} s")
    ok = clean and counter.value == expected

    if args.compare_unlocked:
        raw = aioshm.Value("q", 0, lock=False)
        elapsed, _ = run(ctx, unlocked_worker, raw, args)
        lost = expected - raw.value
        print(f"without a lock:   final count {raw.value}, expected {expected} ({lost} lost)")

    print("correct" if ok else "WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
