"""Locks, semaphores, events and conditions shared by processes.

Each public object is a thin handle on a *state*: one shared segment (layer 1, a block
of a shared arena: :mod:`aioshm._arena`) driven as a
:class:`~aioshm._shared.SharedObject` (layer 2). The state lives in the segment's free
control fields (17..31) and, for the semaphore and the condition, in its one payload
slot; it changes only under the robust mutex. Waiting tasks sleep in the state's wait
hub (layer 3), one thread per object per process, and blocking callers sleep on the
same doorbell. Nothing is ever counted in the doorbell semaphore itself, so a process
killed at any instant takes nothing with it.

**Who holds what.** A process that acquires gets an entry in the object's process table
(at its first acquire). A lock records its holder as that entry plus the holding task
(``id`` of the asyncio or trio task) or, for the blocking forms, the thread (as a
negative number, so that the two are never confused). When a process dies (killed, or
exits without releasing), the next liveness sweep of a waiting process gives back what
it held: a lock is freed and flagged ``owner_died``; a semaphore gets back the permits
the dead process held *inside* ``async with`` / ``with`` blocks; a condition withdraws
the dead process's waits and passes its untaken notifications on.

**Writes are ordered so that a death mid-way is harmless.** Each change has one
authoritative store (the other fields are derived, and rebuilt by ``_repair_locked``
after a holder of the mutex died), and where two are needed the one that *gives*
comes before the one that *takes*: a death in between can cause at worst a spurious
wake-up of a condition waiter, never a lost permit or a lost notification.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
from collections.abc import Callable
from multiprocessing import context
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, NoReturn, TypeVar

from anyio import CancelScope, ClosedResourceError, WouldBlock, get_cancelled_exc_class
from anyio.lowlevel import checkpoint

from . import _arena
from ._checkpoint import YIELD_EVERY, cancel_pending
from ._layout import MAX_PROCS, Segment
from ._posix import Reentered, supported
from ._shared import INFINITE, SEND, SharedObject
from ._wait import Hub

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "CONDITION_CAPACITY",
    "BoundedSemaphore",
    "Condition",
    "ConditionStatistics",
    "Event",
    "EventStatistics",
    "Lock",
    "LockStatistics",
    "RLock",
    "Semaphore",
    "SemaphoreStatistics",
]

T = TypeVar("T")

#: The one doorbell these objects use (a segment has two; the second stays unused).
WAIT: Final = SEND

# Control fields of a lock.
_L_ENTRY: Final = 17  # holder's process-table entry + 1; 0 when free (the commit field)
_L_OWNER: Final = 18  # holding task (its id) or thread (-ident)
_L_COUNT: Final = 19  # recursion depth (always 1 for Lock)
_L_DIED: Final = 20  # 1 after a dead holder's lock was freed, until the next release
_L_RECOVERED: Final = 21  # times a dead holder's lock was freed

# Control fields of a semaphore; its payload holds the held permits of each entry.
_S_VALUE: Final = 17  # permits available (derived: TOTAL - sum(held))
_S_TOTAL: Final = 18  # permits not consumed by a bare acquire (authoritative)
_S_INITIAL: Final = 19
_S_BOUNDED: Final = 20
_S_RECLAIMED: Final = 21  # permits given back from processes that died holding them

# Control fields of an event.
_E_FLAG: Final = 17
_E_GEN: Final = 18  # times it was set: a waiter returns once this changes

# Control fields of a condition; its payload holds the ticket ring and the counts of
# each entry (tickets waiting, notifications granted and not yet taken).
_C_CURSOR: Final = 17  # oldest ticket not yet granted or withdrawn
_C_TAIL: Final = 18  # next ticket
_C_NOTIFIED: Final = 19  # notifications granted by notify()
_C_PASSED: Final = 20  # notifications passed on from cancelled or dead waiters
_C_TIDIED: Final = 21  # leftovers cleared by _tidy_locked (only after a death mid-way)

#: Waits a :class:`Condition` can have outstanding (not yet notified), in all processes.
CONDITION_CAPACITY: Final = 4096

_DONE, _BUSY, _UNLOCKED, _NOT_OWNER, _OVERFLOW = range(5)


# ---------------------------------------------------------------------- identities


def _current_task() -> int | None:
    """The ``id`` of the asyncio or trio task running in this thread, if any."""
    try:
        task: object = asyncio.current_task()
    except RuntimeError:  # no event loop runs in this thread
        task = None
    if task is None:
        trio = sys.modules.get("trio")
        if trio is None:
            return None
        try:
            task = trio.lowlevel.current_task()
        except RuntimeError:  # no trio run in this thread (e.g. a worker thread)
            return None
    return id(task)


def _task_owner() -> int:
    """The current task, as a lock owner (positive: the task object's id)."""
    task = _current_task()
    if task is None:
        raise RuntimeError("no asyncio or trio task is running in this thread")
    return task


def _thread_owner() -> int:
    """The current thread, as a lock owner (negative, so never equal to a task's)."""
    return -threading.get_ident()


def _here_owner() -> int:
    """The current task if an event loop runs the caller, otherwise the thread."""
    task = _current_task()
    return _thread_owner() if task is None else task


def _check_supported() -> None:
    if not supported():
        raise OSError("aioshm needs Linux (robust process-shared mutexes)")


def _check_spawning(what: object) -> None:
    if context.get_spawning_popen() is None:
        instead = (
            ": give it a name (name=...) and join it by name there (.connect(name)) instead"
            if hasattr(what, "connect")
            else ""
        )
        raise RuntimeError(
            f"an aioshm {type(what).__name__} can be handed to another process only as an "
            "argument of multiprocessing.Process (or inherited under fork); pickling it "
            f"otherwise, e.g. through a Queue or a pool, is not supported{instead}"
        )


# ---------------------------------------------------------------------- names


class _Closed:
    """What a closed primitive has in place of its state: any use raises."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, attribute: str) -> NoReturn:
        raise ClosedResourceError(f"this {self._what} has been closed")


class _Primitive:
    """What the primitives share: an optional name, :meth:`connect` and :meth:`close`."""

    #: The kind recorded in a named segment (see :mod:`aioshm._named_sync`).
    _kind: ClassVar[int]
    _state: Any
    _name: str | None = None

    def _new_state(
        self,
        name: str | None,
        mode: int,
        sizes: tuple[int, int],
        init: Callable[[Segment], None],
        make: Callable[[Segment], _State],
        kind: int | None = None,
    ) -> Any:
        """A new state: a block of an arena, or, with ``name``, a named segment (of
        ``kind``, by default this class's)."""
        _check_supported()
        if name is None:
            segment = _arena.allocate(*sizes)
            init(segment)
            return make(segment)
        from . import _named_sync

        state = _named_sync.create(self._kind if kind is None else kind, name, mode, sizes, init)
        self._named(name)
        return state

    def _named(self, name: str) -> None:
        self._name = name

    @classmethod
    def _connect_state(cls, name: str, timeout: float, kind: int | None = None) -> Any:
        _check_supported()
        from . import _named_sync

        return _named_sync.connect(cls._kind if kind is None else kind, name, timeout)

    @classmethod
    def connect(cls, name: str, *, timeout: float = 0) -> Self:
        """A new handle of the live primitive named ``name``, of this class, created
        by any process of this user with ``name=``. Close it when done (:meth:`close`).

        :param timeout: how long to wait, in seconds, for it to be created (for a
            process that may start before the creator). It blocks the calling thread
            meanwhile; from async code with a timeout, call it through
            ``anyio.to_thread.run_sync``.
        :raises FileNotFoundError: no live primitive has that name (within ``timeout``)
        :raises TypeError: the name is of another kind (a channel, or another class:
            the message names both)
        :raises ValueError: the name is malformed, or a URL (primitives are local to
            this machine)
        :raises PermissionError: it belongs to another user, whose ``mode`` does not let
            this one join
        """
        handle = cls.__new__(cls)
        handle._state = cls._connect_state(name, timeout)
        handle._named(name)
        return handle

    @property
    def name(self) -> str | None:
        """The name it was created or joined by; ``None`` for an unnamed one."""
        return self._name

    def close(self) -> None:
        """Close this handle. Idempotent. Using it afterwards raises
        ``anyio.ClosedResourceError``.

        For a named one, the handle stops counting as a holder of the name: the name
        goes once no handle is open in any live process (and no process holds the lock
        or a permit of it). Close it when no task of this process waits on it any more.
        A named handle is also closed when it is garbage-collected, and at the exit of
        its process.
        """
        state = self._state
        if isinstance(state, _Closed):
            return
        self._state = _Closed(type(self).__name__)
        if self._name is not None:
            try:
                state.close_handle()
            except Reentered:  # a finalizer inside this thread's critical section
                state.defer(state.close_handle)

    def __del__(self) -> None:
        if getattr(self, "_name", None) is not None and not isinstance(
            getattr(self, "_state", None), _Closed | None
        ):
            self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return isinstance(self._state, _Closed)

    def _closed_repr(self) -> str:
        named = f" name={self._name!r}" if self._name is not None else ""
        return f"<aioshm.{type(self).__name__} closed{named}>"


# ---------------------------------------------------------------------- shared states


class _State(SharedObject):
    """What every state shares: this process's entry, its hub, its blocked threads."""

    def _reset_local(self) -> None:
        super()._reset_local()
        self.entry = -1
        self._entry_lock = threading.Lock()
        self.hub = Hub(self, WAIT)
        self.ticks = 0
        self.blocked = 0

    def my_entry(self) -> int:
        """This process's entry in the process table (made at first use)."""
        if self.entry >= 0:
            return self.entry
        with self._entry_lock:
            if self.entry < 0:
                try:
                    entry = self.register()
                except RuntimeError:  # the table is full: make room from the dead first
                    self.sweep(force=True)
                    entry = self.register()
                self.locked(self._init_entry_locked, entry)
                self.entry = entry
        return self.entry

    def _init_entry_locked(self, entry: int) -> None:
        """Clear whatever a previous process left in a reused entry (subclasses)."""

    def would_block(self) -> WouldBlock:
        self.maybe_sweep()
        return WouldBlock()

    def swept(self) -> bool:
        """A liveness sweep, if one is due; whether it gave anything back (then the
        failed attempt is worth repeating at once)."""
        return self.maybe_sweep()

    async def tick(self) -> None:
        """The cancel point and fairness yield that begins every async call (see
        :mod:`aioshm._checkpoint`)."""
        self.ticks += 1
        if self.ticks >= YIELD_EVERY or cancel_pending():
            self.ticks = 0
            await checkpoint()

    async def run(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` now if it can proceed, else through the hub (cancellable)."""
        try:
            return attempt()
        except WouldBlock:
            return await self.hub.retry(attempt, self)

    def run_blocking(self, attempt: Callable[[], object], timeout: float | None) -> bool:
        """``attempt()`` from a thread, waiting up to ``timeout``; False on timeout."""
        if timeout is not None and timeout < 0:
            timeout = 0.0
        self.blocked += 1
        try:
            self.block(WAIT, attempt, timeout)
        except TimeoutError:
            return False
        finally:
            self.blocked -= 1
        return True

    @property
    def tasks_waiting(self) -> int:
        return self.hub.waiting + self.blocked


class _LockState(_State):
    def __init__(self, segment: Segment, reentrant: bool = False) -> None:
        self.reentrant = reentrant
        super().__init__(segment)

    def try_acquire(self, owner: int, depth: int = 1) -> None:
        """Acquire for ``owner`` (``depth`` levels), or raise ``WouldBlock``."""
        if not self._acquire_once(owner, depth) and not (
            self.swept() and self._acquire_once(owner, depth)
        ):
            raise WouldBlock

    def _acquire_once(self, owner: int, depth: int) -> bool:
        return self.locked(self._acquire_locked, self.my_entry(), owner, depth)

    def _acquire_locked(self, entry: int, owner: int, depth: int) -> bool:
        ctl = self._ctl
        holder = ctl[_L_ENTRY]
        if holder == 0:
            ctl[_L_OWNER] = owner
            ctl[_L_COUNT] = depth
            ctl[_L_ENTRY] = entry + 1  # the commit
            return True
        if self.reentrant and holder == entry + 1 and ctl[_L_OWNER] == owner:
            ctl[_L_COUNT] += depth
            return True
        return False

    def release(self, owner: int, name: str, all_levels: bool = False) -> int:
        """Release one level (or all); return how many were released."""
        outcome, depth = self.locked(self._release_locked, owner, all_levels)
        if outcome == _UNLOCKED:
            raise RuntimeError(f"release of an unlocked {name}")
        if outcome == _NOT_OWNER:
            raise RuntimeError(
                f"this {name} is held by another task, thread or process: only its owner "
                "may release it"
            )
        return depth

    def _release_locked(self, owner: int, all_levels: bool) -> tuple[int, int]:
        ctl = self._ctl
        entry = self.entry
        holder = ctl[_L_ENTRY]
        if holder == 0:
            return _UNLOCKED, 0
        if self.reentrant and (holder != entry + 1 or ctl[_L_OWNER] != owner):
            return _NOT_OWNER, 0
        depth = ctl[_L_COUNT] if all_levels else 1
        remaining = ctl[_L_COUNT] - depth
        if remaining > 0:
            ctl[_L_COUNT] = remaining
        else:
            ctl[_L_ENTRY] = 0  # the commit
            ctl[_L_OWNER] = 0
            ctl[_L_COUNT] = 0
            ctl[_L_DIED] = 0
            self._ring_one_locked(WAIT)
        return _DONE, depth

    def held_by_caller(self, owner: int) -> bool:
        """An RLock: held by ``owner`` of this process. A Lock: held by this process
        (a Lock has no owning task: on Python 3.11 ``asyncio.wait_for`` runs what it
        awaits in a task of its own)."""
        entry = self.entry
        if entry < 0:
            return False
        holder, holding = self.locked(self._holder_locked)
        return bool(holder == entry + 1 and (holding == owner or not self.reentrant))

    def _holder_locked(self) -> tuple[int, int]:
        return self._ctl[_L_ENTRY], self._ctl[_L_OWNER]

    def _ready_locked(self, side: int) -> int:
        return 1 if self._ctl[_L_ENTRY] == 0 else 0

    def _holds_locked(self, entry: int) -> bool:
        return bool(self._ctl[_L_ENTRY] == entry + 1)

    def _reclaim_locked(self, entry: int) -> None:
        ctl = self._ctl
        if ctl[_L_ENTRY] == entry + 1:
            ctl[_L_DIED] = 1
            ctl[_L_RECOVERED] += 1
            ctl[_L_ENTRY] = 0  # the commit
            ctl[_L_OWNER] = 0
            ctl[_L_COUNT] = 0

    def _repair_locked(self) -> None:
        super()._repair_locked()
        ctl = self._ctl
        if ctl[_L_ENTRY] == 0:
            ctl[_L_OWNER] = 0
            ctl[_L_COUNT] = 0
        elif ctl[_L_COUNT] < 1:
            ctl[_L_COUNT] = 1


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


class _ConditionState(_State):
    """Tickets on a ring: ``[cursor, tail)`` are waits not yet notified, each holding
    its process's entry + 1, or 0 once withdrawn. Notifying moves the cursor past the
    oldest and counts a grant for its process; a waiting task takes any grant of its
    process. ``waiting[e]`` (derived) counts e's tickets, ``grants[e]`` its grants."""

    def _reset_local(self) -> None:
        super()._reset_local()
        size = CONDITION_CAPACITY + 2 * MAX_PROCS
        words = self.segment.payload[0][: 8 * size].cast("q")
        self.ring = words[:CONDITION_CAPACITY]
        self.waiting = words[CONDITION_CAPACITY : CONDITION_CAPACITY + MAX_PROCS]
        self.grants = words[CONDITION_CAPACITY + MAX_PROCS :]
        self.registered = 0  # tasks of this process inside wait() (changed under the mutex)

    def _grant_one_locked(self) -> bool:
        """Grant the oldest ticket to its process; ``False`` if there is none."""
        ctl, ring, cap = self._ctl, self.ring, CONDITION_CAPACITY
        cursor, tail = ctl[_C_CURSOR], ctl[_C_TAIL]
        while cursor < tail and ring[cursor % cap] == 0:
            cursor += 1
        if cursor == tail:
            ctl[_C_CURSOR] = cursor
            return False
        entry = ring[cursor % cap] - 1
        self.grants[entry] += 1  # give first: dying now means a spurious wake-up, no loss
        ring[cursor % cap] = 0
        ctl[_C_CURSOR] = cursor + 1
        self.waiting[entry] -= 1
        return True

    def _withdraw_ticket_locked(self, entry: int) -> bool:
        """Withdraw ``entry``'s newest ticket; ``False`` if it has none."""
        ctl, ring, cap = self._ctl, self.ring, CONDITION_CAPACITY
        cursor, tail = ctl[_C_CURSOR], ctl[_C_TAIL]
        if self.waiting[entry] <= 0:
            return False
        for ticket in range(tail - 1, cursor - 1, -1):
            if ring[ticket % cap] == entry + 1:
                ring[ticket % cap] = 0
                self.waiting[entry] -= 1
                while tail > cursor and ring[(tail - 1) % cap] == 0:
                    tail -= 1
                ctl[_C_TAIL] = tail
                return True
        return False

    def _compact_locked(self) -> None:
        ctl, ring, cap = self._ctl, self.ring, CONDITION_CAPACITY
        cursor, tail = ctl[_C_CURSOR], ctl[_C_TAIL]
        live = [ring[t % cap] for t in range(cursor, tail) if ring[t % cap] != 0]
        for i, value in enumerate(live):
            ring[(cursor + i) % cap] = value
        for t in range(cursor + len(live), tail):
            ring[t % cap] = 0
        ctl[_C_TAIL] = cursor + len(live)

    def _pass_on_locked(self) -> None:
        if self._grant_one_locked():
            self._ctl[_C_PASSED] += 1
            self._ring_all_locked(WAIT)

    def _tidy_locked(self, entry: int) -> None:
        """With no task of this process waiting, nothing may stay registered for it
        (only a death inside a critical section can leave something)."""
        if self.registered <= 0:
            self.registered = 0
            if self.waiting[entry] or self.grants[entry]:
                self._ctl[_C_TIDIED] += 1
                while self._withdraw_ticket_locked(entry):
                    pass
                self.grants[entry] = 0
                self.waiting[entry] = 0

    def add_ticket(self, entry: int) -> None:
        if not self.locked(self._add_ticket_locked, entry):
            raise RuntimeError(f"more than {CONDITION_CAPACITY} waits on this Condition")

    def _add_ticket_locked(self, entry: int) -> bool:
        ctl = self._ctl
        if ctl[_C_TAIL] - ctl[_C_CURSOR] >= CONDITION_CAPACITY:
            self._compact_locked()
        tail = ctl[_C_TAIL]
        if tail - ctl[_C_CURSOR] >= CONDITION_CAPACITY:
            return False
        self.ring[tail % CONDITION_CAPACITY] = entry + 1
        ctl[_C_TAIL] = tail + 1  # the commit
        self.waiting[entry] += 1
        self.registered += 1
        return True

    def consume(self, entry: int) -> None:
        """Take a notification granted to this process, or raise ``WouldBlock``."""
        if not self.locked(self._consume_locked, entry):
            raise self.would_block()

    def _consume_locked(self, entry: int) -> bool:
        if self.grants[entry] <= 0:
            return False
        self.grants[entry] -= 1
        self.registered -= 1
        self._tidy_locked(entry)
        return True

    def withdraw(self, entry: int) -> None:
        """A task leaves wait() without a notification: withdraw a ticket of this
        process, or, if none is left, pass on a notification granted to it (the
        cancelled task's), to the oldest ticket in any process."""
        self.locked(self._withdraw_locked, entry)

    def _withdraw_locked(self, entry: int) -> None:
        self.registered -= 1
        if not self._withdraw_ticket_locked(entry) and self.grants[entry] > 0:
            self._pass_on_locked()
            self.grants[entry] -= 1
        self._tidy_locked(entry)

    def pass_on(self) -> None:
        self.locked(self._pass_on_locked)

    def notify(self, n: int) -> None:
        self.locked(self._notify_locked, n)

    def _notify_locked(self, n: int) -> None:
        granted = 0
        while granted < n and self._grant_one_locked():
            granted += 1
        if granted:
            self._ctl[_C_NOTIFIED] += granted
            self._ring_all_locked(WAIT)

    def _ready_locked(self, side: int) -> int:
        entry = self.entry
        return max(0, self.grants[entry]) if entry >= 0 else 0

    def _holds_locked(self, entry: int) -> bool:
        return bool(self.waiting[entry] > 0 or self.grants[entry] > 0)

    def _reclaim_locked(self, entry: int) -> None:
        while self._withdraw_ticket_locked(entry):
            pass
        for _ in range(self.grants[entry]):
            self._pass_on_locked()
        self.grants[entry] = 0
        self.waiting[entry] = 0

    def _init_entry_locked(self, entry: int) -> None:
        self._reclaim_locked(entry)

    def _repair_locked(self) -> None:
        super()._repair_locked()
        ctl, ring, cap = self._ctl, self.ring, CONDITION_CAPACITY
        cursor, tail = ctl[_C_CURSOR], ctl[_C_TAIL]
        if not 0 <= tail - cursor <= cap:
            ctl[_C_TAIL] = tail = cursor
        for entry in range(MAX_PROCS):
            self.waiting[entry] = 0
            self.grants[entry] = max(0, self.grants[entry])
        for ticket in range(cursor, tail):
            holder = ring[ticket % cap] - 1
            if 0 <= holder < MAX_PROCS:
                self.waiting[holder] += 1
            else:
                ring[ticket % cap] = 0

    def counts(self) -> tuple[int, int, int, int]:
        return self.locked(self._counts_locked)

    def _counts_locked(self) -> tuple[int, int, int, int]:
        ctl = self._ctl
        return sum(self.waiting), sum(self.grants), ctl[_C_NOTIFIED], ctl[_C_PASSED]


# ---------------------------------------------------------------------- locks


class LockStatistics(NamedTuple):
    """A snapshot of a :class:`Lock` or :class:`RLock`."""

    #: whether any task, thread or process holds it
    locked: bool
    #: see :attr:`Lock.owner_died`
    owner_died: bool
    #: how many times a lock held by a dead process was freed
    recoveries: int
    #: recursion depth of the holder (0 when free; 1 for a Lock)
    depth: int
    #: tasks and threads of this process waiting to acquire it
    tasks_waiting: int


def _nothing(segment: Segment) -> None:
    pass


class _LockBase(_Primitive):
    _reentrant: bool = False
    _state: _LockState

    def __init__(self, *, name: str | None = None, mode: int = 0o600) -> None:
        self._state = self._new_state(name, mode, (0, 0), _nothing, self._plain_state)

    def _plain_state(self, segment: Segment) -> _State:
        return _LockState(segment, self._reentrant)

    @classmethod
    def _with_storage(
        cls,
        nbytes: int,
        name: str | None = None,
        mode: int = 0o600,
        kind: int | None = None,
        init: Callable[[Segment], None] = _nothing,
    ) -> Self:
        """A lock whose segment also holds ``nbytes`` of storage (in payload slot 0):
        named ``name`` (as a ``kind``), or a block of an arena."""
        lock = cls.__new__(cls)
        lock._state = lock._new_state(name, mode, (1, nbytes), init, lock._plain_state, kind)
        return lock

    def __reduce__(self) -> tuple[Any, ...]:
        _check_spawning(self)
        return (_rebuild_lock, (type(self), self._state.segment))

    async def acquire(self) -> None:
        """Acquire the lock, waiting if another task, thread or process holds it.

        The holder is this process and, for an :class:`RLock`, the calling task (which
        may already hold it). Waiting takes no thread from anyio's pool, and an acquire
        that can proceed at once takes no thread at all. A task that acquires a
        :class:`Lock` it already holds waits, as with ``asyncio.Lock``.

        Cancellation: every call is a cancel point, even when the lock is free. If
        cancelled (anyio or trio cancel scope, or native asyncio ``Task.cancel()``,
        ``asyncio.timeout``, ``asyncio.wait_for``), the lock was not acquired and
        nothing is left behind; a wake-up the task had received is passed on to another
        waiter.
        """
        state = self._state
        await state.tick()
        await state.run(functools.partial(state.try_acquire, _task_owner()))

    def acquire_nowait(self) -> None:
        """Acquire the lock if it is free, without waiting.

        The owner (for an :class:`RLock`) is the calling task when an event loop runs
        the caller, otherwise the calling thread.

        :raises anyio.WouldBlock: someone else holds it (nothing changed)
        """
        self._state.try_acquire(_here_owner())

    def acquire_blocking(self, timeout: float | None = None) -> bool:
        """Acquire the lock from code with no event loop, waiting up to ``timeout``
        seconds (``None``: as long as it takes).

        The owner (for an :class:`RLock`) is the calling thread: another owner than
        any task, even one running in the same thread. Do not call this from an event
        loop's thread: it blocks the loop.

        :returns: ``True`` if acquired, ``False`` on timeout (nothing held)
        """
        state = self._state
        return state.run_blocking(functools.partial(state.try_acquire, _thread_owner()), timeout)

    def release(self) -> None:
        """Release the lock (one level of an :class:`RLock`).

        A :class:`Lock` may be released by any task, thread or process, as with
        ``multiprocessing.Lock`` and ``asyncio.Lock``; an :class:`RLock` only by its
        owner: the task that acquired it, or the thread that acquired it with
        :meth:`acquire_blocking`. A normal release clears :attr:`owner_died` and wakes
        one waiter, in any process.

        :raises RuntimeError: the lock is not held, or (``RLock``) is held by another
            task, thread or process
        """
        self._state.release(_here_owner(), type(self).__name__)

    def locked(self) -> bool:
        """Whether any task, thread or process holds the lock."""
        return bool(self._state.segment.ctl[_L_ENTRY] != 0)

    @property
    def owner_died(self) -> bool:
        """``True`` once a process died holding the lock and the lock was freed for the
        others; it stays ``True`` until the next normal :meth:`release`.

        So the task that acquires the lock next sees ``True`` while it holds it, and
        should check (or repair) the state the lock guards: the dead holder may have
        left it half-updated. The lock is freed within a fraction of a second of the
        death by a process waiting for it (its liveness sweep), or, with nobody
        waiting, by the first process that fails to acquire it.
        """
        return bool(self._state.segment.ctl[_L_DIED])

    def statistics(self) -> LockStatistics:
        """A snapshot of the lock (see :class:`LockStatistics`)."""
        state = self._state
        ctl = state.segment.ctl

        def snapshot() -> tuple[bool, bool, int, int]:
            return ctl[_L_ENTRY] != 0, bool(ctl[_L_DIED]), ctl[_L_RECOVERED], ctl[_L_COUNT]

        locked, died, recoveries, depth = state.locked(snapshot)
        return LockStatistics(locked, died, recoveries, depth, state.tasks_waiting)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._state.release(_task_owner(), type(self).__name__)

    def __enter__(self) -> None:
        self.acquire_blocking()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._state.release(_thread_owner(), type(self).__name__)

    def __repr__(self) -> str:
        if self.closed:
            return self._closed_repr()
        state = "locked" if self.locked() else "unlocked"
        died = " owner_died" if self.owner_died else ""
        return f"<aioshm.{type(self).__name__} {state}{died}>"


def _rebuild_lock(cls: type[_LockBase], segment: Segment) -> _LockBase:
    lock = cls.__new__(cls)
    lock._state = _LockState(segment, cls._reentrant)
    return lock


class Lock(_LockBase):
    """A lock shared by processes: the async counterpart of ``multiprocessing.Lock``.

    ``Lock(name="x")`` gives it a name by which any process of this user joins it
    (:meth:`connect`); see *Named primitives* in the Concepts page.

    ``async with lock:`` in any process, on asyncio or trio; ``with lock:`` (or
    :meth:`acquire_blocking`) in code with no event loop. Pass it to other processes as
    an argument of ``multiprocessing.Process``, under any start method.

    Not re-entrant, and not owned by a task: like ``multiprocessing.Lock`` and
    ``asyncio.Lock``, any task, thread or process may release it (which also lets
    ``asyncio.wait_for(lock.acquire(), t)`` work on Python 3.11, where ``wait_for``
    runs the acquire in a task of its own). It *is* attributed to the process that
    acquired it: if that process dies holding it, the others are not blocked: within a
    fraction of a second a waiting process frees it, and :attr:`owner_died` tells the
    next holder. Not fair: a task that releases and at once acquires again may get it
    before a woken waiter does.

    Cancellation: a cancelled :meth:`acquire` did not acquire and left nothing behind;
    the other methods never wait.

    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)
    :raises ValueError: ``name`` is malformed or a URL (the message says what a valid
        name is), or ``mode`` is not permission bits that let the owner read and write
    :raises FileExistsError: a live object of this user already has that name
    """

    _kind = 1


class RLock(_LockBase):
    """A re-entrant lock shared by processes (``multiprocessing.RLock``, async).

    Re-entrant *per task*, not per thread: the task holding it may acquire it again
    (and must release it as many times); another task of the same thread is another
    owner and waits, and so is a thread using :meth:`acquire_blocking`. Only the owner
    may release it, otherwise ``RuntimeError``. Otherwise as :class:`Lock`, including
    :attr:`owner_died`.

    On Python 3.11, ``asyncio.wait_for(rlock.acquire(), t)`` makes ``wait_for``'s own
    task the owner (it runs the acquire in a task of its own), so the caller cannot
    release it: use ``asyncio.timeout`` (or an anyio cancel scope) there instead.

    ``RLock(name="x")`` and :meth:`connect` as for :class:`Lock`.
    """

    _reentrant = True
    _kind = 2


# ---------------------------------------------------------------------- semaphores


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


# ---------------------------------------------------------------------- events


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


# ---------------------------------------------------------------------- conditions


class ConditionStatistics(NamedTuple):
    """A snapshot of a :class:`Condition`."""

    #: waits not yet notified, in all processes
    waiting: int
    #: notifications granted and not yet taken by a waiter, in all processes
    granted: int
    #: notifications granted by ``notify()`` and ``notify_all()`` so far
    notified: int
    #: notifications passed on from cancelled waiters or dead processes
    passed_on: int
    #: tasks of this process inside ``wait()``
    tasks_waiting: int
    #: statistics of the underlying lock
    lock_statistics: LockStatistics


class Condition:
    """A condition variable shared by processes (``multiprocessing.Condition``, async).

    ``async with cond:`` holds its lock (a new :class:`Lock`, or the :class:`Lock` or
    :class:`RLock` given); :meth:`wait` releases it while waiting and holds it again
    before returning; :meth:`notify` and :meth:`notify_all` wake waiters in any
    process. All three need the lock held by the caller (a :class:`Lock`: held by the
    calling process; an :class:`RLock`: by the calling task), else ``RuntimeError``.

    **How it works.** A waiter takes a ticket in shared memory before it releases the
    lock; :meth:`notify` turns the ``n`` oldest tickets (over all processes) into
    notifications *granted to their processes*, and a waiting task of that process
    takes one and returns. A waiter that is cancelled gives its ticket back, or, if
    its process holds a notification no other task of it is waiting for, passes that
    notification on to the oldest ticket left, so a notification never dies with a
    cancelled waiter. When a process dies, the next liveness sweep withdraws its
    tickets and passes its untaken notifications on in the same way.

    Order: first come, first notified across processes; among the waiters of one
    process, any may take a notification granted to that process. As with every
    condition variable, check what you wait for after waking (:meth:`wait_for` does):
    a process dying inside a critical section can cause a spurious wake-up.

    Cancellation: see :meth:`wait`; :meth:`notify` and :meth:`notify_all` never wait.

    :raises TypeError: ``lock`` is not an aioshm ``Lock`` or ``RLock``
    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)
    """

    def __init__(self, lock: Lock | RLock | None = None) -> None:
        if lock is None:
            lock = Lock()
        elif not isinstance(lock, _LockBase):
            raise TypeError(
                f"a Condition's lock must be an aioshm Lock or RLock, not {type(lock).__name__}"
            )
        _check_supported()
        size = 8 * (CONDITION_CAPACITY + 2 * MAX_PROCS)
        self._state = _ConditionState(_arena.allocate(1, size))
        self._lock: Lock | RLock = lock

    def __reduce__(self) -> tuple[Any, ...]:
        _check_spawning(self)
        return (_rebuild_condition, (self._state.segment, self._lock))

    @property
    def lock(self) -> Lock | RLock:
        """The underlying lock."""
        return self._lock

    async def wait(self) -> None:
        """Release the lock, wait to be notified, and hold the lock again.

        The lock is held again however this ends, even if cancelled (it may have to
        wait for it). Wake-ups are not spurious, except after a process died inside a
        critical section: check what you wait for (or use :meth:`wait_for`).

        :raises RuntimeError: the calling task does not hold the lock, or more than
            ``CONDITION_CAPACITY`` (4096) waits are outstanding

        Cancellation (anyio or trio cancel scope, native asyncio ``Task.cancel()``,
        ``asyncio.timeout``, ``asyncio.wait_for``): the task was not notified, or its
        notification went to the oldest other waiter (in any process), so none is
        lost; the lock is held again before the cancellation propagates, and another
        cancellation while it is taken back does not stop that.
        """
        lock, state = self._lock, self._state
        owner = _task_owner()
        if not lock._state.held_by_caller(owner):
            raise RuntimeError("wait() needs the Condition's lock held by the caller")
        await state.tick()  # a pending cancellation raises here, the lock still held
        entry = state.my_entry()
        state.add_ticket(entry)
        try:
            depth = lock._state.release(owner, type(lock).__name__, all_levels=True)
        except BaseException:
            state.withdraw(entry)
            raise
        try:
            try:
                await state.run(functools.partial(state.consume, entry))
            except BaseException:
                state.withdraw(entry)
                raise
        except BaseException:
            await _reacquire(lock, owner, depth)
            raise
        cancelled = await _reacquire(lock, owner, depth)
        if cancelled is not None:
            # Notified, but cancelled while taking the lock back: the caller will not
            # act on the notification, so another waiter must.
            state.pass_on()
            raise cancelled

    async def wait_for(self, predicate: Callable[[], T]) -> T:
        """Wait until ``predicate()`` is true; return its last value.

        ``predicate`` is called with the lock held, first before any waiting.

        :raises RuntimeError: the calling task does not hold the lock

        Cancellation: as :meth:`wait`, and the call is a cancel point even when
        ``predicate()`` is already true; the lock is held when the cancellation
        propagates.
        """
        await self._state.tick()
        result = predicate()
        while not result:
            await self.wait()
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiters, oldest first, in any process.

        A notification that lands on a waiter that is then cancelled (or whose process
        dies) goes to the next waiter instead. With nobody waiting it does nothing.

        :raises RuntimeError: the caller does not hold the lock
        """
        if not self._lock._state.held_by_caller(_here_owner()):
            raise RuntimeError("notify() needs the Condition's lock held by the caller")
        self._state.notify(n)

    def notify_all(self) -> None:
        """Wake every task waiting now, in every process.

        :raises RuntimeError: the caller does not hold the lock
        """
        self.notify(INFINITE)

    async def acquire(self) -> None:
        """Acquire the underlying lock (see :meth:`Lock.acquire`)."""
        await self._lock.acquire()

    def release(self) -> None:
        """Release the underlying lock (see :meth:`Lock.release`)."""
        self._lock.release()

    def locked(self) -> bool:
        """Whether the underlying lock is held."""
        return self._lock.locked()

    def statistics(self) -> ConditionStatistics:
        """A snapshot of the condition (see :class:`ConditionStatistics`)."""
        waiting, granted, notified, passed = self._state.counts()
        return ConditionStatistics(
            waiting,
            granted,
            notified,
            passed,
            self._state.hub.waiting,
            self._lock.statistics(),
        )

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._lock._state.release(_task_owner(), type(self._lock).__name__)

    def __repr__(self) -> str:
        return f"<aioshm.Condition lock={self._lock!r}>"


def _rebuild_condition(segment: Segment, lock: Lock | RLock) -> Condition:
    cond = Condition.__new__(Condition)
    cond._state = _ConditionState(segment)
    cond._lock = lock
    return cond


async def _reacquire(lock: _LockBase, owner: int, depth: int) -> BaseException | None:
    """Hold ``lock`` again for ``owner``, whatever happens meanwhile.

    Shielded from anyio and trio cancellation; a native asyncio cancellation that
    arrives anyway is caught and returned, for the caller to raise once it holds the
    lock again.
    """
    state = lock._state
    caught: BaseException | None = None
    cancelled = get_cancelled_exc_class()
    with CancelScope(shield=True):
        while True:
            try:
                await state.run(functools.partial(state.try_acquire, owner, depth))
            except cancelled as exc:
                caught = exc
            else:
                break
    return caught
