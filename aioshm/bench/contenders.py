"""The contenders: aioshm in its several forms, the seed's channel, and the peers.

A contender knows two things: how to create its transport in the parent, the way a user
would (:meth:`Contender.open`: an aioshm channel, a ``multiprocessing.Queue``, a
socket address...), and how to open an endpoint on it in the child process that uses it
(``sync_sender``/``async_sender``...). The loops that drive the endpoints are the
workloads' (:mod:`aioshm.bench.workloads`), the same for every contender.

Blocking calls take no timeout of their own unless the library needs one (faster-fifo
times out after 10 s by default): the runner's watchdog kills any measurement that
overruns, so a stuck contender cannot hang the bench.

Peer libraries are imported only through :func:`peer`, so that one that is not installed
costs the bench nothing but its rows.
"""

from __future__ import annotations

import importlib
import multiprocessing.connection
import multiprocessing.context
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

import aioshm

from .workloads import WORKLOADS, AsyncReceiver, AsyncSender, SyncReceiver, SyncSender, Workload

__all__ = [
    "CONTENDERS",
    "AsyncContender",
    "Contender",
    "Link",
    "SeedFloatChannel",
    "SoloContender",
    "SyncContender",
    "peer",
]

Array = np.ndarray[Any, np.dtype[Any]]
Context = multiprocessing.context.BaseContext

#: aioshm channels for small messages: slots, and bytes per slot.
SMALL_CAPACITY: Final = 128
SMALL_SLOT_BYTES: Final = 1024
#: aioshm channels for 8 MiB messages (also the depth given to faster-fifo).
LARGE_CAPACITY: Final = 4
LARGE_SLOT_BYTES: Final = 8 * 2**20
#: ``send_many``/``recv_many`` batch size.
BATCH: Final = 64
#: pyzmq sends with ``copy=False`` from this many bytes (its docs: zero-copy pays off for
#: large messages only).
ZMQ_ZERO_COPY_FROM: Final = 65536
#: faster-fifo's own timeout, made long: the runner's watchdog is the real one.
FASTER_FIFO_TIMEOUT: Final = 3600.0


def peer(module: str) -> Any:
    """Import a peer library (untyped: peers are optional and some have no stubs)."""
    return importlib.import_module(module)


@dataclass
class Link:
    """A transport created in the parent: what each producer process gets, and what the
    consumer process gets. Producers may share one object (a queue) or have one each."""

    senders: list[Any]
    receiver: Any
    #: objects the parent closes once the children have started
    parent_copies: list[Any] = field(default_factory=list)


# ---------------------------------------------------------------- endpoint defaults


class _SyncEnd:
    """Defaults for blocking endpoints: one message per call; the last one is checked."""

    def __init__(self, data: Array) -> None:
        self.data = data
        self._ok = False

    def connect(self) -> None:
        pass

    def send(self, item: Array) -> None:
        raise NotImplementedError

    def recv(self) -> Array:
        raise NotImplementedError

    def send_some(self, index: int, remaining: int) -> int:
        self.send(self.data)
        return 1

    def recv_some(self, index: int, remaining: int) -> int:
        item = self.recv()
        if remaining == 1:
            self._ok = self.check(item, index)
        return 1

    def check(self, item: Array, index: int) -> bool:
        """Whether message number ``index`` is what was sent."""
        return item.shape == self.data.shape and bool(np.array_equal(item, self.data))

    def verified(self) -> bool:
        return self._ok

    def finish(self) -> None:
        pass


class _AsyncEnd:
    """The async form of :class:`_SyncEnd`."""

    def __init__(self, data: Array) -> None:
        self.data = data
        self._ok = False

    def connect(self) -> None:
        pass

    async def send(self, item: Array) -> None:
        raise NotImplementedError

    async def recv(self) -> Array:
        raise NotImplementedError

    async def send_some(self, index: int, remaining: int) -> int:
        await self.send(self.data)
        return 1

    async def recv_some(self, index: int, remaining: int) -> int:
        item = await self.recv()
        if remaining == 1:
            self._ok = self.check(item, index)
        return 1

    def check(self, item: Array, index: int) -> bool:
        """Whether message number ``index`` is what was sent."""
        return item.shape == self.data.shape and bool(np.array_equal(item, self.data))

    def verified(self) -> bool:
        return self._ok

    async def finish(self) -> None:
        pass


