"""Layer 5: the public handles: :func:`open_channel`, :class:`SendChannel`,
:class:`ReceiveChannel`.

Each operation has a non-blocking core (``*_nowait``) that does all or nothing, an async
form that waits through the wait bridge (layer 3) when the core would block, and a
blocking form (``*_blocking``) for code with no event loop. Messages are encoded
(layer 4) before anything is taken from the channel, so a bad message fails with
nothing sent and nothing held.

**Cancellation.** An async operation either completes and returns, or raises the
cancellation and did not happen: the cancellation points are the start of the call and
the waits before the operation, never the operation itself. This holds for anyio cancel
scopes, trio, and native asyncio cancellation (``Task.cancel()``, ``asyncio.timeout``,
``asyncio.wait_for``). Every async call is a cancel point, as in trio: a call made
while its task has a cancellation pending raises it and does nothing, even if it could
proceed at once (see :mod:`aioshm._checkpoint` for how that is seen without a yield).

**Scheduling.** An operation that can proceed at once never touches a thread. It yields
to the event loop on one call in :data:`~aioshm._checkpoint.YIELD_EVERY` (a checkpoint,
taken *before* the operation), so a task sending in a loop into a channel that never
fills still lets the other tasks of its loop run, without paying for a checkpoint on
every message.
"""

from __future__ import annotations

import functools
import numbers
import os
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from multiprocessing import context
from types import TracebackType
from typing import Any, Generic, NamedTuple, NoReturn, Self, TypeVar, cast

if sys.version_info >= (3, 13):
    from typing import TypeVar as DefaultTypeVar
else:
    from typing_extensions import TypeVar as DefaultTypeVar

import numpy as np
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.lowlevel import checkpoint

from . import _names, _ownership
from ._checkpoint import YIELD_EVERY, cancel_pending
from ._closing import Closing
from ._codec import Message, copy_into, decode, encode, loan_layout, too_large_advice, view
from ._layout import HEADER_RESERVE, UID
from ._posix import Reentered, supported
from ._shared import RECV, SEND
from ._slotqueue import CorruptMessage, SlotQueue
from ._wait import Hub

__all__ = [
    "ChannelStatistics",
    "HandleHolder",
    "ReceiveChannel",
    "SendChannel",
    "connect_receive",
    "connect_send",
    "open_channel",
]

#: The item type of :class:`open_channel`: ``open_channel[int](...)`` gives ``int``
#: handles, and a plain ``open_channel(...)`` gives ``Any`` ones, as an untyped
#: channel would (under ``mypy --strict`` too).
T = DefaultTypeVar("T", default=Any)
T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)
Array = np.ndarray[Any, np.dtype[Any]]


class ChannelStatistics(NamedTuple):
    """A snapshot of a channel, in the spirit of anyio's ``MemoryObjectStreamStatistics``.

    Counts of handles are over every live process; counts of tasks are of this process.
    """

    current_buffer_used: int
    """Messages published and not yet received."""
    max_buffer_size: int
    """Number of slots: messages that can be in flight at once."""
    open_send_streams: int
    """Open send handles, in all processes."""
    open_receive_streams: int
    """Open receive handles, in all processes."""
    tasks_waiting_send: int
    """Tasks and threads of this process waiting to send."""
    tasks_waiting_receive: int
    """Tasks and threads of this process waiting to receive."""
    free_slots: int
    """Slots free to send into."""
    slots_in_use: int
    """Slots held outside the queue: loans, views, large copies in progress."""
    max_message_size: int
    """The largest encoded message a slot holds, in bytes."""
    reclaimed_slots: int
    """Slots taken back from processes that died holding them (their message unsent)."""
    redelivered_messages: int
    """Messages queued again because the process reading them died."""
    dropped_messages: int = 0
    """Messages taken off the channel because they could not be received (decoding
    failed, or the message was corrupt); each raised :class:`aioshm.MessageDropped` in
    the receiver that took it."""


class HandleHolder(NamedTuple):
    """A process holding handles to a channel: a row of :meth:`SendChannel.holders`."""

    pid: int
    """The process; 0 for a child being started whose pid is not known yet."""
    send_handles: int
    """Open send handles it holds."""
    receive_handles: int
    """Open receive handles it holds."""
    reserved_by: int | None
    """``None`` for a process that holds its handles; for handles passed to a child that
    has not taken them yet (it is still starting), the pid of the process that passed
    them."""


class _Channel:
    """One process's view of a channel: the shared queue and this process's hubs."""

    def __init__(self, queue: SlotQueue) -> None:
        self.queue = queue
        self.hubs = (Hub(queue, SEND), Hub(queue, RECV))
        self.blocking = [0, 0]
        self.local_handles = 0
        _channels.add(self)
        _by_uid[int(queue.segment.ctl[UID])] = self

    @staticmethod
    def lookup(uid: int) -> _Channel | None:
        """This process's view of the channel whose segment has identity ``uid``."""
        return _by_uid.get(uid)

    def reset_after_fork(self) -> None:
        for hub in self.hubs:
            hub.reset_after_fork()
        self.blocking = [0, 0]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Channel, (self.queue,))

    def opened(self) -> None:
        self.local_handles += 1

    def closed(self, finalizing: bool = False) -> None:
        """A handle of this process closed; the last one lets the hub threads exit.

        ``finalizing``: called from a finalizer, which may run inside a hub's own locked
        section on this thread (see :meth:`Hub.close`).
        """
        self.local_handles -= 1
        if self.local_handles <= 0:
            for hub in self.hubs:
                hub.close(blocking=not finalizing)


