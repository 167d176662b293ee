"""How long another process waits for a channel's mutex (issue 11, item 15).

Process A runs critical sections in a loop (``send_nowait`` + ``recv_nowait``) on one
thread, optionally while a second thread of A spins in Python. Process B times its own
critical sections (``SlotQueue.ready``: lock, read two fields, unlock) on the same
mutex and reports percentiles. If A's holder waited for A's GIL while holding the
mutex, B's p99 would show it, near the 5 ms switch interval.

    python scripts/critical_section_latency.py [seconds]
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from typing import Any

import numpy as np

import aioshm
from aioshm import _posix


def measure(tx: aioshm.SendChannel[Any], seconds: float, out: Any) -> None:
    """Take and release the mutex in a loop; time the acquisitions that found it held
    (B's own preemption, which the machine's load causes, hits every probe alike, so
    only contended waits are counted)."""
    mutex = tx._queue.segment.mutex
    ptr = getattr(mutex, "ptr", None) or mutex._ptr  # type: ignore[attr-defined]  # aioshm 0.1
    trylock = getattr(_posix, "trylock", None) or _posix._mutex_trylock
    unlock = getattr(_posix, "unlock", None) or _posix._mutex_unlock
    contended = getattr(mutex, "acquire_contended", None) or (lambda _: mutex.acquire())
    waits: list[float] = []
    probes = 0
    deadline = time.monotonic() + seconds
    clock = time.perf_counter
    while time.monotonic() < deadline:
        probes += 1
        result = trylock(ptr)
        if result:
            t0 = clock()
            contended(result)
            waits.append(clock() - t0)
        unlock(ptr)
        for _ in range(20):  # pace the probes a little
            pass
    waits.sort()
    n = len(waits) or 1
    out.send(
        {
            "probes": probes,
            "n": len(waits),
            "p50": waits[n // 2] if waits else 0.0,
            "p99": waits[int(n * 0.99)] if waits else 0.0,
            "max": waits[-1] if waits else 0.0,
            "over1ms": sum(1 for x in waits if x > 1e-3),
            "stalled": sum(x for x in waits if x > 1e-3),
        }
    )
    tx.close()


def run(scenario: str, seconds: float) -> dict[str, float]:
    tx, rx = aioshm.open_channel[Any](16, 1024)
    stop = threading.Event()
    threads = []
    item = np.arange(10.0)

    def looper() -> None:
        while not stop.is_set():
            for _ in range(100):
                tx.send_nowait(item)
                rx.recv_nowait()

    def spinner() -> None:
        while not stop.is_set():
            pass

    if scenario in ("loop", "loop+spin"):
        threads.append(threading.Thread(target=looper))
    if scenario == "loop+spin":
        threads.append(threading.Thread(target=spinner))
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=measure, args=(tx, seconds, child))
    proc.start()
    for thread in threads:
        thread.start()
    result: dict[str, float] = parent.recv()
    stop.set()
    for thread in threads:
        thread.join()
    proc.join()
    tx.close()
    rx.close()
    return result


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    print(f"switch interval {sys.getswitchinterval() * 1e3:.1f} ms, {seconds} s each")
    for scenario in ("loop", "loop+spin"):
        r = run(scenario, seconds)
        print(
            f"{scenario:10s} probes={r['probes']:>8} contended={r['n']:>6} "
            f"wait p50={r['p50'] * 1e6:7.1f} us p99={r['p99'] * 1e6:8.1f} us "
            f"max={r['max'] * 1e3:6.2f} ms >1ms: {r['over1ms']:>4} "
            f"(stalled {r['stalled'] * 1e3:6.1f} ms)"
        )


if __name__ == "__main__":
    main()