# ---------------------------------------------------------------- contender kinds


class Contender:
    """Base of all contenders."""

    #: stable identifier (report rows, ratios, targets)
    key: str = ""
    #: what the report calls it
    label: str = ""
    #: modules that must import for it to run
    requires: tuple[str, ...] = ()
    #: the workloads it takes part in
    workloads: frozenset[str] = frozenset(WORKLOADS)
    #: how its transport is set up, for the report
    setup: str = ""

    def takes_part(self, workload: Workload) -> bool:
        """Whether it runs on ``workload``."""
        return workload.key in self.workloads and (
            workload.only is None or self.key in workload.only
        )

    def missing(self) -> str | None:
        """Why it cannot run here (a module that does not import), or ``None``."""
        for module in self.requires:
            try:
                peer(module)
            except ImportError as exc:
                return f"`{module}` is not installed ({exc})"
        return None

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        """Create the transport in the parent, for ``producers`` sending processes."""
        raise NotImplementedError

    def release(self, link: Link) -> None:
        """Close the parent's copies once the children have started."""
        for obj in link.parent_copies:
            obj.close()


class SyncContender(Contender):
    """A contender used through blocking calls."""

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        raise NotImplementedError

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        raise NotImplementedError


class AsyncContender(Contender):
    """A contender used from an event loop (endpoints are opened inside the loop)."""

    #: the anyio backend its processes run on
    backend: str = "asyncio"

    def async_sender(self, end: Any, workload: Workload, data: Array) -> AsyncSender:
        raise NotImplementedError

    def async_receiver(self, end: Any, workload: Workload, data: Array) -> AsyncReceiver:
        raise NotImplementedError


class SoloContender(Contender):
    """Not a transport: a figure measured in one process (one core's memcpy, as context)."""


# ---------------------------------------------------------------- aioshm


def _aioshm_link(workload: Workload, producers: int) -> Link:
    if workload.message_bytes > SMALL_SLOT_BYTES:
        slot = max(LARGE_SLOT_BYTES, workload.message_bytes)
        tx, rx = aioshm.open_channel[Array](LARGE_CAPACITY, slot)
    else:
        tx, rx = aioshm.open_channel[Array](SMALL_CAPACITY, SMALL_SLOT_BYTES)
    return Link([tx] * producers, rx, [tx, rx])


_AIOSHM_SETUP = (
    f"`open_channel(capacity={SMALL_CAPACITY}, max_message_size={SMALL_SLOT_BYTES})` for "
    f"small messages, `open_channel(capacity={LARGE_CAPACITY}, "
    f"max_message_size={LARGE_SLOT_BYTES})` for 8 MiB (64 MiB slots for 64 MiB); "
    "handles passed as "
    "`Process` arguments"
)


class _AioshmAsyncSender(_AsyncEnd):
    def __init__(self, tx: aioshm.SendChannel[Array], data: Array) -> None:
        super().__init__(data)
        self.tx = tx

    async def send(self, item: Array) -> None:
        await self.tx.send(item)

    async def finish(self) -> None:
        await self.tx.aclose()


class _AioshmAsyncReceiver(_AsyncEnd):
    def __init__(self, rx: aioshm.ReceiveChannel[Array], data: Array) -> None:
        super().__init__(data)
        self.rx = rx

    async def recv(self) -> Array:
        return await self.rx.recv()

    async def finish(self) -> None:
        await self.rx.aclose()


