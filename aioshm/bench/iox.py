"""iceoryx2, the reference: zero-copy, lock-free shared-memory IPC with Python bindings.

iceoryx2 has no async API, so it runs through blocking calls, in two forms:

- **blocking wait**: each send is followed by a notification on an event service of the
  same name; the subscriber sleeps on a ``WaitSet`` attached to a listener when nothing
  is there (the subscriber itself has no blocking receive);
- **busy poll**: the subscriber calls ``receive()`` in a loop, never sleeping.

Set up so that it cannot drop a message unnoticed: safe overflow is disabled (a full
subscriber buffer makes the publisher retry, as a full aioshm channel makes its sender
wait), the subscriber is created (in the consumer, which is started first) before the
publisher, and both ports connect to each other before the start gate opens
(:meth:`connect`, once every process has opened its ports).

That last step matters. A connection between a publisher and a subscriber has two
sides, and each port attaches its own side only in ``update_connections``, which a
subscriber runs when it next looks for samples (``receive``, ``has_samples``). A
publisher created after the subscriber attaches its side at once, and may fill the
subscriber's buffer before the subscriber has attached; it then does not retry but
discards every message it sends, until the subscriber attaches, and ``send`` says so
only by returning 0 recipients instead of 1 (iceoryx2 0.10's ``blocking_send`` gives up
when the other side is not connected). That is how earlier runs lost messages 129 to a
few thousand whenever the consumer was scheduled late after the start.

And the counts are checked: a send that reaches no subscriber, or a notification that
wakes no listener, raises at once; a receiver that sees nothing for :data:`STALL`
seconds raises, saying how many messages it got; it also checks, at the end, that
nothing arrived beyond them.

Messages are a fixed-size ``ctypes.c_double * n`` payload: a send is ``loan_uninit`` +
``ctypes.memmove`` of the array's bytes + ``send``; a copying receive copies the payload
out into a new array (``loan+copy``); an in-place receive only maps it as an array and
releases the sample (as aioshm's ``recv_view`` rows do, the last one is read through).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import time
from typing import Any, Final

import numpy as np

from .contenders import Context, Link, SyncContender, _SyncEnd, peer
from .workloads import SyncReceiver, SyncSender, Workload

__all__ = ["STALL", "IceoryxBlocking", "IceoryxInPlace", "IceoryxPoll"]

Array = np.ndarray[Any, np.dtype[Any]]

#: A receiver that gets nothing for this long reports the messages as dropped.
STALL: Final = 20.0
#: Subscriber buffer (messages in flight) for small and for large messages, as aioshm's
#: channel capacities in the bench.
SMALL_DEPTH: Final = 128
LARGE_DEPTH: Final = 4
#: Most publishers on one service (the fan-in producers).
MAX_PUBLISHERS: Final = 4
#: A polling receiver looks at the clock once in this many empty polls.
POLLS_PER_CLOCK: Final = 4096

_serial = itertools.count()


class _Ports:
    """One process's node and services for one link (publish-subscribe, plus an event
    service of the same name for the blocking form)."""

    def __init__(self, name: str, workload: Workload, blocking: bool) -> None:
        iox2 = peer("iceoryx2")
        iox2.set_log_level(iox2.LogLevel.Error)
        self.iox2 = iox2
        self.payload = ctypes.c_double * int(np.prod(workload.shape))
        self.depth = LARGE_DEPTH if workload.message_bytes > 65536 else SMALL_DEPTH
        self.node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        service_name = iox2.ServiceName.new(name)
        self.service = (
            self.node.service_builder(service_name)
            .publish_subscribe(self.payload)
            .enable_safe_overflow(False)
            .subscriber_max_buffer_size(self.depth)
            .history_size(0)
            .max_publishers(MAX_PUBLISHERS)
            .max_subscribers(1)
            .open_or_create()
        )
        self.event = (
            self.node.service_builder(service_name).event().open_or_create() if blocking else None
        )


class _Sender(_SyncEnd):
    def __init__(self, name: str, workload: Workload, data: Array, blocking: bool) -> None:
        super().__init__(data)
        self.ports = _Ports(name, workload, blocking)
        iox2 = self.ports.iox2
        self.publisher = (
            self.ports.service.publisher_builder()
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.notifier = (
            None if self.ports.event is None else self.ports.event.notifier_builder().create()
        )
        self.nbytes = data.nbytes
        self.sent = 0

    def connect(self) -> None:
        self.publisher.update_connections()

    def send(self, item: Array) -> None:
        sample = self.publisher.loan_uninit()
        ctypes.memmove(sample.payload_ptr, item.ctypes.data, self.nbytes)
        if sample.assume_init().send() != 1:
            raise RuntimeError(
                f"iceoryx2 sent message {self.sent + 1} to no subscriber: it was dropped"
            )
        self.sent += 1
        if self.notifier is not None and self.notifier.notify() != 1:
            raise RuntimeError(f"iceoryx2's notification of message {self.sent} woke no listener")

    def finish(self) -> None:
        if self.notifier is not None:
            self.notifier.delete()
        self.publisher.delete()


class _Receiver(_SyncEnd):
    def __init__(
        self, name: str, workload: Workload, data: Array, blocking: bool, in_place: bool
    ) -> None:
        super().__init__(data)
        self.ports = _Ports(name, workload, blocking)
        iox2 = self.ports.iox2
        self.subscriber = (
            self.ports.service.subscriber_builder().buffer_size(self.ports.depth).create()
        )
        self.listener: Any = (
            None if self.ports.event is None else self.ports.event.listener_builder().create()
        )
        self.waitset: Any = None
        if self.listener is not None:
            self.waitset = iox2.WaitSetBuilder.new().create(iox2.ServiceType.Ipc)
            self.guard = self.waitset.attach_notification(self.listener)
            self.stall = iox2.Duration.from_secs_f64(STALL)
        self.in_place = in_place
        self.received = 0

    def connect(self) -> None:
        self.subscriber.has_samples()  # runs update_connections: attach to the publisher

    def _sample(self) -> Any:
        """The next sample, waiting for it (blocking or polling)."""
        receive = self.subscriber.receive
        sample = receive()
        if sample is not None:
            return sample
        if self.waitset is not None:
            while True:
                triggered, _ = self.waitset.wait_and_process_with_timeout(self.stall)
                self.listener.try_wait()  # consume the notifications: else it stays ready
                sample = receive()
                if sample is not None:
                    return sample
                if not triggered:
                    self._dropped()
        deadline = time.monotonic() + STALL
        while True:
            for _ in range(POLLS_PER_CLOCK):
                sample = receive()
                if sample is not None:
                    return sample
            if time.monotonic() > deadline:
                self._dropped()

    def _dropped(self) -> None:
        raise RuntimeError(
            f"iceoryx2 delivered {self.received} message(s), then nothing for {STALL:g} s: "
            "the others were dropped or are stuck"
        )

    def _view(self, sample: Any) -> Array:
        """The sample's payload as an array (no copy)."""
        payload: Any = self.ports.payload.from_address(sample.payload_ptr)
        return np.frombuffer(payload, np.float64).reshape(self.data.shape)

    def recv(self) -> Array:
        sample = self._sample()
        out = self._view(sample).copy()
        sample.delete()
        self.received += 1
        return out

    def recv_some(self, index: int, remaining: int) -> int:
        if not self.in_place:
            return super().recv_some(index, remaining)
        sample = self._sample()
        self.received += 1
        if remaining == 1:
            self._ok = self.check(self._view(sample), index)
        sample.delete()
        return 1

    def verified(self) -> bool:
        extra = self.subscriber.receive()
        if extra is not None:  # more than was sent: the count is wrong
            extra.delete()
            return False
        return self._ok

    def finish(self) -> None:
        if self.waitset is not None:
            self.guard.delete()
            self.waitset.delete()
            self.listener.delete()
        self.subscriber.delete()


