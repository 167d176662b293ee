"""The in-process hot path: ``send_nowait`` + ``recv_nowait`` of an 80-byte array.

    python scripts/hot_path_pair.py            # wall time, best of 7 x 200,000
    valgrind --tool=callgrind python scripts/hot_path_pair.py 3000   # instructions

With an argument N it runs N pairs once (after 200 to warm up), for instruction counts:
the difference between two values of N, divided by theirs, is the cost of a pair. Take
them far apart (2000 and 12000) with PYTHONHASHSEED=0: the same code measured twice
still differs by up to about 2,500 instructions a pair (at N 2000 and 4000: more).

AIOSHM_PURE_PYTHON=1 measures the pure-Python path instead of the C hot path.
"""

from __future__ import annotations

import sys
import timeit
from typing import Any

import numpy as np

import aioshm


def main() -> None:
    tx, rx = aioshm.open_channel[np.ndarray[Any, Any]](16, 1024)
    item = np.arange(10, dtype=np.float64)

    def pair() -> None:
        tx.send_nowait(item)
        rx.recv_nowait()

    for _ in range(200):
        pair()
    if len(sys.argv) > 1:
        for _ in range(int(sys.argv[1])):
            pair()
    else:
        n = 200_000
        best = min(timeit.repeat(pair, number=n, repeat=7)) / n
        print(f"send_nowait + recv_nowait, 80 bytes: {best * 1e6:.2f} us a pair")
    tx.close()
    rx.close()


if __name__ == "__main__":
    main()
