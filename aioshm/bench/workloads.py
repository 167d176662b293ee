"""The workloads: what is sent, how much of it, and the loops every contender runs.

A workload fixes the message (shape, dtype, values), how many messages one measurement
sends, how many processes take part, and the metric. The loops here (producer,
consumer, ping, pong, and one core's memcpy) are the same for every contender: a
contender only supplies the endpoints (:class:`SyncSender`, :class:`AsyncReceiver`, ...)
whose ``send``/``recv`` they call. The loops come in a blocking and an async form,
written line for line alike.

Times that cross processes use ``time.monotonic()`` (``CLOCK_MONOTONIC``, one clock for
the whole machine): the parent notes the instant it releases the start gate, the
consumer the instant it has the last message.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

__all__ = [
    "LATENCY_WARMUP",
    "WORKLOADS",
    "AsyncReceiver",
    "AsyncSender",
    "Connectable",
    "Gate",
    "SyncReceiver",
    "SyncSender",
    "Workload",
    "consume_async",
    "consume_sync",
    "memcpy_solo",
    "ping_async",
    "ping_sync",
    "pong_async",
    "pong_sync",
    "produce_async",
    "produce_sync",
]

Array = np.ndarray[Any, np.dtype[Any]]

#: Round trips done before the timed ones in the latency workload (not counted).
LATENCY_WARMUP: Final = 50


@dataclass(frozen=True)
class Workload:
    """One workload; see :data:`WORKLOADS`."""

    #: name used on the command line (``--only``)
    key: str
    title: str
    description: str
    #: ``"msg/s"``, ``"GB/s"`` or ``"µs"``
    unit: str
    higher_is_better: bool
    #: messages per measurement in the full run, and with ``--quick``
    count: int
    quick_count: int
    #: ``"throughput"`` (producers -> one consumer) or ``"latency"`` (ping-pong)
    kind: str
    #: producer processes (throughput workloads)
    producers: int
    #: the array sent: float64 of this shape
    shape: tuple[int, ...]
    #: contender keys whose figures the others are divided by, round by round
    baselines: tuple[str, ...]
    #: if given, only these contenders take part (besides the workload being theirs)
    only: frozenset[str] | None = None

    @property
    def message_bytes(self) -> int:
        """Bytes of array data in one message."""
        return int(np.prod(self.shape)) * 8

    def messages(self, quick: bool) -> int:
        """Messages per measurement."""
        return self.quick_count if quick else self.count

    def data(self) -> Array:
        """The array every contender sends: the same values in every process and run."""
        return np.random.default_rng(20240607).random(self.shape)

    def figure(self, count: int, elapsed: float) -> float:
        """The workload's metric for ``count`` messages moved in ``elapsed`` seconds."""
        if self.unit == "GB/s":
            return count * self.message_bytes / elapsed / 1e9
        return count / elapsed


SMALL: Final = Workload(
    key="small",
    title="Small messages",
    description=(
        "A 10-element float64 array (80 bytes), one way, one producer process to one "
        "consumer process."
    ),
    unit="msg/s",
    higher_is_better=True,
    count=100_000,
    quick_count=2_000,
    kind="throughput",
    producers=1,
    shape=(10,),
    baselines=("mp-queue", "iceoryx2-wait"),
)