class IceoryxBlocking(SyncContender):
    """iceoryx2 publish-subscribe, the subscriber sleeping on a ``WaitSet`` + event."""

    key = "iceoryx2-wait"
    label = "iceoryx2, blocking wait (WaitSet + event)"
    requires = ("iceoryx2",)
    workloads = frozenset({"small", "large", "huge", "latency"})
    blocking = True
    in_place = False
    setup = (
        "publish-subscribe service of `ctypes.c_double * n`, safe overflow disabled, "
        f"subscriber buffer {SMALL_DEPTH} (small) or {LARGE_DEPTH} (large), publisher "
        "`RetryUntilDelivered`; subscriber created first, both ports connected "
        "(`update_connections`, `has_samples`) before the clock starts; `loan_uninit` + "
        "`memmove` + `send`; the blocking form notifies an event service after each send "
        "and the subscriber waits on a `WaitSet`; recipients of each send and notification "
        "and receive counts checked"
    )

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        name = f"aioshm-bench/{os.getpid()}/{next(_serial)}"
        return Link([name] * producers, name)

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        return _Sender(end, workload, data, self.blocking)

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        return _Receiver(end, workload, data, self.blocking, self.in_place)


class IceoryxPoll(IceoryxBlocking):
    """iceoryx2 publish-subscribe, the subscriber polling ``receive()`` in a loop."""

    key = "iceoryx2-poll"
    label = "iceoryx2, busy poll"
    workloads = frozenset({"small", "large", "latency"})
    blocking = False


class IceoryxInPlace(IceoryxBlocking):
    """iceoryx2, blocking wait, the subscriber reading the sample in place."""

    key = "iceoryx2-inplace"
    label = "iceoryx2, blocking wait, read in place"
    workloads = frozenset({"large", "huge"})
    in_place = True