class AioshmAsync(AsyncContender):
    """aioshm's async API, ``await tx.send(x)`` / ``await rx.recv()``."""

    setup = _AIOSHM_SETUP

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.key = f"aioshm-{backend}"
        self.label = f"aioshm, {backend}"
        self.requires = ("trio",) if backend == "trio" else ()

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        return _aioshm_link(workload, producers)

    def async_sender(self, end: Any, workload: Workload, data: Array) -> AsyncSender:
        return _AioshmAsyncSender(end, data)

    def async_receiver(self, end: Any, workload: Workload, data: Array) -> AsyncReceiver:
        return _AioshmAsyncReceiver(end, data)


class _AioshmBlockingSender(_SyncEnd):
    def __init__(self, tx: aioshm.SendChannel[Array], data: Array) -> None:
        super().__init__(data)
        self.tx = tx

    def send(self, item: Array) -> None:
        self.tx.send_blocking(item)

    def finish(self) -> None:
        self.tx.close()


class _AioshmBlockingReceiver(_SyncEnd):
    def __init__(self, rx: aioshm.ReceiveChannel[Array], data: Array) -> None:
        super().__init__(data)
        self.rx = rx

    def recv(self) -> Array:
        return self.rx.recv_blocking()

    def finish(self) -> None:
        self.rx.close()


class AioshmBlocking(SyncContender):
    """aioshm without an event loop: ``send_blocking`` / ``recv_blocking``."""

    key = "aioshm-blocking"
    label = "aioshm, blocking API"
    setup = _AIOSHM_SETUP

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        return _aioshm_link(workload, producers)

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        return _AioshmBlockingSender(end, data)

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        return _AioshmBlockingReceiver(end, data)


class _BatchSender(_AioshmAsyncSender):
    async def send_some(self, index: int, remaining: int) -> int:
        n = min(BATCH, remaining)
        await self.tx.send_many([self.data] * n)
        return n


class _BatchReceiver(_AioshmAsyncReceiver):
    async def recv_some(self, index: int, remaining: int) -> int:
        items = await self.rx.recv_many(min(BATCH, remaining))
        if len(items) == remaining:
            self._ok = self.check(items[-1], index + remaining - 1)
        return len(items)


class AioshmBatch(AioshmAsync):
    """aioshm on asyncio, ``send_many`` / ``recv_many`` in batches of :data:`BATCH`."""

    workloads = frozenset({"small"})

    def __init__(self) -> None:
        super().__init__("asyncio")
        self.key = "aioshm-batch"
        self.label = f"aioshm, asyncio, send_many/recv_many \N{MULTIPLICATION SIGN}{BATCH}"

    def async_sender(self, end: Any, workload: Workload, data: Array) -> AsyncSender:
        return _BatchSender(end, data)

    def async_receiver(self, end: Any, workload: Workload, data: Array) -> AsyncReceiver:
        return _BatchReceiver(end, data)


class _ViewReceiver(_AioshmAsyncReceiver):
    """Receives with ``recv_view``: the message is looked at in its slot, not copied.

    Only the last message is read through (to check it); the others are only mapped.
    """

    async def recv_some(self, index: int, remaining: int) -> int:
        async with self.rx.recv_view() as view:
            if remaining == 1:
                self._ok = self.check(view, index)
        return 1


class AioshmView(AioshmAsync):
    """aioshm on asyncio: copying ``send``, zero-copy ``recv_view``."""

    workloads = frozenset({"large", "huge"})

    def __init__(self) -> None:
        super().__init__("asyncio")
        self.key = "aioshm-view"
        self.label = "aioshm, asyncio, send + recv_view"

    def async_receiver(self, end: Any, workload: Workload, data: Array) -> AsyncReceiver:
        return _ViewReceiver(end, data)


class _LoanCopySender(_AioshmAsyncSender):
    async def send_some(self, index: int, remaining: int) -> int:
        async with self.tx.send_loan(self.data.shape, self.data.dtype) as buf:
            np.copyto(buf, self.data)
        return 1


