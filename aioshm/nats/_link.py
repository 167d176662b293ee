"""One process's connection to one network channel: its setup, and the registry of
handles, kept on the bridge loop. The data path (publishing, pulling, acknowledging)
is in :mod:`aioshm.nats._lane`, on the bridge loop and on each asyncio caller's loop.

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
  only once this process has seen no server fault for a whole ``heartbeat`` (see
  :meth:`Link.settled`): while the stream has no leader, every process's beats are
  lost and live handles expire too, and a process cut off from its server cannot beat;
  one heartbeat after the fault is over, every live process has beaten again.
* stream ``AIOSHM_C_E`` on ``aioshm.C.e.>``: events counted by ``statistics()``, and
  claims (``e.claim.<seq>``, one message each) that settle which receiver returns a
  message delivered again, or whose acknowledgement was confirmed late (see
  ``Lane._judge``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from . import _bridge
from ._lane import _WRONG_LAST, EOS_EVERY, REQUEST_TIMEOUT, Lane, broken
from ._url import Address

__all__ = ["EOS_EVERY", "REQUEST_TIMEOUT", "Counts", "Link", "broken", "get_link"]

#: Room for the message headers NATS adds, on top of the encoded message.
HEADER_SLACK = 4096
#: A count of handles that drops to none is confirmed by asking again after this long.
CONFIRM_AFTER = 0.25
#: A failed heartbeat is tried again this soon (not a quarter of ``heartbeat`` later).
BEAT_RETRY = 0.1
#: A replica of the registry that its leader has not heard from for this long (in
#: nanoseconds, as the server reports it) is down: a healthy one answers within about a
#: second (the servers' own heartbeat).
PEER_SILENT_NS = 2_000_000_000
#: A reservation made while pickling a handle lasts this long unless it is claimed.
RESERVATION_LIFETIME = 60.0


class Counts(NamedTuple):
    senders: int
    receivers: int


class _RegistryState(NamedTuple):
    """The registry stream's cluster as a count saw it: a change is a server fault."""

    leader: str | None
    elected: object  # when the leader was elected (servers that say so)
    down: frozenset[str]  # replicas that the leader has not heard from lately, or at all

    @classmethod
    def of(cls, cluster: Any) -> _RegistryState:
        if cluster is None:
            return cls(None, None, frozenset())
        down = frozenset(
            str(peer.name)
            for peer in cluster.replicas or ()
            if peer.offline
            or (peer.active or 0) > PEER_SILENT_NS
            or not (peer.active or peer.current)  # not heard from since the election
        )
        return cls(cluster.leader, cluster.leader_since, down)


