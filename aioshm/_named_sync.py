"""Named primitives: a Lock, Semaphore, Event, Value or Array that any process of the
user joins by name.

A named primitive is not a block of an arena (:mod:`aioshm._arena`): it is a small
segment of its own, the file ``/dev/shm/aioshm.<name>``, made, found, reclaimed and
removed by exactly the machinery of named channels (:mod:`aioshm._names`): the same
name rules, the same per-user files and ``mode=``, the same stale reclaim, the same
``timeout`` for a joiner that starts first. Its segment records its *kind* (and, for a
value or an array, its typecode and length), so that joining a name with the wrong
class is a ``TypeError`` that names both kinds.

**Holders.** Each handle (``Lock(name=...)``, ``Lock.connect(...)``) counts one open
handle in its process's entry of the object's process table, as a channel handle does;
a process has one entry per object however many handles it makes (their counts add).
The name lives while some entry is in use: a handle open in a live process, or a
process that still holds the lock or a permit (or used a handle it was passed as a
``Process`` argument) and has not exited. After that, the process that frees the last
entry, or the liveness sweep that finds the last holder dead, removes the name, as for
a channel.

**One object per process.** A process that joins an object it already maps (it created
it, or joined it before) uses the state it has, so its tasks and threads share one
entry, one wait hub and one owner record.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Final

from . import _names, _ownership
from ._event import _EventState
from ._layout import LENGTH, P_KIND, P_PID, PROC_FIELDS, TYPE_TAG, UID, Segment
from ._lock import _LockState
from ._primitive import _State
from ._semaphore import _SemaphoreState
from ._shared import _K_ACTIVE, RECV, SEND

__all__ = ["ARRAY", "EVENT", "LOCK", "RLOCK", "VALUE", "NamedState", "connect", "create"]

#: The kinds, as recorded in a named segment (0 is a channel).
LOCK: Final = 1
RLOCK: Final = 2
SEMAPHORE: Final = 3
BOUNDED_SEMAPHORE: Final = 4
EVENT: Final = 5
VALUE: Final = 6
ARRAY: Final = 7

#: Which side of the process table counts a primitive's handles (it has one kind).
HANDLES: Final = 0


class NamedState(_names.Named, _State):
    """A primitive's shared state with a name (a mixin, before the state's class)."""

    def __init__(self, segment: Segment, name: str = "") -> None:
        super().__init__(segment)
        self.name = name

    def _joined_locked(self, entry: int) -> None:
        self._init_entry_locked(entry)

    def _mine(self, entry: int) -> bool:
        """Whether ``entry`` is (still) this process's."""
        base = entry * PROC_FIELDS
        procs = self._procs
        return (
            entry >= 0 and procs[base + P_KIND] == _K_ACTIVE and procs[base + P_PID] == self._my_pid
        )

    def my_entry(self) -> int:
        entry = self.entry
        if entry >= 0:
            if self._mine(entry):
                return entry
            self.entry = -1  # freed when the last handle of this process was closed
        return super().my_entry()

    def _reset_local(self) -> None:
        super()._reset_local()
        from . import _procs

        self._my_pid = _procs.my_identity()[0]

    def adopt(self, entry: int) -> None:
        """Make ``entry`` (holding a handle, just registered) this process's entry."""
        with self._entry_lock:
            self.entry = _ownership.merge_into_mine(self, entry)

    def leave(self) -> None:
        """At this process's exit: give back what it holds (the lock, its permits) and
        close its handles, as the sweep that finds it dead would, so that the name goes
        now if nobody else holds it."""
        entry = self.entry
        if entry < 0:
            return

        def leave_locked() -> None:
            if self._mine(entry):
                self._forget_sleepers_locked(entry)
                self._reclaim_locked(entry)
                self._free_entry_locked(entry)
                self._ring_all_locked(SEND)
                self._ring_all_locked(RECV)

        self.locked(leave_locked)
        self.entry = -1

    def close_handle(self) -> None:
        """Count one handle of this process closed; the last one frees this process's
        entry (unless it still holds something) and, if it was the last entry, the
        name goes."""
        entry = self.entry
        if not self._mine(entry):  # given back already: this process left at its exit
            return
        self.drop_handle(entry, HANDLES)
        if not self._mine(entry):
            _open.pop(int(self.segment.ctl[UID]), None)