_channels: weakref.WeakSet[_Channel] = weakref.WeakSet()
#: One view per channel and process: a handle unpickled or connected by name in a
#: process that already maps the channel (or inherited it through fork) shares it.
_by_uid: weakref.WeakValueDictionary[int, _Channel] = weakref.WeakValueDictionary()


def _reset_channels_in_child() -> None:
    for channel in list(_channels):
        channel.reset_after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_channels_in_child)


class _Handle(Closing):
    """What send and receive handles share: ownership, closing, statistics."""

    _side: int

    def __init__(self, channel: _Channel, entry: int, owned: bool = True) -> None:
        self._channel = channel
        self._queue = channel.queue
        self._hub = channel.hubs[self._side]
        self._entry = entry
        self._closed = False
        self._owned = owned
        self._adopted = False  # pickled or unpickled outside a Process start: closed
        # silently when collected (a pool's task arguments are beyond the user's reach)
        self._lost = False
        self._usable = owned
        self._ticks = 0
        self._limit = channel.queue.max_message_size
        channel.opened()
        _ownership.track(self)

    # -------------------------------------------------------------- state checks

    def _raise_unusable(self) -> NoReturn:
        name = type(self).__name__
        if self._closed:
            raise ClosedResourceError(f"this {name} has been closed")
        if self._lost:
            raise BrokenResourceError(
                f"this {name} was handed to this process, but the reservation made for it "
                "when it was pickled expired first: the process that pickled it exited "
                "before this one unpickled it (or this pickle was unpickled once already)"
            )
        raise ClosedResourceError(
            f"this {name} was inherited through fork but not passed to this process: pass "
            "it as an argument of multiprocessing.Process to use it in a child process"
        )

    async def _tick(self) -> None:
        """The cancel point and fairness yield that begins every async operation
        (inlined in the hottest paths): see :mod:`aioshm._checkpoint`."""
        self._ticks += 1
        if self._ticks >= YIELD_EVERY or cancel_pending():
            self._ticks = 0
            await checkpoint()

    # -------------------------------------------------------------- lifecycle

    def clone(self) -> Self:
        """Another handle to the same side of the channel, closed independently.

        The side stays open until every clone, in every process, is closed. A clone is
        owned by the process that made it: passing it to a child process gives the child
        a handle of its own, and the parent must still close its clone.

        :raises anyio.ClosedResourceError: this handle is closed, or is not this
            process's (see :meth:`SendChannel.send_nowait`)
        """
        if not self._usable:
            self._raise_unusable()
        self._queue.add_handle(self._entry, self._side)
        return type(self)(self._channel, self._entry)

    def close(self) -> None:
        """Close this handle. Idempotent.

        Tasks and threads of this process blocked on this handle get
        ``ClosedResourceError``. Closing the last send handle in all processes ends the
        stream for receivers (after what is buffered); closing the last receive handle
        breaks the channel for senders.
        """
        if self._closed:
            return
        self._retire()
        self._hub.wake_tagged(self)
        if self._channel.blocking[self._side]:
            self._queue.wake_all(self._side)
        self._channel.closed()

    def _retire(self) -> None:
        """Mark this handle closed and, if it was this process's, stop counting it."""
        self._closed = True
        self._usable = False
        if self._owned:
            self._release_ownership()

    def _release_ownership(self) -> None:
        self._owned = False
        try:
            self._queue.drop_handle(self._entry, self._side)
        except Reentered:  # a finalizer inside this thread's critical section
            self._queue.defer(functools.partial(self._queue.drop_handle, self._entry, self._side))

    def __del__(self) -> None:
        if getattr(self, "_owned", False) and not self._closed:
            self._retire()  # first: the warning may be turned into an error
            self._channel.closed(finalizing=True)
            if self._adopted:
                return  # the documented way for a task's handle to be closed
            warnings.warn(
                f"unclosed {self!r}: close it, or use it as a context manager",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    def statistics(self) -> ChannelStatistics:
        """A snapshot of the channel (see :class:`ChannelStatistics`).

        **How it differs from anyio's memory streams.** anyio hands an item to a waiting
        task synchronously: after ``receive_nowait()`` frees room, a waiting sender's item
        is already in the buffer and ``tasks_waiting_send`` has dropped. Here the waiter
        may be in another process, so it cannot be handed a slot: it is woken and takes
        one itself when it next runs. Until then ``current_buffer_used`` has dropped and
        the waiter is still counted in ``tasks_waiting_send`` (likewise for a receiver
        woken by ``send_nowait()``, in ``tasks_waiting_receive``). Counts of tasks are of
        this process; counts of handles are of every process.
        """
        self._queue.maybe_sweep()
        counters = self._queue.counters()
        send_hub, recv_hub = self._channel.hubs
        return ChannelStatistics(
            current_buffer_used=counters.buffered,
            max_buffer_size=counters.capacity,
            open_send_streams=counters.open_send,
            open_receive_streams=counters.open_receive,
            tasks_waiting_send=send_hub.waiting + self._channel.blocking[SEND],
            tasks_waiting_receive=recv_hub.waiting + self._channel.blocking[RECV],
            free_slots=counters.free,
            slots_in_use=counters.writing + counters.reading,
            max_message_size=self._queue.max_message_size,
            reclaimed_slots=counters.reclaimed,
            redelivered_messages=counters.redelivered,
            dropped_messages=counters.dropped,
        )

    def holders(self) -> list[HandleHolder]:
        """Which processes hold handles to this channel, and how many of each side.

        One row per process, this one included, ordered by pid; processes found dead
        are swept out first. The answer to "why does my ``async for`` never end?": a row
        with ``send_handles`` greater than 0 is a process keeping the stream open. It
        works on any handle, open or closed, of the channel.
        """
        counts: dict[tuple[int, int | None], list[int]] = {}
        for holder in self._queue.table():
            if holder.sends or holder.receives:
                row = counts.setdefault((holder.pid, holder.reserved_by or None), [0, 0])
                row[0] += holder.sends
                row[1] += holder.receives
        return [
            HandleHolder(pid, sends, receives, reserved_by)
            for (pid, reserved_by), (sends, receives) in sorted(
                counts.items(), key=lambda item: (item[0][0], item[0][1] or 0)
            )
        ]

    def _block(self, attempt: Any, timeout: float | None) -> Any:
        blocking = self._channel.blocking
        blocking[self._side] += 1
        try:
            return self._queue.block(self._side, attempt, timeout)
        finally:
            blocking[self._side] -= 1

    # -------------------------------------------------------------- ownership

    def __reduce__(self) -> tuple[Any, ...]:
        if context.get_spawning_popen() is not None:  # an argument of Process
            return (_rebuild, (type(self), self._channel, _ownership.reserve_for_spawn(self)))
        kind = type(self).__name__
        if not self._usable:
            try:
                if self._closed:
                    raise _ownership.closed_handle_error(kind)
                self._raise_unusable()
            except (ClosedResourceError, BrokenResourceError) as error:
                if _ownership.feeding_a_plain_queue():
                    # That queue would print the error and drop the item, and its
                    # reader would wait for ever: let the reader's get() raise it.
                    return (_ownership.raise_on_arrival, (error.with_traceback(None),))
                raise
        # A pool or queue holds this object until it is done with it, beyond the user's
        # reach: once it has been pickled, it is closed silently when collected.
        self._adopted = True
        queue = self._queue
        try:
            entry, nonce = queue.reserve((1, 0) if self._side == SEND else (0, 1), None)
        except RuntimeError as exc:  # the process table is full
            raise RuntimeError(
                f"cannot pickle this {kind}: {exc}, counting handles pickled and not yet "
                "unpickled. Submit tasks that carry handles in smaller batches"
            ) from exc
        passport = _ownership.export_segment(queue.segment, getattr(queue, "name", None))
        _ownership.keep_until_claimed(queue, entry, nonce, self._channel)
        return (_adopt, (type(self), passport, entry, nonce))

    def _reserve(self, popen: object) -> tuple[int, int] | None:
        if not self._usable:
            return None
        opened = (1, 0) if self._side == SEND else (0, 1)
        return self._queue.reserve(opened, popen)

    def _claim(self, reservation: object) -> None:
        entry, nonce = cast(tuple[int, int], reservation)
        self._entry = entry
        self._owned = self._usable = self._queue.claim_reservation(entry, nonce)
        self._lost = not self._owned
        self._closed = False

    def _disown(self) -> None:
        self._owned = self._usable = False

    def _close_at_exit(self) -> None:
        if self._owned and not self._closed:
            self._retire()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._owned else "not owned"
        queue = self._queue
        return (
            f"<{type(self).__name__} {state} capacity={queue.capacity} "
            f"max_message_size={queue.max_message_size}>"
        )


def _rebuild(cls: type[_Handle], channel: _Channel, reservation: tuple[int, int]) -> _Handle:
    handle = cls(channel, reservation[0], owned=False)
    handle._claim(reservation)
    return handle


def _adopt(cls: type[_Handle], passport: _ownership.Passport, entry: int, nonce: int) -> _Handle:
    """Unpickle a handle pickled outside a ``Process`` start (see ``_ownership``)."""
    channel = _Channel.lookup(passport.uid)
    if channel is None:
        try:
            segment = _ownership.import_segment(passport, cls.__name__)
        except PermissionError:
            # /proc/<pid>/fd closed to us (a sandbox, say): a named channel is
            # reachable by its name as well.
            named = _names.open_existing(passport.name) if passport.name else None
            if named is None or int(named.segment.ctl[UID]) != passport.uid:
                raise
            segment = named.segment
        channel = _Channel(_names.queue_for(segment, passport.name))
    handle = cls(channel, entry, owned=False)
    handle._claim((entry, nonce))
    if handle._owned:
        handle._entry = _ownership.merge_into_mine(channel.queue, entry)
    handle._adopted = True
    return handle


def _note_partial(exc: BaseException, sent: int) -> None:
    exc.aioshm_items_sent = sent  # type: ignore[attr-defined]
    exc.add_note(f"aioshm: {sent} item(s) of the batch were sent before this")


def items_sent(exc: BaseException) -> int:
    """How many items of a batch :meth:`SendChannel.send_many` sent before ``exc``.

    ``exc`` may be the exception that interrupted the batch (a cancellation, say) or one
    raised in its place: the ``TimeoutError`` of ``asyncio.timeout``,
    ``asyncio.wait_for`` or ``anyio.fail_after`` carries it along ``__cause__`` or
    ``__context__``, which are followed. 0 means that the batch did not happen at all.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        sent = getattr(current, "aioshm_items_sent", None)
        if sent is not None:
            return int(sent)
        current = current.__cause__ or current.__context__
    return 0


class SendChannel(_Handle, ObjectSendStream[T_contra], Generic[T_contra]):
    """The sending end of a channel. Obtain one from :func:`open_channel` or
    :func:`connect_send`.

    Pass it to other processes as an argument of ``multiprocessing.Process``, or in
    anything else ``multiprocessing`` pickles (a pool's task, a ``Queue``, a ``Pipe``):
    each process it is passed to owns a handle of its own, and closes it when it exits;
    the one you passed stays yours to close. Pools and queues pickle later, on a thread
    of their own: pass ``tx.clone()`` and close your own at once. It is an
    ``anyio.abc.ObjectSendStream``, and a context manager, sync or async, that closes it.

    Pickling it raises ``ClosedResourceError`` if it is closed.
    """

    _side = SEND

    def _put(self, message: Message) -> None:
        if not self._usable:
            self._raise_unusable()
        self._queue.try_put(self._entry, message)

    def send_nowait(self, item: T_contra) -> None:
        """Send ``item`` if a slot is free, without waiting.

        :raises anyio.WouldBlock: every slot is taken (nothing was sent)
        :raises anyio.ClosedResourceError: this handle is closed, or this process only
            inherited it through ``fork`` instead of being passed it as a ``Process``
            argument
        :raises anyio.BrokenResourceError: no receive handle is open in any process
        :raises ValueError: ``item`` encodes to more than ``max_message_size`` bytes
        :raises TypeError: ``item`` cannot be pickled

        Whatever it raises, nothing was sent.
        """
        if not self._usable:
            self._raise_unusable()
        self._queue.try_put(self._entry, encode(item, self._limit))

    async def send(self, item: T_contra) -> None:
        """Send ``item``, waiting for a free slot if there is none.

        Raises as :meth:`send_nowait` does (but never ``WouldBlock``), including
        ``ClosedResourceError`` if this handle is closed while the call waits, and
        ``BrokenResourceError`` if the last receive handle closes meanwhile.

        Cancellation: the call is a cancel point, and so is the wait for a slot; if
        cancelled, the item was not sent, and nothing is held for it. A call that does
        not have to wait yields to the event loop (a schedule point) only once in 16
        calls, but always raises a cancellation already pending when it is made.
        """
        self._ticks += 1
        if self._ticks >= YIELD_EVERY or cancel_pending():
            self._ticks = 0
            await checkpoint()
        if not self._usable:
            self._raise_unusable()
        message = encode(item, self._limit)
        try:
            self._queue.try_put(self._entry, message)
            return
        except WouldBlock:
            pass  # wait outside the handler: nothing raised later chains to WouldBlock
        await self._hub.retry(functools.partial(self._put, message), self)

    def send_blocking(self, item: T_contra, timeout: float | None = None) -> None:
        """Send ``item`` from code with no event loop, waiting up to ``timeout`` seconds.

        :raises TimeoutError: no slot became free in time (nothing was sent)

        Otherwise raises as :meth:`send_nowait`, including ``ClosedResourceError`` if
        another thread closes this handle while the call waits. Do not call it from an
        event loop's thread: it blocks the thread.
        """
        if not self._usable:
            self._raise_unusable()
        self._block(functools.partial(self._put, encode(item, self._limit)), timeout)

    async def send_many(self, items: Iterable[T_contra]) -> None:
        """Send every item, in order, taking one locked round for as many as fit.

        Every item is encoded first, so a bad item (``ValueError``, ``TypeError``) fails
        the batch with nothing sent. Otherwise raises as :meth:`send`.

        Cancellation: the batch can only be cancelled when it starts (then nothing was
        sent) and while it waits for room. If that happens before the first round,
        nothing was sent. Otherwise the items of the
        rounds already done stay sent (published messages cannot be recalled) and the
        cancellation carries their number: see :func:`aioshm.items_sent`. So does any
        other exception that interrupts the batch between rounds (the channel broken or
        closed while it waits).
        """
        await self._tick()
        batch = self._encode_batch(items)
        sent = 0
        try:
            while sent < len(batch):
                try:
                    sent += self._put_many(batch, sent)
                    continue
                except WouldBlock:
                    pass
                sent += await self._hub.retry(functools.partial(self._put_many, batch, sent), self)
        except BaseException as exc:
            if sent:
                _note_partial(exc, sent)
            raise

    def send_many_blocking(self, items: Iterable[T_contra], timeout: float | None = None) -> None:
        """The blocking form of :meth:`send_many`, for code with no event loop: waits
        in the calling thread, up to ``timeout`` seconds in all.

        :raises TimeoutError: the batch did not all fit in time; the items of the rounds
            already done stay sent, and the exception carries their number (see
            :func:`aioshm.items_sent`)

        Otherwise raises as :meth:`send_many`.
        """
        batch = self._encode_batch(items)
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = 0
        try:
            while sent < len(batch):
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    sent += self._block(functools.partial(self._put_many, batch, sent), left)
                except TimeoutError:
                    raise TimeoutError(f"timed out after {timeout} s") from None
        except BaseException as exc:
            if sent:
                _note_partial(exc, sent)
            raise

    def _encode_batch(self, items: Iterable[T_contra]) -> list[Message]:
        """Every item encoded, before anything is sent: a bad one fails the batch."""
        if not self._usable:
            self._raise_unusable()
        limit = self._limit
        return [encode(item, limit) for item in items]

    def _put_many(self, batch: Sequence[Message], start: int) -> int:
        if not self._usable:
            self._raise_unusable()
        return self._queue.try_put_many(self._entry, batch, start)

    def send_loan(self, shape: int | Sequence[int], dtype: Any = np.float64) -> _Loan:
        """Loan a free slot as a writable array to fill in place: zero-copy send.

        ``async with tx.send_loan(shape, dtype) as buf:`` waits like :meth:`send` for a
        free slot and yields a C-contiguous array that lies in the slot itself. On a
        normal exit the array is published as one message; on an exception or a
        cancellation the slot is returned unpublished and nothing is sent.

        While a loan is held, other senders and receivers carry on: the slot is simply
        out of the pool. Do not use ``buf`` after the block: it is made read-only on
        exit, so writes raise ``ValueError``, but reads see whatever the slot holds
        later.

        Views derived from ``buf`` (``buf[:]``, ``buf.reshape(...)``, ``memoryview(buf)``,
        ``np.asarray(buf)``) are not made read-only: numpy cannot revoke them, and a
        write through one after the block changes the published message, or a later one
        that reuses the slot. Use them only inside the block, and keep nothing derived
        from ``buf`` past it; keep a ``copy()`` instead.

        :raises ValueError: at once, if the array would exceed ``max_message_size``, or
            a dimension is negative
        :raises TypeError: at once, if a dimension is not an integer or the dtype holds
            Python objects

        Nothing is claimed before the shape and dtype are checked. Entered with a plain
        ``with``, it raises ``TypeError`` (that would block the event loop's thread):
        :meth:`send_loan_blocking` is the form for code with no event loop.

        On entering the block, raises as :meth:`send` does; on a normal exit,
        ``ClosedResourceError`` if this handle was closed meanwhile (nothing is sent).

        Cancellation: only entering is a cancellation point (the start, and the wait for
        a slot); if cancelled there, nothing is held.
        """
        return _Loan(self, shape, dtype, blocking=False)

    def send_loan_blocking(
        self, shape: int | Sequence[int], dtype: Any = np.float64, timeout: float | None = None
    ) -> _Loan:
        """The blocking form of :meth:`send_loan`: ``with tx.send_loan_blocking(...)``,
        for code with no event loop.

        :raises TimeoutError: no slot became free within ``timeout`` seconds (nothing
            is held)

        Otherwise raises as :meth:`send_loan`.
        """
        return _Loan(self, shape, dtype, blocking=True, timeout=timeout)

    def _claim_slot(self) -> int:
        if not self._usable:
            self._raise_unusable()
        return self._queue.claim(self._entry)


def _check_form(blocking: bool, entered_blocking: bool, call: str) -> None:
    """A loan or view entered by the form it was not made for raises ``TypeError``,
    having taken nothing: ``with`` on the async form would block the event loop's
    thread, and ``async with`` on the blocking form would drop its ``timeout``."""
    if blocking == entered_blocking:
        return
    if entered_blocking:
        raise TypeError(
            f"{call}() is entered with `async with`: a plain `with` would block the event "
            f"loop's thread. In code with no event loop, use `with {call}_blocking()`."
        )
    raise TypeError(
        f"{call}_blocking() is entered with a plain `with`, in code with no event loop. "
        f"On an event loop, use `async with {call}()`."
    )


class _Loan:
    """A slot loaned to a sender (see :meth:`SendChannel.send_loan`)."""

    def __init__(
        self,
        tx: SendChannel[Any],
        shape: int | Sequence[int],
        dtype: Any,
        *,
        blocking: bool,
        timeout: float | None = None,
    ) -> None:
        self._tx = tx
        self._blocking = blocking
        self._dtype, self._shape, self._header, self._start, self._offset, self._length = (
            loan_layout(dtype, shape)
        )
        limit = tx._queue.max_message_size
        if self._length - HEADER_RESERVE > limit:
            raise ValueError(
                f"an array of shape {self._shape} and dtype {self._dtype} encodes to "
                f"{self._length - HEADER_RESERVE} bytes, more than the channel's "
                f"max_message_size of {limit} bytes. "
                f"{too_large_advice(self._length - HEADER_RESERVE)}"
            )
        self._timeout = timeout
        self._slot = -1
        self._buf: Array | None = None

    def _open(self, slot: int) -> Array:
        self._slot = slot
        memory = self._tx._queue.slot_memory(slot)
        memory[self._start : self._offset] = self._header
        self._buf = np.ndarray(self._shape, self._dtype, buffer=memory, offset=self._offset)
        return self._buf

    def _close(self, publish: bool) -> None:
        assert self._buf is not None
        self._buf.flags.writeable = False
        queue = self._tx._queue
        if publish and not self._tx._usable:
            queue.abandon(self._slot)
            self._tx._raise_unusable()
        if publish:
            queue.publish(self._slot, self._start, self._length)
        else:
            queue.abandon(self._slot)

    async def __aenter__(self) -> Array:
        _check_form(self._blocking, False, "tx.send_loan")
        tx = self._tx
        await tx._tick()
        try:
            return self._open(tx._claim_slot())
        except WouldBlock:
            pass
        return self._open(await tx._hub.retry(tx._claim_slot, tx))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._close(exc_type is None)

    def __enter__(self) -> Array:
        _check_form(self._blocking, True, "tx.send_loan")
        return self._open(self._tx._block(self._tx._claim_slot, self._timeout))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._close(exc_type is None)


class ReceiveChannel(_Handle, ObjectReceiveStream[T_co], Generic[T_co]):
    """The receiving end of a channel. Obtain one from :func:`open_channel`.

    ``async for item in rx`` receives until the stream ends: once every send handle, in
    every process, is closed and what they sent has been received. Pass it to other
    processes as :class:`SendChannel` says (each owns a handle of its own), or join by
    name with :func:`connect_receive`. It is an ``anyio.abc.ObjectReceiveStream``, and a
    context manager, sync or async, that closes it.

    ``receive``, ``receive_nowait`` and ``receive_blocking`` are aliases of
    :meth:`recv`, :meth:`recv_nowait` and :meth:`recv_blocking`: ``receive`` is the
    name that ``anyio.abc.ObjectReceiveStream`` requires, ``recv`` the one these docs
    use.
    """

    _side = RECV

    def _get(self) -> T_co:
        if not self._usable:
            self._raise_unusable()
        return self._queue.try_get(self._entry, decode)  # type: ignore[no-any-return]

    def recv_nowait(self) -> T_co:
        """Receive the oldest message if there is one, without waiting.

        :raises anyio.WouldBlock: nothing is buffered
        :raises anyio.EndOfStream: nothing is buffered and no send handle is open in any
            process
        :raises anyio.ClosedResourceError: this handle is closed, or this process only
            inherited it through ``fork`` instead of being passed it as a ``Process``
            argument
        """
        return self._get()

    receive_nowait = recv_nowait

    async def recv(self) -> T_co:
        """Receive the oldest message, waiting for one if none is buffered.

        Raises as :meth:`recv_nowait` does (but never ``WouldBlock``), including
        ``ClosedResourceError`` if this handle is closed while the call waits.

        Cancellation: the call is a cancel point, and so is the wait; if cancelled,
        nothing was received: the message stays for the next receiver. A call that does
        not have to wait yields to the event loop (a schedule point) only once in 16
        calls, but always raises a cancellation already pending when it is made.

        A message that cannot be decoded (an unpickling error, a class this process
        cannot import) or that is corrupt is taken off the channel for good, whatever its
        size: this call raises :class:`aioshm.MessageDropped` with the error as its
        ``__cause__``, the messages behind it flow on, and ``statistics()`` counts it in
        ``dropped_messages``.
        """
        self._ticks += 1
        if self._ticks >= YIELD_EVERY or cancel_pending():
            self._ticks = 0
            await checkpoint()
        if not self._usable:
            self._raise_unusable()
        try:
            return self._queue.try_get(self._entry, decode)  # type: ignore[no-any-return]
        except WouldBlock:
            pass  # wait outside the handler: nothing raised later chains to WouldBlock
        return await self._hub.retry(self._get, self)

    receive = recv

    def recv_blocking(self, timeout: float | None = None) -> T_co:
        """Receive from code with no event loop, waiting up to ``timeout`` seconds.

        :raises TimeoutError: nothing arrived in time (nothing was received)

        Otherwise raises as :meth:`recv_nowait`, including ``ClosedResourceError``
        if another thread closes this handle while the call waits. Do not call it from
        an event loop's thread: it blocks the thread.
        """
        return self._block(self._get, timeout)  # type: ignore[no-any-return]

    receive_blocking = recv_blocking

    async def recv_many(self, max_items: int) -> list[T_co]:
        """Receive between 1 and ``max_items`` messages, in one locked round where they
        are small, waiting only while none is buffered.

        :raises ValueError: ``max_items`` is less than 1
        :raises aioshm.MessageDropped: some messages of the batch could not be decoded
            and were dropped (see :meth:`recv`); the others were received all the
            same and are in its ``received`` list, in order: ``except MessageDropped as
            exc: items = exc.received``

        Otherwise raises as :meth:`recv`: ``EndOfStream`` only when nothing at all is
        left to receive.

        Cancellation: if cancelled, nothing was received.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        await self._tick()
        attempt = functools.partial(self._get_many, max_items)
        try:
            return attempt()
        except WouldBlock:
            pass
        return await self._hub.retry(attempt, self)

    def recv_many_blocking(self, max_items: int, timeout: float | None = None) -> list[T_co]:
        """The blocking form of :meth:`recv_many`, for code with no event loop.

        :raises TimeoutError: nothing arrived within ``timeout`` seconds (nothing was
            received)

        Otherwise raises as :meth:`recv_many`.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        return self._block(functools.partial(self._get_many, max_items), timeout)  # type: ignore[no-any-return]

    def _get_many(self, max_items: int) -> list[T_co]:
        if not self._usable:
            self._raise_unusable()
        return self._queue.try_get_many(self._entry, max_items, decode)

    def recv_view(self) -> _View:
        """Receive an array message without copying it.

        ``async with rx.recv_view() as arr:`` waits like :meth:`recv`, then yields a
        read-only array onto the slot in shared memory; the slot is released when the
        block exits, however it exits. A bytes message comes as a 1-d ``uint8`` array.

        The array is valid only inside the block: afterwards the slot may hold another
        message. Copy what you keep (``arr.copy()``): views derived from ``arr``
        (``arr[1:]``, ``arr.T``, ``memoryview(arr)``) point into the slot as well, and
        outlive the block unchecked. The message counts as received once the block is
        entered: if the block raises, it is not put back.

        :raises aioshm.MessageDropped: the message was corrupt; it is dropped (see
            :meth:`recv`)

        :raises TypeError: the next message is a pickled object; it stays at the head of
            the channel for :meth:`recv`. Also, having taken nothing, if it is entered
            with a plain ``with``: :meth:`recv_view_blocking` is the form for code with
            no event loop

        Otherwise raises as :meth:`recv` (``EndOfStream`` once the stream has ended).

        Cancellation: only entering is a cancellation point (the start, and the wait);
        if cancelled there, nothing was received.
        """
        return _View(self, blocking=False)

    def recv_view_blocking(self, timeout: float | None = None) -> _View:
        """The blocking form of :meth:`recv_view`: ``with rx.recv_view_blocking() as
        arr:``, for code with no event loop.

        :raises TimeoutError: nothing arrived within ``timeout`` seconds (nothing was
            received, nothing is held)

        Otherwise raises as :meth:`recv_view`.
        """
        return _View(self, blocking=True, timeout=timeout)

    def views(self) -> _Views:
        """Iterate over array messages without copying them:
        ``async for frame in rx.views():``.

        Each ``frame`` is what :meth:`recv_view` would give: a read-only array onto its
        slot in shared memory. It is valid until the next iteration, which releases its
        slot before waiting for the next message. The loop ends when the stream does.
        Leaving the loop in any other way (``break``, an exception, a cancellation)
        releases the last view's slot as the loop drops the iterator; if you keep a
        reference to the iterator, call its ``close()`` to release it.

        Raises as :meth:`recv_view`, except that the end of the stream ends the loop.

        Cancellation: as :meth:`recv_view`'s: only the wait for the next message is a
        cancellation point; if cancelled there, nothing was received, and the previous
        view had already been released.
        """
        return _Views(self)

    async def recv_into(self, out: Array) -> Array:
        """Receive an array message into ``out`` and return ``out``.

        :raises ValueError: the message's dtype or shape does not match ``out``
        :raises TypeError: the next message is not an array or bytes

        Either way the message stays at the head of the channel. Otherwise raises as
        :meth:`recv`.

        Cancellation: if cancelled, nothing was received.
        """
        await self._tick()
        return self._copy_out(await self._take_waiting(), out)

    def recv_into_blocking(self, out: Array, timeout: float | None = None) -> Array:
        """The blocking form of :meth:`recv_into`, for code with no event loop.

        :raises TimeoutError: nothing arrived within ``timeout`` seconds (nothing was
            received)

        Otherwise raises as :meth:`recv_into`.
        """
        return self._copy_out(self._block(self._take, timeout), out)

    def _copy_out(self, taken: tuple[int, memoryview], out: Array) -> Array:
        """Copy the taken message into ``out`` and release its slot; on a mismatch, put
        it back at the head of the channel."""
        slot, message = taken
        try:
            copy_into(message, out)
        except CorruptMessage as exc:
            self._queue.drop(slot, exc)
        except BaseException:
            self._queue.put_back(slot)
            raise
        self._queue.release(slot)
        return out

    def _take(self) -> tuple[int, memoryview]:
        if not self._usable:
            self._raise_unusable()
        return self._queue.take(self._entry)

    async def _take_waiting(self) -> tuple[int, memoryview]:
        """Take the next message's slot, waiting for one: the only cancellation point."""
        try:
            return self._take()
        except WouldBlock:
            pass  # wait outside the handler: nothing raised later chains to WouldBlock
        return await self._hub.retry(self._take, self)


class _View:
    """A received message held in its slot (see :meth:`ReceiveChannel.recv_view`)."""

    def __init__(
        self, rx: ReceiveChannel[Any], *, blocking: bool, timeout: float | None = None
    ) -> None:
        self._rx = rx
        self._blocking = blocking
        self._timeout = timeout
        self._slot = -1

    def _open(self, taken: tuple[int, memoryview]) -> Array:
        slot, message = taken
        try:
            array = view(message)
        except CorruptMessage as exc:
            self._rx._queue.drop(slot, exc)
        except BaseException:
            self._rx._queue.put_back(slot)
            raise
        self._slot = slot
        return array

    async def __aenter__(self) -> Array:
        _check_form(self._blocking, False, "rx.recv_view")
        await self._rx._tick()
        return self._open(await self._rx._take_waiting())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._release()

    def __enter__(self) -> Array:
        _check_form(self._blocking, True, "rx.recv_view")
        return self._open(self._rx._block(self._rx._take, self._timeout))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        self._rx._queue.release(self._slot)


class _Views:
    """``async for`` over views (see :meth:`ReceiveChannel.views`)."""

    def __init__(self, rx: ReceiveChannel[Any]) -> None:
        self._rx = rx
        self._held: _View | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Array:
        self.close()
        held = _View(self._rx, blocking=False)
        try:
            array = await held.__aenter__()
        except EndOfStream:
            raise StopAsyncIteration from None
        self._held = held
        return array

    def close(self) -> None:
        """Release the slot of the last view given. Idempotent."""
        held, self._held = self._held, None
        if held is not None:
            held._release()

    def __del__(self) -> None:
        # The loop that iterated was left (break, exception, cancellation) and dropped
        # this iterator: give the last view's slot back.
        held, self._held = getattr(self, "_held", None), None
        if held is not None:
            try:
                held._release()
            except Reentered:  # a finalizer inside this thread's critical section
                self._rx._queue.defer(held._release)


class open_channel(tuple[SendChannel[T], ReceiveChannel[T]]):
    """Open a channel and return its ``(send, receive)`` handles.

    The item type can be given like anyio's memory streams:
    ``tx, rx = open_channel[int](capacity=16)``.

    :param capacity: number of slots: how many messages can be in flight at once
    :param max_message_size: the largest encoded message one slot holds, in bytes (for
        an array, its ``nbytes``; for bytes, their length). Each slot reserves 256 bytes
        more for the message's header.
    :param name: if given, any process of this user on the machine can join the channel
        by this name, with :func:`connect_send` and :func:`connect_receive`. The name
        lives as long as some handle of the channel is open in a live process.
    :param mode: who may join a named channel, as the permission bits of a file
        (``0o600``: this user only; ``0o660``: this user's group too)
    :raises ValueError: a size is less than 1, or the name is malformed (the message
        says what a valid name is)
    :raises TypeError: a size is not an ``int``
    :raises FileExistsError: a live channel already has that name
    :raises OSError: the platform is not Linux, or the shared memory cannot be
        reserved (``ENOMEM``: not enough memory, or a memory cgroup at its limit;
        ``ENOSPC``: a full ``/dev/shm``, for a named channel; ``EFBIG``:
        ``RLIMIT_FSIZE``); nothing is left behind

    The channel maps and reserves about ``capacity * (max_message_size + 256)`` bytes
    of shared memory when it is opened, so that no process can get ``SIGBUS`` touching
    a slot later.
    """

    def __new__(  # type: ignore[misc]
        cls,
        capacity: int = 16,
        max_message_size: int = 65536,
        *,
        name: str | None = None,
        mode: int = 0o600,
    ) -> tuple[SendChannel[T], ReceiveChannel[T]]:
        transport = None if name is None else _names.dispatch(name)
        if transport is not None:
            return transport(  # type: ignore[no-any-return]
                "open", name, capacity=capacity, max_message_size=max_message_size, mode=mode
            )
        sizes: list[int] = []
        for what, value in (("capacity", capacity), ("max_message_size", max_message_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{what} must be an integer, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{what} must be at least 1, not {value}")
            sizes.append(int(value))
        capacity, max_message_size = sizes
        if not supported():
            raise OSError("aioshm needs Linux (robust process-shared mutexes)")
        queue: SlotQueue
        if name is None:
            queue = SlotQueue.create(capacity, max_message_size)
            entry = queue.register((1, 1))
        else:
            queue, entry = _names.create_queue(name, capacity, max_message_size, mode)
        channel = _Channel(queue)
        return SendChannel[T](channel, entry), ReceiveChannel[T](channel, entry)


def _connect(name: str, side: int, timeout: float) -> _Handle:
    transport = _names.dispatch(name)
    cls = SendChannel if side == SEND else ReceiveChannel
    if transport is not None:
        op = "send" if side == SEND else "receive"
        return transport(op, name, timeout=timeout)  # type: ignore[no-any-return]
    if not supported():
        raise OSError("aioshm needs Linux (robust process-shared mutexes)")
    queue, entry = _names.connect_queue(name, (1, 0) if side == SEND else (0, 1), timeout)
    channel = _Channel.lookup(int(queue.segment.ctl[UID])) or _Channel(queue)
    return cls(channel, _ownership.merge_into_mine(channel.queue, entry))


def connect_send(name: str, timeout: float = 0) -> SendChannel[Any]:
    """A new send handle of the channel named ``name``, owned by this process, as if it
    had been passed in: close it when done.

    :param timeout: how long to wait, in seconds, for the channel to be created (for a
        producer that may start before the channel's creator). It blocks the calling
        thread meanwhile; from async code with a timeout, call it through
        ``anyio.to_thread.run_sync``.
    :raises FileNotFoundError: no live channel has that name (within ``timeout``)
    :raises PermissionError: the channel belongs to another user, whose ``mode`` does
        not let this one join
    :raises ValueError: the name is malformed
    """
    return cast(SendChannel[Any], _connect(name, SEND, timeout))


def connect_receive(name: str, timeout: float = 0) -> ReceiveChannel[Any]:
    """A new receive handle of the channel named ``name``; see :func:`connect_send`."""
    return cast(ReceiveChannel[Any], _connect(name, RECV, timeout))
