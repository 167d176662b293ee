"""Condition shared by processes.

The state lives in control fields 17..21 and, in the one payload slot, a ring of
tickets (one per wait not yet notified) and, for each entry of the process table, its
tickets waiting and its notifications granted and not yet taken. When a process dies,
the next liveness sweep withdraws its tickets and passes its untaken notifications on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, NamedTuple, TypeVar

from anyio import CancelScope, get_cancelled_exc_class

from . import _arena
from ._layout import MAX_PROCS, Segment
from ._lock import Lock, LockStatistics, RLock, _LockBase
from ._primitive import WAIT, _check_spawning, _check_supported, _here_owner, _State, _task_owner
from ._shared import INFINITE

__all__ = ["CONDITION_CAPACITY", "Condition", "ConditionStatistics"]

T = TypeVar("T")

# Control fields of a condition; its payload holds the ticket ring and the counts of
# each entry (tickets waiting, notifications granted and not yet taken).
_C_CURSOR: Final = 17  # oldest ticket not yet granted or withdrawn
_C_TAIL: Final = 18  # next ticket
_C_NOTIFIED: Final = 19  # notifications granted by notify()
_C_PASSED: Final = 20  # notifications passed on from cancelled or dead waiters
_C_TIDIED: Final = 21  # leftovers cleared by _tidy_locked (only after a death mid-way)

#: Waits a :class:`Condition` can have outstanding (not yet notified), in all processes.
CONDITION_CAPACITY: Final = 4096


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
