"""Which process owns which handle, under every start method.

A process owns the handles it created and the handles passed to it as arguments of its
``multiprocessing.Process``. Ownership is what keeps a stream open: the stream ends
when no process owns an open send handle.

* **spawn, forkserver**: the parent pickles the ``Process`` object. Pickling a handle
  reserves a process-table entry for the child *in the parent*, before the child
  exists, so that the parent may close its own handle at once without ending the
  stream. The child claims the entry when it unpickles the handle.
* **fork**: nothing is pickled, and the child inherits a copy of every handle. Just
  before the fork, the parent finds the ``Process`` being started (it is a local of
  ``multiprocessing``'s ``Popen._launch`` frame) and reserves entries for the handles in
  its arguments and attributes; the child claims those and treats every other inherited
  handle as not its own.
* **anywhere else** (a ``multiprocessing.Queue``, a ``Pipe``, a pool's task arguments
  and results, a manager proxy, ``anyio.to_process``): pickling a handle reserves an entry
  that the *pickling* process vouches for, and keeps the channel's memory mapped in that
  process until the entry is claimed or expires (:func:`keep_until_claimed`). The
  unpickling process maps the same memory through ``/proc/<pid>/fd/<fd>`` of the pickling
  process (:func:`export_segment`, :func:`import_segment`), or reuses its own mapping, and
  claims the entry. So a pickled handle keeps its side open until it is unpickled, and at
  most until the pickling process exits.
* **exit**: a process that exits normally closes what it owns (``atexit`` in the main
  process, a ``multiprocessing`` finalizer in children). One killed outright is found
  dead by the liveness sweeps of the others.

A small thread, the *keeper*, runs while anything above is in flight: it writes a
child's pid into its reservation as soon as ``Process.start()`` has returned (so a
child killed while starting counts as closed within a sweep, even if the parent never
sweeps), and lets go of the mappings kept for pickled handles once they are claimed. It
exits when nothing is left to watch.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import stat
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterator
from multiprocessing import context, popen_fork, queues, util
from typing import Any, NamedTuple, Protocol

from anyio import BrokenResourceError, ClosedResourceError

from . import _procs
from ._layout import (
    MAX_PROCS,
    P_KIND,
    P_NONCE,
    P_OPEN,
    P_PID,
    P_START,
    PROC_FIELDS,
    UID,
    Segment,
)
from ._shared import _K_ACTIVE, _K_FREE, _K_RESERVED

__all__ = [
    "Owned",
    "Passport",
    "closed_handle_error",
    "export_segment",
    "feeding_a_plain_queue",
    "import_segment",
    "keep_until_claimed",
    "leave_at_exit",
    "merge_into_mine",
    "raise_on_arrival",
    "reserve_for_spawn",
    "track",
    "watch_children",
]


class Owned(Protocol):
    """What a handle offers to the ownership rules."""

    _queue: Any  # the shared object it is a handle of

    def _reserve(self, popen: object) -> object | None:
        """Reserve for a child started by ``popen``; ``None`` if closed or not owned."""

    def _claim(self, reservation: object) -> None:
        """In the child: take ownership of a reservation made by the parent."""

    def _disown(self) -> None:
        """In a forked child: this inherited copy is not the child's."""

    def _close_at_exit(self) -> None:
        """Close at process exit, without a warning."""


_handles: weakref.WeakSet[Any] = weakref.WeakSet()
_fork_claims: list[tuple[Any, object]] = []


def track(handle: Owned) -> None:
    """Register a handle owned by this process."""
    _handles.add(handle)


def reserve_for_spawn(handle: Owned) -> object:
    """Reserve ``handle`` for the child being started; only legal while pickling a
    ``Process`` for spawn or forkserver."""
    popen = context.get_spawning_popen()
    assert popen is not None
    reservation = handle._reserve(popen)
    if reservation is None:
        raise closed_handle_error(type(handle).__name__)
    watch_children(handle._queue)
    return reservation


def closed_handle_error(kind: str) -> ClosedResourceError:
    """The error for pickling a closed handle, saying what to do instead."""
    return ClosedResourceError(
        f"cannot pickle a closed {kind}: it was closed before it was pickled. Pools and "
        "queues pickle later, on a thread of their own, so pass a clone and close your "
        "own handle at once: q.put(tx.clone()); tx.close()"
    )


# ---------------------------------------------------------------- anywhere


class Passport(NamedTuple):
    """How another process of this user finds a channel's memory (picklable)."""

    uid: int  # the segment's random identity (its UID control field)
    pid: int  # the pickling process, which keeps the memory mapped meanwhile
    started: int
    fd: int
    ino: int
    name: str | None


