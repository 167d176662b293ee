"""The in-process batch path: ``send_many`` + ``recv_many`` of 64 80-byte arrays, asyncio.

    python scripts/batch_pair.py            # wall time per message, best of 7
    valgrind --tool=callgrind python scripts/batch_pair.py 300   # instructions

With an argument N it runs N batch pairs once (after 20 to warm up), for instruction
counts: the difference between two values of N, divided by 64 times theirs, is the
cost of one message (take them far apart, 100 and 600, with PYTHONHASHSEED=0).

AIOSHM_PURE_PYTHON=1 measures the pure-Python path instead of the C hot path.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import numpy as np

import aioshm

BATCH = 64


async def main() -> None:
    tx, rx = aioshm.open_channel[np.ndarray[Any, Any]](128, 1024)
    items = [np.arange(10, dtype=np.float64)] * BATCH

    async def pairs(n: int) -> None:
        for _ in range(n):
            await tx.send_many(items)
            got = await rx.recv_many(BATCH)
            assert len(got) == BATCH

    await pairs(20)
    if len(sys.argv) > 1:
        await pairs(int(sys.argv[1]))
    else:
        n = 2000
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            await pairs(n)
            best = min(best, time.perf_counter() - t0)
        print(
            f"send_many + recv_many x{BATCH}, 80 bytes: {best / n / BATCH * 1e6:.3f} us a message"
        )
    tx.close()
    rx.close()


if __name__ == "__main__":
    asyncio.run(main())
