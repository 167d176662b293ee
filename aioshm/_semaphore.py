"""Semaphore and BoundedSemaphore shared by processes.

The state lives in control fields 17..21 and, in the one payload slot, the permits each
entry of the process table holds. When a process dies, the next liveness sweep of a
waiting process gives back the permits it held *inside* ``async with`` / ``with``
blocks; those taken by a bare ``acquire`` stay consumed.
"""

from __future__ import annotations

import functools
from types import TracebackType
from typing import Any, Final, NamedTuple

from anyio import WouldBlock

from ._layout import MAX_PROCS, Segment
from ._primitive import _DONE, _OVERFLOW, WAIT, _check_spawning, _Primitive, _State

__all__ = ["BoundedSemaphore", "Semaphore", "SemaphoreStatistics"]

# Control fields of a semaphore; its payload holds the held permits of each entry.
_S_VALUE: Final = 17  # permits available (derived: TOTAL - sum(held))
_S_TOTAL: Final = 18  # permits not consumed by a bare acquire (authoritative)
_S_INITIAL: Final = 19
_S_BOUNDED: Final = 20
_S_RECLAIMED: Final = 21  # permits given back from processes that died holding them


class _SemaphoreState(_State):
    def _reset_local(self) -> None:
        super()._reset_local()
        self.held = self.segment.payload[0][: 8 * MAX_PROCS].cast("q")

    def try_acquire(self, scoped: bool) -> None:
        """Take a permit (held by this process if ``scoped``), or raise ``WouldBlock``."""
        if not self._acquire_once(scoped) and not (self.swept() and self._acquire_once(scoped)):
            raise WouldBlock

    def _acquire_once(self, scoped: bool) -> bool:
        return self.locked(self._acquire_locked, self.my_entry() if scoped else -1, scoped)

    def _acquire_locked(self, entry: int, scoped: bool) -> bool:
        ctl = self._ctl
        if ctl[_S_VALUE] <= 0:
            return False
        if scoped:
            self.held[entry] += 1  # the commit: a held permit
        else:
            ctl[_S_TOTAL] -= 1  # the commit: a consumed permit
        ctl[_S_VALUE] -= 1
        return True

    def release(self, scoped: bool) -> None:
        ctl = self._ctl
        if self.locked(self._release_locked, self.entry, scoped) == _OVERFLOW:
            raise ValueError(
                "BoundedSemaphore released more times than it was acquired (its value "
                f"would exceed its initial value, {ctl[_S_INITIAL]})"
            )

    def _release_locked(self, entry: int, scoped: bool) -> int:
        ctl = self._ctl
        if ctl[_S_BOUNDED] and ctl[_S_VALUE] >= ctl[_S_INITIAL]:
            return _OVERFLOW
        if scoped and entry >= 0 and self.held[entry] > 0:
            self.held[entry] -= 1  # the commit: a held permit given back
        else:
            ctl[_S_TOTAL] += 1  # the commit: a new permit
        ctl[_S_VALUE] += 1
        self._ring_one_locked(WAIT)
        return _DONE

    def _ready_locked(self, side: int) -> int:
        return max(0, self._ctl[_S_VALUE])

    def _holds_locked(self, entry: int) -> bool:
        return bool(self.held[entry] > 0)

    def _reclaim_locked(self, entry: int) -> None:
        held = self.held[entry]
        if held > 0:
            self.held[entry] = 0  # the commit
            self._ctl[_S_VALUE] += held
            self._ctl[_S_RECLAIMED] += held

    def _init_entry_locked(self, entry: int) -> None:
        self._reclaim_locked(entry)

    def _repair_locked(self) -> None:
        super()._repair_locked()
        self._ctl[_S_VALUE] = self._ctl[_S_TOTAL] - sum(self.held)


class SemaphoreStatistics(NamedTuple):
    """A snapshot of a :class:`Semaphore`."""

    #: permits available now
    value: int
    #: permits held inside ``async with`` / ``with`` blocks, in all processes
    held: int
    #: permits given back from processes that died inside such a block
    reclaimed: int
    #: tasks and threads of this process waiting to acquire
    tasks_waiting: int


