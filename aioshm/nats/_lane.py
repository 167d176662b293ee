"""A channel's data path on one event loop: publishing, pulling, acknowledging.

A :class:`Lane` does a :class:`~aioshm.nats._link.Link`'s sending and receiving on the
event loop that owns its NATS connection. The bridge loop has one, on the link's own
connection: trio and blocking callers reach it through :class:`~aioshm.nats._call.Call`
hand-offs. Every asyncio loop that sends or receives gets one of its own, with a
connection of its own (opened on the loop's first call, closed when the loop shuts
down its tasks, as ``asyncio.run`` does): its callers await it in their own task, with
no thread switch and no task per call.

Either way, one code path does the work, and a *call* (a ``Call``, or a :class:`Here`
for a caller awaiting on the lane's loop) records where the operation stands:
``begin()`` before a point of no return (``False``: the caller has left, do nothing),
``retreat()`` when an attempt had no effect, ``settle()`` / ``fail()`` at the end.

Requests (publishes, acknowledgements) take their replies through one subscription of
the lane, into futures of its own, and every wait past a point of no return goes
*through* the waiting task's cancellation (:func:`_through`): the reply is never lost,
the cancellation is noted on the call and decided at the next ``begin``/``retreat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import nats
import nats.errors
import nats.js.errors
from anyio import BrokenResourceError, EndOfStream
from nats.aio.msg import Msg

from ._call import DONE, PENDING, Call

if TYPE_CHECKING:
    from ._link import Link

__all__ = ["Here", "Lane", "Waiter"]

T = TypeVar("T")

#: How long one pull request waits at the server.
PULL_EXPIRES = 1.0
#: How often a waiting receiver checks for the end of the stream while idle.
EOS_EVERY = 0.2
#: A waiting sender retries a full channel this often at most.
FULL_BACKOFF = 0.02
#: How long one publish or API request may take before it is retried.
REQUEST_TIMEOUT = 2.0
#: An acknowledgement confirmed within this share of ``ack_wait`` after the message
#: arrived was applied before the server could deliver the message elsewhere.
ACK_IN_TIME = 0.8
_FULL = 10077  # JetStream's "maximum messages exceeded"
_WRONG_LAST = 10071  # "wrong last sequence"
_MSG_TOO_BIG = 10054
_ACK = b"+ACK"
_NAK = b"-NAK"


def broken() -> BrokenResourceError:
    return BrokenResourceError("no receive handle of this channel is open in any process")


class _Call(Protocol):
    """What the lane's work asks of a call (a ``Call``, a :class:`Here`)."""

    def begin(self) -> bool: ...
    def retreat(self) -> bool: ...
    def interrupt(self, exc: BaseException) -> None: ...


class _Nobody:
    """The call of work done for nobody's caller (giving back, tests)."""

    def begin(self) -> bool:
        return True

    def retreat(self) -> bool:
        return True

    def interrupt(self, exc: BaseException) -> None:
        return None


_NOBODY = _Nobody()


class Here:
    """A send awaited on its lane's own loop, by the caller's task itself.

    ``begin()`` is ``False`` once the handle was closed (:meth:`fail`, from any thread)
    or the caller's task was cancelled (:meth:`interrupt`) before a point of no return;
    ``retreat()`` is ``False`` if a cancellation arrived during an attempt that had no
    effect. The caller reads :attr:`error` when the work returns.
    """

    __slots__ = ("cancelled", "done", "error")

    state = PENDING  # for the handle's close(): a pending call is told it closed

    def __init__(self) -> None:
        self.cancelled: BaseException | None = None
        self.error: BaseException | None = None
        self.done = False

    def begin(self) -> bool:
        return self.cancelled is None and self.error is None

    def retreat(self) -> bool:
        return self.cancelled is None

    def interrupt(self, exc: BaseException) -> None:
        if self.cancelled is None:
            self.cancelled = exc

    def settle(self, result: None) -> None:
        self.done = True

    def fail(self, error: BaseException) -> bool:
        if self.error is None:
            self.error = error
        return True

    def outcome(self) -> None:
        """Raise what ended the call: its error, or the cancellation if nothing was done."""
        if self.done:
            return
        if self.error is not None:
            raise self.error
        assert self.cancelled is not None
        raise self.cancelled


