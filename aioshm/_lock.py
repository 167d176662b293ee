"""Lock and RLock shared by processes.

The state lives in control fields 17..21 of the lock's segment. A lock records its
holder as the holding process's entry in the process table plus the holding task or
thread (see :mod:`aioshm._primitive`). When the holder dies, the next liveness sweep of
a waiting process frees the lock and flags ``owner_died``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from anyio import WouldBlock

from ._layout import Segment
from ._primitive import (
    _DONE,
    _NOT_OWNER,
    _UNLOCKED,
    WAIT,
    _check_spawning,
    _here_owner,
    _nothing,
    _Primitive,
    _State,
    _task_owner,
    _thread_owner,
)

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Lock", "LockStatistics", "RLock"]

# Control fields of a lock.
_L_ENTRY: Final = 17  # holder's process-table entry + 1; 0 when free (the commit field)
_L_OWNER: Final = 18  # holding task (its id) or thread (-ident)
_L_COUNT: Final = 19  # recursion depth (always 1 for Lock)
_L_DIED: Final = 20  # 1 after a dead holder's lock was freed, until the next release
_L_RECOVERED: Final = 21  # times a dead holder's lock was freed


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
