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

import collections
import enum
import os
import time
from collections.abc import Callable

__all__ = [
    "Liveness",
    "RunnableWindow",
    "is_alive",
    "my_identity",
    "others_runnable",
    "probe",
    "start_time",
]

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


class RunnableWindow:
    """How many tasks of the machine, other than this process's running threads, have
    been runnable throughout a short window: the least of the last ``size`` samples of
    the kernel's instantaneous count, one sample per ``every`` seconds at most.

    A task runnable for an instant (a kernel thread, a peer's thread on its way back to
    sleep) is not counted, a load that lasts the window is. This process's own running
    threads never are: a count that included them would stop a task from spinning
    because its own wait thread had just woken it.
    """

    def __init__(self, every: float = 0.025, size: int = 4) -> None:
        self._every = every
        self._samples: collections.deque[int] = collections.deque(maxlen=size)
        self._at = -float("inf")
        self._least = 0

    def get(self, now: float, own: int, read: Callable[[], int]) -> int:
        """The answer at time ``now``; ``read()`` gives the machine's runnable count
        (sampled only when one is due), of which ``own`` are this process's threads."""
        if now - self._at >= self._every:
            self._samples.append(max(0, read() - own))
            self._at = now
            self._least = min(self._samples)
        return self._least


def _running_now() -> int:
    """The kernel's instantaneous count of runnable tasks (``/proc/loadavg``)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):  # pragma: no cover - no /proc
        return 0


_window = RunnableWindow()


def others_runnable(own: int = 1) -> int:
    """How many other tasks have kept the machine's CPUs busy for the last 100 ms or so,
    ``own`` being how many threads of this process run now (see :class:`RunnableWindow`;
    re-read at most every 25 ms)."""
    return _window.get(time.monotonic(), own, _running_now)