async def _ignore(*_: object) -> None:
    """nats-py's callbacks must be coroutine functions; aioshm handles reconnection."""


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
        self._beat_now: asyncio.Event | None = None  # set: beat at once (reconnected)
        self._disturbed_at = -float("inf")  # when this process last saw a server fault
        self._registry: _RegistryState | None = None  # as the last count saw it
        self._registry_lock = threading.Lock()
        self.connect_timeout = 5.0
        # the data path: the bridge loop's lane, and the asyncio callers' loops' lanes
        self.lane: Lane | None = None
        self.lanes: dict[asyncio.AbstractEventLoop, Lane] = {}
        self._lanes_lock = threading.Lock()
        self.local_receivers = 0
        self.waiting_send = 0
        self.claimer = uuid.uuid4().hex  # this link's token in claims (see Lane._claim)

    # ---------------------------------------------------------------- setup

    async def connect(
        self, connect_timeout: float, reconnected: Callable[[], Coroutine[Any, Any, None]]
    ) -> Any:
        """A new connection to the channel's servers, on the running loop.

        :raises OSError: none within ``connect_timeout`` (the message names the URL)
        """
        address, options = self.address, self.options
        kwargs: dict[str, Any] = {
            "servers": list(address.servers),
            "connect_timeout": connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "error_cb": _ignore,
            "disconnected_cb": _ignore,
            "reconnected_cb": reconnected,
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
            return await asyncio.wait_for(
                nats.connect(**kwargs), connect_timeout * len(address.servers) + 1
            )
        except (OSError, TimeoutError, nats.errors.Error, ssl.SSLError) as exc:
            raise OSError(
                f"cannot connect to the NATS server(s) of {address.url} within "
                f"connect_timeout={connect_timeout} s ({type(exc).__name__}: {exc})"
            ) from exc

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
            self.connect_timeout = connect_timeout
            self.nc = await self.connect(connect_timeout, self._reconnected)
            self.js = self.nc.jetstream(timeout=REQUEST_TIMEOUT)
            try:
                await self._declare(create, capacity, max_message_size, connect_timeout)
                lane = Lane(self, asyncio.get_running_loop())
                await lane.attach(self.nc)
            except BaseException:
                await self.nc.close()
                raise
            self.lane = lane
            self.ready = True
            self._beat_now = asyncio.Event()
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
        """Close every lane (giving back what they hold) and disconnect."""
        if self._beat is not None:
            self._beat.cancel()
        with self._lanes_lock:
            lanes = list(self.lanes.values())
            self.lanes.clear()
        for lane in lanes:
            with contextlib.suppress(RuntimeError):  # its loop is closed: so is its lane
                lane.loop.call_soon_threadsafe(_close_soon, lane)
        if self.lane is not None:
            await self.lane.close()
        if self.nc is not None:
            await self.nc.close()

    # ---------------------------------------------------------------- lanes

    async def lane_here(self) -> Lane | None:
        """The lane of the running asyncio loop, connected on first use; ``None`` if it
        cannot connect (the caller goes through the bridge instead)."""
        loop = asyncio.get_running_loop()
        lane = self.lanes.get(loop)
        if lane is None:
            if self.lane is not None and loop is self.lane.loop:
                return self.lane
            with self._lanes_lock:
                for old in [old for old in self.lanes if old.is_closed()]:
                    del self.lanes[old]
                lane = self.lanes.setdefault(loop, Lane(self, loop))
        if not lane.ready:
            try:
                await lane.start()
            except OSError:
                return None
        return lane

    @property
    def bridge_lane(self) -> Lane:
        """The bridge loop's lane (on the link's own connection)."""
        assert self.lane is not None, "the link is not set up"
        return self.lane

    def all_lanes(self) -> list[Lane]:
        """The bridge's lane and every caller loop's (from any thread)."""
        with self._lanes_lock:
            lanes = list(self.lanes.values())
        return [self.lane, *lanes] if self.lane is not None else lanes

    async def receivers_closed(self) -> None:
        """The last receive handle of this process closed: give back what every lane
        pulled ahead, from the bridge's connection."""
        for lane in self.all_lanes():
            await self.bridge_lane.give_back(lane.take_all())

    async def _reconnected(self) -> None:
        """Back from a disconnection (a server fault): beat now."""
        self.disturbed()
        if self._beat_now is not None:
            self._beat_now.set()

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

    async def refresh(self, js: Any = None) -> Counts:
        """Count the open handles of every process, asking the server (through ``js``,
        of the running loop's connection; by default the link's own).

        A side that drops to none is asked again a moment later: during a cluster's
        leader change an answer may briefly miss what is there, and "no receiver" or
        "no sender" ends the channel, so it must be sure.
        """
        js = js or self.js
        counts = await self._count(js)
        before = self.counts
        if (counts.senders == 0 < before.senders) or (counts.receivers == 0 < before.receivers):
            await asyncio.sleep(CONFIRM_AFTER)
            counts = await self._count(js)
            if not self.settled():  # live handles may have expired in a server fault
                counts = Counts(
                    counts.senders or before.senders, counts.receivers or before.receivers
                )
        self.counts = counts
        self.counted_at = time.monotonic()
        return counts

    def disturbed(self) -> None:
        """Note a server fault, seen now by this process (from any thread)."""
        self._disturbed_at = time.monotonic()

    def settled(self) -> bool:
        """Whether handles missing from the registry are gone: this process has seen no
        server fault for a whole ``heartbeat``.

        The faults it sees: a heartbeat or a count of its own that failed (the registry
        has no leader, or the connection is down), a reconnection (of the link's or a
        lane's connection), and a change in the registry's cluster as each count reports
        it (another leader, or a new election; a replica that its leader has not heard
        from for :data:`PEER_SILENT_NS`, or that comes back). A replica that stays down
        is a change once: the verdicts resume a heartbeat later. Every live process
        beats at least every quarter of ``heartbeat``, and tries a failed beat again
        within :data:`BEAT_RETRY`; so once the fault is over, its handles are stored
        again well within the heartbeat that this process waits.
        """
        return time.monotonic() - self._disturbed_at >= self.heartbeat

    async def _beat_owned(self) -> bool:
        """Re-publish this process's handles' subjects; ``False`` if one was not stored
        (a server fault: see :meth:`settled`)."""
        subjects = list(self.owned)
        if not subjects:
            return True
        # Concurrent publishes: a slow reply does not delay the other handles' beats.
        results = await asyncio.gather(
            *(self.js.publish(s, b"open", timeout=self.heartbeat / 4) for s in subjects),
            return_exceptions=True,
        )
        return not any(isinstance(result, BaseException) for result in results)

    async def _count(self, js: Any) -> Counts:
        try:
            info = await js.stream_info(self.hb_stream, subjects_filter=f"{self.hb_prefix}.>")
        except Exception:
            self.disturbed()  # no leader, or no connection
            raise
        self._note_registry(_RegistryState.of(info.cluster))
        senders = receivers = 0
        for subject in info.state.subjects or {}:
            side = subject[len(self.hb_prefix) + 1 : len(self.hb_prefix) + 2]
            if side == "s":
                senders += 1
            elif side == "r":
                receivers += 1
        return Counts(senders, receivers)

    def _note_registry(self, state: _RegistryState) -> None:
        with self._registry_lock:
            before, self._registry = self._registry, state
        if before is not None and state != before:
            self.disturbed()

    async def _heartbeat(self) -> None:
        """Beat every quarter of ``heartbeat``; at once after a reconnection, and again
        within :data:`BEAT_RETRY` after a failure."""
        assert self._beat_now is not None
        wait = self.heartbeat / 4
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), wait)
            self._beat_now.clear()
            wait = BEAT_RETRY
            try:
                if not await self._beat_owned():
                    self.disturbed()
                    continue
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
                self.disturbed()  # no server now: try again soon
                continue
            wait = self.heartbeat / 4

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


def _close_soon(lane: Lane) -> None:
    lane.loop.create_task(lane.close())


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
