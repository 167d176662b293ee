"""Layer 2 (core): a shared object that survives the death of any process using it.

:class:`SharedObject` gives a segment (layer 1) four things every aioshm object needs:

* **Critical sections** under the robust mutex. If a holder dies mid-way, the kernel
  tells the next holder (``EOWNERDEAD``), which calls
  :meth:`SharedObject._repair_locked` to rebuild derived state from the authoritative
  state; a live holder interrupted by an exception repairs in place before releasing.
  Nothing is ever left half-done.
* **The process table**: which processes hold handles, how many of each side, and the
  reservations a parent makes for a child it is starting.
* **Liveness sweeps**: a process found dead (pid gone, zombie, or pid reused) has its
  handles closed and whatever it held given back (:meth:`_reclaim_locked`).
* **Doorbells**: two semaphores, one per side, on which threads sleep when they cannot
  proceed. Capacity is never counted by these semaphores, only by fields under the mutex,
  so a process that dies at any instant cannot take a permit with it. A sleeper registers
  under the mutex, together with its readiness check, so no wake-up can be missed.

Everything here is synchronous and needs no event loop.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, TypeVar

from anyio import WouldBlock

from . import _procs
from ._layout import (
    MAX_PROCS,
    OPEN,
    P_KIND,
    P_NONCE,
    P_OPEN,
    P_PID,
    P_RES_PID,
    P_RES_START,
    P_START,
    PROC_FIELDS,
    SLEEPERS,
    Segment,
)
from ._posix import Reentered
from ._posix import trylock as _trylock
from ._posix import unlock as _unlock

__all__ = ["INFINITE", "RANG", "RECV", "SEND", "SLICE", "SharedObject"]

#: The two sides. A bell is named by the side it wakes.
SEND: Final = 0
RECV: Final = 1
#: A readiness count meaning "everyone may proceed" (end of stream, broken, ...).
INFINITE: Final = 1 << 40
#: What :meth:`SharedObject.wait` returns when a bell woke it.
RANG: Final = -1
#: Longest single sleep on a bell; also the period of liveness sweeps by sleepers.
SLICE: Final = 0.1
#: Shortest interval between two liveness sweeps by one process.
SWEEP_INTERVAL: Final = 0.1

R = TypeVar("R")
#: "No argument" for :meth:`SharedObject.locked` (``None`` is an argument).
_NO_ARG: Final[Any] = object()

_K_FREE = 0
_K_ACTIVE = 1
_K_RESERVED = 2


class SharedObject:
    """Base of the shared objects; see the module docstring."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self._ctl = segment.ctl
        self._procs = segment.procs
        self._bells = segment.bells
        self._mutex = segment.mutex
        self._mptr = segment.mutex.ptr
        self._reset_local()
        _live_objects.add(self)

    def _reset_local(self) -> None:
        """Process-local bookkeeping (reset in a forked child)."""
        self._pending: dict[int, tuple[int, weakref.ref[Any]]] = {}
        self._next_sweep = 0.0
        self._local = threading.Lock()
        #: Actions to run once a thread's critical section ends, by thread.
        self._deferred: dict[int, list[Callable[[], object]]] = {}

    # ------------------------------------------------------------------ the mutex

    def locked(
        self, body: Callable[..., R], a: Any = _NO_ARG, b: Any = _NO_ARG, c: Any = _NO_ARG
    ) -> R:
        """``body(a, b, c)`` with the mutex held: the one critical section of aioshm.

        Up to three arguments, passed on as given (no ``*args``: packing them costs more
        than the rest of the call).

        If ``body`` raises, the state is repaired (:meth:`_repair_locked`) before the
        mutex is released, so nothing is left half-done. This holds for asynchronous
        exceptions too: a ``KeyboardInterrupt`` raised by a signal handler (or by trio)
        at any bytecode. Python delivers those only after a call returns, at a loop's
        jump back, or on entering a Python function; here every such point between the
        ``trylock`` and the ``unlock`` lies inside the ``try``, and the ``unlock`` is a
        C call made with no Python frame in between. The handler does not know how far
        the acquisition got, so it asks the mutex (:meth:`RobustMutex.seize`) and
        releases it if this thread holds it (a release by a non-owner is refused).
        """
        ptr = self._mptr
        acquired = False
        try:
            result = _trylock(ptr)
            if result:
                self._lock_contended(result)
            acquired = True
            if a is _NO_ARG:
                value = body()
            elif b is _NO_ARG:
                value = body(a)
            elif c is _NO_ARG:
                value = body(a, b)
            else:
                value = body(a, b, c)
        except BaseException as exc:
            if not acquired and type(exc) is Reentered:
                raise  # the mutex belongs to this thread's outer critical section
            try:
                if self._mutex.seize():
                    self._repair_locked()
            finally:
                _unlock(ptr)
            raise
        _unlock(ptr)
        if self._deferred:
            self._run_deferred()
        return value

    def critical(self) -> _CriticalSection:
        """``with obj.critical():`` the same critical section as :meth:`locked`.

        Prefer :meth:`locked`: a ``with`` block's ``__exit__`` is a Python function, and
        an asynchronous exception delivered on entering it, after a block that completed,
        would leave the mutex held. :meth:`locked` has no such instant.
        """
        return _CriticalSection(self)

    def _lock_contended(self, result: int) -> None:
        if self._mutex.acquire_contended(result):  # the previous holder died mid-way
            self._repair_locked()
            self.defer(self._sweep_after_owner_died)  # find out who, after

    def _recover(self) -> None:
        """After an exception inside a critical section: repair and release, if held."""
        try:
            if self._mutex.seize():
                self._repair_locked()
        finally:
            _unlock(self._mptr)

    def defer(self, action: Callable[[], object]) -> None:
        """Run ``action`` after the current critical section of this thread ends.

        For finalizers and signal handlers, which may run inside a critical section of
        the same thread and would otherwise try to take the mutex a second time. The
        actions are kept per thread: only the thread that deferred one runs it.
        """
        self._deferred.setdefault(threading.get_ident(), []).append(action)

    def _run_deferred(self) -> None:
        ident = threading.get_ident()
        while (actions := self._deferred.pop(ident, None)) is not None:
            for action in actions:
                action()

    def _repair_locked(self) -> None:
        """Rebuild derived state after a holder died mid-way (extended by subclasses)."""
        procs = self._procs
        totals = [0, 0]
        for base in range(0, MAX_PROCS * PROC_FIELDS, PROC_FIELDS):
            if procs[base + P_KIND] != _K_FREE:
                totals[0] += procs[base + P_OPEN]
                totals[1] += procs[base + P_OPEN + 1]
        self._ctl[OPEN] = totals[0]
        self._ctl[OPEN + 1] = totals[1]

    # ------------------------------------------------------------ process table

    def _new_entry_locked(self, kind: int, opened: tuple[int, int]) -> int:
        procs = self._procs
        for entry in range(MAX_PROCS):
            base = entry * PROC_FIELDS
            if procs[base + P_KIND] == _K_FREE:
                for field in range(PROC_FIELDS):
                    procs[base + field] = 0
                procs[base + P_OPEN] = opened[0]
                procs[base + P_OPEN + 1] = opened[1]
                self._ctl[OPEN] += opened[0]
                self._ctl[OPEN + 1] += opened[1]
                procs[base + P_KIND] = kind
                return entry
        raise RuntimeError(f"more than {MAX_PROCS} processes hold handles to this object")

    def register(self, opened: tuple[int, int] = (0, 0)) -> int:
        """Add an entry for this process holding ``opened`` handles per side."""
        pid, started = _procs.my_identity()
        return self.locked(self._register_locked, opened, pid, started)

    def _register_locked(self, opened: tuple[int, int], pid: int, started: int) -> int:
        entry = self._new_entry_locked(_K_ACTIVE, opened)
        base = entry * PROC_FIELDS
        self._procs[base + P_PID] = pid
        self._procs[base + P_START] = started
        return entry

    def reserve(self, opened: tuple[int, int], popen: object) -> tuple[int, int]:
        """Reserve an entry for a child being started by ``popen``.

        The child claims it with :meth:`claim_reservation`. Until then the entry lives as
        long as this process does, and once the child's pid is known, as long as the child.
        """
        pid, started = _procs.my_identity()
        nonce = int.from_bytes(secrets.token_bytes(7), "little") or 1

        def reserve_locked() -> int:
            entry = self._new_entry_locked(_K_RESERVED, opened)
            base = entry * PROC_FIELDS
            self._procs[base + P_RES_PID] = pid
            self._procs[base + P_RES_START] = started
            self._procs[base + P_NONCE] = nonce
            return entry

        entry = self.locked(reserve_locked)
        with self._local:
            self._pending[entry] = (nonce, weakref.ref(popen))
        return entry, nonce

    def claim_reservation(self, entry: int, nonce: int) -> bool:
        """Make a reservation this process's own (in the child). False if it expired."""
        pid, started = _procs.my_identity()
        base = entry * PROC_FIELDS

        def claim_locked() -> bool:
            procs = self._procs
            if procs[base + P_KIND] != _K_RESERVED or procs[base + P_NONCE] != nonce:
                return False
            procs[base + P_PID] = pid
            procs[base + P_START] = started
            procs[base + P_KIND] = _K_ACTIVE
            return True

        return self.locked(claim_locked)

    def add_handle(self, entry: int, side: int) -> None:
        self.locked(self._add_handle_locked, entry, side)

    def _add_handle_locked(self, entry: int, side: int) -> None:
        self._procs[entry * PROC_FIELDS + P_OPEN + side] += 1
        self._ctl[OPEN + side] += 1

    def drop_handle(self, entry: int, side: int) -> None:
        """Count one handle of ``side`` closed; the last one wakes the other side."""
        self.locked(self._drop_handle_locked, entry, side)

    def _drop_handle_locked(self, entry: int, side: int) -> None:
        procs = self._procs
        base = entry * PROC_FIELDS
        if procs[base + P_KIND] == _K_FREE or procs[base + P_OPEN + side] <= 0:
            return  # already reclaimed by a sweep
        procs[base + P_OPEN + side] -= 1
        self._ctl[OPEN + side] -= 1
        if (
            procs[base + P_OPEN] == 0
            and procs[base + P_OPEN + 1] == 0
            and not self._holds_locked(entry)
        ):
            self._free_entry_locked(entry)
        if self._ctl[OPEN + side] <= 0:
            self._ring_all_locked(1 - side)

    def _free_entry_locked(self, entry: int) -> None:
        procs = self._procs
        base = entry * PROC_FIELDS
        self._ctl[OPEN] -= procs[base + P_OPEN]
        self._ctl[OPEN + 1] -= procs[base + P_OPEN + 1]
        procs[base + P_OPEN] = procs[base + P_OPEN + 1] = 0
        procs[base + P_KIND] = _K_FREE

    def open_handles(self, side: int) -> int:
        """Open handles of ``side`` in all live processes (as last swept)."""
        return max(0, self._ctl[OPEN + side])

    # ------------------------------------------------------------ liveness

    def sweep(self, force: bool = False) -> bool:
        """Find processes that died and give back what they held. Rate-limited.

        Returns ``True`` if anything was reclaimed.
        """
        now = time.monotonic()
        if not force and now < self._next_sweep:
            return False
        self._next_sweep = now + SWEEP_INTERVAL
        self._resolve_pending()
        procs = self._procs
        me = _procs.my_identity()[0]
        dead = []
        for entry in range(MAX_PROCS):
            base = entry * PROC_FIELDS
            kind = procs[base + P_KIND]
            if kind == _K_FREE:
                continue
            pid, started = procs[base + P_PID], procs[base + P_START]
            if pid == 0:  # a reservation whose child is not known yet: the parent vouches
                pid, started = procs[base + P_RES_PID], procs[base + P_RES_START]
            if pid != me and not _procs.is_alive(pid, started):
                dead.append((entry, kind, procs[base + P_PID], procs[base + P_NONCE]))
        if not dead:
            return False
        self.locked(self._reclaim_dead_locked, dead)
        return True

    def _reclaim_dead_locked(self, dead: list[tuple[int, int, int, int]]) -> None:
        procs = self._procs
        for entry, kind, pid, nonce in dead:
            base = entry * PROC_FIELDS
            if (procs[base + P_KIND], procs[base + P_PID], procs[base + P_NONCE]) == (
                kind,
                pid,
                nonce,
            ):
                self._reclaim_locked(entry)
                self._free_entry_locked(entry)
        self._ring_all_locked(SEND)
        self._ring_all_locked(RECV)

    def _sweep_after_owner_died(self) -> None:
        # The dead holder released the mutex while exiting, and /proc may lag a little
        # behind: if it does, keep looking from a thread of our own rather than make
        # this thread (an event loop's, perhaps) wait.
        if not self.sweep(force=True):
            threading.Thread(target=self._sweep_until_found, daemon=True).start()

    def _sweep_until_found(self) -> None:
        for _ in range(100):
            time.sleep(0.005)
            if self.sweep(force=True):
                return

    def maybe_sweep(self) -> bool:
        """A sweep if one is due (cheap when it is not); whether it gave anything back."""
        return time.monotonic() >= self._next_sweep and self.sweep()

    def _resolve_pending(self) -> None:
        """Write the pids of children this process started into their reservations."""
        if not self._pending:
            return
        with self._local:
            pending = list(self._pending.items())
        for entry, (nonce, popen_ref) in pending:
            popen = popen_ref()
            child = getattr(popen, "pid", None)
            if popen is not None and not child:
                continue  # still being started
            started = _procs.start_time(child) if child else 0
            self.locked(self._resolve_locked, (entry, nonce), child, started)
            with self._local:
                self._pending.pop(entry, None)

    def _resolve_locked(self, reservation: tuple[int, int], child: int, started: int) -> None:
        entry, nonce = reservation
        procs = self._procs
        base = entry * PROC_FIELDS
        if procs[base + P_KIND] == _K_RESERVED and procs[base + P_NONCE] == nonce:
            if child:
                procs[base + P_PID] = child
                procs[base + P_START] = started
            else:  # the start failed before a child existed
                self._free_entry_locked(entry)
                self._ring_all_locked(SEND)
                self._ring_all_locked(RECV)

    def _reclaim_locked(self, entry: int) -> None:
        """Give back what a dead process held, besides its handles (subclasses)."""

    def _holds_locked(self, entry: int) -> bool:
        """Whether ``entry`` still holds anything besides handles (subclasses)."""
        return False

    # ------------------------------------------------------------ doorbells

    def _ready_locked(self, side: int) -> int:
        """How many waiters of ``side`` could proceed now (subclasses)."""
        raise NotImplementedError

    def _worth_waking_locked(self, side: int) -> int:
        """Like :meth:`_ready_locked`, but 0 while too little is ready to be worth a
        sleeper's wake-up (a low-water mark; subclasses). A sleeper whose wait times
        out takes whatever is ready."""
        return self._ready_locked(side)

    def _ring_one_locked(self, side: int) -> None:
        ctl = self._ctl
        if ctl[SLEEPERS + side] > 0:
            ctl[SLEEPERS + side] -= 1
            self._bells[side].post()

    def _ring_all_locked(self, side: int) -> None:
        ctl = self._ctl
        bell = self._bells[side]
        for _ in range(ctl[SLEEPERS + side]):
            bell.post()
        ctl[SLEEPERS + side] = 0

    def ready(self, side: int) -> int:
        return self.locked(self._ready_locked, side)

    def wait(self, side: int, timeout: float, reserved: int = 0) -> int:
        """Sleep until ``side`` may proceed, a bell rings, or ``timeout`` passes.

        Returns how many waiters of ``side`` may proceed beyond ``reserved`` (already
        woken ones); otherwise :data:`RANG` if a bell woke it, or 0. The caller then
        checks again; a caller that cannot use a bell should :meth:`forward` it. It
        sleeps unless enough is ready to be worth waking for
        (:meth:`_worth_waking_locked`); after a timeout it counts whatever is ready.
        """
        ready = self.locked(self._register_sleeper_locked, side, reserved)
        if ready > 0:
            return ready
        if self._bells[side].wait(timeout):
            return RANG
        return max(self.locked(self._unregister_sleeper_locked, side, reserved), 0)

    def _register_sleeper_locked(self, side: int, reserved: int) -> int:
        ready = self._worth_waking_locked(side) - reserved
        if ready <= 0:
            self._ctl[SLEEPERS + side] += 1
        return ready

    def _unregister_sleeper_locked(self, side: int, reserved: int) -> int:
        ctl = self._ctl
        if ctl[SLEEPERS + side] > 0:
            ctl[SLEEPERS + side] -= 1
        else:  # a waker took our registration: its post is ours to consume
            self._bells[side].try_wait()
        return self._ready_locked(side) - reserved

    def forward(self, side: int) -> None:
        """Pass on a wake-up this process cannot use to another sleeper, if any."""
        self.locked(self._ring_one_locked, side)

    def wake_all(self, side: int) -> None:
        self.locked(self._ring_all_locked, side)

    def block(self, side: int, attempt: Callable[[], Any], timeout: float | None) -> Any:
        """Call ``attempt`` until it stops raising ``WouldBlock``, sleeping in between.

        The blocking (no event loop) form of every operation. Raises ``TimeoutError``
        once ``timeout`` seconds have passed, having done nothing.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return attempt()
            except WouldBlock:
                pass
            if deadline is None:
                self.wait(side, SLICE)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout} s") from None
                self.wait(side, min(SLICE, remaining))
            self.maybe_sweep()


class _CriticalSection:
    """``with obj.critical():`` (see :meth:`SharedObject.critical`)."""

    __slots__ = ("_obj",)

    def __init__(self, obj: SharedObject) -> None:
        self._obj = obj

    def __enter__(self) -> None:
        obj = self._obj
        try:
            result = _trylock(obj._mptr)
            if result:
                obj._lock_contended(result)
        except Reentered:
            raise
        except BaseException:
            obj._recover()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        obj = self._obj
        if exc_type is not None:
            obj._recover()
            return
        _unlock(obj._mptr)
        if obj._deferred:
            obj._run_deferred()


_live_objects: weakref.WeakSet[SharedObject] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for obj in list(_live_objects):
        obj._reset_local()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
