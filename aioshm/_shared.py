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
  handles closed and whatever it held given back (:meth:`_reclaim_locked`). A process
  whose liveness cannot be told (no ``/proc``, ``hidepid``, a sandbox) counts as alive
  (:func:`aioshm._procs.probe`). Sweeps are shared: at most one per
  :data:`SWEEP_INTERVAL` for the whole object, by whichever process finds one due, so
  their total cost grows with the number of processes, not with its square.
* **Doorbells**: two semaphores, one per side, on which threads sleep when they cannot
  proceed. Capacity is never counted by these semaphores, only by fields under the mutex,
  so a process that dies at any instant cannot take a permit with it. A sleeper registers
  under the mutex, together with its readiness check, so no wake-up can be missed. See
  :meth:`SharedObject.wait` for the bookkeeping, and for how sleepers take turns to
  watch for deaths while everyone sleeps.

Everything here is synchronous and needs no event loop.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Final, NamedTuple, TypeVar

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
    P_SLEEP,
    P_START,
    PROC_FIELDS,
    SLEEPERS,
    SWEEPS,
    SWEPT_AT,
    TIMED_OUT,
    Segment,
)
from ._posix import Reentered
from ._posix import trylock as _trylock
from ._posix import unlock as _unlock

__all__ = ["INFINITE", "RANG", "RECV", "SEND", "SLICE", "SharedObject", "WaitCounters"]

#: The two sides. A bell is named by the side it wakes.
SEND: Final = 0
RECV: Final = 1
#: A readiness count meaning "everyone may proceed" (end of stream, broken, ...).
INFINITE: Final = 1 << 40
#: What :meth:`SharedObject.wait` returns when a bell woke it.
RANG: Final = -1
#: Shortest interval between two liveness sweeps of one object (by any process); also
#: the shortest sleep on a bell before a sleeper wakes to see whether one is due.
SWEEP_INTERVAL: Final = 0.3
#: The sleepers of one object wake in turn, about one every ``SPACING`` seconds (see
#: :meth:`SharedObject.wait`); so a dead peer is noticed within about
#: ``SWEEP_INTERVAL + SPACING``, plus about ``SPACING`` for each sleeper next in turn
#: that died with it.
SPACING: Final = 0.07
#: Longest single sleep on a bell.
LONGEST_SLEEP: Final = 30.0
#: Longest single sleep of a thread of ours that waits with no timeout (kept as a name
#: for callers that bound their own waits by it).
SLICE: Final = SWEEP_INTERVAL
_SWEEP_NS: Final = int(SWEEP_INTERVAL * 1e9)

R = TypeVar("R")
#: "No argument" for :meth:`SharedObject.locked` (``None`` is an argument).
_NO_ARG: Final[Any] = object()

_K_FREE = 0
_K_ACTIVE = 1
_K_RESERVED = 2


class TableRow(NamedTuple):
    """One entry of a shared object's process table (see :meth:`SharedObject.table`)."""

    pid: int
    """The holder; 0 for a child whose pid is not known yet, or a handle pickled and not
    yet unpickled."""
    started: int
    """The holder's start time (see :mod:`aioshm._procs`)."""
    reserved_by: int
    """The process that passed (or pickled) handles which were not claimed yet, else 0."""
    vouched_by: int
    """Who vouches for the entry while its pid is not known: the reserving process."""
    vouched_started: int
    """That process's start time."""
    sends: int
    """Send handles the entry holds."""
    receives: int
    """Receive handles the entry holds."""


class WaitCounters(NamedTuple):
    """The shared wait and liveness bookkeeping of one object (all processes)."""

    sleepers: tuple[int, int]
    """Per side: threads registered on the bell and not yet returned, counted as
    registrations plus posts not yet taken (dead processes' registrations removed)."""
    sweeps: int
    """Liveness sweeps done."""
    timed_out: int
    """Sleeps on a bell that ended by timeout rather than by a post."""