class NamedLockState(NamedState, _LockState):
    def __init__(self, segment: Segment, name: str = "", reentrant: bool = False) -> None:
        self.reentrant = reentrant
        NamedState.__init__(self, segment, name)


class NamedSemaphoreState(NamedState, _SemaphoreState):
    pass


class NamedEventState(NamedState, _EventState):
    pass


def _lock(segment: Segment, name: str) -> _names.Named:
    return NamedLockState(segment, name)


def _rlock(segment: Segment, name: str) -> _names.Named:
    return NamedLockState(segment, name, reentrant=True)


_CLASSES: dict[int, tuple[str, Callable[[Segment, str], _names.Named]]] = {
    LOCK: ("Lock", _lock),
    RLOCK: ("RLock", _rlock),
    SEMAPHORE: ("Semaphore", NamedSemaphoreState),
    BOUNDED_SEMAPHORE: ("BoundedSemaphore", NamedSemaphoreState),
    EVENT: ("Event", NamedEventState),
    VALUE: ("Value", _lock),
    ARRAY: ("Array", _lock),
}
for _kind, (_label, _wrap) in _CLASSES.items():
    _names.KINDS[_kind] = _names.Kind(
        _label, _wrap, f"aioshm.{_label}(..., name={{name!r}})", f"aioshm.{_label}.connect"
    )


#: This process's state of each named object it maps, by the segment's identity.
_states: weakref.WeakValueDictionary[int, NamedState] = weakref.WeakValueDictionary()
#: The same, while this process holds an entry: kept alive, so that a handle collected
#: with a reference cycle (whose members the collector finalizes in any order) still
#: finds its state's file descriptor open when it closes.
_open: dict[int, NamedState] = {}


def create(
    kind: int,
    name: str,
    mode: int,
    sizes: tuple[int, int],
    init: Callable[[Segment], None],
) -> NamedState:
    """A new named primitive of ``kind``, holding one handle in this process.

    ``sizes`` is the segment's ``(capacity, payload bytes)``; ``init`` writes its
    initial state before it gets its name.

    :raises ValueError: the name is malformed or a URL
    :raises FileExistsError: a live object has that name
    """
    label, wrap = _CLASSES[kind]
    _names.check_local(name, label)

    def make(fd: int) -> NamedState:
        segment = Segment.create(sizes[0], max(sizes[1], 0), fd)
        init(segment)
        state = wrap(segment, name)
        assert isinstance(state, NamedState)
        return state

    state, entry = _names.create_named(name, kind, mode, make, (1, 0))
    state.adopt(entry)
    _states[int(state.segment.ctl[UID])] = _open[int(state.segment.ctl[UID])] = state
    _ownership.leave_at_exit(state)
    return state


def connect(kind: int, name: str, timeout: float) -> NamedState:
    """A new handle's state of the live primitive ``name``, which must be of ``kind``.

    :raises FileNotFoundError: no live object has that name (within ``timeout``)
    :raises TypeError: the object of that name is of another kind
    :raises ValueError: the name is malformed or a URL
    """
    _names.check_local(name, _CLASSES[kind][0])
    found, entry = _names.connect_named(name, kind, (1, 0), timeout)
    assert isinstance(found, NamedState)
    uid = int(found.segment.ctl[UID])
    state = _states.get(uid)
    if state is None:
        state = _states[uid] = found
        _ownership.leave_at_exit(state)
    state.adopt(entry)  # one entry per process: folded into the one it has, if any
    _open[uid] = state
    return state


def type_of(state: _State) -> tuple[int, int]:
    """A named value's or array's ``(typecode as ord(), length)``."""
    ctl = state.segment.ctl
    return int(ctl[TYPE_TAG]), int(ctl[LENGTH])


def record_type(segment: Segment, tag: int, length: int) -> None:
    segment.ctl[TYPE_TAG] = tag
    segment.ctl[LENGTH] = length
