"""The hand-off between a caller (asyncio, trio or a plain thread) and the bridge loop.

A :class:`Call` is one operation that the bridge loop performs for one caller. Its
states make cancellation atomic:

``PENDING``    nothing has been done: a cancelled caller *abandons* the call at once,
               and the bridge, which checks before acting, does nothing for it.
``ATTEMPT``    the bridge has passed a point of no return (a publish is on the wire): a
               cancelled caller waits for the outcome, shielded, and the cancellation
               is deferred if the operation succeeded.
``DONE``       the bridge has a result for the caller: it is the caller's.
``FAILED``     the operation raised; the caller gets the exception.
``ABANDONED``  the caller left before the bridge acted.

The bridge moves ``PENDING -> ATTEMPT`` with :meth:`begin`, back with :meth:`retreat`
(the attempt is known to have had no effect), and settles with :meth:`settle`,
:meth:`fail` or :meth:`deliver` (``PENDING -> DONE`` in one step). Every transition is
made under one lock, which is what makes "cancelled" and "done" exclusive.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
from anyio import get_cancelled_exc_class
from anyio.lowlevel import EventLoopToken, current_token

__all__ = ["Call"]

T = TypeVar("T")

PENDING, ATTEMPT, DONE, FAILED, ABANDONED = range(5)


def _notify_loop(token: EventLoopToken, event: anyio.Event) -> Callable[[], None]:
    def notify() -> None:
        with contextlib.suppress(anyio.RunFinishedError, RuntimeError):  # the caller's loop is gone
            token.backend_class.run_sync_soon(event.set, (), token.native_token)

    return notify


class Call(Generic[T]):
    """One operation the bridge performs for one caller (see the module docstring)."""

    __slots__ = ("_cancel_requested", "_error", "_lock", "_notify", "_result", "state")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = PENDING
        self._result: T | None = None
        self._error: BaseException | None = None
        self._notify: Callable[[], None] | None = None
        self._cancel_requested = False

    # ------------------------------------------------------------ bridge side

    @property
    def abandoned(self) -> bool:
        """The caller has left (the bridge should drop the call)."""
        return self.state == ABANDONED

    def begin(self) -> bool:
        """Pass a point of no return: ``False`` if the caller has left (do nothing)."""
        with self._lock:
            if self.state != PENDING:
                return False
            self.state = ATTEMPT
            return True

    def retreat(self) -> bool:
        """The attempt had no effect: back to ``PENDING``; ``False`` if the caller
        asked to cancel meanwhile (it is told, and the call is over)."""
        with self._lock:
            if self._cancel_requested:
                self.state = ABANDONED
                notify = self._notify
            else:
                self.state = PENDING
                return True
        if notify is not None:
            notify()
        return False

    def interrupt(self, exc: BaseException) -> None:
        """The bridge's task doing the work was cancelled (the link is closing): the
        caller's own cancellation is recorded by :meth:`wait`, not here."""

    def _finish(self, state: int, result: T | None, error: BaseException | None) -> bool:
        with self._lock:
            if self.state == ABANDONED:
                return False
            self.state = state
            self._result = result
            self._error = error
            notify = self._notify
        if notify is not None:
            notify()
        return True

    def settle(self, result: T) -> None:
        """The operation succeeded with ``result``."""
        self._finish(DONE, result, None)

    def fail(self, error: BaseException) -> bool:
        """The operation raised ``error``; ``False`` if the caller had left."""
        return self._finish(FAILED, None, error)

    def deliver(self, result: T) -> bool:
        """Hand ``result`` to a caller still waiting: ``False`` (and nothing done) if
        it has left."""
        return self._finish(DONE, result, None)

    # ------------------------------------------------------------ caller side

    def _outcome(self) -> T:
        if self.state == FAILED:
            assert self._error is not None
            raise self._error
        return self._result  # type: ignore[return-value]

    def _leave(self) -> bool:
        """The caller is cancelled: ``True`` if it may raise at once (nothing was done,
        or the operation failed); ``False`` if it must wait for an attempt's outcome,
        or take the result (the cancellation is deferred)."""
        with self._lock:
            state = self.state
            if state == PENDING:
                self.state = ABANDONED
                return True
            if state == ATTEMPT:
                self._cancel_requested = True
                return False
        return state != DONE

    async def wait(self) -> T:
        """Wait for the outcome, from an asyncio or trio task.

        Cancellation: if cancelled before the bridge acted, nothing was done; during an
        attempt, the outcome is awaited, shielded: a success is returned (the
        cancellation is deferred to the next checkpoint) and a failure gives way to the
        cancellation.
        """
        event = anyio.Event()
        with self._lock:
            ready = self.state in (DONE, FAILED)
            if not ready:
                self._notify = _notify_loop(current_token(), event)
        if ready:
            return self._outcome()
        try:
            await event.wait()
        except BaseException:
            if self._leave():
                raise
            await _wait_shielded(event)
            if self.state == ABANDONED:
                raise
            if self._leave():
                raise
        return self._outcome()

    def wait_blocking(self, timeout: float | None) -> T:
        """Wait for the outcome from a thread with no event loop.

        :raises TimeoutError: not done in ``timeout`` seconds; as for a cancellation,
            nothing was done then
        """
        event = threading.Event()
        with self._lock:
            ready = self.state in (DONE, FAILED)
            if not ready:
                self._notify = event.set
        if ready:  # settled before the notification could be registered
            return self._outcome()
        if not event.wait(timeout) and self.state not in (DONE, FAILED):
            if self._leave():
                raise TimeoutError(f"not done within {timeout} s (nothing was done)")
            event.wait()
            if self.state == ABANDONED or self._leave():
                raise TimeoutError(f"not done within {timeout} s (nothing was done)")
        return self._outcome()


async def _wait_shielded(event: anyio.Event) -> None:
    """Wait for ``event`` whatever happens: native asyncio cancellation pierces anyio's
    shields, so it is caught and the wait resumed."""
    with anyio.CancelScope(shield=True):
        while True:
            try:
                await event.wait()
                return
            except get_cancelled_exc_class():
                continue
