"""Helpers for tests that start real processes."""

from __future__ import annotations

import json
import multiprocessing.context
import multiprocessing.process
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

#: What the ``ctx`` fixture gives: a context of one of the three start methods (unlike
#: ``BaseContext``, each has ``Process``).
Context: TypeAlias = (
    multiprocessing.context.ForkContext
    | multiprocessing.context.SpawnContext
    | multiprocessing.context.ForkServerContext
)


def join_all(procs: Sequence[multiprocessing.process.BaseProcess], timeout: float = 60) -> None:
    """Join every process within ``timeout`` seconds and require exit code 0."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in procs if p.is_alive()]
    assert not stuck, f"processes still running after {timeout} s: {stuck}"
    codes = {p.name: p.exitcode for p in procs}
    assert all(code == 0 for code in codes.values()), f"exit codes: {codes}"


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> float:
    """Poll ``predicate`` until it is true; return the time it took. Fails on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.005)
    return time.monotonic() - start


def shared_sleepers(obj: Any, side: str = "send") -> int:
    """Threads of every process registered asleep on the doorbell of a channel (side
    ``"send"`` or ``"recv"``) or of a lock, semaphore or condition (one side), read from
    the shared control block: a test can tell that a task or thread, here or in another
    process, really sleeps in its wait, not merely that it is about to."""
    from aioshm._layout import SLEEPERS
    from aioshm._shared import RECV, SEND

    shared = obj._queue if hasattr(obj, "_queue") else obj._state
    return int(shared._ctl[SLEEPERS + {"send": SEND, "recv": RECV}[side]])


def mutex_held(obj: Any) -> bool:
    """Whether anyone (another process, or the calling thread) holds ``obj``'s mutex,
    probed with a trylock from a fresh thread."""
    import errno
    import threading

    from aioshm import _posix

    addr = obj.segment.mutex.ptr
    result: list[int] = []

    def probe() -> None:
        code = _posix._mutex_trylock(addr)
        if code in (0, errno.EOWNERDEAD):
            _posix._mutex_unlock(addr)
        result.append(code)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result[0] == errno.EBUSY


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m aioshm ARGS``, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "aioshm", *args], capture_output=True, text=True, timeout=60
    )


def listed(name: str) -> dict[str, Any]:
    """The row of ``aioshm list --json`` for ``name`` (there must be exactly one)."""
    result = cli("list", "--json")
    assert result.returncode == 0, result.stderr
    rows = [row for row in json.loads(result.stdout) if row["name"] == name]
    assert len(rows) == 1, result.stdout
    return rows[0]  # type: ignore[no-any-return]
