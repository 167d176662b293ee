"""``python -m aioshm.bench.idle``: the CPU that processes idle in ``recv`` cost.

A server's workers wait on a job channel most of the time, and waiting must be nearly
free. This starts ``N`` processes blocked in ``recv`` on one empty channel, lets them
idle, and reports the CPU time they used in total (all their threads, from the kernel's
``/proc/<pid>/task/*/schedstat``, or ``stat`` ticks where that is missing), as a
percentage of one core. The parent's own CPU is not counted.

Not part of the default benchmark run (``python -m aioshm.bench``): it takes
``seconds`` per row. ``python -m aioshm.bench --idle`` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Sequence
from typing import Any

import anyio

import aioshm

__all__ = ["cpu_seconds", "main", "measure"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by every thread of ``pid``."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    try:
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0]) / 1e9
        return total
    except (OSError, ValueError, IndexError):  # no schedstat: clock ticks
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK


def _waiter(rx: aioshm.ReceiveChannel[Any], mode: str) -> None:
    with rx:
        try:
            if mode == "blocking":
                rx.recv_blocking()
            else:
                anyio.run(rx.recv, backend=mode)
        except anyio.EndOfStream:
            pass


def measure(waiters: int, seconds: float, mode: str = "asyncio") -> float:
    """Percent of one core that ``waiters`` processes idle in ``recv`` use in total."""
    ctx = multiprocessing.get_context("fork")
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=64)
    procs = [ctx.Process(target=_waiter, args=(rx, mode), daemon=True) for _ in range(waiters)]
    for proc in procs:
        proc.start()
    rx.close()
    try:
        queue: Any = tx._queue  # the shared sleeper count: everyone asleep
        deadline = time.monotonic() + 60
        while queue.wait_counters().sleepers[1] < waiters:
            if time.monotonic() > deadline:
                raise RuntimeError("the waiters did not all fall asleep within 60 s")
            time.sleep(0.01)
        time.sleep(min(1.0, seconds))  # past start-up
        pids = [proc.pid for proc in procs if proc.pid is not None]
        before = sum(cpu_seconds(pid) for pid in pids)
        began = time.monotonic()
        time.sleep(seconds)
        used = sum(cpu_seconds(pid) for pid in pids) - before
        elapsed = time.monotonic() - began
    finally:
        tx.close()  # end of stream: the waiters return
        for proc in procs:
            proc.join(30)
            if proc.is_alive():  # pragma: no cover - a stuck waiter
                proc.kill()
    return 100 * used / elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aioshm.bench.idle", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--waiters",
        type=int,
        nargs="+",
        default=[4, 16, 64],
        metavar="N",
        help="numbers of idle processes to measure (default 4 16 64)",
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="idle time per row (default 10)"
    )
    parser.add_argument(
        "--mode",
        choices=["asyncio", "trio", "blocking"],
        default="asyncio",
        help="how the waiters wait (default asyncio)",
    )
    args = parser.parse_args(argv)
    print(f"Processes idle in recv ({args.mode}), {args.seconds:g} s each, CPU in total:\n")
    print("| idle processes | % of one core |")
    print("|---:|---:|")
    for n in args.waiters:
        print(f"| {n} | {measure(n, args.seconds, args.mode):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