def _none_reserved() -> int:
    return 0


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
        self._sleep_entry = -1  # where this process records its sleepers (a guess)
        self._sleep_pid = 0  # ... and this process's pid, then
        self._free_when_awake: set[int] = set()  # entries closed while a thread slept
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

    def _lock_contended(self, result: int) -> None:
        if self._mutex.acquire_contended(result):  # the previous holder died mid-way
            self._repair_locked()
            self.defer(self._sweep_after_owner_died)  # find out who, after

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

    def reserve(self, opened: tuple[int, int], popen: object | None) -> tuple[int, int]:
        """Reserve an entry for a child being started by ``popen`` (or, if ``None``, for
        whichever process unpickles a handle pickled now).

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
        if popen is not None:  # otherwise this process vouches until it is claimed
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
            if procs[base + P_SLEEP] or procs[base + P_SLEEP + 1]:
                # A thread of ours still sleeps, recorded here: the entry goes when
                # it returns, or with this process if it dies first.
                self._free_when_awake.add(entry)
            else:
                self._free_entry_locked(entry)
        if self._ctl[OPEN + side] <= 0:
            self._ring_all_locked(1 - side)

    def _free_entry_locked(self, entry: int) -> None:
        procs = self._procs
        base = entry * PROC_FIELDS
        self._ctl[OPEN] -= procs[base + P_OPEN]
        self._ctl[OPEN + 1] -= procs[base + P_OPEN + 1]
        procs[base + P_OPEN] = procs[base + P_OPEN + 1] = 0
        procs[base + P_SLEEP] = procs[base + P_SLEEP + 1] = 0
        procs[base + P_KIND] = _K_FREE

    def open_handles(self, side: int) -> int:
        """Open handles of ``side`` in all live processes (as last swept)."""
        return max(0, self._ctl[OPEN + side])

    def table(self, sweep: bool = True) -> list[TableRow]:
        """The entries of the process table in use (after a sweep, unless ``sweep`` is
        false: a caller that wants to see dead holders as well)."""
        if sweep:
            self.sweep(force=True)
        return self.locked(self._table_locked)

    def _table_locked(self) -> list[TableRow]:
        procs = self._procs
        rows = []
        for entry in range(MAX_PROCS):
            base = entry * PROC_FIELDS
            kind = procs[base + P_KIND]
            if kind == _K_FREE:
                continue
            rows.append(
                TableRow(
                    procs[base + P_PID],
                    procs[base + P_START],
                    procs[base + P_RES_PID] if kind == _K_RESERVED else 0,
                    procs[base + P_RES_PID],
                    procs[base + P_RES_START],
                    procs[base + P_OPEN],
                    procs[base + P_OPEN + 1],
                )
            )
        return rows

    # ------------------------------------------------------------ liveness

    def sweep(self, force: bool = False) -> bool:
        """Find processes that died and give back what they held.

        Rate-limited for the whole object: unless ``force``, nothing is done if any
        process began a sweep less than :data:`SWEEP_INTERVAL` ago. A process whose
        liveness is unknown counts as alive. Returns ``True`` if anything was reclaimed.
        """
        if not self.locked(self._start_sweep_locked, time.monotonic_ns(), force):
            return False
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
                self._forget_sleepers_locked(entry)
                self._reclaim_locked(entry)
                self._free_entry_locked(entry)
        self._ring_all_locked(SEND)
        self._ring_all_locked(RECV)

    def _forget_sleepers_locked(self, entry: int) -> None:
        """Take a dead process's registrations off the bells: its registrations first,
        then posts made for them that nobody took (posts already made stay for the live
        sleepers, who are fungible: every sleeper of a side waits for the same thing)."""
        ctl, procs = self._ctl, self._procs
        base = entry * PROC_FIELDS
        for side in (SEND, RECV):
            count = procs[base + P_SLEEP + side]
            procs[base + P_SLEEP + side] = 0
            taken = min(count, max(ctl[SLEEPERS + side], 0))
            ctl[SLEEPERS + side] -= taken
            for _ in range(count - taken):
                if not self._bells[side].try_wait():
                    break

    def _start_sweep_locked(self, now: int, force: bool) -> bool:
        """Whether a sweep is due (always, if ``force``); if so, it begins now."""
        ctl = self._ctl
        if not force and now < ctl[SWEPT_AT] + _SWEEP_NS:
            return False
        ctl[SWEPT_AT] = now
        ctl[SWEEPS] += 1
        return True

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
        return time.monotonic_ns() >= self._ctl[SWEPT_AT] + _SWEEP_NS and self.sweep()

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

    def wait(
        self, side: int, timeout: float | None, reserved: Callable[[], int] = _none_reserved
    ) -> int:
        """Sleep until ``side`` may proceed, a bell rings, or ``timeout`` passes.

        Returns how many waiters of ``side`` may proceed beyond ``reserved()`` (already
        woken ones, counted under the mutex each time it checks: as it registers and
        again as it leaves); otherwise :data:`RANG` if a bell woke it, or 0. The caller
        then checks again; a caller that cannot use a bell should :meth:`forward` it.
        It sleeps unless enough is ready to be worth waking for
        (:meth:`_worth_waking_locked`), and a bell's count is held to the same mark;
        after a timeout it counts whatever is ready.

        **The bookkeeping.** ``SLEEPERS + side`` is a count, not a list: a sleeper adds
        one under the mutex; a waker that finds it positive takes one off and posts the
        bell once. So at every instant, the sleepers that registered and have not
        returned number exactly ``SLEEPERS + side`` plus the bell's value (posts not
        yet taken). Sleepers of one side are interchangeable, so it does not matter
        which one takes a post: a sleeper that times out takes a registration off the
        count if one is left, and otherwise the post that was made for it (or for
        another: either way, one sleeper leaves and one token goes). No post is lost
        and none is left over. Each process also records how many of its threads sleep
        (``P_SLEEP`` in its process-table entry), so that the sweep that finds it dead
        takes its registrations off again (:meth:`_forget_sleepers_locked`); without
        that, a dead sleeper's registration would cost a spurious wake-up on every
        later ring, for ever.

        **Who watches.** While everyone sleeps, someone must wake now and then to sweep
        for dead peers, but not everyone, or idle waiting costs ``N`` wake-ups per
        period, each ``N`` processes long. The sleepers take turns: one that registers
        while ``k`` others are registered (on either side) sleeps about ``(k + 1) *``
        :data:`SPACING` (at least :data:`SWEEP_INTERVAL`, at most
        :data:`LONGEST_SLEEP`, jittered by ±50% so that processes started together
        drift apart), so about one sleeper wakes per ``SPACING``, whatever their number,
        and whoever finds a sweep due does it (one per ``SWEEP_INTERVAL`` for the
        object). A sleeper that dies leaves a gap in the turns until the sweep that
        finds it.
        """
        ready, turn, entry = self.locked(self._register_sleeper_locked, side, reserved)
        if ready > 0:
            return ready
        # Jittered (±50%), so that sleepers started together, perhaps to die together,
        # do not keep waking together: the turns spread over the whole cycle.
        limit = min(max(SWEEP_INTERVAL, turn * SPACING) * (0.5 + random.random()), LONGEST_SLEEP)
        rang = self._bells[side].wait(limit if timeout is None else min(limit, timeout))
        ready = self.locked(self._unregister_sleeper_locked, side, (reserved, rang), entry)
        if rang:
            return ready if ready > 0 else RANG
        self.maybe_sweep()
        return ready

    def _register_sleeper_locked(
        self, side: int, reserved: Callable[[], int]
    ) -> tuple[int, int, int]:
        """``(ready, turn, entry)``: a sleeper is registered only if nothing is ready."""
        ctl = self._ctl
        ready = self._worth_waking_locked(side) - reserved()
        if ready > 0:
            return ready, 0, -1
        turn = ctl[SLEEPERS + SEND] + ctl[SLEEPERS + RECV] + 1
        ctl[SLEEPERS + side] += 1  # first the count, then the record (see above)
        return ready, turn, self._record_sleeper_locked(side)

    def _unregister_sleeper_locked(
        self, side: int, outcome: tuple[Callable[[], int], bool], entry: int
    ) -> int:
        """How many waiters of ``side`` may proceed beyond the reserved ones, counted
        as the sleeper leaves: after a bell as a sleeper that registers counts, after a
        timeout whatever is ready."""
        reserved, rang = outcome
        if rang:
            ready = self._worth_waking_locked(side) - reserved()
        else:
            ctl = self._ctl
            ctl[TIMED_OUT] += 1
            if ctl[SLEEPERS + side] > 0:
                ctl[SLEEPERS + side] -= 1
            else:  # a waker took our registration: its post is ours to consume
                self._bells[side].try_wait()
            ready = max(self._ready_locked(side) - reserved(), 0)
        self._unrecord_sleeper_locked(side, entry)
        return ready

    def _record_sleeper_locked(self, side: int) -> int:
        """Count a sleeper of this process in its entry; the entry, or -1 if it has none
        (its registration then cannot be taken back if it dies asleep)."""
        procs = self._procs
        entry, pid = self._sleep_entry, self._sleep_pid
        base = entry * PROC_FIELDS
        if entry < 0 or procs[base + P_KIND] != _K_ACTIVE or procs[base + P_PID] != pid:
            pid, started = _procs.my_identity()
            entry = -1
            for candidate in range(MAX_PROCS):
                base = candidate * PROC_FIELDS
                if (
                    procs[base + P_PID] == pid
                    and procs[base + P_KIND] == _K_ACTIVE
                    and procs[base + P_START] == started
                ):
                    entry = candidate
                    break
            self._sleep_entry, self._sleep_pid = entry, pid
            if entry < 0:
                return -1
        procs[base + P_SLEEP + side] += 1
        return entry

    def _unrecord_sleeper_locked(self, side: int, entry: int) -> None:
        if entry < 0:
            return
        procs = self._procs
        base = entry * PROC_FIELDS
        if procs[base + P_PID] != self._sleep_pid or procs[base + P_SLEEP + side] <= 0:
            return
        procs[base + P_SLEEP + side] -= 1
        if entry in self._free_when_awake and not (
            procs[base + P_SLEEP] or procs[base + P_SLEEP + 1]
        ):
            self._free_when_awake.discard(entry)
            if not (procs[base + P_OPEN] or procs[base + P_OPEN + 1] or self._holds_locked(entry)):
                self._free_entry_locked(entry)

    def wait_counters(self) -> WaitCounters:
        """A snapshot of the shared wait and liveness bookkeeping (for tests and
        diagnostics)."""
        return self.locked(self._wait_counters_locked)

    def _wait_counters_locked(self) -> WaitCounters:
        ctl = self._ctl
        return WaitCounters(
            sleepers=(
                ctl[SLEEPERS + SEND] + self._bells[SEND].value(),
                ctl[SLEEPERS + RECV] + self._bells[RECV].value(),
            ),
            sweeps=ctl[SWEEPS],
            timed_out=ctl[TIMED_OUT],
        )

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
                self.wait(side, None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout} s") from None
                self.wait(side, remaining)


_live_objects: weakref.WeakSet[SharedObject] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for obj in list(_live_objects):
        obj._reset_local()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