class AioshmLoanCopy(AioshmView):
    """``send_loan`` filled by ``np.copyto`` from a source array, received by
    ``recv_view``: one copy in all."""

    workloads = frozenset({"large"})

    def __init__(self) -> None:
        super().__init__()
        self.key = "aioshm-loan-copy"
        self.label = "aioshm, asyncio, send_loan (np.copyto) + recv_view"

    def async_sender(self, end: Any, workload: Workload, data: Array) -> AsyncSender:
        return _LoanCopySender(end, data)


class _LoanFillSender(_AioshmAsyncSender):
    async def send_some(self, index: int, remaining: int) -> int:
        async with self.tx.send_loan(self.data.shape, self.data.dtype) as buf:
            buf.fill(float(index))
        return 1


class _FillViewReceiver(_ViewReceiver):
    def check(self, item: Array, index: int) -> bool:
        return item.shape == self.data.shape and bool(np.all(item == float(index)))


class AioshmLoanInPlace(AioshmView):
    """``send_loan`` written in place (message *i* is the array filled with *i*; every
    byte is written, nothing is read), received by ``recv_view``: no copy at all."""

    workloads = frozenset({"large"})

    def __init__(self) -> None:
        super().__init__()
        self.key = "aioshm-loan-inplace"
        self.label = "aioshm, asyncio, send_loan (in-place fill) + recv_view"

    def async_sender(self, end: Any, workload: Workload, data: Array) -> AsyncSender:
        return _LoanFillSender(end, data)

    def async_receiver(self, end: Any, workload: Workload, data: Array) -> AsyncReceiver:
        return _FillViewReceiver(end, data)


# ---------------------------------------------------------------- the seed


class SeedFloatChannel:
    """A reference copy of the seed's synchronous one-slot ``FloatChannel``.

    As in the seed: the values in a ``RawArray('d', maxsize)``, their number in a
    ``Value('i')``, and two semaphores making one slot (``empty`` starts at 1, ``full``
    at 0). The seed copied lists element by element through ctypes; here the copies go
    through a numpy view of the ``RawArray``, so that arrays cross at memcpy speed.
    """

    def __init__(self, maxsize: int, ctx: Context) -> None:
        self.buffer = ctx.RawArray("d", maxsize)
        self.buffer_len = ctx.Value("i")
        self.empty = ctx.Semaphore(1)
        self.full = ctx.Semaphore(0)
        self._view: Array | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_view"] = None
        return state

    def _values(self) -> Array:
        if self._view is None:
            self._view = np.frombuffer(self.buffer, dtype=np.float64)
        return self._view

    def send(self, values: Array) -> None:
        """Wait for the slot to be empty, fill it, mark it full."""
        self.empty.acquire()
        nitems = len(values)
        self.buffer_len.value = nitems
        self._values()[:nitems] = values
        self.full.release()

    def recv(self) -> Array:
        """Wait for the slot to be full, copy the values out, mark it empty."""
        self.full.acquire()
        values = self._values()[: self.buffer_len.value].copy()
        self.empty.release()
        return values


class _SeedEnd(_SyncEnd):
    def __init__(self, channel: SeedFloatChannel, data: Array) -> None:
        super().__init__(data)
        self.channel = channel

    def send(self, item: Array) -> None:
        self.channel.send(item)

    def recv(self) -> Array:
        return self.channel.recv()


class Seed(SyncContender):
    """The seed's channel (reference copy kept in the bench)."""

    key = "seed"
    label = "seed FloatChannel (sync, one slot)"
    setup = "`RawArray('d', n)` + `Value('i')` + `Semaphore(1)`/`Semaphore(0)`, one slot"

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        channel = SeedFloatChannel(int(np.prod(workload.shape)), ctx)
        return Link([channel] * producers, channel)

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        return _SeedEnd(end, data)

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        return _SeedEnd(end, data)


# ---------------------------------------------------------------- multiprocessing


class _QueueSender(_SyncEnd):
    def __init__(self, queue: Any, data: Array) -> None:
        super().__init__(data)
        self.queue = queue

    def send(self, item: Array) -> None:
        self.queue.put(item)

    def finish(self) -> None:
        self.queue.close()
        self.queue.join_thread()


