"""Process identity and liveness.

A process is identified by its pid *and* its start time, so that a recycled pid is not
mistaken for the process that used to have it. A zombie (killed, not yet reaped) counts
as dead: ``os.kill(pid, 0)`` would wrongly call it alive. So does a process that has
begun to exit (``PF_EXITING``): the kernel releases a dying process's robust mutexes
before it turns into a zombie, and the next holder must be able to tell who died.

Liveness has three answers (:class:`Liveness`): alive, dead, or *unknown*, and unknown
is treated as alive. ``/proc`` may be missing, mounted with ``hidepid=1/2`` (another
user's processes are invisible), or closed by a sandbox (``EACCES``); then only
``kill(pid, 0)`` is left, and only its ``ESRCH`` ("no such process") is proof of death.
Calling a live peer dead would reclaim what it still uses, so aioshm never guesses: a
peer it cannot see is kept until it can be proven dead. aioshm itself needs to read
its own ``/proc/self/stat`` (its identity); :func:`my_identity` raises a clear
:class:`OSError` if it cannot.
"""

from __future__ import annotations

import enum
import os
import time

__all__ = ["Liveness", "is_alive", "my_identity", "others_runnable", "probe", "start_time"]

_DEAD_STATES = frozenset("ZXx")
_PF_EXITING = 0x4
_identity: tuple[int, int] | None = None


class Liveness(enum.Enum):
    """What a liveness probe found out about a process."""

    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # not visible: treated as alive


def _read_stat(pid: int) -> tuple[str, int]:
    """Return ``(state, start_time)`` from ``/proc/<pid>/stat``.

    A process that has begun to exit gets the state ``"X"``. Raises :class:`OSError`
    if the file cannot be read: ``ProcessLookupError`` if the process exited while it
    was being read, ``FileNotFoundError`` if it is gone *or hidden* (``hidepid``, no
    ``/proc``), ``PermissionError`` in a sandbox.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) is in parentheses and may itself contain ") ".
    try:
        fields = raw[raw.rindex(b")") + 2 :].split()
        state = "X" if int(fields[6]) & _PF_EXITING else fields[0].decode()
        return state, int(fields[19])
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise OSError(f"/proc/{pid}/stat has an unexpected format: {raw[:200]!r}") from exc


def _probe_by_signal(pid: int) -> Liveness:
    """Without ``/proc``: only ``ESRCH`` proves death (a zombie, a reused pid or
    another user's process cannot be told apart from a live peer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return Liveness.DEAD
    except OSError:  # EPERM: exists, someone else's (or a sandbox said no)
        return Liveness.UNKNOWN
    return Liveness.UNKNOWN


def probe(pid: int, started: int) -> Liveness:
    """Whether the process ``pid`` that started at ``started`` is still running.

    ``started`` is a start time from :func:`start_time`: ``0`` means "not known" (the
    pid alone is checked), a negative value "already dead when it was recorded".
    """
    if pid <= 0 or started < 0:
        return Liveness.DEAD
    try:
        state, start = _read_stat(pid)
    except ProcessLookupError:
        return Liveness.DEAD
    except OSError:
        return _probe_by_signal(pid)
    if state in _DEAD_STATES or (started and start != started):
        return Liveness.DEAD
    return Liveness.ALIVE


def is_alive(pid: int, started: int) -> bool:
    """Whether the process may still be running: alive or unknown (see :func:`probe`)."""
    return probe(pid, started) is not Liveness.DEAD


def start_time(pid: int) -> int:
    """The start time of a process (in clock ticks since boot) to record for
    :func:`probe`: ``-1`` if it is dead already, ``0`` if it cannot be read."""
    try:
        state, start = _read_stat(pid)
    except ProcessLookupError:
        return -1
    except OSError:
        return -1 if _probe_by_signal(pid) is Liveness.DEAD else 0
    return -1 if state in _DEAD_STATES else start


def my_identity() -> tuple[int, int]:
    """``(pid, start_time)`` of the calling process (cached; refreshed after fork).

    Raises :class:`OSError` if ``/proc/self/stat`` cannot be read: without its own
    start time a process cannot be told apart from a later one with the same pid.
    """
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        try:
            start = _read_stat(pid)[1]
        except OSError as exc:
            why = (
                f"aioshm cannot read /proc/{pid}/stat ({exc.strerror or exc}); it needs "
                "a mounted /proc where each process can read its own entry, to tell its "
                "peers' deaths from pid reuse"
            )
            raise (OSError(why) if exc.errno is None else OSError(exc.errno, why)) from exc
        _identity = (pid, start)
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