class Semaphore(_Primitive):
    """A counting semaphore shared by processes (``multiprocessing.Semaphore``, async).

    **Permits of a dead process.** A permit taken by ``async with sem:`` (or
    ``with sem:``) is *held* by the process until the block exits; if the process dies
    inside the block, the permit is given back (within a fraction of a second, by a
    waiting process's liveness sweep; counted in ``statistics().reclaimed``). A permit
    taken by a bare :meth:`acquire` is *consumed*: the semaphore is then a counter that
    any task or process may :meth:`release` (the signalling use), nothing says that the
    permit would ever have come back, and it is not returned if the process dies, just
    as with ``multiprocessing.Semaphore``.

    Cancellation: a cancelled :meth:`acquire` (or ``async with`` entry) took no permit
    and left nothing behind; the other methods never wait.

    ``Semaphore(value, name="x")`` gives it a name by which any process of this user
    joins it (:meth:`connect`, which keeps the value it has); see *Named primitives*
    in the Concepts page.

    :raises ValueError: ``value`` is negative, or ``name`` is malformed or a URL
    :raises TypeError: ``value`` is not an int
    :raises FileExistsError: a live object of this user already has that name
    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)
    """

    _bounded = False
    _kind = 3
    _state: _SemaphoreState

    def __init__(self, value: int = 1, *, name: str | None = None, mode: int = 0o600) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"value must be an int, not {type(value).__name__}")
        if value < 0:
            raise ValueError(f"a semaphore's initial value must be >= 0, not {value}")
        bounded = self._bounded

        def init(segment: Segment) -> None:
            ctl = segment.ctl
            ctl[_S_VALUE] = ctl[_S_TOTAL] = ctl[_S_INITIAL] = value
            ctl[_S_BOUNDED] = int(bounded)

        self._state = self._new_state(name, mode, (1, 8 * MAX_PROCS), init, _SemaphoreState)

    def __reduce__(self) -> tuple[Any, ...]:
        _check_spawning(self)
        return (_rebuild_semaphore, (type(self), self._state.segment))

    async def acquire(self) -> None:
        """Take a permit, waiting for one if none is available.

        A permit taken this way is consumed (see the class docstring): it is not given
        back if the process dies. ``async with sem:`` takes one that is.

        Cancellation: every call is a cancel point, even with a permit free. If
        cancelled (anyio or trio cancel scope, or native asyncio cancellation), no
        permit was taken, and a wake-up the task had received is
        passed on to another waiter.
        """
        state = self._state
        await state.tick()
        await state.run(functools.partial(state.try_acquire, False))

    def acquire_nowait(self) -> None:
        """Take a permit if one is available, without waiting.

        :raises anyio.WouldBlock: no permit is available (nothing changed)
        """
        self._state.try_acquire(False)

    def acquire_blocking(self, timeout: float | None = None) -> bool:
        """Take a permit from code with no event loop, waiting up to ``timeout`` seconds.

        :returns: ``True`` if a permit was taken, ``False`` on timeout (none taken)
        """
        state = self._state
        return state.run_blocking(functools.partial(state.try_acquire, False), timeout)

    def release(self) -> None:
        """Add a permit and wake one waiter, in any process. Any task or process may
        release, whether it acquired or not.

        :raises ValueError: (``BoundedSemaphore`` only) the value would exceed the
            initial value; nothing changed
        """
        self._state.release(False)

    @property
    def value(self) -> int:
        """Permits available now (in all processes)."""
        return max(0, self._state.segment.ctl[_S_VALUE])

    def statistics(self) -> SemaphoreStatistics:
        """A snapshot of the semaphore (see :class:`SemaphoreStatistics`)."""
        state = self._state
        ctl = state.segment.ctl

        def snapshot() -> tuple[int, int, int]:
            return ctl[_S_VALUE], sum(state.held), ctl[_S_RECLAIMED]

        value, held, reclaimed = state.locked(snapshot)
        return SemaphoreStatistics(max(0, value), held, reclaimed, state.tasks_waiting)

    async def __aenter__(self) -> None:
        """Take a *held* permit: given back when the block exits, or if the process
        dies inside it. Cancellation as :meth:`acquire`."""
        state = self._state
        await state.tick()
        await state.run(functools.partial(state.try_acquire, True))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._state.release(True)

    def __enter__(self) -> None:
        """Take a *held* permit from code with no event loop (waits as long as needed)."""
        state = self._state
        state.run_blocking(functools.partial(state.try_acquire, True), None)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._state.release(True)

    def __repr__(self) -> str:
        if self.closed:
            return self._closed_repr()
        return f"<aioshm.{type(self).__name__} value={self.value}>"


def _rebuild_semaphore(cls: type[Semaphore], segment: Segment) -> Semaphore:
    sem = cls.__new__(cls)
    sem._state = _SemaphoreState(segment)
    return sem


class BoundedSemaphore(Semaphore):
    """A :class:`Semaphore` that refuses to grow past its initial value
    (``multiprocessing.BoundedSemaphore``, async).

    :meth:`release` raises ``ValueError`` (and changes nothing) when the value already
    equals the initial value. Dead holders and cancellation as :class:`Semaphore`.
    """

    _bounded = True
    _kind = 4