class _QueueReceiver(_SyncEnd):
    def __init__(self, queue: Any, data: Array) -> None:
        super().__init__(data)
        self.queue = queue

    def recv(self) -> Array:
        return self.queue.get()  # type: ignore[no-any-return]


class MpQueue(SyncContender):
    """``multiprocessing.Queue``: ``put`` / ``get``."""

    key = "mp-queue"
    label = "multiprocessing.Queue"
    setup = "`ctx.Queue()` (unbounded; pickled through a pipe by a feeder thread)"

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        queue = ctx.Queue()
        return Link([queue] * producers, queue)

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        return _QueueSender(end, data)

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        return _QueueReceiver(end, data)


class _PipeSender(_SyncEnd):
    def __init__(self, conn: multiprocessing.connection.Connection, data: Array) -> None:
        super().__init__(data)
        self.conn = conn

    def send(self, item: Array) -> None:
        self.conn.send(item)

    def finish(self) -> None:
        self.conn.close()


class _PipeReceiver(_SyncEnd):
    """Receives from one pipe, or from one pipe per producer (``connection.wait``)."""

    def __init__(self, conns: list[multiprocessing.connection.Connection], data: Array) -> None:
        super().__init__(data)
        self.conns = conns
        self.ready: deque[Any] = deque()

    def recv(self) -> Array:
        if len(self.conns) == 1:
            return self.conns[0].recv()  # type: ignore[no-any-return]
        if not self.ready:
            self.ready.extend(multiprocessing.connection.wait(self.conns))
        return self.ready.popleft().recv()  # type: ignore[no-any-return]

    def finish(self) -> None:
        for conn in self.conns:
            conn.close()


class MpPipe(SyncContender):
    """``multiprocessing.Pipe``: ``send`` / ``recv``; one pipe per producer for fan-in."""

    key = "mp-pipe"
    label = "multiprocessing.Pipe"
    setup = (
        "`ctx.Pipe(duplex=False)`; for fan-in one pipe per producer, the consumer "
        "selecting with `multiprocessing.connection.wait`"
    )

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        pipes = [ctx.Pipe(duplex=False) for _ in range(producers)]
        readers = [r for r, _ in pipes]
        writers = [w for _, w in pipes]
        return Link(list(writers), readers, [*readers, *writers])

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        return _PipeSender(end, data)

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        return _PipeReceiver(end, data)


# ---------------------------------------------------------------- aioprocessing


class _AioQueueSender(_AsyncEnd):
    def __init__(self, queue: Any, data: Array) -> None:
        super().__init__(data)
        self.queue = queue

    async def send(self, item: Array) -> None:
        await self.queue.coro_put(item)

    async def finish(self) -> None:
        self.queue.close()
        self.queue.join_thread()


class _AioQueueReceiver(_AsyncEnd):
    def __init__(self, queue: Any, data: Array) -> None:
        super().__init__(data)
        self.queue = queue

    async def recv(self) -> Array:
        return await self.queue.coro_get()  # type: ignore[no-any-return]


class AioprocessingQueue(AsyncContender):
    """``aioprocessing.AioQueue`` on asyncio: ``coro_put`` / ``coro_get``."""

    key = "aioprocessing"
    label = "aioprocessing.AioQueue"
    requires = ("aioprocessing",)
    setup = "`aioprocessing.AioQueue()`, `await coro_put(x)` / `await coro_get()`"

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        queue = peer("aioprocessing").AioQueue()
        return Link([queue] * producers, queue)

    def async_sender(self, end: Any, workload: Workload, data: Array) -> AsyncSender:
        return _AioQueueSender(end, data)

    def async_receiver(self, end: Any, workload: Workload, data: Array) -> AsyncReceiver:
        return _AioQueueReceiver(end, data)


# ---------------------------------------------------------------- faster-fifo


