"""What the cross-process primitives share: owners, the handle base, the state base.

Each public object (:mod:`aioshm._lock`, :mod:`aioshm._semaphore`, :mod:`aioshm._event`,
:mod:`aioshm._condition`) is a thin handle on a *state*: one shared segment (layer 1, a
block of a shared arena: :mod:`aioshm._arena`) driven as a
:class:`~aioshm._shared.SharedObject` (layer 2). The state lives in the segment's free
control fields (17..31) and, for the semaphore and the condition, in its one payload
slot; it changes only under the robust mutex. Waiting tasks sleep in the state's wait
hub (layer 3), one thread per object per process, and blocking callers sleep on the
same doorbell. Nothing is ever counted in the doorbell semaphore itself, so a process
killed at any instant takes nothing with it.

**Who holds what.** A process that acquires gets an entry in the object's process table
(at its first acquire). An owner is a task (``id`` of the asyncio or trio task) or, for
the blocking forms, a thread (as a negative number, so that the two are never
confused). When a process dies (killed, or exits without releasing), the next liveness
sweep of a waiting process gives back what it held.

**Writes are ordered so that a death mid-way is harmless.** Each change has one
authoritative store (the other fields are derived, and rebuilt by ``_repair_locked``
after a holder of the mutex died), and where two are needed the one that *gives*
comes before the one that *takes*: a death in between can cause at worst a spurious
wake-up of a condition waiter, never a lost permit or a lost notification.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from multiprocessing import context
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, TypeVar

from anyio import ClosedResourceError, WouldBlock
from anyio.lowlevel import checkpoint

from . import _arena
from ._checkpoint import YIELD_EVERY, cancel_pending
from ._layout import Segment
from ._posix import Reentered, supported
from ._shared import SEND, SharedObject
from ._wait import Hub

if TYPE_CHECKING:
    from typing import Self

T = TypeVar("T")

#: The one doorbell these objects use (a segment has two; the second stays unused).
WAIT: Final = SEND

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


def _nothing(segment: Segment) -> None:
    pass