LARGE: Final = Workload(
    key="large",
    title="Large messages (8 MiB)",
    description=(
        "A float64 array of 1,048,576 elements (8 MiB), one way, one producer process to "
        "one consumer process. GB/s are 10^9 bytes of array data per second. The "
        "reference is iceoryx2 (loan + copy in, copy out; and read in place). One core's "
        "memcpy, `np.copyto` between two preallocated 8 MiB arrays in a process of its "
        "own, is given as context, not as a ceiling: where the L3 cache holds both "
        "buffers it runs from cache, which no transport between two cores reaches (see "
        "the 64 MiB workload for a size past the cache)."
    ),
    unit="GB/s",
    higher_is_better=True,
    count=300,
    quick_count=20,
    kind="throughput",
    producers=1,
    shape=(8 * 2**20 // 8,),
    baselines=("mp-queue", "iceoryx2-wait", "two-copies", "memcpy"),
)

HUGE: Final = Workload(
    key="huge",
    title="Larger than the cache (64 MiB)",
    description=(
        "A float64 array of 8,388,608 elements (64 MiB: more than the L3 cache of the "
        "machines this runs on), one way, one producer process to one consumer process, "
        "for the copying and the zero-copy forms of aioshm and iceoryx2; memcpy as "
        "context, here from memory rather than from cache."
    ),
    unit="GB/s",
    higher_is_better=True,
    count=40,
    quick_count=3,
    kind="throughput",
    producers=1,
    shape=(64 * 2**20 // 8,),
    baselines=("iceoryx2-wait", "two-copies", "memcpy"),
    only=frozenset(
        {
            "aioshm-asyncio",
            "aioshm-view",
            "iceoryx2-wait",
            "iceoryx2-inplace",
            "mp-queue",
            "two-copies",
            "memcpy",
        }
    ),
)

LATENCY: Final = Workload(
    key="latency",
    title="Round-trip latency",
    description=(
        "Ping-pong of a 10-element float64 array between two processes: one sends, the "
        "other sends back what it received. A round's figure is the median round trip, "
        f"after {LATENCY_WARMUP} untimed warm-up round trips; the table gives the median "
        "over the rounds. Lower is better."
    ),
    unit="µs",
    higher_is_better=False,
    count=5_000,
    quick_count=200,
    kind="latency",
    producers=1,
    shape=(10,),
    baselines=("mp-pipe", "mp-queue", "iceoryx2-wait"),
)

FANIN: Final = Workload(
    key="fanin",
    title="Fan-in 4 → 1",
    description=(
        "Four producer processes send small messages (10 float64) to one consumer "
        "process; the count is the total over the four producers. The table gives the "
        "median over the rounds."
    ),
    unit="msg/s",
    higher_is_better=True,
    count=100_000,
    quick_count=2_000,
    kind="throughput",
    producers=4,
    shape=(10,),
    baselines=("mp-queue",),
)

#: Every workload, in report order.
WORKLOADS: Final[dict[str, Workload]] = {w.key: w for w in (SMALL, LARGE, HUGE, LATENCY, FANIN)}


# ---------------------------------------------------------------- endpoints


class Connectable(Protocol):
    """What every endpoint has: a way to reach the endpoints opened after it."""

    def connect(self) -> None:
        """Connect to the peer endpoints, which exist by now (called once every process
        of the measurement has opened its endpoints, before the start gate opens).

        A no-op for most transports. iceoryx2 needs it: a subscriber attaches to a
        publisher created after it only when it next looks for samples, and until then
        a publisher that has filled the subscriber's buffer discards what it sends.
        """


class SyncSender(Connectable, Protocol):
    """A blocking sending endpoint, opened in the process that uses it."""

    def send(self, item: Array) -> None:
        """Send one message."""

    def send_some(self, index: int, remaining: int) -> int:
        """Send message number ``index`` (and possibly more, up to ``remaining``);
        return how many were sent."""

    def finish(self) -> None:
        """Flush and close, once everything is sent."""


class SyncReceiver(Connectable, Protocol):
    """A blocking receiving endpoint."""

    def recv(self) -> Array:
        """Receive one message."""

    def recv_some(self, index: int, remaining: int) -> int:
        """Receive message number ``index`` (and possibly more, up to ``remaining``);
        return how many. The last message (``remaining`` reached) is checked."""

    def verified(self) -> bool:
        """Whether the last message received had the expected contents."""

    def finish(self) -> None:
        """Close."""


class AsyncSender(Connectable, Protocol):
    """The async form of :class:`SyncSender`."""

    async def send(self, item: Array) -> None:
        """Send one message."""

    async def send_some(self, index: int, remaining: int) -> int:
        """See :meth:`SyncSender.send_some`."""

    async def finish(self) -> None:
        """Flush and close."""


class AsyncReceiver(Connectable, Protocol):
    """The async form of :class:`SyncReceiver`."""

    async def recv(self) -> Array:
        """Receive one message."""

    async def recv_some(self, index: int, remaining: int) -> int:
        """See :meth:`SyncReceiver.recv_some`."""

    def verified(self) -> bool:
        """Whether the last message received had the expected contents."""

    async def finish(self) -> None:
        """Close."""


class Gate(Protocol):
    """The start and finish lines, kept by the parent."""

    def ready_and_wait(self, *ends: Connectable) -> None:
        """Report ready; once every process is, connect ``ends`` (:meth:`Connectable.connect`)
        and report that; then block until the parent releases every process."""

    def wait_received(self) -> None:
        """Block until the measuring process (consumer, ping) has all it needs.

        Senders close their endpoints only then, as a long-lived sender would: closing
        while messages are still in flight is a different (shutdown) scenario, and it
        is where pyzmq's ``zmq.asyncio`` receiver was seen to miss its wake-up and hang.
        """


# ---------------------------------------------------------------- loops


def _cpu_seconds() -> float:
    """CPU time of this process, all threads, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def produce_sync(sender: SyncSender, count: int, gate: Gate) -> dict[str, float]:
    """Send ``count`` messages as fast as the endpoint takes them."""
    gate.ready_and_wait(sender)
    index = 0
    while index < count:
        index += sender.send_some(index, count - index)
    gate.wait_received()
    sender.finish()
    return {}


async def produce_async(sender: AsyncSender, count: int, gate: Gate) -> dict[str, float]:
    """The async form of :func:`produce_sync`."""
    gate.ready_and_wait(sender)
    index = 0
    while index < count:
        index += await sender.send_some(index, count - index)
    gate.wait_received()
    await sender.finish()
    return {}


def consume_sync(receiver: SyncReceiver, count: int, gate: Gate) -> dict[str, float]:
    """Receive ``count`` messages; report when the last arrived and the CPU time used,
    by the whole process and by the thread that receives."""
    gate.ready_and_wait(receiver)
    cpu, thread = _cpu_seconds(), time.thread_time()
    index = 0
    while index < count:
        index += receiver.recv_some(index, count - index)
    end = time.monotonic()
    cpu, thread = _cpu_seconds() - cpu, time.thread_time() - thread
    ok = receiver.verified()
    receiver.finish()
    return {"end": end, "cpu": cpu, "thread_cpu": thread, "verified": float(ok)}


async def consume_async(receiver: AsyncReceiver, count: int, gate: Gate) -> dict[str, float]:
    """The async form of :func:`consume_sync`."""
    gate.ready_and_wait(receiver)
    cpu, thread = _cpu_seconds(), time.thread_time()
    index = 0
    while index < count:
        index += await receiver.recv_some(index, count - index)
    end = time.monotonic()
    cpu, thread = _cpu_seconds() - cpu, time.thread_time() - thread
    ok = receiver.verified()
    await receiver.finish()
    return {"end": end, "cpu": cpu, "thread_cpu": thread, "verified": float(ok)}


def _latency_report(rtts: list[float], last: Array, data: Array) -> dict[str, float]:
    return {
        "median": statistics.median(rtts),
        "verified": float(bool(np.array_equal(last, data))),
    }


def ping_sync(
    sender: SyncSender, receiver: SyncReceiver, data: Array, count: int, gate: Gate
) -> dict[str, float]:
    """Send ``data``, wait for it to come back; time each round trip."""
    gate.ready_and_wait(sender, receiver)
    rtts: list[float] = []
    clock = time.perf_counter
    last = data
    for i in range(LATENCY_WARMUP + count):
        start = clock()
        sender.send(data)
        last = receiver.recv()
        if i >= LATENCY_WARMUP:
            rtts.append(clock() - start)
    sender.finish()
    receiver.finish()
    return _latency_report(rtts, last, data)


async def ping_async(
    sender: AsyncSender, receiver: AsyncReceiver, data: Array, count: int, gate: Gate
) -> dict[str, float]:
    """The async form of :func:`ping_sync`."""
    gate.ready_and_wait(sender, receiver)
    rtts: list[float] = []
    clock = time.perf_counter
    last = data
    for i in range(LATENCY_WARMUP + count):
        start = clock()
        await sender.send(data)
        last = await receiver.recv()
        if i >= LATENCY_WARMUP:
            rtts.append(clock() - start)
    await sender.finish()
    await receiver.finish()
    return _latency_report(rtts, last, data)


def pong_sync(
    sender: SyncSender, receiver: SyncReceiver, count: int, gate: Gate
) -> dict[str, float]:
    """Send back every message received."""
    gate.ready_and_wait(sender, receiver)
    for _ in range(LATENCY_WARMUP + count):
        sender.send(receiver.recv())
    gate.wait_received()
    sender.finish()
    receiver.finish()
    return {}


async def pong_async(
    sender: AsyncSender, receiver: AsyncReceiver, count: int, gate: Gate
) -> dict[str, float]:
    """The async form of :func:`pong_sync`."""
    gate.ready_and_wait(sender, receiver)
    for _ in range(LATENCY_WARMUP + count):
        await sender.send(await receiver.recv())
    gate.wait_received()
    await sender.finish()
    await receiver.finish()
    return {}


def memcpy_solo(data: Array, count: int, gate: Gate) -> dict[str, float]:
    """Context: ``count`` copies of ``data`` into a preallocated array, on one core."""
    dst = np.empty_like(data)
    np.copyto(dst, data)  # fault the pages in before the clock starts
    gate.ready_and_wait()
    start = time.monotonic()
    for _ in range(count):
        np.copyto(dst, data)
    end = time.monotonic()
    return {
        "end": end,
        "elapsed": end - start,
        "verified": float(bool(np.array_equal(dst, data))),
    }