class _FasterFifoSender(_SyncEnd):
    def __init__(self, queue: Any, data: Array) -> None:
        super().__init__(data)
        self.queue = queue

    def send(self, item: Array) -> None:
        self.queue.put(item, timeout=FASTER_FIFO_TIMEOUT)


class _FasterFifoReceiver(_SyncEnd):
    def __init__(self, queue: Any, data: Array) -> None:
        super().__init__(data)
        self.queue = queue

    def recv(self) -> Array:
        return self.queue.get(timeout=FASTER_FIFO_TIMEOUT)  # type: ignore[no-any-return]


class FasterFifo(SyncContender):
    """``faster_fifo.Queue``: ``put`` / ``get`` (one message per call)."""

    key = "faster-fifo"
    label = "faster_fifo.Queue"
    requires = ("faster_fifo",)
    setup = (
        "`faster_fifo.Queue()` (default 1 MB buffer) for small messages, "
        f"`max_size_bytes` for {LARGE_CAPACITY} messages for 8 MiB; `put`/`get`"
    )

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        module = peer("faster_fifo")
        if workload.message_bytes > SMALL_SLOT_BYTES:
            queue = module.Queue(max_size_bytes=LARGE_CAPACITY * (workload.message_bytes + 65536))
        else:
            queue = module.Queue()
        return Link([queue] * producers, queue)

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        return _FasterFifoSender(end, data)

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        return _FasterFifoReceiver(end, data)


# ---------------------------------------------------------------- pyzmq


class _ZmqEnd(_AsyncEnd):
    """A ``zmq.asyncio`` socket of its own context, sending arrays as pyzmq documents:
    a JSON header frame (dtype, shape), then the buffer, zero-copy when large."""

    def __init__(self, address: str, data: Array, push: bool) -> None:
        super().__init__(data)
        zmq = peer("zmq")
        self.more = zmq.SNDMORE
        self.copy = data.nbytes < ZMQ_ZERO_COPY_FROM
        self.context = peer("zmq.asyncio").Context()
        self.socket = self.context.socket(zmq.PUSH if push else zmq.PULL)
        if push:
            self.socket.connect(address)
        else:
            self.socket.bind(address)

    async def send(self, item: Array) -> None:
        await self.socket.send_json({"dtype": str(item.dtype), "shape": item.shape}, self.more)
        await self.socket.send(item, copy=self.copy)

    async def recv(self) -> Array:
        header = await self.socket.recv_json()
        frame = await self.socket.recv(copy=self.copy)
        return np.frombuffer(frame, dtype=header["dtype"]).reshape(header["shape"])

    async def finish(self) -> None:
        self.socket.close(linger=30_000)
        self.context.term()


class Zmq(AsyncContender):
    """``zmq.asyncio`` PUSH/PULL over ``ipc://`` in a temporary directory."""

    key = "zmq"
    label = "zmq.asyncio PUSH/PULL, ipc://"
    requires = ("zmq", "zmq.asyncio")
    setup = (
        "PULL binds, PUSH connects, `ipc://` in a temporary directory; header frame "
        "with dtype and shape (`send_json`), then the array, `copy=False` from 64 KiB; "
        "`np.frombuffer` on receipt"
    )

    def __init__(self) -> None:
        self._serial = 0

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        self._serial += 1
        address = f"ipc://{tmpdir}/zmq-{self._serial}"
        return Link([address] * producers, address)

    def async_sender(self, end: Any, workload: Workload, data: Array) -> AsyncSender:
        return _ZmqEnd(end, data, push=True)

    def async_receiver(self, end: Any, workload: Workload, data: Array) -> AsyncReceiver:
        return _ZmqEnd(end, data, push=False)


# ---------------------------------------------------------------- the ceiling


class Memcpy(SoloContender):
    """One core's memcpy bandwidth, as context (from cache where the cache holds both
    buffers)."""

    key = "memcpy"
    label = "memcpy, one core (np.copyto; context)"
    workloads = frozenset({"large", "huge"})
    setup = "`np.copyto` between two preallocated arrays of the message's size, in one process"


