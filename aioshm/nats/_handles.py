"""The handles of a network channel: the same API as the shared-memory handles.

:class:`SendChannel` and :class:`ReceiveChannel` are ``anyio.abc.ObjectSendStream`` and
``ObjectReceiveStream``, with the method names and meanings of
:class:`aioshm.SendChannel` and :class:`aioshm.ReceiveChannel`. What differs:

* ``send_nowait`` always raises ``WouldBlock``: a network send completes only when the
  server has stored the message. ``recv_nowait`` returns a message already delivered to
  this process (left by a cancelled receive, or pulled ahead with ``prefetch``), or
  raises ``WouldBlock``.
* ``send_loan``, ``recv_view`` and ``recv_into`` raise ``TypeError``: they lend shared
  memory, which a network channel does not have.
* ``statistics()`` asks the server: it blocks the calling thread for a few round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Iterable
from typing import Any, Generic, NoReturn, Self, TypeVar

from anyio import ClosedResourceError, WouldBlock
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.lowlevel import checkpoint
from nats.aio.msg import Msg

from aioshm import _ownership
from aioshm._channel import ChannelStatistics, _note_partial
from aioshm._closing import Closing
from aioshm._codec import decode, encode_bytes
from aioshm.nats import _bridge
from aioshm.nats._call import PENDING, Call
from aioshm.nats._lane import Here, Lane
from aioshm.nats._link import REQUEST_TIMEOUT, Link, broken, get_link
from aioshm.nats._url import Address, parse

__all__ = ["ReceiveChannel", "SendChannel"]

T_co = TypeVar("T_co", covariant=True)
T_contra = TypeVar("T_contra", contravariant=True)

_SHARED_MEMORY_ONLY = (
    "{} lends shared memory and works only on shared-memory channels; a network "
    "channel copies every message: use {} instead"
)


class _NoPending:
    """What aioshm's ownership keeper asks of a handle's shared object (``_queue``): a
    network channel has no reservations to resolve to child pids; its reservations live
    on the server, claimed or expired."""

    _pending = False

    def _resolve_pending(self) -> None:
        return None


_NO_PENDING = _NoPending()


class _Handle(Closing):
    """What send and receive handles share: ownership, closing, statistics."""

    _side = ""
    _queue: Any = _NO_PENDING

    def __init__(
        self, link: Link, address: Address, options: dict[str, Any], subject: str | None
    ) -> None:
        self._link: Link | None = link
        self._address = address
        self._options = options
        self._subject = subject or ""
        self._closed = False
        self._owned = subject is not None
        self._calls: set[Any] = set()  # Calls, and Here / Waiter calls of lanes
        self._max_message_size = link.max_message_size
        if self._owned:
            _ownership.track(self)

    # ------------------------------------------------------------ state

    def _raise_unusable(self) -> NoReturn:
        name = type(self).__name__
        if self._closed:
            raise ClosedResourceError(f"this {name} has been closed")
        raise ClosedResourceError(
            f"this network {name} was inherited through fork but not passed to this "
            "process: pass it as an argument of multiprocessing.Process"
        )

    def _usable_link(self) -> Link:
        if self._closed or not self._owned or self._link is None:
            self._raise_unusable()
        return self._link

    @staticmethod
    async def _lane(link: Link) -> Lane | None:
        """The running asyncio loop's lane, which the caller's task uses directly;
        ``None`` under trio (or if it cannot connect): the bridge's, through a Call.

        Every async send and receive starts here, and this is its cancel point: a call
        made while its task has a cancellation pending raises it and does nothing, as
        every async call of aioshm does. A full checkpoint (a yield) is cheap next to a
        round trip to the server.
        """
        await checkpoint()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return await link.lane_here()

    async def _wait(self, call: Call[Any]) -> Any:
        self._calls.add(call)
        try:
            return await call.wait()
        finally:
            self._calls.discard(call)

    def _wait_blocking(self, call: Call[Any], timeout: float | None) -> Any:
        self._calls.add(call)
        try:
            return call.wait_blocking(timeout)
        finally:
            self._calls.discard(call)

    # ------------------------------------------------------------ lifecycle

    def clone(self) -> Self:
        """Another handle to the same side of the channel, closed independently (see
        :meth:`aioshm.SendChannel.clone`)."""
        link = self._usable_link()
        subject = link.new_subject(self._side)
        _bridge.run(link.register(subject))
        return type(self)(link, self._address, self._options, subject)

    def close(self) -> None:
        """Close this handle. Idempotent. It waits for the server to count it out (a
        round trip, blocking the calling thread).

        Calls of this process waiting on it get ``ClosedResourceError``. Closing the last
        send handle of every process ends the stream for receivers (after what is
        buffered); closing the last receive handle breaks the channel for senders.
        """
        if self._closed:
            return
        self._closed = True
        error = ClosedResourceError(f"this {type(self).__name__} has been closed")
        for call in list(self._calls):
            if call.state == PENDING:
                call.fail(error)
        link = self._link
        if self._owned and link is not None:
            self._owned = False
            link.forget(self._subject)
            self._unregister(link)

    def _unregister(self, link: Link) -> None:
        """Tell the server, and wait for it (a round trip), so that a process that
        exits right after closing is not counted until its heartbeat expires."""
        if _bridge.on_loop():
            _bridge.spawn(link.unregister(self._subject))
            return
        with contextlib.suppress(Exception):  # then it expires after one heartbeat
            _bridge.run(link.unregister(self._subject), timeout=REQUEST_TIMEOUT)

    def __del__(self) -> None:
        if getattr(self, "_owned", False) and not self._closed:
            self.close()

    def statistics(self) -> ChannelStatistics:
        """A snapshot of the channel, asked of the server (a few round trips, blocking
        the calling thread). ``slots_in_use`` counts messages delivered to receivers
        and not yet acknowledged; ``reclaimed_slots`` is always 0."""
        link = self._usable_link()
        counts, buffered, held, redelivered = _bridge.run(link.stats(), timeout=30)
        waiters = [call for lane in link.all_lanes() for call, _ in list(lane.waiters)]
        waiting_recv = sum(1 for call in waiters if call.state == PENDING)
        return ChannelStatistics(
            current_buffer_used=buffered,
            max_buffer_size=link.capacity,
            open_send_streams=counts.senders,
            open_receive_streams=counts.receivers,
            tasks_waiting_send=link.waiting_send,
            tasks_waiting_receive=waiting_recv,
            free_slots=max(0, link.capacity - buffered),
            slots_in_use=held,
            max_message_size=link.max_message_size,
            reclaimed_slots=0,
            redelivered_messages=redelivered,
        )

    # ------------------------------------------------------------ ownership

    def __reduce__(self) -> tuple[Any, ...]:
        link = self._usable_link()
        subject = link.new_subject(self._side)
        _bridge.run(link.reserve(subject))
        return (_rebuild, (type(self), self._address.source, self._options, subject))

    def _reserve(self, popen: object) -> object | None:
        if self._closed or not self._owned or self._link is None:
            return None
        subject = self._link.new_subject(self._side)
        _bridge.run(self._link.reserve(subject))
        return subject

    def _claim(self, reservation: object) -> None:
        # In a forked child: the parent's connection is not ours; connect afresh.
        self._link = None
        self._calls = set()
        self._subject = str(reservation)
        self._owned = True
        self._closed = False
        self._link = _claimed_link(self._address, self._options, self._subject)

    def _disown(self) -> None:
        self._owned = False
        self._link = None

    def _close_at_exit(self) -> None:
        if self._owned and not self._closed:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._owned else "not owned"
        return f"<{type(self).__name__} {state} {self._address.url}>"


def _claimed_link(address: Address, options: dict[str, Any], subject: str) -> Link:
    link = get_link(address, options)
    _bridge.run(link.register(subject))
    return link


def _rebuild(cls: type[_Handle], url: str, options: dict[str, Any], subject: str) -> _Handle:
    address = parse(url)
    return cls(_claimed_link(address, options, subject), address, options, subject)


class SendChannel(_Handle, ObjectSendStream[T_contra], Generic[T_contra]):
    """The sending end of a network channel (see :class:`aioshm.SendChannel`)."""

    _side = "s"

    def __init__(
        self, link: Link, address: Address, options: dict[str, Any], subject: str | None
    ) -> None:
        super().__init__(link, address, options, subject)
        self._new_ids()

    def _new_ids(self) -> None:
        # Message ids are unique per owner of a handle: a forked child's copy must not
        # reuse its parent's, or the server would drop its messages as duplicates.
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex

    def _claim(self, reservation: object) -> None:
        super()._claim(reservation)
        self._new_ids()

    def _start(self, item: T_contra) -> Call[None]:
        link = self._usable_link()
        data = encode_bytes(item, self._max_message_size)
        if link.counts.receivers == 0:
            raise broken()
        call: Call[None] = Call()
        _bridge.spawn(link.bridge_lane.publish(call, data, f"{self._prefix}.{next(self._ids)}"))
        return call

    def send_nowait(self, item: T_contra) -> None:
        """Always raises ``WouldBlock`` (after checking the handle and the item): a
        network send waits for the server to store the message. Use :meth:`send`, or
        :meth:`send_blocking` from code with no event loop."""
        self._usable_link()
        encode_bytes(item, self._max_message_size)
        raise WouldBlock

    async def send(self, item: T_contra) -> None:
        """Send ``item``: return once the server has stored it; wait while the channel
        holds ``capacity`` messages, or while no server is reachable.

        :raises anyio.BrokenResourceError: no receive handle is open in any process
        :raises anyio.ClosedResourceError: this handle is closed (also while waiting)
        :raises ValueError: ``item`` encodes to more than ``max_message_size`` bytes
        :raises TypeError: ``item`` cannot be pickled

        Cancellation: cancelled while it waits for room, nothing was sent. A publish on
        the wire is a point of no return: a cancellation that arrives then waits for the
        server's answer, and is deferred if the message was stored.

        On asyncio, the calling task publishes on its loop's own connection; under trio,
        the bridge's thread does, for it.
        """
        link = self._usable_link()
        lane = await self._lane(link)
        if lane is None:
            call = self._start(item)
            link.waiting_send += 1
            try:
                await self._wait(call)
            finally:
                link.waiting_send -= 1
            return
        data = encode_bytes(item, self._max_message_size)
        if link.counts.receivers == 0:
            raise broken()
        here = Here()
        self._calls.add(here)
        link.waiting_send += 1
        try:
            await lane.publish(here, data, f"{self._prefix}.{next(self._ids)}")
        finally:
            link.waiting_send -= 1
            self._calls.discard(here)
        here.outcome()

    def send_blocking(self, item: T_contra, timeout: float | None = None) -> None:
        """Send from code with no event loop, waiting up to ``timeout`` seconds.

        :raises TimeoutError: not stored in time (then nothing was sent)

        Otherwise raises as :meth:`send`.
        """
        self._wait_blocking(self._start(item), timeout)

    async def send_many(self, items: Iterable[T_contra]) -> None:
        """Send every item, in order (each is encoded first: a bad item fails the batch
        with nothing sent). If interrupted, the items already sent stay sent and the
        exception carries their number: see :func:`aioshm.items_sent`."""
        items = self._checked_batch(items)
        sent = 0
        try:
            for item in items:
                await self.send(item)
                sent += 1
        except BaseException as exc:
            if sent:
                _note_partial(exc, sent)
            raise

    def send_many_blocking(self, items: Iterable[T_contra], timeout: float | None = None) -> None:
        """The blocking form of :meth:`send_many`, waiting up to ``timeout`` seconds in
        all: on ``TimeoutError``, the items already sent stay sent, and the exception
        carries their number."""
        items = self._checked_batch(items)
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = 0
        try:
            for item in items:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                self.send_blocking(item, left)
                sent += 1
        except BaseException as exc:
            if sent:
                _note_partial(exc, sent)
            raise

    def _checked_batch(self, items: Iterable[T_contra]) -> list[T_contra]:
        """The items as a list, each checked to encode, before anything is sent: a bad
        one fails the batch."""
        self._usable_link()
        limit = self._max_message_size
        for item in (checked := list(items)):
            encode_bytes(item, limit)
        return checked

    def send_loan(self, *args: object, **kwargs: object) -> NoReturn:
        """Raises ``TypeError``: shared-memory channels only."""
        raise TypeError(_SHARED_MEMORY_ONLY.format("send_loan", "send"))

    send_loan_blocking = send_loan


class ReceiveChannel(_Handle, ObjectReceiveStream[T_co], Generic[T_co]):
    """The receiving end of a network channel (see :class:`aioshm.ReceiveChannel`)."""

    _side = "r"

    def __init__(
        self, link: Link, address: Address, options: dict[str, Any], subject: str | None
    ) -> None:
        super().__init__(link, address, options, subject)
        if self._owned:
            link.local_receivers += 1

    def close(self) -> None:
        link = self._link
        was_owned = self._owned and not self._closed
        super().close()
        if was_owned and link is not None:
            link.local_receivers -= 1
            if link.local_receivers == 0:  # give back what was pulled ahead, now
                if _bridge.on_loop():
                    _bridge.spawn(link.receivers_closed())
                else:
                    with contextlib.suppress(Exception):
                        _bridge.run(link.receivers_closed(), timeout=REQUEST_TIMEOUT)

    def _claim(self, reservation: object) -> None:
        super()._claim(reservation)
        assert self._link is not None
        self._link.local_receivers += 1

    def _decode(self, msgs: list[Msg]) -> list[Any]:
        return [decode(memoryview(m.data), owned=False) for m in msgs]

    def _start(self, max_items: int) -> Call[list[Msg]]:
        link = self._usable_link()
        call: Call[list[Msg]] = Call()
        _bridge.call_soon(link.bridge_lane.add_waiter, call, max_items)
        return call

    def receive_nowait(self) -> T_co:
        """A message already delivered to this process, or ``WouldBlock``. Its
        acknowledgement is confirmed by the server before it is returned: that blocks
        the calling thread for a round trip.

        :raises anyio.WouldBlock: nothing is here (messages on the server are fetched
            only by :meth:`receive`)
        :raises anyio.ClosedResourceError: this handle is closed
        """
        link = self._usable_link()
        taken = []
        for lane in link.all_lanes():
            if taken := lane.take_buffered(1):
                break
        msgs = _bridge.run(link.bridge_lane.acknowledge(taken)) if taken else []
        if not msgs:
            raise WouldBlock
        return self._decode(msgs)[0]  # type: ignore[no-any-return]

    recv_nowait = receive_nowait

    async def receive(self) -> T_co:
        """Receive the oldest message, waiting for one.

        :raises anyio.EndOfStream: no send handle is open in any process (closed, or
            its process silent for longer than the heartbeat) and nothing is left
        :raises anyio.ClosedResourceError: this handle is closed (also while waiting)

        Cancellation: if cancelled while it waits, nothing was received: a message that
        reached this process meanwhile goes to the next receive, here or (after a short
        hold) at another receiver. Handing a message over is the point of no return: it
        is acknowledged, and the call returns it once the server has confirmed, so a
        receiver that dies after that does not get it delivered again elsewhere; a
        cancellation that arrives during that round trip is deferred.
        """
        return (await self.recv_many(1))[0]

    recv = receive

    def recv_blocking(self, timeout: float | None = None) -> T_co:
        """Receive from code with no event loop, waiting up to ``timeout`` seconds.

        :raises TimeoutError: nothing arrived in time (nothing was received)

        Otherwise raises as :meth:`receive`.
        """
        msgs = self._wait_blocking(self._start(1), timeout)
        return self._decode(msgs)[0]  # type: ignore[no-any-return]

    receive_blocking = recv_blocking

    async def recv_many(self, max_items: int) -> list[T_co]:
        """Receive between 1 and ``max_items`` messages, waiting only while none is
        here. Raises as :meth:`receive`; cancelled, nothing was received."""
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        lane = await self._lane(self._usable_link())
        if lane is None:
            return self._decode(await self._wait(self._start(max_items)))
        return self._decode(await lane.receive(max_items, self._calls))

    def recv_many_blocking(self, max_items: int, timeout: float | None = None) -> list[T_co]:
        """The blocking form of :meth:`recv_many`, waiting up to ``timeout`` seconds
        (``TimeoutError``: nothing was received)."""
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        return self._decode(self._wait_blocking(self._start(max_items), timeout))

    def recv_view(self, *args: object, **kwargs: object) -> NoReturn:
        """Raises ``TypeError``: shared-memory channels only."""
        raise TypeError(_SHARED_MEMORY_ONLY.format("recv_view", "recv"))

    recv_view_blocking = recv_view

    async def recv_into(self, out: object) -> NoReturn:
        """Raises ``TypeError``: shared-memory channels only."""
        raise TypeError(_SHARED_MEMORY_ONLY.format("recv_into", "recv"))

    def recv_into_blocking(self, out: object, timeout: float | None = None) -> NoReturn:
        """Raises ``TypeError``: shared-memory channels only."""
        raise TypeError(_SHARED_MEMORY_ONLY.format("recv_into_blocking", "recv_blocking"))
