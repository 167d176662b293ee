"""Event shared by processes.

The state is a flag and a generation (control fields 17 and 18): a waiter returns once
the flag is set or the generation has moved on. No process holds anything, so the death
of a process changes nothing.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Final, NamedTuple

from anyio import WouldBlock

from ._layout import Segment
from ._primitive import WAIT, _check_spawning, _nothing, _Primitive, _State
from ._shared import INFINITE

__all__ = ["Event", "EventStatistics"]

# Control fields of an event.
_E_FLAG: Final = 17
_E_GEN: Final = 18  # times it was set: a waiter returns once this changes


class _EventState(_State):
    def _reset_local(self) -> None:
        super()._reset_local()
        # Generations this process's waiters wait from (number of waiters of each).
        self._generations: dict[int, int] = {}
        self._generations_lock = threading.Lock()

    def _ready_locked(self, side: int) -> int:
        ctl = self._ctl
        if ctl[_E_FLAG]:
            return INFINITE
        with self._generations_lock:
            oldest = min(self._generations, default=ctl[_E_GEN])
        return INFINITE if oldest != ctl[_E_GEN] else 0

    def start_waiting(self) -> int | None:
        """``None`` if set, else the generation to wait from (now registered)."""
        generation: int | None = self.locked(self._generation_locked)
        if generation is None:
            return None
        with self._generations_lock:
            self._generations[generation] = self._generations.get(generation, 0) + 1
        return generation

    def _generation_locked(self) -> int | None:
        return None if self._ctl[_E_FLAG] else self._ctl[_E_GEN]

    def stop_waiting(self, generation: int) -> None:
        with self._generations_lock:
            left = self._generations[generation] - 1
            if left:
                self._generations[generation] = left
            else:
                del self._generations[generation]

    def check(self, generation: int) -> None:
        if not self.locked(self._done_locked, generation):
            raise WouldBlock

    def _done_locked(self, generation: int) -> bool:
        ctl = self._ctl
        return bool(ctl[_E_FLAG] or ctl[_E_GEN] != generation)

    def set(self) -> None:
        self.locked(self._set_locked)

    def _set_locked(self) -> None:
        ctl = self._ctl
        if not ctl[_E_FLAG]:
            ctl[_E_FLAG] = 1
            ctl[_E_GEN] += 1
            self._ring_all_locked(WAIT)

    def clear(self) -> None:
        self.locked(self._clear_locked)

    def _clear_locked(self) -> None:
        self._ctl[_E_FLAG] = 0


class EventStatistics(NamedTuple):
    """A snapshot of an :class:`Event`."""

    #: whether the flag is set
    is_set: bool
    #: tasks and threads of this process waiting for it
    tasks_waiting: int


class Event(_Primitive):
    """An event flag shared by processes (``multiprocessing.Event``, async).

    :meth:`set` wakes every waiter, in every process. A waiter returns once the flag is
    set *or has been set since it began waiting*, so a :meth:`set` at once followed by
    :meth:`clear` still wakes everyone who was waiting (as with ``threading.Event``).
    No process holds anything, so the death of a process changes nothing.

    Cancellation: a cancelled :meth:`wait` leaves nothing behind; the other methods
    never wait.

    ``Event(name="x")`` gives it a name by which any process of this user joins it
    (:meth:`connect`); see *Named primitives* in the Concepts page.

    :raises ValueError: ``name`` is malformed or a URL
    :raises FileExistsError: a live object of this user already has that name
    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)
    """

    _kind = 5
    _state: _EventState

    def __init__(self, *, name: str | None = None, mode: int = 0o600) -> None:
        self._state = self._new_state(name, mode, (0, 0), _nothing, _EventState)

    def __reduce__(self) -> tuple[Any, ...]:
        _check_spawning(self)
        return (_rebuild_event, (self._state.segment,))

    def set(self) -> None:
        """Set the flag and wake every waiter, in every process. Idempotent."""
        self._state.set()

    def clear(self) -> None:
        """Reset the flag. Waiters that a :meth:`set` already woke still return."""
        self._state.clear()

    def is_set(self) -> bool:
        """Whether the flag is set."""
        return bool(self._state.segment.ctl[_E_FLAG])

    async def wait(self) -> None:
        """Wait until the flag is set (or has been set since this call began).

        Returns at once if it is set, taking no thread.

        Cancellation: every call is a cancel point, even when the flag is set. If
        cancelled, nothing is left behind: the event is unchanged and other waiters
        are not affected.
        """
        state = self._state
        await state.tick()
        generation = state.start_waiting()
        if generation is None:
            return
        try:
            await state.run(functools.partial(state.check, generation))
        finally:
            state.stop_waiting(generation)

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Wait from code with no event loop, up to ``timeout`` seconds (``None``: as
        long as it takes).

        :returns: ``True`` if the flag was set (or set meanwhile), ``False`` on timeout
        """
        state = self._state
        generation = state.start_waiting()
        if generation is None:
            return True
        try:
            return state.run_blocking(functools.partial(state.check, generation), timeout)
        finally:
            state.stop_waiting(generation)

    def statistics(self) -> EventStatistics:
        """A snapshot of the event (see :class:`EventStatistics`)."""
        return EventStatistics(self.is_set(), self._state.tasks_waiting)

    def __repr__(self) -> str:
        if self.closed:
            return self._closed_repr()
        return f"<aioshm.Event {'set' if self.is_set() else 'unset'}>"


def _rebuild_event(segment: Segment) -> Event:
    event = Event.__new__(Event)
    event._state = _EventState(segment)
    return event
