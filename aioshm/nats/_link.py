"""One process's connection to one network channel, and what it does on the bridge loop.

Server-side layout of a channel ``C`` (created by ``open_channel``):

* stream ``AIOSHM_C`` on subject ``aioshm.C.m``: the messages. Work-queue retention (a
  message is deleted once acknowledged), ``max_msgs = capacity`` with *discard new* (a
  publish into a full channel is refused, and the sender retries: that is the bound),
  ``max_msg_size``, ``num_replicas``, ``storage``, and a duplicate window in which a
  publish retried with the same ``Nats-Msg-Id`` is stored once.
* durable pull consumer ``receivers`` on it, shared by every receiver: each message goes
  to one of them; one not acknowledged within ``ack_wait`` goes to another.
* stream ``AIOSHM_C_H`` on ``aioshm.C.h.>``: one subject per open handle
  (``h.s.<id>`` for senders, ``h.r.<id>`` for receivers), one message per subject, and
  ``max_age = heartbeat``. Each process re-publishes its handles' subjects four times per
  ``heartbeat``; closing a handle purges its subject; a dead process's subjects expire.
  Counting subjects counts open handles. A count that drops a side to none is believed
  only while this process's own heartbeats are being stored, and have been for a beat:
  while the stream has no leader (a server fault), every process's beats are lost and
  live handles expire too, until their next beat.
* stream ``AIOSHM_C_E`` on ``aioshm.C.e.>``: events counted by ``statistics()``, and
  claims (``e.claim.<seq>``, one message each) that settle which receiver returns a
  message delivered again, or whose acknowledgement was confirmed late (see
  ``Link._ack``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import threading
import time
import uuid
from collections import deque
from typing import Any, NamedTuple

import nats
import nats.errors
import nats.js.errors
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from . import _bridge
from ._call import PENDING, Call
from ._url import Address

__all__ = ["Counts", "Link", "get_link"]

#: Room for the message headers NATS adds, on top of the encoded message.
HEADER_SLACK = 4096
#: How long one pull request waits at the server.
PULL_EXPIRES = 1.0
#: How often a waiting receiver checks for the end of the stream while idle.
EOS_EVERY = 0.2
#: A waiting sender retries a full channel this often at most.
FULL_BACKOFF = 0.02
#: A count of handles that drops to none is confirmed by asking again after this long.
CONFIRM_AFTER = 0.25
#: After this process's heartbeats failed, a count of none is believed again only once
#: they have been stored for a beat (a quarter of ``heartbeat``) and this much more.
BEAT_SLACK = 0.5
#: How long one publish or API request may take before it is retried.
REQUEST_TIMEOUT = 2.0
#: An acknowledgement confirmed within this share of ``ack_wait`` after the message
#: arrived was applied before the server could deliver the message elsewhere.
ACK_IN_TIME = 0.8
#: A reservation made while pickling a handle lasts this long unless it is claimed.
RESERVATION_LIFETIME = 60.0
_FULL = 10077  # JetStream's "maximum messages exceeded"
_WRONG_LAST = 10071  # "wrong last sequence"
_MSG_TOO_BIG = 10054


class Counts(NamedTuple):
    senders: int
    receivers: int


async def _ignore(*_: object) -> None:
    """nats-py's callbacks must be coroutine functions; aioshm handles reconnection."""


def _is_full(error: BaseException) -> bool:
    return isinstance(error, nats.js.errors.APIError) and error.err_code == _FULL