class Waiter:
    """A receive waiting on its lane's own loop, in the caller's task (``future``).

    The lane hands it messages by setting the future's result: that is the point of no
    return. A cancelled caller's future is cancelled with it, and the lane skips it.
    """

    __slots__ = ("future", "loop", "n")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[tuple[Msg, float]]] = loop.create_future()
        self.n = n

    @property
    def state(self) -> int:
        return PENDING if not self.future.done() else DONE

    def begin(self) -> bool:
        return not self.future.done()

    def fail(self, error: BaseException) -> bool:
        """Fail the wait (from any thread) if nothing was handed to it."""

        def fail() -> None:
            if not self.future.done():
                self.future.set_exception(error)

        try:
            if asyncio.get_running_loop() is self.loop:
                fail()
                return True
        except RuntimeError:
            pass
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(fail)
        return True


async def _through(fut: asyncio.Future[T], call: _Call) -> T:
    """Wait for ``fut`` whatever happens to the waiting task: a cancellation is noted on
    ``call`` and the wait resumed (native asyncio cancellation pierces anyio's shields,
    so it is caught as well)."""
    if not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError as exc:
            call.interrupt(exc)
            with anyio.CancelScope(shield=True):
                while not fut.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(fut)
    return fut.result()


async def _run_through(coro: Coroutine[Any, Any, T], call: _Call) -> T:
    """Run ``coro`` to its end in a task of its own, whatever happens to the caller."""
    return await _through(asyncio.ensure_future(coro), call)


