"""Cancel points without a yield: is a cancellation pending for the calling task?

Every async call of aioshm is a cancel point, as in trio and in anyio's memory streams:
a call made while its task has a cancellation pending raises it and does nothing. A
checkpoint (a yield to the event loop) on every call would give that, but it costs
about as much as the whole operation (3.5 µs on asyncio, 5.5 µs on trio). So each call
first asks :func:`cancel_pending`, which looks without yielding, and yields only when
the answer is yes (the yield then raises the cancellation) or on one call in
:data:`YIELD_EVERY`, its schedule point for fairness to the other tasks of its loop.

What it sees, on the calling task:

- **trio** (and anyio on trio): the task's effective cancel status, as
  ``trio.lowlevel.checkpoint_if_cancelled`` reads it, and a pending ``KeyboardInterrupt``
  of the main task.
- **anyio cancel scopes on asyncio**: a cancelled scope enclosing the task up to the
  first shielded one, as ``anyio.lowlevel.checkpoint_if_cancelled`` reads it (a scope
  whose deadline has passed is cancelled on entering it, so ``move_on_after(0)``
  counts).
- **native asyncio**: a ``Task.cancel()`` not yet delivered (the task was cancelled
  while it ran), and the expiry callback of an ``asyncio.timeout()`` (or of
  ``asyncio.wait_for`` on Python 3.12+) that is already queued on the loop, as
  ``asyncio.timeout(0)`` queues it. The queue is read on asyncio's own event loop
  only; on another loop (uvloop), such a timeout is seen at the next schedule point.
  When more than :data:`READY_SCAN_LIMIT` callbacks are queued, the call yields
  instead of reading them all.

A deadline that passes while the task runs without yielding is seen, as in trio, once
the event loop has processed it: at the call's next schedule point or wait.
"""

from __future__ import annotations

import asyncio.tasks
import asyncio.timeouts
import sys
from asyncio import _get_running_loop, current_task
from collections.abc import Callable
from typing import Any, Final
from weakref import ref

__all__ = ["READY_SCAN_LIMIT", "YIELD_EVERY", "cancel_pending"]

#: A call that can proceed at once yields to the event loop once in this many calls.
YIELD_EVERY: Final = 16
#: Past this many callbacks queued on an asyncio loop, :func:`cancel_pending` answers
#: yes (the caller yields) rather than scanning them for an expired timeout.
READY_SCAN_LIMIT: Final = 32

#: What an ``asyncio.timeout()`` queues on its loop when it expires.
_ON_TIMEOUT: Any = getattr(asyncio.timeouts.Timeout, "_on_timeout", None)

_current_task: Callable[[Any], Any] = current_task  # a C function from Python 3.12
if sys.version_info < (3, 12):  # Python code there: read its dict
    _current_task = getattr(asyncio.tasks, "_current_tasks", {}).get

_anyio_states: Any = None  # anyio's asyncio backend's task states, once it is imported
_trio_context: Any = None  # trio's per-thread run context, once trio is imported


def _no_task() -> object:
    return None


# The last task found in them, and its state (a weak reference: a task is not kept alive).
_last_task: Callable[[], object] = _no_task
_last_state: Any = None


def cancel_pending() -> bool:  # noqa: PLR0911 (one early return per source)
    """Whether the calling task should yield now because a cancellation is (or may be)
    pending for it; cheap, and never yields itself.

    A ``True`` is followed by a checkpoint, which raises the cancellation if there is
    one (and is a harmless schedule point if there is not).
    """
    loop = _get_running_loop()
    if loop is None:
        return _trio_cancel_pending()
    task = _current_task(loop)
    if task is None:
        return False
    try:
        if task._must_cancel:  # Task.cancel() while the task runs
            return True
    except AttributeError:  # a task of another kind than asyncio's
        pass
    state = _last_state if _last_task() is task else _anyio_state(task)
    if state is not None:
        scope = state.cancel_scope
        while scope is not None:
            if scope._cancel_called:
                return True
            if scope._shield:
                break
            scope = scope._parent_scope
    try:
        ready = loop._ready  # type: ignore[attr-defined]
    except AttributeError:  # not asyncio's own loop
        return False
    if ready:
        if len(ready) > READY_SCAN_LIMIT:
            return True
        for handle in ready:
            callback = handle._callback
            if (
                getattr(callback, "__func__", None) is _ON_TIMEOUT
                and callback.__self__._task is task
            ):
                return True
    return False


def _anyio_state(task: object) -> Any:
    """anyio's state of an asyncio task (its cancel scope), if it has one; the last
    found is kept, with the task, for the next call."""
    global _anyio_states, _last_task, _last_state
    if _anyio_states is None:  # anyio's asyncio backend is imported on first use
        module = sys.modules.get("anyio._backends._asyncio")
        if module is None:
            return None
        _anyio_states = module._task_states.data  # a WeakKeyDictionary's own dict
    state = _anyio_states.get(ref(task))
    if state is not None:  # it stays the task's for the task's life
        _last_task, _last_state = ref(task), state
    return state


def _trio_cancel_pending() -> bool:
    global _trio_context
    if _trio_context is None:
        if "trio" not in sys.modules:  # no trio run can be in progress
            return False
        # What trio.lowlevel.current_task() reads, without its frame.
        _trio_context = sys.modules["trio._core._run"].GLOBAL_RUN_CONTEXT
    try:
        task = _trio_context.task
    except AttributeError:  # no trio run in this thread
        return False
    if task._cancel_status.effectively_cancelled:
        return True
    runner = task._runner
    return bool(task is runner.main_task and runner.ki_pending)
