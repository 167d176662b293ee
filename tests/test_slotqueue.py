"""Layer 2, the synchronous slot queue, with no event loop."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from aioshm import _layout
from aioshm._shared import RANG, RECV, SEND
from aioshm._slotqueue import LOCKED_COPY_LIMIT, READING, READY, WRITING, SlotQueue

from .helpers import mutex_held

pytestmark = pytest.mark.timeout(30)


class Raw:
    """A message of raw bytes (the queue does not know about the codec)."""

    def __init__(self, data: bytes, start: int = 0) -> None:
        self.data = data
        self.start = start
        self.length = start + len(data)

    def write(self, slot: memoryview) -> None:
        slot[self.start : self.length] = self.data


def read(message: memoryview | bytearray, owned: bool) -> bytes:
    return bytes(message)


def make(capacity: int = 4, size: int = 64) -> tuple[SlotQueue, int]:
    queue = SlotQueue.create(capacity, size)
    return queue, queue.register((1, 1))


def states(queue: SlotQueue) -> list[int]:
    slots = queue.segment.slots
    return [slots[s * _layout.SLOT_FIELDS + _layout.SLOT_STATE] for s in range(queue.capacity)]


def test_fifo_full_and_empty() -> None:
    queue, me = make(capacity=3)
    with pytest.raises(anyio.WouldBlock):
        queue.try_get(me, read)
    for i in range(3):
        queue.try_put(me, Raw(bytes([i]) * 5, start=i))
    with pytest.raises(anyio.WouldBlock):
        queue.try_put(me, Raw(b"x"))
    assert [queue.try_get(me, read) for _ in range(3)] == [bytes([i]) * 5 for i in range(3)]
    counters = queue.counters()
    assert (counters.free, counters.buffered, counters.writing, counters.reading) == (3, 0, 0, 0)


def test_end_of_stream_and_broken() -> None:
    queue, me = make()
    queue.try_put(me, Raw(b"last"))
    queue.drop_handle(me, SEND)
    assert queue.try_get(me, read) == b"last"  # what was sent is drained first
    with pytest.raises(anyio.EndOfStream):
        queue.try_get(me, read)
    queue.drop_handle(me, RECV)
    with pytest.raises(anyio.BrokenResourceError):
        queue.try_put(me, Raw(b"x"))


def test_claim_publish_abandon() -> None:
    queue, me = make(capacity=2)
    held = queue.claim(me)
    queue.try_put(me, Raw(b"other"))  # a held slot holds up no one
    assert queue.try_get(me, read) == b"other"
    queue.payload_address(held)
    queue.slot_memory(held)[:3] = b"abc"
    queue.publish(held, 0, 3)
    assert queue.try_get(me, read) == b"abc"
    held = queue.claim(me)
    queue.abandon(held)
    assert queue.counters().free == 2
    with pytest.raises(anyio.WouldBlock):
        queue.try_get(me, read)


def test_take_release_put_back() -> None:
    queue, me = make()
    queue.try_put(me, Raw(b"one"))
    queue.try_put(me, Raw(b"two"))
    slot, message = queue.take(me)
    assert bytes(message) == b"one"
    assert states(queue)[slot] == READING
    queue.put_back(slot)
    assert queue.try_get(me, read) == b"one"  # back at the head
    slot, message = queue.take(me)
    assert bytes(message) == b"two"
    queue.release(slot)
    assert queue.counters().free == 4


def test_large_messages_are_copied_outside_the_mutex() -> None:
    big = LOCKED_COPY_LIMIT + 1
    queue, me = make(capacity=2, size=2 * big)
    seen: list[bool] = []

    class Probe(Raw):
        def write(self, slot: memoryview) -> None:
            seen.append(mutex_held(queue))
            super().write(slot)

    queue.try_put(me, Probe(b"s" * 10))
    queue.try_put(me, Probe(b"b" * big))
    assert seen == [True, False]

    def probing_read(message: memoryview | bytearray, owned: bool) -> tuple[bool, bool, int]:
        return owned, mutex_held(queue), len(message)

    assert queue.try_get(me, probing_read) == (True, False, 10)
    assert queue.try_get(me, probing_read) == (False, False, big)


def test_batches() -> None:
    queue, me = make(capacity=4)
    assert queue.try_put_many(me, [Raw(bytes([i])) for i in range(6)]) == 4
    with pytest.raises(anyio.WouldBlock):
        queue.try_put_many(me, [Raw(b"x")])
    assert queue.try_get_many(me, 3, read) == [b"\0", b"\1", b"\2"]
    assert queue.try_get_many(me, 10, read) == [b"\3"]
    with pytest.raises(anyio.WouldBlock):
        queue.try_get_many(me, 10, read)


def test_reader_interrupted_puts_a_large_message_back() -> None:
    """An interruption (not an error of the message's own) puts a large message back;
    an error drops it (see test_hardening_core.py)."""
    big = LOCKED_COPY_LIMIT + 1
    queue, me = make(capacity=1, size=big)
    queue.try_put(me, Raw(b"z" * big))

    def interrupted(message: memoryview | bytearray, owned: bool) -> bytes:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        queue.try_get(me, interrupted)
    assert queue.try_get(me, read) == b"z" * big


def test_blocking_wait_and_timeout() -> None:
    queue, me = make(capacity=1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        queue.block(RECV, lambda: queue.try_get(me, read), timeout=0.2)
    assert time.monotonic() - start >= 0.2

    def later() -> None:
        time.sleep(0.2)
        queue.try_put(me, Raw(b"late"))

    thread = threading.Thread(target=later)
    thread.start()
    assert queue.block(RECV, lambda: queue.try_get(me, read), timeout=10) == b"late"
    thread.join()


def test_doorbell_protocol() -> None:
    """A sleeper registers with its readiness check under the mutex, so a publication
    after it rings the bell; a timed-out sleeper deregisters. A rung sleeper counts
    what is ready beyond the reserved as it leaves, with the reserved counted then."""
    queue, me = make(capacity=1)
    assert queue.wait(RECV, 0.05) == 0  # timed out
    assert queue.segment.ctl[_layout.SLEEPERS + RECV] == 0
    result: list[int] = []
    reserved = [0]

    def sleep_in_a_thread() -> threading.Thread:
        thread = threading.Thread(
            target=lambda: result.append(queue.wait(RECV, 10, lambda: reserved[0]))
        )
        thread.start()
        while queue.segment.ctl[_layout.SLEEPERS + RECV] == 0:
            time.sleep(0.001)
        return thread

    thread = sleep_in_a_thread()
    queue.try_put(me, Raw(b"x"))
    thread.join(10)
    assert result == [1]  # rung, and what rang it counted on the way out
    assert queue.wait(RECV, 10) == 1  # ready at once, no sleep
    assert queue.wait(RECV, 0.05, lambda: 1) == 0  # promised to someone already woken
    reserved[0] = 1  # the message is promised: it sleeps
    thread = sleep_in_a_thread()
    queue.forward(RECV)
    thread.join(10)
    assert result == [1, RANG]  # a bell with nothing beyond the reserved
    thread = sleep_in_a_thread()
    reserved[0] = 0  # the woken task is done without it
    queue.forward(RECV)
    thread.join(10)
    assert result == [1, RANG, 1]  # counted as it left, not as it registered


def test_repair_after_a_holder_died_mid_update() -> None:
    """Repair rebuilds the free stack and the slot states from the ring and the owners
    (what the next holder does after EOWNERDEAD)."""
    queue, me = make(capacity=4)
    queue.try_put(me, Raw(b"published"))
    loan = queue.claim(me)

    def scribble_and_repair() -> None:
        queue.segment.ctl[_layout.NFREE] = 0  # scribbled on by a holder that died
        queue._repair_locked()

    queue.locked(scribble_and_repair)
    assert queue.try_get(me, read) == b"published"
    assert states(queue)[loan] == WRITING  # a live owner keeps its loan
    assert queue.counters().free == 3
    queue.abandon(loan)
    assert queue.counters().free == 4


def test_an_exception_inside_a_critical_section_repairs_in_place() -> None:
    queue, me = make(capacity=2)

    class Failing(Raw):
        def write(self, slot: memoryview) -> None:
            queue.segment.ctl[_layout.NFREE] = -7  # half-done, then...
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        queue.try_put(me, Failing(b"x"))
    assert not mutex_held(queue)
    assert queue.counters().free == 2
    queue.try_put(me, Raw(b"fine"))
    assert queue.try_get(me, read) == b"fine"


def test_repair_requeues_a_fully_written_slot_that_missed_the_ring() -> None:
    queue, me = make(capacity=2)
    slot = queue.claim(me)
    queue.slot_memory(slot)[:4] = b"done"
    slots = queue.segment.slots
    base = slot * _layout.SLOT_FIELDS

    def mark_and_repair() -> None:
        slots[base + _layout.SLOT_START], slots[base + _layout.SLOT_LENGTH] = 0, 4
        slots[base + _layout.SLOT_STATE] = READY  # died after marking it, before the ring
        queue._repair_locked()

    queue.locked(mark_and_repair)
    assert queue.try_get(me, read) == b"done"
    assert queue.counters().redelivered == 1