def export_segment(segment: Segment, name: str | None) -> Passport:
    pid, started = _procs.my_identity()
    info = os.fstat(segment.fd)
    return Passport(int(segment.ctl[UID]), pid, started, segment.fd, info.st_ino, name)


def import_segment(passport: Passport, kind: str) -> Segment:
    """Map the memory described by ``passport`` (from ``/proc/<pid>/fd/<fd>``)."""
    gone = BrokenResourceError(
        f"this {kind} was pickled by process {passport.pid}, which exited (or closed the "
        "channel) before it was unpickled here: a pickled handle lives at most as long as "
        "the process that pickled it"
    )
    if not _procs.is_alive(passport.pid, passport.started):
        raise gone
    try:
        fd = os.open(f"/proc/{passport.pid}/fd/{passport.fd}", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise gone from None
    except PermissionError as exc:
        raise PermissionError(
            f"cannot map the memory of this {kind} from process {passport.pid}: "
            f"{exc.strerror}. A handle can be unpickled only by a process of the same "
            "user that may read the other's /proc/<pid>/fd"
        ) from exc
    try:
        info = os.fstat(fd)
        if info.st_ino != passport.ino or not stat.S_ISREG(info.st_mode):
            raise gone  # the descriptor was closed and its number reused
    except BaseException:
        os.close(fd)
        raise
    segment = Segment._attach(fd)  # takes the descriptor over (closes it on failure)
    if int(segment.ctl[UID]) != passport.uid:  # pragma: no cover - inode checked above
        raise gone
    return segment


def merge_into_mine(obj: Any, entry: int) -> int:
    """Fold the fresh entry ``entry`` (just claimed or registered, holding no slot) into
    another entry this process already has, if any; return the entry to use.

    So a process holds one entry per channel however many handles it unpickles or
    connects, and the table is bounded by processes and pickles in flight.
    """
    pid, started = _procs.my_identity()
    procs = obj._procs

    def merge_locked() -> int:
        for other in range(MAX_PROCS):
            base = other * PROC_FIELDS
            if (
                other != entry
                and procs[base + P_KIND] == _K_ACTIVE
                and procs[base + P_PID] == pid
                and procs[base + P_START] == started
            ):
                mine = entry * PROC_FIELDS
                for side in (0, 1):
                    procs[base + P_OPEN + side] += procs[mine + P_OPEN + side]
                    procs[mine + P_OPEN + side] = 0
                procs[mine + P_KIND] = _K_FREE  # the totals under OPEN are unchanged
                return other
        return entry

    return int(obj.locked(merge_locked))


# ---------------------------------------------------------------- the keeper

_keeper_lock = threading.Lock()
_keeper: threading.Thread | None = None
#: Pickled handles not yet claimed: (object, entry, nonce) -> what keeps the memory mapped.
_kept: dict[tuple[int, int, int], tuple[Any, int, int, object]] = {}
_pending_objects: weakref.WeakSet[Any] = weakref.WeakSet()
#: The keeper polls this often at first, backing off to ``_SLOW`` for long waits.
_FAST = 0.005
_SLOW = 0.1


def keep_until_claimed(obj: Any, entry: int, nonce: int, keep: object) -> None:
    """Keep ``keep`` (what maps ``obj``'s memory) alive until the reservation ``(entry,
    nonce)`` of ``obj`` is claimed by the unpickling process, or expires."""
    with _keeper_lock:
        _kept[(id(obj), entry, nonce)] = (obj, entry, nonce, keep)
        _start_keeper_locked()


def watch_children(obj: Any) -> None:
    """Have ``obj``'s reservations for children being started resolved to their pids as
    soon as the pids are known (see the module docstring)."""
    with _keeper_lock:
        _pending_objects.add(obj)
        _start_keeper_locked()


def _start_keeper_locked() -> None:
    global _keeper
    if _keeper is None:
        _keeper = threading.Thread(target=_keep, name="aioshm-keeper", daemon=True)
        _keeper.start()


def _claimed(obj: Any, entry: int, nonce: int) -> bool:
    # Read without the mutex: two aligned 64-bit fields, polled again if stale.
    base = entry * PROC_FIELDS
    procs = obj._procs
    return bool(procs[base + P_KIND] != _K_RESERVED or procs[base + P_NONCE] != nonce)


def feeding_a_plain_queue() -> bool:
    """Whether the caller runs on the feeder thread of a ``multiprocessing.Queue`` that
    drops what it cannot pickle (printing the error), leaving its reader waiting for ever.

    A ``ProcessPoolExecutor``'s queue reports the error to the task's future instead.
    """
    plain: Any = queues.Queue
    feed = plain._feed.__code__
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is feed:
            onerror = frame.f_locals.get("onerror")
            return getattr(onerror, "__func__", onerror) is plain._on_queue_feeder_error
        frame = frame.f_back
    return False


def raise_on_arrival(error: BaseException) -> None:
    """Unpickled in place of a handle that could not be pickled: raise ``error`` there."""
    raise error


def _keep() -> None:
    global _keeper
    interval = _FAST
    while True:
        time.sleep(interval)
        interval = min(_SLOW, interval * 1.25)
        with _keeper_lock:
            objects = list(_pending_objects)
            kept = list(_kept.items())
        for obj in objects:
            with contextlib.suppress(Exception):  # reported by the object's own sweeps
                obj._resolve_pending()
            if not obj._pending:
                _pending_objects.discard(obj)
        done = [key for key, (obj, entry, nonce, _) in kept if _claimed(obj, entry, nonce)]
        with _keeper_lock:
            for key in done:
                _kept.pop(key, None)
            if not _kept and not _pending_objects:
                _keeper = None
                return


# ---------------------------------------------------------------- fork


def _process_being_forked() -> tuple[object, object] | None:
    """``(popen, process)`` if ``multiprocessing`` is forking right now."""
    launch = getattr(getattr(popen_fork.Popen, "_launch", None), "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is launch:
            return frame.f_locals.get("self"), frame.f_locals.get("process_obj")
        frame = frame.f_back  # type: ignore[assignment]
    return None


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.CodeType)


def _reachable(root: object, depth: int = 4) -> Iterator[object]:
    """Objects reachable from ``root`` through containers and instance attributes."""
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        obj, level = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if level >= depth:
            continue
        children: Any
        if isinstance(obj, dict):
            children = [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset):
            children = obj
        elif isinstance(obj, functools.partial):
            children = [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, types.MethodType):
            children = [obj.__self__]
        elif hasattr(obj, "__dict__") and not isinstance(obj, _OPAQUE):
            children = list(vars(obj).values())
        else:
            continue
        stack.extend((child, level + 1) for child in children)


def _before_fork() -> None:
    _fork_claims.clear()
    found = _process_being_forked()
    if found is None or not _handles:
        return
    popen, process = found
    handles = {id(handle): handle for handle in _handles}
    for obj in _reachable(process):
        if id(obj) in handles and handles[id(obj)] is obj:
            reservation = obj._reserve(popen)
            if reservation is not None:
                _fork_claims.append((obj, reservation))


def _after_fork_in_child() -> None:
    global _keeper, _keeper_lock
    _keeper_lock = threading.Lock()
    _keeper = None
    _kept.clear()  # the parent's pickled handles are the parent's to keep
    _pending_objects.clear()
    claims = list(_fork_claims)
    _fork_claims.clear()
    claimed = {id(handle) for handle, _ in claims}
    for handle in list(_handles):
        if id(handle) not in claimed:
            handle._disown()
    for handle, reservation in claims:
        handle._claim(reservation)


def _after_fork_in_parent() -> None:
    for handle, _ in _fork_claims:
        watch_children(handle._queue)
    _fork_claims.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(
        before=_before_fork,
        after_in_child=_after_fork_in_child,
        after_in_parent=_after_fork_in_parent,
    )


# ---------------------------------------------------------------- exit


class Leaving(Protocol):
    def leave(self) -> None:
        """Give back what this process holds of it, at this process's exit."""


#: Other things this process leaves at exit (named primitives).
_leaving: weakref.WeakSet[Any] = weakref.WeakSet()


def leave_at_exit(obj: Leaving) -> None:
    """Have ``obj.leave()`` called when this process exits normally (as handles are
    closed then), while ``obj`` lives."""
    _leaving.add(obj)


def _close_all() -> None:
    for handle in list(_handles):
        handle._close_at_exit()
    for obj in list(_leaving):
        obj.leave()


class _ExitHook:
    """Keeps the after-fork registration alive (it is held weakly)."""


_exit_hook = _ExitHook()


def _register_exit_finalizer(_: object = None) -> None:
    # A multiprocessing child leaves through os._exit(): atexit does not run there, but
    # multiprocessing's own finalizers do. Its registry is cleared when a child starts,
    # hence the re-registration after every start.
    util.Finalize(None, _close_all, exitpriority=50)


atexit.register(_close_all)
_register_exit_finalizer()
util.register_after_fork(_exit_hook, _register_exit_finalizer)