class Link:
    """One process's connection to one channel (see the module docstring)."""

    def __init__(self, address: Address, options: dict[str, Any]) -> None:
        self.address = address
        self.options = options
        name = address.channel
        self.stream = f"AIOSHM_{name}"
        self.subject = f"aioshm.{name}.m"
        self.consumer = "receivers"
        self.hb_stream = f"AIOSHM_{name}_H"
        self.hb_prefix = f"aioshm.{name}.h"
        self.ev_stream = f"AIOSHM_{name}_E"
        self.ev_prefix = f"aioshm.{name}.e"
        self.capacity = 0
        self.max_message_size = 0
        self.heartbeat = address.heartbeat
        self.ack_wait = address.ack_wait
        self.nc: Any = None
        self.js: Any = None
        self.ready = False
        self._setup_lock: asyncio.Lock | None = None
        # handles and their heartbeats
        self.owned: dict[str, int] = {}  # subject -> local handle count (always 1)
        self.reservations: dict[str, tuple[int, float]] = {}  # subject -> (seq, deadline)
        self.counts = Counts(1, 1)
        self.counted_at = 0.0
        self._beat: asyncio.Task[None] | None = None
        self._beats_ok = True  # this process's last heartbeats were stored
        self._beats_ok_since = -float("inf")
        # receiving
        self.lock = threading.Lock()
        self.waiters: deque[tuple[Call[list[Msg]], int]] = deque()
        self.buffer: deque[tuple[Msg, float]] = deque()
        self.requests: deque[list[float]] = deque()  # [deadline, remaining]
        self.local_receivers = 0
        self.waiting_send = 0
        self.eos = False
        self._inbox = ""
        self._sub: Any = None
        self._pump: asyncio.Task[None] | None = None
        self._poke: asyncio.Event | None = None
        self._last_arrival = 0.0
        self._reconnected_at = -float("inf")
        self._acks: set[asyncio.Task[None]] = set()
        self.claimer = uuid.uuid4().hex  # this link's token in claims (see _claim)

    # ---------------------------------------------------------------- setup

    async def _connect(self, connect_timeout: float) -> None:
        address, options = self.address, self.options
        kwargs: dict[str, Any] = {
            "servers": list(address.servers),
            "connect_timeout": connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "error_cb": _ignore,
            "disconnected_cb": _ignore,
            "reconnected_cb": self._reconnected,
            "closed_cb": _ignore,
            "name": f"aioshm {address.channel}",
        }
        if address.user is not None:
            kwargs["user"] = address.user
            kwargs["password"] = address.password
        if options.get("credentials"):
            kwargs["user_credentials"] = str(options["credentials"])
        if address.scheme == "tls" or options.get("tls_ca") or options.get("tls_cert"):
            context = ssl.create_default_context(cafile=options.get("tls_ca"))
            if options.get("tls_cert"):
                context.load_cert_chain(options["tls_cert"], options.get("tls_key"))
            kwargs["tls"] = context
            if address.scheme == "tls":
                kwargs["tls_handshake_first"] = bool(options.get("tls_handshake_first", False))
        try:
            self.nc = await asyncio.wait_for(
                nats.connect(**kwargs), connect_timeout * len(address.servers) + 1
            )
        except (OSError, TimeoutError, nats.errors.Error, ssl.SSLError) as exc:
            raise OSError(
                f"cannot connect to the NATS server(s) of {address.url} within "
                f"connect_timeout={connect_timeout} s ({type(exc).__name__}: {exc})"
            ) from exc
        self.js = self.nc.jetstream(timeout=REQUEST_TIMEOUT)

    async def _api(self, coro_factory: Any, what: str, deadline: float) -> Any:
        """Run a JetStream API request, retrying while the cluster elects a leader."""
        while True:
            try:
                return await coro_factory()
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                if time.monotonic() > deadline:
                    if isinstance(exc, nats.js.errors.ServiceUnavailableError) and not getattr(
                        exc, "err_code", None
                    ):
                        raise OSError(
                            f"the NATS server(s) of {self.address.url} do not speak JetStream "
                            "(start nats-server with -js, or a jetstream {} block in its "
                            f"configuration); {what} failed"
                        ) from exc
                    raise OSError(f"{what} at {self.address.url} timed out ({exc!r})") from exc
                await asyncio.sleep(0.1)

    async def setup(
        self, create: bool, capacity: int, max_message_size: int, connect_timeout: float
    ) -> None:
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        async with self._setup_lock:
            if self.ready:
                if create:
                    self._check_matches(capacity, max_message_size)
                return
            await self._connect(connect_timeout)
            try:
                await self._declare(create, capacity, max_message_size, connect_timeout)
            except BaseException:
                await self.nc.close()
                raise
            self.ready = True
            self._beat = asyncio.get_running_loop().create_task(self._heartbeat())

    def _check_matches(self, capacity: int, max_message_size: int) -> None:
        if (capacity, max_message_size) != (self.capacity, self.max_message_size):
            raise ValueError(
                f"the channel {self.address.url} exists with capacity={self.capacity} and "
                f"max_message_size={self.max_message_size}, not capacity={capacity} and "
                f"max_message_size={max_message_size}"
            )

    async def _declare(
        self, create: bool, capacity: int, max_message_size: int, connect_timeout: float
    ) -> None:
        address, js = self.address, self.js
        deadline = time.monotonic() + max(connect_timeout, 5.0)
        # A plain NATS server has nobody listening on the JetStream API at all.
        try:
            await js.account_info()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
            if not create:
                pass
            raise OSError(
                f"the NATS server(s) of {address.url} do not speak JetStream (start "
                "nats-server with -js, or a jetstream {} block in its configuration)"
            ) from exc
        except nats.errors.TimeoutError:
            pass  # a cluster electing its leader; the requests below retry
        storage = StorageType.FILE if address.storage == "file" else StorageType.MEMORY
        if create:
            limit = max_message_size + HEADER_SLACK
            server_limit = self.nc.max_payload
            if limit > server_limit:
                raise ValueError(
                    f"max_message_size={max_message_size} needs messages of up to {limit} "
                    f"bytes, but the server at {address.url} allows {server_limit} "
                    "(max_payload): raise max_payload in the server's configuration (up to "
                    "64MB) or lower max_message_size"
                )
            config = StreamConfig(
                name=self.stream,
                subjects=[self.subject],
                retention=RetentionPolicy.WORK_QUEUE,
                max_msgs=capacity,
                discard=DiscardPolicy.NEW,
                max_msg_size=limit,
                storage=storage,
                num_replicas=address.replicas,
                duplicate_window=120.0,
                metadata={"aioshm.max_message_size": str(max_message_size)},
            )
            try:
                await self._api(lambda: js.add_stream(config), "creating the channel", deadline)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # stream name already in use
                    raise ValueError(
                        f"cannot create the channel {address.url}: {exc.description}"
                    ) from exc
        try:
            info = await self._api(
                lambda: js.stream_info(self.stream), "looking the channel up", deadline
            )
        except nats.js.errors.NotFoundError as exc:
            raise FileNotFoundError(
                f"no channel named {address.channel!r} on the NATS server(s) of "
                f"{address.url}: create it first with aioshm.nats.open_channel"
            ) from exc
        self.capacity = int(info.config.max_msgs)
        meta = info.config.metadata or {}
        self.max_message_size = int(meta.get("aioshm.max_message_size", 0)) or int(
            info.config.max_msg_size - HEADER_SLACK
        )
        if create:
            self._check_matches(capacity, max_message_size)
            await self._api(
                lambda: js.add_consumer(
                    self.stream,
                    ConsumerConfig(
                        durable_name=self.consumer,
                        ack_policy=AckPolicy.EXPLICIT,
                        ack_wait=address.ack_wait,
                        max_deliver=-1,
                        max_waiting=4096,
                    ),
                ),
                "creating the channel's consumer",
                deadline,
            )
            for name, prefix, max_age in (
                (self.hb_stream, self.hb_prefix, address.heartbeat),
                (self.ev_stream, self.ev_prefix, None),
            ):
                await self._api(
                    lambda name=name, prefix=prefix, max_age=max_age: js.add_stream(
                        StreamConfig(
                            name=name,
                            subjects=[f"{prefix}.>"],
                            storage=storage,
                            num_replicas=address.replicas,
                            max_msgs_per_subject=1 if max_age else -1,
                            max_age=max_age,
                            duplicate_window=min(max_age or 120.0, 120.0),
                        )
                    ),
                    "creating the channel's bookkeeping streams",
                    deadline,
                )
        consumer = await self._api(
            lambda: js.consumer_info(self.stream, self.consumer), "the consumer", deadline
        )
        self.ack_wait = float(consumer.config.ack_wait or address.ack_wait)
        hb = await self._api(lambda: js.stream_info(self.hb_stream), "the registry", deadline)
        self.heartbeat = float(hb.config.max_age or address.heartbeat)

    async def close(self) -> None:
        """Give back what is buffered, flush acknowledgements, and disconnect."""
        for task in (self._pump, self._beat):
            if task is not None:
                task.cancel()
        await self._give_back_buffer()
        if self._acks:
            await asyncio.wait(list(self._acks), timeout=REQUEST_TIMEOUT)
        if self.nc is not None:
            await self.nc.close()

    # ---------------------------------------------------------------- registry

    def new_subject(self, side: str) -> str:
        return f"{self.hb_prefix}.{side}.{uuid.uuid4().hex}"

    async def register(self, subject: str) -> None:
        """Count a handle of this process as open (and keep it alive)."""
        await self.js.publish(subject, b"open", timeout=REQUEST_TIMEOUT)
        self.owned[subject] = 1
        self.reservations.pop(subject, None)
        await self.refresh()

    async def reserve(self, subject: str) -> None:
        """Count a handle that another process will claim (see ``register``)."""
        ack = await self.js.publish(subject, b"reserved", timeout=REQUEST_TIMEOUT)
        self.reservations[subject] = (ack.seq, time.monotonic() + RESERVATION_LIFETIME)

    def forget(self, subject: str) -> None:
        """A handle of this process is closing: stop heartbeating it, and count it out
        at once here (other processes see it at their next count)."""
        if self.owned.pop(subject, None) is not None:
            side = subject[len(self.hb_prefix) + 1]
            senders, receivers = self.counts
            self.counts = Counts(
                senders - (side == "s") if senders else 0,
                receivers - (side == "r") if receivers else 0,
            )

    async def unregister(self, subject: str) -> None:
        """A handle of this process closed: stop counting it."""
        self.forget(subject)
        with contextlib.suppress(
            nats.errors.Error, OSError
        ):  # it expires after one heartbeat instead
            await self.js.purge_stream(self.hb_stream, subject=subject)
        await self.refresh()

    async def refresh(self) -> Counts:
        """Count the open handles of every process, asking the server.

        A side that drops to none is asked again a moment later: during a cluster's
        leader change an answer may briefly miss what is there, and "no receiver" or
        "no sender" ends the channel, so it must be sure.
        """
        counts = await self._count()
        before = self.counts
        if (counts.senders == 0 < before.senders) or (counts.receivers == 0 < before.receivers):
            await asyncio.sleep(CONFIRM_AFTER)
            counts = await self._count()
            if not self.beats_trusted():  # live handles may have expired with the leader
                counts = Counts(
                    counts.senders or before.senders, counts.receivers or before.receivers
                )
        self.counts = counts
        self.counted_at = time.monotonic()
        return counts

    def beats_trusted(self) -> bool:
        """Whether handles missing from the registry are gone: this process's own
        heartbeats have been stored for a beat, so the others' would have been too."""
        settled = self.heartbeat / 4 + BEAT_SLACK
        return self._beats_ok and time.monotonic() - self._beats_ok_since >= settled

    async def _beat_owned(self) -> None:
        """Re-publish this process's handles' subjects, and note whether the stream
        stored them (see :meth:`beats_trusted`)."""
        subjects = list(self.owned)
        if not subjects:
            return
        # Concurrent publishes: a slow reply does not delay the other handles' beats.
        results = await asyncio.gather(
            *(self.js.publish(s, b"open", timeout=self.heartbeat / 4) for s in subjects),
            return_exceptions=True,
        )
        if any(isinstance(result, BaseException) for result in results):
            self._beats_ok = False
        elif not self._beats_ok:
            self._beats_ok = True
            self._beats_ok_since = time.monotonic()

    async def _count(self) -> Counts:
        info = await self.js.stream_info(self.hb_stream, subjects_filter=f"{self.hb_prefix}.>")
        senders = receivers = 0
        for subject in info.state.subjects or {}:
            side = subject[len(self.hb_prefix) + 1 : len(self.hb_prefix) + 2]
            if side == "s":
                senders += 1
            elif side == "r":
                receivers += 1
        return Counts(senders, receivers)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 4)
            try:
                await self._beat_owned()
                now = time.monotonic()
                for subject, (seq, deadline) in list(self.reservations.items()):
                    if now > deadline:
                        del self.reservations[subject]
                        continue
                    try:
                        ack = await self.js.publish(
                            subject,
                            b"reserved",
                            timeout=REQUEST_TIMEOUT,
                            headers={"Nats-Expected-Last-Subject-Sequence": str(seq)},
                        )
                    except nats.js.errors.APIError as exc:
                        if exc.err_code == _WRONG_LAST:  # claimed (or gone)
                            self.reservations.pop(subject, None)
                            continue
                        raise
                    self.reservations[subject] = (ack.seq, deadline)
                await self.refresh()
            except (nats.errors.Error, OSError):
                continue  # no server now: try again next beat

    # ---------------------------------------------------------------- sending

    async def publish(self, call: Call[None], data: bytes | memoryview, msg_id: str) -> None:
        """Publish one message for ``call``; retry while the channel is full."""
        committed = False  # an attempt may have been stored: never retreat after it
        backoff = 0.001
        headers = {"Nats-Msg-Id": msg_id}
        while True:
            if not committed and not call.begin():
                return
            try:
                await self.js.publish(
                    self.subject, bytes(data), timeout=REQUEST_TIMEOUT, headers=headers
                )
            except nats.js.errors.APIError as exc:
                if _is_full(exc):
                    if not committed:
                        if time.monotonic() - self.counted_at > EOS_EVERY:
                            await self._refresh_quietly()
                        if self.counts.receivers == 0:
                            call.fail(_broken())
                            return
                        if not call.retreat():
                            return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, FULL_BACKOFF)
                    continue
                if exc.err_code == _MSG_TOO_BIG:
                    call.fail(ValueError(f"the server refused the message: {exc.description}"))
                    return
                if (
                    isinstance(exc, nats.js.errors.ServiceUnavailableError)
                    or (exc.code or 0) >= 500
                ):
                    committed = True  # no leader right now: unknown whether stored
                    await asyncio.sleep(0.05)
                    continue
                call.fail(
                    OSError(f"publishing to {self.address.url} failed: {type(exc).__name__}: {exc}")
                )
                return
            except (nats.errors.Error, OSError, TimeoutError):
                # Lost request or reply, or no server: the same id is stored once.
                committed = True
                await asyncio.sleep(0.05)
                continue
            call.settle(None)
            return

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.refresh()

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

    def add_waiter(self, call: Call[list[Msg]], max_items: int) -> None:
        """Queue a receiving caller (on the bridge loop)."""
        with self.lock:
            self.waiters.append((call, max_items))
        self._wake()

    def fail_waiters(self, error: BaseException, calls: set[Call[Any]] | None = None) -> None:
        """Fail queued receiving callers (all, or those in ``calls``) that are pending."""
        with self.lock:
            for call, _ in self.waiters:
                if (calls is None or call in calls) and call.state == PENDING:
                    call.fail(error)

    def _wake(self) -> None:
        if self._poke is None:
            self._poke = asyncio.Event()
            self._inbox = self.nc.new_inbox()
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())
        self._poke.set()

    async def _run_pump(self) -> None:
        assert self._poke is not None
        self._sub = await self.nc.subscribe(self._inbox, cb=self._arrived)
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
                if self.local_receivers > 0 and demand:
                    demand += self.address.prefetch
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
        return min(1.0, self.ack_wait / 4)

    async def _pull(self, batch: int) -> None:
        request = {"batch": batch, "expires": int(PULL_EXPIRES * 1e9)}
        try:
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
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
        self._match()
        self._poke.set()  # type: ignore[union-attr]

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
                task = asyncio.get_running_loop().create_task(self._confirm(call, n, batch))
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

    async def acknowledge(self, msgs: list[tuple[Msg, float]]) -> list[Msg]:
        """Acknowledge ``msgs`` (with their arrival times) and wait for the server to
        confirm; return those that are this process's to hand out (see :meth:`_ack`)."""
        confirmed = await asyncio.gather(*(self._ack(m, at) for m, at in msgs))
        return [m for (m, _), ok in zip(msgs, confirmed, strict=True) if ok]

    async def _reconnected(self) -> None:
        """Back from a disconnection: re-publish this process's handles now."""
        self._reconnected_at = time.monotonic()
        with contextlib.suppress(nats.errors.Error, OSError):
            for subject in list(self.owned):
                await self.nc.publish(subject, b"open")

    async def _check_end(self) -> None:
        # Right after a reconnection, other processes' handles may have expired while
        # the server was out of reach: give them one heartbeat to come back first.
        if time.monotonic() - self._reconnected_at < self.heartbeat:
            return
        try:
            counts = await self.refresh()
            if counts.senders:
                self.eos = False
                return
            info = await self.js.stream_info(self.stream)
        except (nats.errors.Error, OSError):
            return
        with self.lock:
            if info.state.messages == 0 and not self.buffer:
                self.eos = True
                for call, _ in self.waiters:
                    if call.state == PENDING:
                        call.fail(EndOfStream())
                self.waiters.clear()

    async def _ack(self, msg: Msg, arrived: float) -> bool:
        """Acknowledge ``msg`` and wait until a server confirms: whether it is ours.

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
        timeout = min(REQUEST_TIMEOUT, self.ack_wait / 4)
        while True:
            try:
                await msg.ack_sync(timeout=timeout)
                break
            except nats.errors.MsgAlreadyAckdError:
                break
            except (nats.errors.Error, OSError, TimeoutError):
                if self.nc.is_closed:
                    return False  # closing: redelivered after ack_wait, if not applied
                await asyncio.sleep(0.02)
        in_time = time.monotonic() <= arrived + self.ack_wait * ACK_IN_TIME
        if (msg.metadata.num_delivered > 1 or not in_time) and not await self._claim(msg):
            return False
        if msg.metadata.num_delivered > 1:
            await self._event("redelivered", msg)
        return True

    async def _claim(self, msg: Msg) -> bool:
        """Claim ``msg`` for this process: ``True`` for the first claimant of its
        stream sequence, in every process; ``False`` for the others.

        A claim is a message on the events stream with subject ``claim.<seq>``,
        stored only if the subject has none yet. A claim retried after a lost reply is
        refused as a second one: the stored claim's token then says whose it is.
        """
        seq = msg.metadata.sequence.stream
        subject = f"{self.ev_prefix}.claim.{seq}"
        token = f"{self.claimer}.{msg.metadata.num_delivered}".encode()
        headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
        while True:
            try:
                try:
                    await self.js.publish(subject, token, timeout=REQUEST_TIMEOUT, headers=headers)
                    return True
                except nats.js.errors.APIError as exc:
                    if exc.err_code != _WRONG_LAST:
                        raise
                stored = await self.js.get_last_msg(self.ev_stream, subject)
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
                f"{self.ev_prefix}.{kind}",
                b"",
                timeout=REQUEST_TIMEOUT,
                headers={"Nats-Msg-Id": msg_id},
            )

    async def _give_back(self, msg: Msg) -> None:
        await self._event("returned", msg)
        with contextlib.suppress(nats.errors.Error, OSError):  # redelivered after ack_wait instead
            await msg.nak()

    async def _give_back_buffer(self) -> None:
        with self.lock:
            msgs = [m for m, _ in self.buffer]
            self.buffer.clear()
        for msg in msgs:
            await self._give_back(msg)

    async def receivers_closed(self) -> None:
        """The last receive handle of this process closed."""
        await self._give_back_buffer()

    # ---------------------------------------------------------------- statistics

    async def stats(self) -> tuple[Counts, int, int, int]:
        """``(counts, buffered, held by receivers, redelivered)`` from the server."""
        counts = await self.refresh()
        info = await self.js.stream_info(self.stream)
        consumer = await self.js.consumer_info(self.stream, self.consumer)
        events = await self.js.stream_info(self.ev_stream, subjects_filter=f"{self.ev_prefix}.>")
        subjects = events.state.subjects or {}
        redelivered = subjects.get(f"{self.ev_prefix}.redelivered", 0) - subjects.get(
            f"{self.ev_prefix}.returned", 0
        )
        return counts, info.state.messages, consumer.num_ack_pending, max(0, redelivered)


def _broken() -> BrokenResourceError:
    return BrokenResourceError("no receive handle of this channel is open in any process")


def _closed(name: str) -> ClosedResourceError:
    return ClosedResourceError(f"this {name} has been closed")


_links: dict[tuple[object, ...], Link] = {}
_links_lock = threading.Lock()
_links_pid = os.getpid()


def get_link(
    address: Address,
    options: dict[str, Any],
    create: bool = False,
    capacity: int = 0,
    max_message_size: int = 0,
    connect_timeout: float = 5.0,
) -> Link:
    """This process's link to ``address``, set up (blocking the calling thread)."""
    if _links_pid != os.getpid():
        _reset_in_child()
    with _links_lock:
        link = _links.get(address.key)
        if link is None:
            link = _links[address.key] = Link(address, options)
    try:
        _bridge.run(link.setup(create, capacity, max_message_size, connect_timeout))
    except BaseException:
        with _links_lock:
            if not link.ready and _links.get(address.key) is link:
                del _links[address.key]
        raise
    return link


def close_links() -> None:
    """Close every link of this process (their handles become unusable): for tests and
    for a clean exit."""
    with _links_lock:
        links = list(_links.values())
        _links.clear()
    for link in links:
        with contextlib.suppress(Exception):
            _bridge.run(link.close(), timeout=10)


def _reset_in_child() -> None:
    # A forked child has none of its parent's connections (nor the bridge thread).
    global _links_lock, _links_pid
    _links_pid = os.getpid()
    _links.clear()
    _links_lock = threading.Lock()