async def _pause(delay: float, call: _Call) -> None:
    """Sleep ``delay`` seconds through cancellations (noted on ``call``)."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handle = fut.get_loop().call_later(delay, _resolve, fut, None)
    try:
        await _through(fut, call)
    finally:
        handle.cancel()


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _no_responders(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get("Status") == "503"  # type: ignore[union-attr]


class Lane:
    """A link's sending and receiving on one event loop (see the module docstring)."""

    def __init__(self, link: Link, loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.loop = loop
        self.nc: Any = None
        self.js: Any = None
        self.ready = False
        self.closed = False
        self._starting: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        # requests
        self._reply_prefix = ""
        self._replies: dict[str, tuple[asyncio.Future[Msg | None], asyncio.TimerHandle]] = {}
        self._tokens = itertools.count()
        # receiving
        self.lock = threading.Lock()
        self.waiters: deque[tuple[Call[list[Msg]] | Waiter, int]] = deque()
        self.buffer: deque[tuple[Msg, float]] = deque()
        self.requests: deque[list[float]] = deque()  # [deadline, remaining]
        self._inbox = ""
        self._pump: asyncio.Task[None] | None = None
        self._poke: asyncio.Event | None = None
        self._last_arrival = 0.0
        self._acks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle

    async def attach(self, nc: Any) -> None:
        """Start on the connection ``nc`` (owned by this lane's loop)."""
        self.nc = nc
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        self._reply_prefix = nc.new_inbox()
        await nc.subscribe(f"{self._reply_prefix}.*", cb=self._replied)
        self.ready = True

    async def start(self) -> None:
        """Connect a lane of an asyncio caller's loop: once, whoever asks first (a
        cancelled first caller does not stop it)."""
        if self._starting is None:
            self._starting = self.loop.create_task(self._open())
        await asyncio.shield(self._starting)

    async def _open(self) -> None:
        nc = await self.link.connect(self.link.connect_timeout, self.reconnected)
        await self.attach(nc)
        self._keeper = self.loop.create_task(self._keep())

    async def _keep(self) -> None:
        """Close the lane when its loop cancels every task (``asyncio.run`` ending)."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await self.close()

    async def close(self) -> None:
        """Give back what is buffered, flush acknowledgements, disconnect (unless the
        connection is the link's own)."""
        if self.closed:
            return
        self.closed = True
        if self._pump is not None:
            self._pump.cancel()
        with contextlib.suppress(Exception):
            await self.give_back_buffer()
            if self._acks:
                await asyncio.wait(list(self._acks), timeout=REQUEST_TIMEOUT)
            if self.nc is not None and self.nc is not self.link.nc:
                await self.nc.close()

    async def reconnected(self) -> None:
        self.link.disturbed()  # see Link.settled

    # ---------------------------------------------------------------- requests

    async def _request(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        timeout: float,
        call: _Call,
    ) -> asyncio.Future[Msg | None]:
        """Publish a request; return the future of its reply (``None``: none in
        ``timeout`` seconds). A cancellation of the caller is noted on ``call``: the
        request is on its way then (nats-py queues a publish before its first
        suspension).

        :raises nats.errors.Error, OSError: not sent (no connection)
        """
        token = str(next(self._tokens))
        fut: asyncio.Future[Msg | None] = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._expired, token)
        self._replies[token] = (fut, timer)
        try:
            await self.nc.publish(
                subject, payload, reply=f"{self._reply_prefix}.{token}", headers=headers
            )
        except asyncio.CancelledError as exc:
            call.interrupt(exc)
        except BaseException:
            self._replies.pop(token, None)
            timer.cancel()
            raise
        return fut

    def _expired(self, token: str) -> None:
        entry = self._replies.pop(token, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(None)

    async def _replied(self, msg: Msg) -> None:
        entry = self._replies.pop(msg.subject[len(self._reply_prefix) + 1 :], None)
        if entry is not None:
            fut, timer = entry
            timer.cancel()
            if not fut.done():
                fut.set_result(msg)

    async def _ask(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        timeout: float,
        call: _Call,
    ) -> Msg | None:
        """A request and its reply, through the caller's cancellation (noted on
        ``call``): ``None`` if no reply came in time.

        :raises nats.errors.Error, OSError: not sent (no connection)
        """
        return await _through(await self._request(subject, payload, headers, timeout, call), call)

    # ---------------------------------------------------------------- sending

    async def publish(self, call: Call[None] | Here, data: bytes | memoryview, msg_id: str) -> None:
        """Publish one message for ``call``; retry while the channel is full.

        It never raises: the outcome is settled on ``call``. A publish on the wire is a
        point of no return (``committed``): an attempt whose answer was lost is retried
        with the same message id, which the server stores once.
        """
        link = self.link
        committed = False  # an attempt may have been stored: never retreat after it
        backoff = 0.001
        headers = {"Nats-Msg-Id": msg_id}
        payload = bytes(data)
        while True:
            if not committed and not call.begin():
                return
            try:
                reply = await self._ask(link.subject, payload, headers, REQUEST_TIMEOUT, call)
            except (nats.errors.Error, OSError):
                reply = None  # not sent now (no connection): like a lost reply
            if reply is None or _no_responders(reply):
                # Lost request or reply, or no server or leader: the id is stored once.
                committed = True
                await _pause(0.05, call)
                continue
            answer = json.loads(reply.data)
            error = answer.get("error") if isinstance(answer, dict) else None
            if error is None:
                call.settle(None)
                return
            err_code, description = error.get("err_code"), error.get("description")
            if err_code == _FULL:
                # Only a receiver makes room: with none left, fail, even past the point
                # of no return (an earlier attempt, unanswered, that was stored after
                # all would be received by nobody either).
                if time.monotonic() - link.counted_at > EOS_EVERY:
                    await self._refresh(call)
                if link.counts.receivers == 0:
                    call.fail(broken())
                    return
                if not committed and not call.retreat():
                    return
                await _pause(backoff, call)
                backoff = min(backoff * 2, FULL_BACKOFF)
                continue
            if err_code == _MSG_TOO_BIG:
                call.fail(ValueError(f"the server refused the message: {description}"))
                return
            if (error.get("code") or 0) >= 500:
                committed = True  # no leader right now: unknown whether stored
                await _pause(0.05, call)
                continue
            call.fail(OSError(f"publishing to {link.address.url} failed: {error}"))
            return

    async def _refresh(self, call: _Call) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await _run_through(self.link.refresh(self.js), call)

    # ---------------------------------------------------------------- receiving

    def take_buffered(self, max_items: int) -> list[tuple[Msg, float]]:
        """Messages already here with their arrival times, oldest first (from any
        thread); the caller must :meth:`acknowledge` them before handing them out."""
        with self.lock:
            if self.waiters or not self.buffer:
                return []
            taken: list[tuple[Msg, float]] = []
            while self.buffer and len(taken) < max_items:
                taken.append(self.buffer.popleft())
            return taken

    def add_waiter(self, call: Call[list[Msg]] | Waiter, max_items: int) -> None:
        """Queue a receiving caller (on this lane's loop)."""
        with self.lock:
            self.waiters.append((call, max_items))
        self._wake()

    async def receive(self, max_items: int, calls: set[Any]) -> list[Msg]:
        """Receive between 1 and ``max_items`` messages, on this lane's loop, in the
        caller's task (tracked in ``calls`` while it waits, for the handle's close).

        Cancellation: cancelled while waiting, nothing was taken. Messages handed over
        are acknowledged through a cancellation, and returned if any is confirmed
        (the cancellation is deferred); if none is, the cancellation is raised then.
        """
        while True:
            batch = self.take_buffered(max_items)
            if not batch:
                waiter = Waiter(self.loop, max_items)
                calls.add(waiter)
                try:
                    self.add_waiter(waiter, max_items)
                    try:
                        batch = await waiter.future
                    except asyncio.CancelledError:
                        fut = waiter.future
                        if not fut.done() or fut.cancelled() or fut.exception() is not None:
                            raise
                        batch = fut.result()  # handed over: the point of no return
                finally:
                    calls.discard(waiter)
            here = Here()
            msgs = await self.acknowledge(batch, here)
            if msgs:
                return msgs
            if here.cancelled is not None:  # nothing was ours after all
                raise here.cancelled

    def _wake(self) -> None:
        if self._poke is None:
            self._poke = asyncio.Event()
            self._inbox = self.nc.new_inbox()
            self._pump = self.loop.create_task(self._run_pump())
        self._poke.set()

    async def _run_pump(self) -> None:
        assert self._poke is not None
        await self.nc.subscribe(self._inbox, cb=self._arrived)
        next_eos_check = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), EOS_EVERY / 2)
            self._poke.clear()
            now = time.monotonic()
            while self.requests and self.requests[0][0] < now:
                self.requests.popleft()
            self._match()
            with self.lock:
                demand = sum(n for call, n in self.waiters)
                if self.link.local_receivers > 0 and demand:
                    demand += self.link.address.prefetch
                demand -= len(self.buffer) + sum(int(r[1]) for r in self.requests)
                waiting = bool(self.waiters)
                stale = [m for m, at in self.buffer if not self.waiters and now - at > self._hold()]
                if stale:
                    self.buffer.clear()
            for msg in stale:
                await self._give_back(msg)
            if demand > 0:
                await self._pull(min(demand, 256))
            if waiting and now >= next_eos_check and now - self._last_arrival > EOS_EVERY:
                next_eos_check = now + EOS_EVERY
                await self._check_end()

    def _hold(self) -> float:
        return min(1.0, self.link.ack_wait / 4)

    async def _pull(self, batch: int) -> None:
        link = self.link
        request = {"batch": batch, "expires": int(PULL_EXPIRES * 1e9)}
        try:
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{link.stream}.{link.consumer}",
                json.dumps(request).encode(),
                reply=self._inbox,
            )
        except (nats.errors.Error, OSError):
            return
        self.requests.append([time.monotonic() + PULL_EXPIRES + 0.5, float(batch)])

    async def _arrived(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            if status in ("404", "408", "409") and self.requests:
                self.requests.popleft()  # a pull request ended
                self._poke.set()  # type: ignore[union-attr]
            return
        self._last_arrival = time.monotonic()
        if self.requests:
            self.requests[0][1] -= 1
            if self.requests[0][1] <= 0:
                self.requests.popleft()
        with self.lock:
            self.buffer.append((msg, self._last_arrival))
        self._match()  # (a caller served asks again, which wakes the pump for more)

    def _match(self) -> None:
        """Hand buffered messages to waiting callers, oldest first.

        Taking a caller's call out of ``PENDING`` is the point of no return: from then
        on the caller waits (its cancellation deferred) while the messages are
        acknowledged, and gets them once the server has confirmed. A caller that left
        before leaves the messages here for the next.
        """
        with self.lock:
            while self.waiters and self.buffer:
                call, n = self.waiters.popleft()
                if not call.begin():
                    continue
                batch = [self.buffer.popleft() for _ in range(min(n, len(self.buffer)))]
                if isinstance(call, Waiter):
                    call.future.set_result(batch)  # its caller acknowledges them
                    continue
                task = self.loop.create_task(self._confirm(call, n, batch))
                self._acks.add(task)
                task.add_done_callback(self._acks.discard)
            while self.waiters and self.waiters[0][0].state != PENDING:
                self.waiters.popleft()

    async def _confirm(self, call: Call[list[Msg]], n: int, batch: list[tuple[Msg, float]]) -> None:
        taken = await self.acknowledge(batch)
        if taken:
            call.settle(taken)
        elif call.retreat():  # every ack failed: the messages went elsewhere; wait on
            with self.lock:
                self.waiters.appendleft((call, n))
            self._wake()

    async def acknowledge(self, msgs: list[tuple[Msg, float]], call: _Call = _NOBODY) -> list[Msg]:
        """Acknowledge ``msgs`` (with their arrival times) and wait for the server to
        confirm, through the caller's cancellation (noted on ``call``); return those
        that are this process's to hand out (see :meth:`_ack`)."""
        timeout = min(REQUEST_TIMEOUT, self.link.ack_wait / 4)
        pending: list[asyncio.Future[Msg | None] | None] = []
        for msg, _ in msgs:
            try:
                pending.append(await self._request(msg.reply, _ACK, None, timeout, call))
            except (nats.errors.Error, OSError):
                pending.append(None)  # not sent: retried below
        ours = []
        for (msg, arrived), fut in zip(msgs, pending, strict=True):
            reply = None if fut is None else await _through(fut, call)
            if reply is None or _no_responders(reply):
                confirmed = await _run_through(self._ack_again(msg, timeout), call)
                if not confirmed:
                    continue
            if await self._judge(msg, arrived, call):
                ours.append(msg)
        return ours

    async def _ack_again(self, msg: Msg, timeout: float) -> bool:
        """Retry an acknowledgement until a server confirms it: ``False`` only if the
        connection closed (the message is delivered again after ``ack_wait``, if the
        acknowledgement was not applied)."""
        while True:
            try:
                reply = await self._ask(msg.reply, _ACK, None, timeout, _NOBODY)
            except (nats.errors.Error, OSError):
                reply = None
            if reply is not None and not _no_responders(reply):
                return True
            if self.nc.is_closed:
                return False
            await asyncio.sleep(0.02)

    async def _judge(self, msg: Msg, arrived: float, call: _Call) -> bool:
        """Whether a confirmed acknowledgement makes ``msg`` this process's.

        An acknowledgement whose reply is lost may still have been applied (the
        message is then deleted, and nobody else gets it), so it is retried until a
        server answers, however long no server is reachable: giving up would lose
        such a message. A server confirms an acknowledgement of a message that is
        no longer pending too, so a confirmation alone does not tell whether the
        message went to another receiver meanwhile. It cannot have, if the
        confirmation came within ``ack_wait`` of the delivery (here: within 0.8
        ``ack_wait`` of its arrival), and the message was delivered for the first
        time. Otherwise (a late confirmation, or a message delivered again) the
        receivers that may hold it settle who gets it with a claim (:meth:`_claim`).
        """
        in_time = time.monotonic() <= arrived + self.link.ack_wait * ACK_IN_TIME
        again = msg.metadata.num_delivered > 1
        if not again and in_time:
            return True
        if not await _run_through(self._claim(msg), call):
            return False
        if again:
            await _run_through(self._event("redelivered", msg), call)
        return True

    async def _claim(self, msg: Msg) -> bool:
        """Claim ``msg`` for this process: ``True`` for the first claimant of its
        stream sequence, in every process; ``False`` for the others.

        A claim is a message on the events stream with subject ``claim.<seq>``,
        stored only if the subject has none yet. A claim retried after a lost reply is
        refused as a second one: the stored claim's token then says whose it is.
        """
        link = self.link
        seq = msg.metadata.sequence.stream
        subject = f"{link.ev_prefix}.claim.{seq}"
        token = f"{link.claimer}.{msg.metadata.num_delivered}".encode()
        headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
        while True:
            try:
                try:
                    await self.js.publish(subject, token, timeout=REQUEST_TIMEOUT, headers=headers)
                    return True
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _WRONG_LAST:
                        raise
                stored = await self.js.get_last_msg(link.ev_stream, subject)
                return bool(stored.data == token)
            except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError):
                if self.nc.is_closed:
                    return False
                await asyncio.sleep(0.05)

    async def _event(self, kind: str, msg: Msg) -> None:
        meta = msg.metadata
        msg_id = f"{kind}.{meta.sequence.stream}.{meta.num_delivered}"
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.js.publish(
                f"{self.link.ev_prefix}.{kind}",
                b"",
                timeout=REQUEST_TIMEOUT,
                headers={"Nats-Msg-Id": msg_id},
            )

    async def _check_end(self) -> None:
        # A server fault (a reconnection, say) delays the verdict: see Link.settled.
        link = self.link
        try:
            counts = await link.refresh(self.js)
            if counts.senders:
                return
            info = await self.js.stream_info(link.stream)
        except (nats.errors.Error, OSError):
            return
        with self.lock:
            if info.state.messages == 0 and not self.buffer:
                for call, _ in self.waiters:
                    if call.state == PENDING:
                        call.fail(EndOfStream())
                self.waiters.clear()

    async def _give_back(self, msg: Msg) -> None:
        """Count ``msg`` as returned and hand it back to the server, without waiting for
        replies (it works on a loop that is shutting down, whose connection reads no
        more): if lost, it is delivered again after ``ack_wait`` instead."""
        meta = msg.metadata
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.nc.publish(
                f"{self.link.ev_prefix}.returned",
                b"",
                headers={"Nats-Msg-Id": f"returned.{meta.sequence.stream}.{meta.num_delivered}"},
            )
            await self.nc.publish(msg.reply, _NAK)

    def take_all(self) -> list[Msg]:
        """Empty the buffer (from any thread): the messages are to be given back."""
        with self.lock:
            msgs = [m for m, _ in self.buffer]
            self.buffer.clear()
        return msgs

    async def give_back(self, msgs: list[Msg]) -> None:
        """Give ``msgs`` back to the channel, from this lane's connection (any lane
        may give back any lane's messages)."""
        for msg in msgs:
            await self._give_back(msg)

    async def give_back_buffer(self) -> None:
        await self.give_back(self.take_all())