class TwoCopyRing:
    """The least a transport can do to hand an array it does not own to another
    process's array: copy it into shared memory, then out of it, each copy on its own
    core. ``slots`` slots of ``nbytes`` in a ``RawArray``, the classic bounded buffer
    (semaphores ``empty``, starting at ``slots``, and ``full``, at 0) and nothing else:
    no header, no codec, no allocation, one destination array used again each time.
    """

    def __init__(self, slots: int, nbytes: int, ctx: Context) -> None:
        self.slots = slots
        self.nbytes = nbytes
        self.buffer = ctx.RawArray("B", slots * nbytes)
        self.empty = ctx.Semaphore(slots)
        self.full = ctx.Semaphore(0)

    def views(self, like: Array) -> list[Array]:
        """Each slot as an array shaped like ``like`` (no copy)."""
        raw = np.frombuffer(self.buffer, np.uint8).reshape(self.slots, self.nbytes)
        return [row.view(like.dtype).reshape(like.shape) for row in raw]


class _TwoCopyEnd(_SyncEnd):
    """Either end of a :class:`TwoCopyRing`. Each touches every page of every slot
    before the clock starts (the sender writes, the receiver reads): this is the
    ceiling, with no page to fault in."""

    def __init__(self, ring: TwoCopyRing, data: Array, *, sending: bool) -> None:
        super().__init__(data)
        self.ring = ring
        self.index = 0
        self.slot_views = ring.views(data)
        self.out = np.empty_like(data)
        for view in self.slot_views:
            if sending:
                np.copyto(view, data)
            else:
                np.copyto(self.out, view)

    def send(self, item: Array) -> None:
        ring = self.ring
        ring.empty.acquire()
        np.copyto(self.slot_views[self.index], item)
        ring.full.release()
        self.index = (self.index + 1) % ring.slots

    def recv(self) -> Array:
        ring = self.ring
        ring.full.acquire()
        np.copyto(self.out, self.slot_views[self.index])
        ring.empty.release()
        self.index = (self.index + 1) % ring.slots
        return self.out


class TwoCopies(SyncContender):
    """The ceiling of a copying receive, as context: :class:`TwoCopyRing`, the same
    depth as aioshm's channel."""

    key = "two-copies"
    label = "two copies, no transport (np.copyto in and out of shared slots; ceiling)"
    workloads = frozenset({"large", "huge"})
    setup = (
        f"a `RawArray` of {LARGE_CAPACITY} slots of the message's size, every page touched "
        "by both processes before the clock starts; `np.copyto` into a slot, "
        "`np.copyto` out into one preallocated array; `Semaphore` hand-off"
    )

    def open(self, workload: Workload, producers: int, ctx: Context, tmpdir: str) -> Link:
        assert producers == 1, "one producer: the slots are taken in turn"
        ring = TwoCopyRing(LARGE_CAPACITY, workload.message_bytes, ctx)
        return Link([ring] * producers, ring)

    def sync_sender(self, end: Any, workload: Workload, data: Array) -> SyncSender:
        return _TwoCopyEnd(end, data, sending=True)

    def sync_receiver(self, end: Any, workload: Workload, data: Array) -> SyncReceiver:
        return _TwoCopyEnd(end, data, sending=False)


#: Every contender, in report order.
CONTENDERS: Final[list[Contender]] = [
    AioshmAsync("asyncio"),
    AioshmAsync("trio"),
    AioshmBlocking(),
    AioshmBatch(),
    AioshmView(),
    AioshmLoanCopy(),
    AioshmLoanInPlace(),
    Seed(),
    MpQueue(),
    MpPipe(),
    AioprocessingQueue(),
    FasterFifo(),
    Zmq(),
    TwoCopies(),
    Memcpy(),
]

from .iox import IceoryxBlocking, IceoryxInPlace, IceoryxPoll  # noqa: E402 (they build on the above)

CONTENDERS[-1:-1] = [IceoryxBlocking(), IceoryxPoll(), IceoryxInPlace()]
