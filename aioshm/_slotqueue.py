"""Layer 2: the synchronous slot queue.

The seed's one-slot empty/full buffer, generalised: ``capacity`` slots, any number of
sending and receiving processes, and processes that die at any instant.

* Free slots sit on a stack; published slots are queued on a ring in order of
  publication. A slot that one sender holds (a loan, or a large copy in progress) is on
  neither, so it never holds up anyone else.
* Every slot is in one of four states, and each state says who is responsible for it::

      FREE --claim--> WRITING(owner) --publish--> READY --take--> READING(owner) --release--> FREE
                            \\--abandon--> FREE                          \\--put_back--> READY

  ``READY`` slots are the ones on the ring. A slot in ``WRITING`` or ``READING`` names
  the process-table entry that holds it, so a survivor can give it back when its holder
  dies: a half-written slot is freed (never seen), a half-read one is queued again.
* Receivers are woken for every message; senders asleep on a full queue are woken once a
  quarter of the slots are free (a low-water mark, as TCP's), so that under contention
  one wake-up carries a burst of messages.
* A message occupies ``slot[start:length]``. A small one is copied in or out with the
  mutex held, as one ``memcpy`` in one locked round per operation; encoding and decoding
  happen outside. A large one is copied with its slot claimed and the mutex free, so
  that a sender and a receiver copy in parallel. No caller code ever runs under the
  mutex except a message's own ``write``.

Operations that cannot proceed raise :class:`anyio.WouldBlock` and change nothing; the
blocking forms and the async wait bridge (layer 3) sleep on the doorbells in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, NamedTuple, Protocol, Self, TypeVar

from anyio import BrokenResourceError, EndOfStream, WouldBlock

from ._layout import (
    HEAD,
    MAX_PROCS,
    NFREE,
    OPEN,
    P_KIND,
    PROC_FIELDS,
    RECLAIMED,
    REDELIVERED,
    SLEEPERS,
    SLOT_FIELDS,
    SLOT_LENGTH,
    SLOT_OWNER,
    SLOT_START,
    SLOT_STATE,
    TAIL,
    Segment,
)
from ._shared import INFINITE, RECV, SEND, SharedObject

__all__ = ["LOCKED_COPY_LIMIT", "QueueCounters", "SlotQueue"]

FREE: Final = 0
WRITING: Final = 1
READY: Final = 2
READING: Final = 3

#: Messages up to this size are copied with the mutex held (one locked round); larger
#: ones are copied outside it, so that other processes are not held up meanwhile.
LOCKED_COPY_LIMIT: Final = 64 * 1024

T = TypeVar("T")
#: Turns a message's bytes into a value; ``owned`` says the bytes are a private copy
#: (the value may keep pointing into them) rather than the slot itself.
Reader = Callable[[memoryview, bool], T]


class Message(Protocol):
    """What the queue needs of a message: where it lies in a slot, and how to write it."""

    start: int
    length: int

    def write(self, slot: memoryview) -> None: ...


_DONE, _FULL, _BROKEN, _EMPTY, _ENDED, _CLAIMED = range(6)


class QueueCounters(NamedTuple):
    buffered: int
    capacity: int
    open_send: int
    open_receive: int
    free: int
    writing: int
    reading: int
    reclaimed: int
    redelivered: int


class SlotQueue(SharedObject):
    """A bounded MPMC queue of byte slots shared by processes; see the module docstring."""

    def __init__(self, segment: Segment) -> None:
        super().__init__(segment)
        self.capacity = segment.layout.capacity
        self.max_message_size = segment.layout.max_message_size
        #: A sender asleep on a full queue is woken once this many slots are free (as
        #: TCP wakes a writer once a third of its buffer is free), so that one wake-up
        #: sends a burst rather than a message; a send that can proceed never waits.
        self.low_water = max(1, self.capacity // 4)
        self._ring = segment.ring
        self._free = segment.free
        self._slots = segment.slots
        self._payload = segment.payload

    @classmethod
    def create(cls, capacity: int, max_message_size: int, fd: int | None = None) -> Self:
        queue = cls(Segment.create(capacity, max_message_size, fd))
        with queue.critical():
            for slot in range(capacity):
                queue._free[slot] = slot
            queue._ctl[NFREE] = capacity
        return queue

    def __reduce__(self) -> tuple[object, ...]:
        return (SlotQueue, (self.segment,))

    def payload_address(self, slot: int) -> int:
        return self.segment.payload_address(slot)

    # ------------------------------------------------------------ sending

    def try_put(self, owner: int, message: Message) -> None:
        """Publish one message.

        Raises ``WouldBlock`` when every slot is taken and ``BrokenResourceError`` when
        no receive handle is open; nothing is changed then.
        """
        ctl = self._ctl
        self._lock()
        try:
            if ctl[OPEN + RECV] <= 0:
                outcome = _BROKEN
            elif ctl[NFREE] == 0:
                outcome = _FULL
            else:
                n = ctl[NFREE] - 1
                slot = self._free[n]
                if message.length <= LOCKED_COPY_LIMIT:
                    message.write(self._payload[slot])
                    ctl[NFREE] = n
                    self._publish_locked(slot, message.start, message.length)
                    outcome = _DONE
                else:
                    ctl[NFREE] = n
                    self._hold_locked(slot, WRITING, owner)
                    outcome = _CLAIMED
        except BaseException:
            self._abort()
            raise
        self._unlock()
        if outcome == _DONE:
            return
        if outcome != _CLAIMED:
            self._raise_for(outcome)
        try:
            message.write(self._payload[slot])
        except BaseException:
            self.abandon(slot)
            raise
        self.publish(slot, message.start, message.length)

    def try_put_many(self, owner: int, messages: Sequence[Message]) -> int:
        """Publish a prefix of ``messages`` in one locked round; return how many.

        Takes as many as there are free slots. A large message is published on its own
        (two rounds) and ends the prefix. Raises like :meth:`try_put` if none can go.
        """
        ctl = self._ctl
        if not messages:
            return 0
        sent = 0
        self._lock()
        try:
            if ctl[OPEN + RECV] <= 0:
                outcome = _BROKEN
            elif ctl[NFREE] == 0:
                outcome = _FULL
            else:
                outcome = _DONE
                for message in messages:
                    n = ctl[NFREE] - 1
                    if n < 0 or message.length > LOCKED_COPY_LIMIT:
                        break
                    slot = self._free[n]
                    message.write(self._payload[slot])
                    ctl[NFREE] = n
                    self._publish_locked(slot, message.start, message.length)
                    sent += 1
        except BaseException:
            self._abort()
            raise
        self._unlock()
        if outcome != _DONE:
            self._raise_for(outcome)
        if sent == 0:
            self.try_put(owner, messages[0])
            sent = 1
        return sent

    def claim(self, owner: int) -> int:
        """Take a free slot for ``owner`` to fill (state ``WRITING``); return its number."""
        ctl = self._ctl
        self._lock()
        try:
            if ctl[OPEN + RECV] <= 0:
                outcome = _BROKEN
            elif ctl[NFREE] == 0:
                outcome = _FULL
            else:
                n = ctl[NFREE] - 1
                slot = self._free[n]
                ctl[NFREE] = n
                self._hold_locked(slot, WRITING, owner)
                outcome = _DONE
        except BaseException:
            self._abort()
            raise
        self._unlock()
        if outcome != _DONE:
            self._raise_for(outcome)
        return slot

    def publish(self, slot: int, start: int, length: int) -> None:
        """Publish a claimed slot holding the message ``slot[start:length]``.

        Raises ``BrokenResourceError`` (and frees the slot) if no receive handle is open
        any more.
        """
        with self.critical():
            broken = self._ctl[OPEN + RECV] <= 0
            if broken:
                self._free_locked(slot)
            else:
                self._publish_locked(slot, start, length)
        if broken:
            raise BrokenResourceError

    def abandon(self, slot: int) -> None:
        """Give a claimed slot back unpublished."""
        with self.critical():
            self._free_locked(slot)

    # ------------------------------------------------------------ receiving

    def try_get(self, owner: int, read: Reader[T]) -> T:
        """Take the oldest message and return ``read(message_bytes, owned)``.

        ``read`` runs with the mutex free: on a private copy of a small message, or on
        the slot itself (held for this process) for a large one. Raises ``WouldBlock``
        when nothing is buffered, ``EndOfStream`` when moreover no send handle is open.
        If ``read`` raises, a large message goes back to the head of the queue; a small
        one has already been received.
        """
        ctl = self._ctl
        slots = self._slots
        self._lock()
        try:
            head = ctl[HEAD]
            if head == ctl[TAIL]:
                outcome = _ENDED if ctl[OPEN + SEND] <= 0 else _EMPTY
            else:
                slot = self._ring[head % self.capacity]
                base = slot * SLOT_FIELDS
                start, length = slots[base + SLOT_START], slots[base + SLOT_LENGTH]
                if length <= LOCKED_COPY_LIMIT:
                    copy = bytearray(self._payload[slot][start:length])
                    ctl[HEAD] = head + 1
                    self._free_locked(slot)
                    outcome = _DONE
                else:
                    ctl[HEAD] = head + 1
                    self._hold_locked(slot, READING, owner)
                    outcome = _CLAIMED
        except BaseException:
            self._abort()
            raise
        self._unlock()
        if outcome == _DONE:
            return read(memoryview(copy), True)
        if outcome != _CLAIMED:
            self._raise_for(outcome)
        try:
            value = read(self._payload[slot][start:length], False)
        except BaseException:
            self.put_back(slot)
            raise
        self.release(slot)
        return value

    def try_get_many(self, owner: int, limit: int, read: Reader[T]) -> list[T]:
        """Take up to ``limit`` small messages in one locked round (at least one).

        A large message at the head is taken on its own. Raises like :meth:`try_get`
        if none is buffered.
        """
        ctl, slots, cap = self._ctl, self._slots, self.capacity
        copies: list[bytearray] = []
        self._lock()
        try:
            head, tail = ctl[HEAD], ctl[TAIL]
            if head == tail:
                outcome = _ENDED if ctl[OPEN + SEND] <= 0 else _EMPTY
            else:
                outcome = _DONE
                while head < tail and len(copies) < limit:
                    slot = self._ring[head % cap]
                    base = slot * SLOT_FIELDS
                    start, length = slots[base + SLOT_START], slots[base + SLOT_LENGTH]
                    if length > LOCKED_COPY_LIMIT:
                        break
                    copies.append(bytearray(self._payload[slot][start:length]))
                    head += 1
                    ctl[HEAD] = head
                    self._free_locked(slot)
        except BaseException:
            self._abort()
            raise
        self._unlock()
        if outcome != _DONE:
            self._raise_for(outcome)
        if not copies:
            return [self.try_get(owner, read)]
        return [read(memoryview(copy), True) for copy in copies]

    def take(self, owner: int) -> tuple[int, memoryview]:
        """Take the oldest message's slot for ``owner`` to read (state ``READING``).

        Returns the slot and a view of its message; the caller must :meth:`release` it
        or :meth:`put_back` it.
        """
        ctl = self._ctl
        self._lock()
        try:
            head = ctl[HEAD]
            if head == ctl[TAIL]:
                outcome = _ENDED if ctl[OPEN + SEND] <= 0 else _EMPTY
            else:
                slot = self._ring[head % self.capacity]
                base = slot * SLOT_FIELDS
                start, length = self._slots[base + SLOT_START], self._slots[base + SLOT_LENGTH]
                ctl[HEAD] = head + 1
                self._hold_locked(slot, READING, owner)
                outcome = _DONE
        except BaseException:
            self._abort()
            raise
        self._unlock()
        if outcome != _DONE:
            self._raise_for(outcome)
        return slot, self._payload[slot][start:length]

    def release(self, slot: int) -> None:
        """Free a slot that has been read."""
        with self.critical():
            self._free_locked(slot)

    def put_back(self, slot: int) -> None:
        """Return a taken slot unread to the head of the queue."""
        with self.critical():
            self._requeue_locked(slot)

    def slot_memory(self, slot: int) -> memoryview:
        return self._payload[slot]

    # ------------------------------------------------------------ internals

    def _raise_for(self, outcome: int) -> None:
        if outcome == _BROKEN:
            raise BrokenResourceError
        if outcome == _ENDED:
            raise EndOfStream
        self.maybe_sweep()
        raise WouldBlock

    def _hold_locked(self, slot: int, state: int, owner: int) -> None:
        base = slot * SLOT_FIELDS
        self._slots[base + SLOT_OWNER] = owner
        self._slots[base + SLOT_STATE] = state

    def _publish_locked(self, slot: int, start: int, length: int) -> None:
        ctl = self._ctl
        tail = ctl[TAIL]
        base = slot * SLOT_FIELDS
        self._slots[base + SLOT_START] = start
        self._slots[base + SLOT_LENGTH] = length
        self._slots[base + SLOT_STATE] = READY
        self._ring[tail % self.capacity] = slot
        ctl[TAIL] = tail + 1
        if ctl[SLEEPERS + RECV]:
            self._ring_one_locked(RECV)

    def _free_locked(self, slot: int) -> None:
        ctl = self._ctl
        self._slots[slot * SLOT_FIELDS + SLOT_STATE] = FREE
        n = ctl[NFREE]
        self._free[n] = slot
        ctl[NFREE] = n + 1
        if ctl[SLEEPERS + SEND] and n + 1 >= self.low_water:
            self._ring_one_locked(SEND)

    def _requeue_locked(self, slot: int) -> None:
        ctl = self._ctl
        head = ctl[HEAD] - 1
        self._slots[slot * SLOT_FIELDS + SLOT_STATE] = READY
        self._ring[head % self.capacity] = slot
        ctl[HEAD] = head
        self._ring_one_locked(RECV)

    def _ready_locked(self, side: int) -> int:
        ctl = self._ctl
        if side == SEND:
            return INFINITE if ctl[OPEN + RECV] <= 0 else ctl[NFREE]
        buffered = ctl[TAIL] - ctl[HEAD]
        if buffered > 0:
            return buffered
        return INFINITE if ctl[OPEN + SEND] <= 0 else 0

    def _worth_waking_locked(self, side: int) -> int:
        ready = self._ready_locked(side)
        return ready if side == RECV or ready >= self.low_water else 0

    def _holds_locked(self, entry: int) -> bool:
        slots = self._slots
        for base in range(0, self.capacity * SLOT_FIELDS, SLOT_FIELDS):
            if slots[base + SLOT_STATE] in (WRITING, READING) and slots[base + SLOT_OWNER] == entry:
                return True
        return False

    def _reclaim_locked(self, entry: int) -> None:
        slots = self._slots
        for slot in range(self.capacity):
            base = slot * SLOT_FIELDS
            if slots[base + SLOT_OWNER] != entry:
                continue
            state = slots[base + SLOT_STATE]
            if state == WRITING:
                self._free_locked(slot)
                self._ctl[RECLAIMED] += 1
            elif state == READING:
                self._requeue_locked(slot)
                self._ctl[REDELIVERED] += 1

    def _repair_locked(self) -> None:
        """Rebuild the free stack and slot states from the ring and the owners."""
        super()._repair_locked()
        ctl, slots, procs, cap = self._ctl, self._slots, self._procs, self.capacity
        head, tail = ctl[HEAD], ctl[TAIL]
        tail = head + min(max(tail - head, 0), cap)
        ctl[TAIL] = tail
        queued = {self._ring[pos % cap] for pos in range(head, tail)}
        ctl[NFREE] = 0
        for slot in range(cap):
            base = slot * SLOT_FIELDS
            state = slots[base + SLOT_STATE]
            owner = slots[base + SLOT_OWNER]
            owner_live = 0 <= owner < MAX_PROCS and procs[owner * PROC_FIELDS + P_KIND] != 0
            if slot in queued:
                slots[base + SLOT_STATE] = READY
            elif state == READY or (state == READING and not owner_live):
                self._requeue_locked(slot)  # fully written, or taken by no one alive
                ctl[REDELIVERED] += 1
            elif state in (WRITING, READING) and owner_live:
                pass
            else:
                if state == WRITING:
                    ctl[RECLAIMED] += 1
                slots[base + SLOT_STATE] = FREE
                n = ctl[NFREE]
                self._free[n] = slot
                ctl[NFREE] = n + 1

    # ------------------------------------------------------------ statistics

    def counters(self) -> QueueCounters:
        with self.critical():
            ctl, slots = self._ctl, self._slots
            states = [slots[s * SLOT_FIELDS + SLOT_STATE] for s in range(self.capacity)]
            return QueueCounters(
                buffered=ctl[TAIL] - ctl[HEAD],
                capacity=self.capacity,
                open_send=max(0, ctl[OPEN + SEND]),
                open_receive=max(0, ctl[OPEN + RECV]),
                free=ctl[NFREE],
                writing=states.count(WRITING),
                reading=states.count(READING),
                reclaimed=ctl[RECLAIMED],
                redelivered=ctl[REDELIVERED],
            )
