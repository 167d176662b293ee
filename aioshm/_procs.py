"""Process identity and liveness.

A process is identified by its pid *and* its start time, so that a recycled pid is not
mistaken for the process that used to have it. A zombie (killed, not yet reaped) counts
as dead: ``os.kill(pid, 0)`` would wrongly call it alive. So does a process that has
begun to exit (``PF_EXITING``): the kernel releases a dying process's robust mutexes
before it turns into a zombie, and the next holder must be able to tell who died.
"""

from __future__ import annotations

import os
import time

__all__ = ["is_alive", "my_identity", "others_runnable", "start_time"]

_DEAD_STATES = frozenset("ZXx")
_PF_EXITING = 0x4
_identity: tuple[int, int] | None = None


def _read_stat(pid: int) -> tuple[str, int] | None:
    """Return ``(state, start_time)`` from ``/proc/<pid>/stat``, or ``None`` if gone.

    A process that has begun to exit gets the state ``"X"``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # pragma: no cover - no /proc: fall back to signal 0
        return _read_without_proc(pid)
    # The command name (field 2) is in parentheses and may itself contain ") ".
    fields = raw[raw.rindex(b")") + 2 :].split()
    state = "X" if int(fields[6]) & _PF_EXITING else fields[0].decode()
    return state, int(fields[19])


def _read_without_proc(pid: int) -> tuple[str, int] | None:  # pragma: no cover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "R", 0


def start_time(pid: int) -> int:
    """The start time of a live process (in clock ticks since boot), or 0 if it is dead."""
    stat = _read_stat(pid)
    if stat is None or stat[0] in _DEAD_STATES:
        return 0
    return stat[1]


def is_alive(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` is still running."""
    if pid <= 0:
        return False
    stat = _read_stat(pid)
    return stat is not None and stat[0] not in _DEAD_STATES and stat[1] == started


def my_identity() -> tuple[int, int]:
    """``(pid, start_time)`` of the calling process (cached; refreshed after fork)."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        _identity = (pid, start_time(pid))
    return _identity


_runnable = (0.0, 0)


def others_runnable() -> int:
    """How many other tasks of the machine are runnable right now (from the kernel's
    instantaneous count in ``/proc/loadavg``; re-read at most every 50 ms)."""
    global _runnable
    now = time.monotonic()
    if now - _runnable[0] >= 0.05:
        try:
            with open("/proc/loadavg", "rb") as f:
                running = int(f.read().split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):  # pragma: no cover - no /proc
            running = 1
        _runnable = (now, max(0, running - 1))
    return _runnable[1]
