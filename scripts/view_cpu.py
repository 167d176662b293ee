"""CPU per 8 MiB message on the receiving side: ``recv_view`` (zero-copy) or ``recv``.

A producer process sends ``N`` (env, default 300) 8 MiB float64 arrays; this process
receives them on asyncio and prints the measured window (monotonic clock, to cut a
``perf record -k CLOCK_MONOTONIC`` trace to it), then wall time and CPU per message, of
the whole process and of its event-loop thread (the rest is aioshm's hub thread). Run
under the shared lock, several times, and compare medians:

    flock /tmp/aioshm-heavy.lock .venv/bin/python scripts/view_cpu.py view   # or: copy
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Any

import anyio
import numpy as np

import aioshm

N = int(os.environ.get("N", "300"))


def produce(tx: Any) -> None:
    data = np.arange(1 << 20, dtype=np.float64)

    async def main() -> None:
        for _ in range(N):
            await tx.send(data)
        tx.close()

    anyio.run(main)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def consume(rx: Any, mode: str) -> None:
    t0, c0, th0 = time.monotonic(), cpu(), time.thread_time()
    if mode == "view":
        for _ in range(N):
            async with rx.recv_view():
                pass
    else:
        for _ in range(N):
            await rx.recv()
    print("window", t0, time.monotonic())  # CLOCK_MONOTONIC: for perf record -k
    dt, dc, dth = time.monotonic() - t0, cpu() - c0, time.thread_time() - th0
    print(
        f"{mode}: {dt / N * 1e6:.0f} us/msg wall, cpu {dc / N * 1e6:.1f} us/msg "
        f"(loop thread {dth / N * 1e6:.1f})"
    )


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "view"
    tx, rx = aioshm.open_channel[Any](4, 8 << 20)
    producer = mp.Process(target=produce, args=(tx,))
    producer.start()
    tx.close()
    anyio.run(consume, rx, mode)
    producer.join()
