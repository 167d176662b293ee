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
* **exit**: a process that exits normally closes what it owns (``atexit`` in the main
  process, a ``multiprocessing`` finalizer in children). One killed outright is found
  dead by the liveness sweeps of the others.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import types
import weakref
from collections.abc import Iterator
from multiprocessing import context, popen_fork, util
from typing import Any, Protocol

__all__ = ["Owned", "reserve_for_spawn", "track"]


class Owned(Protocol):
    """What a handle offers to the ownership rules."""

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
    if popen is None:
        raise RuntimeError(
            f"{type(handle).__name__} can be handed to another process only as an argument "
            "of multiprocessing.Process (pickling it otherwise, e.g. through a Queue, is "
            "not supported)"
        )
    reservation = handle._reserve(popen)
    if reservation is None:
        raise RuntimeError(f"cannot hand a closed {type(handle).__name__} to a child process")
    return reservation


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
    claims = list(_fork_claims)
    _fork_claims.clear()
    claimed = {id(handle) for handle, _ in claims}
    for handle in list(_handles):
        if id(handle) not in claimed:
            handle._disown()
    for handle, reservation in claims:
        handle._claim(reservation)


def _after_fork_in_parent() -> None:
    _fork_claims.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(
        before=_before_fork,
        after_in_child=_after_fork_in_child,
        after_in_parent=_after_fork_in_parent,
    )


# ---------------------------------------------------------------- exit


def _close_all() -> None:
    for handle in list(_handles):
        handle._close_at_exit()


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
