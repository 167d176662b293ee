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

import os
import weakref
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn, Protocol, Self, TypeVar

from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock

from ._layout import (
    DROPPED,
    ENDED,
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
from ._posix import _MUTEX_T, _SEM_T, SEM_SIZE
from ._shared import INFINITE, RECV, SEND, SharedObject

if TYPE_CHECKING:
    from ._speedups import FastQueue

__all__ = ["LOCKED_COPY_LIMIT", "CorruptMessage", "MessageDropped", "QueueCounters", "SlotQueue"]

FREE: Final = 0
WRITING: Final = 1
READY: Final = 2
READING: Final = 3

#: Messages up to this size are copied with the mutex held (one locked round); larger
#: ones are copied outside it, so that other processes are not held up meanwhile.
LOCKED_COPY_LIMIT: Final = 64 * 1024

T = TypeVar("T")
#: Turns a message's bytes into a value; ``owned`` says the bytes are a private copy
#: (a ``bytearray``, which the value may keep pointing into) rather than the slot itself
#: (a ``memoryview``).
Reader = Callable[[memoryview | bytearray, bool], T]


class Message(Protocol):
    """What the queue needs of a message: where it lies in a slot, and how to write it."""

    start: int
    length: int

    def write(self, slot: memoryview) -> None: ...


_DONE, _FULL, _BROKEN, _EMPTY, _ENDED, _CLAIMED, _CLOSED, _CORRUPT = range(8)
#: A put's outcome ``_CLAIMED_SLOT + slot``: a large message's slot, claimed.
_CLAIMED_SLOT: Final = 16


def _load_speedups() -> ModuleType | None:
    """The C hot path (:mod:`aioshm._speedups`), or ``None``: not built, forced off by
    ``AIOSHM_PURE_PYTHON=1``, or built against other field numbers or C types."""
    if os.environ.get("AIOSHM_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    expected = {
        "HEAD": HEAD,
        "TAIL": TAIL,
        "NFREE": NFREE,
        "OPEN": OPEN,
        "SLEEPERS": SLEEPERS,
        "ENDED": ENDED,
        "SLOT_STATE": SLOT_STATE,
        "SLOT_OWNER": SLOT_OWNER,
        "SLOT_START": SLOT_START,
        "SLOT_LENGTH": SLOT_LENGTH,
        "SLOT_FIELDS": SLOT_FIELDS,
        "FREE": FREE,
        "READY": READY,
        "READING": READING,
        "SEND": SEND,
        "RECV": RECV,
        "_DONE": _DONE,
        "_FULL": _FULL,
        "_BROKEN": _BROKEN,
        "_EMPTY": _EMPTY,
        "_ENDED": _ENDED,
        "_CLOSED": _CLOSED,
        "LOCKED_COPY_LIMIT": LOCKED_COPY_LIMIT,
        "sizeof(pthread_mutex_t)": _MUTEX_T,
        "sizeof(sem_t)": _SEM_T,
    }
    if expected != _speedups.LAYOUT:
        return None
    return _speedups


#: The C hot path, if built and enabled (see :func:`_load_speedups`); else ``None``.
speedups: ModuleType | None = _load_speedups()


class CorruptMessage(ValueError):
    """A message's header, its place in its slot, or its ring entry makes no sense."""


class MessageDropped(Exception):
    """A message was taken off the channel and dropped: it could not be received.

    Its slot is free again, and the messages behind it flow on. ``__cause__`` is the
    error that made it unreadable: whatever decoding raised (an ``UnpicklingError``, an
    ``ImportError`` for a class this process cannot import, ...) or a
    :class:`CorruptMessage`. ``statistics().dropped_messages`` counts such messages.

    ``received`` holds the messages that a batch receive (``recv_many``) did receive
    besides the dropped ones, in order; ``dropped`` says how many were dropped.
    """

    def __init__(self, text: str, dropped: int = 1, received: Sequence[Any] = ()) -> None:
        super().__init__(text)
        self.dropped = dropped
        self.received: list[Any] = list(received)

    @classmethod
    def of(
        cls, error: BaseException, dropped: int = 1, received: Sequence[Any] = ()
    ) -> MessageDropped:
        what = "a message was" if dropped == 1 else f"{dropped} messages were"
        return cls(
            f"{what} dropped: it could not be received ({type(error).__name__}: {error})",
            dropped,
            received,
        )


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
    dropped: int


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
        self._stride = segment.layout.stride
        #: Messages up to this length are copied with the mutex held.
        self._small = min(self._stride, LOCKED_COPY_LIMIT)
        #: The C hot path over this segment, if any (``None``: the Python path only).
        self._fast: FastQueue | None = None
        if speedups is not None:
            layout = segment.layout
            self._fast = speedups.FastQueue(
                segment.address,
                layout.mutex,
                layout.bells,
                SEM_SIZE,
                layout.ring,
                layout.free,
                layout.slots,
                layout.payloads,
                layout.stride,
                layout.capacity,
                self.low_water,
                self._small,
                segment,
                weakref.WeakMethod(self._owner_died_locked),
            )

    @classmethod
    def create(cls, capacity: int, max_message_size: int, fd: int | None = None) -> Self:
        queue = cls(Segment.create(capacity, max_message_size, fd))
        queue.locked(queue._init_locked)
        return queue

    def _owner_died_locked(self) -> None:
        """What the C hot path calls when it took the mutex from a holder that died
        (``EOWNERDEAD``), as :meth:`SharedObject._lock_contended` does."""
        self._repair_locked()
        self.defer(self._sweep_after_owner_died)

    def _init_locked(self) -> None:
        for slot in range(self.capacity):
            self._free[slot] = slot
        self._ctl[NFREE] = self.capacity

    def __reduce__(self) -> tuple[object, ...]:
        return (SlotQueue, (self.segment,))

    def payload_address(self, slot: int) -> int:
        return self.segment.payload_address(slot)

    # ------------------------------------------------------------ sending

    def try_put(self, owner: int, message: Message) -> None:
        """Publish one message.

        Raises ``WouldBlock`` when every slot is taken, ``BrokenResourceError`` when no
        receive handle is open, and ``ClosedResourceError`` when no send handle is open
        (the stream has ended: a handle closed by another thread meanwhile); nothing is
        changed then. A large message is copied with the mutex free, and the send
        handles are counted again when it is published.

        A small message that comes as one image of bytes (``message.image``) goes
        through the C hot path where it is built (:mod:`aioshm._speedups`): the same
        critical section, unless the mutex is not free at once or anything is out of
        the ordinary, when it does nothing and this Python path takes over.
        """
        fast = self._fast
        if fast is not None:
            image = getattr(message, "image", None)
            if image is not None:
                outcome = fast.put(image, message.start, message.length)
                if self._deferred:  # a sweep after a holder died (see _owner_died_locked)
                    self._run_deferred()
                if outcome == _DONE:
                    return
                if outcome >= 0:
                    self._raise_for(outcome)
        outcome = self.locked(self._put_locked, owner, message)
        if outcome == _DONE:
            return
        if outcome < _CLAIMED_SLOT:
            self._raise_for(outcome)
        slot = outcome - _CLAIMED_SLOT
        try:
            message.write(self._payload[slot])
        except BaseException:
            self.abandon(slot)
            raise
        self.publish(slot, message.start, message.length)

    def _put_locked(self, owner: int, message: Message) -> int:
        """An outcome, or ``_CLAIMED_SLOT + slot`` for a large message's claimed slot."""
        ctl = self._ctl
        if ctl[OPEN + RECV] <= 0:
            return _BROKEN
        if ctl[OPEN + SEND] <= 0 or ctl[ENDED]:
            return _CLOSED
        n = ctl[NFREE] - 1
        if n < 0:
            return _FULL
        slot: int = self._free[n]
        if message.length <= LOCKED_COPY_LIMIT:
            message.write(self._payload[slot])
            ctl[NFREE] = n
            self._publish_locked(slot, message.start, message.length)
            return _DONE
        ctl[NFREE] = n
        self._hold_locked(slot, WRITING, owner)
        return _CLAIMED_SLOT + slot

    def try_put_many(self, owner: int, messages: Sequence[Message], first: int = 0) -> int:
        """Publish a prefix of ``messages[first:]`` in one locked round; return how many.

        Takes as many as there are free slots. A large message is published on its own
        (two rounds) and ends the prefix. Raises like :meth:`try_put` if none can go.

        The C hot path (:mod:`aioshm._speedups`), where it is built, publishes the
        leading messages that come as one image of bytes (at most a chunk of them) in
        the same critical section; a message that does not also ends the prefix there.
        When the first does not, or anything is out of the ordinary, it does nothing and
        this Python path takes over.
        """
        if first >= len(messages):
            return 0
        fast = self._fast
        if fast is not None and type(messages) is list:
            outcome, sent = fast.put_many(messages, first)
            if self._deferred:  # a sweep after a holder died (see _owner_died_locked)
                self._run_deferred()
            if outcome == _DONE:
                return sent
            if outcome >= 0:
                self._raise_for(outcome)
        outcome, sent = self.locked(self._put_many_locked, messages, first)
        if outcome != _DONE:
            self._raise_for(outcome)
        if sent == 0:
            self.try_put(owner, messages[first])
            sent = 1
        return sent

    def _put_many_locked(self, messages: Sequence[Message], first: int) -> tuple[int, int]:
        ctl = self._ctl
        if ctl[OPEN + RECV] <= 0:
            return _BROKEN, 0
        if ctl[OPEN + SEND] <= 0 or ctl[ENDED]:
            return _CLOSED, 0
        if ctl[NFREE] == 0:
            return _FULL, 0
        sent = 0
        for i in range(first, len(messages)):
            message = messages[i]
            n = ctl[NFREE] - 1
            if n < 0 or message.length > LOCKED_COPY_LIMIT:
                break
            slot = self._free[n]
            message.write(self._payload[slot])
            ctl[NFREE] = n
            self._publish_locked(slot, message.start, message.length)
            sent += 1
        return _DONE, sent

    def claim(self, owner: int) -> int:
        """Take a free slot for ``owner`` to fill (state ``WRITING``); return its number."""
        outcome, slot = self.locked(self._claim_locked, owner)
        if outcome != _DONE:
            self._raise_for(outcome)
        return slot

    def _claim_locked(self, owner: int) -> tuple[int, int]:
        ctl = self._ctl
        if ctl[OPEN + RECV] <= 0:
            return _BROKEN, -1
        if ctl[OPEN + SEND] <= 0 or ctl[ENDED]:
            return _CLOSED, -1
        n = ctl[NFREE] - 1
        if n < 0:
            return _FULL, -1
        slot = self._free[n]
        ctl[NFREE] = n
        self._hold_locked(slot, WRITING, owner)
        return _DONE, slot

    def publish(self, slot: int, start: int, length: int) -> None:
        """Publish a claimed slot holding the message ``slot[start:length]``.

        Raises ``BrokenResourceError`` if no receive handle is open any more, and
        ``ClosedResourceError`` if no send handle is (the stream has ended, and a
        receiver may have been told so); the slot is freed then, and nothing is sent.
        """
        outcome = self.locked(self._publish_claimed_locked, slot, start, length)
        if outcome != _DONE:
            self._raise_for(outcome)

    def _publish_claimed_locked(self, slot: int, start: int, length: int) -> int:
        ctl = self._ctl
        if ctl[OPEN + RECV] <= 0:
            self._free_locked(slot)
            return _BROKEN
        if ctl[OPEN + SEND] <= 0 or ctl[ENDED]:
            self._free_locked(slot)
            return _CLOSED
        self._publish_locked(slot, start, length)
        return _DONE

    def abandon(self, slot: int) -> None:
        """Give a claimed slot back unpublished."""
        self.locked(self._free_locked, slot)

    # ------------------------------------------------------------ receiving

    def try_get(self, owner: int, read: Reader[T]) -> T:
        """Take the oldest message and return ``read(message_bytes, owned)``.

        ``read`` runs with the mutex free: on a private copy of a small message, or on
        the slot itself (held for this process) for a large one. Raises ``WouldBlock``
        when nothing is buffered, ``EndOfStream`` when moreover no send handle is open.

        If ``read`` raises an ``Exception``, the message is dropped, whatever its size:
        its slot is freed, :attr:`QueueCounters.dropped` counts it, and
        :class:`MessageDropped` is raised with the error as its ``__cause__``. So is a
        message whose place in the slot (or whose slot number) is corrupt. Any other
        exception (``KeyboardInterrupt``, a cancellation) while a large message is read
        puts it back at the head of the queue.

        The C hot path (:mod:`aioshm._speedups`), where it is built, takes a small
        message or finds the queue empty in the same critical section; in any other
        case it does nothing, and this Python path takes over.
        """
        fast = self._fast
        got: Any = fast.get() if fast is not None else -1
        if self._deferred:  # a sweep after a holder died (see _owner_died_locked)
            self._run_deferred()
        if type(got) is int:
            if got >= 0:
                self._raise_for(got)
            got = self.locked(self._get_locked, owner)
        if type(got) is bytearray:  # a small message, copied out
            try:
                return read(got, True)
            except Exception as exc:
                self.locked(self._count_dropped_locked, 1)
                raise MessageDropped.of(exc) from exc
        outcome, slot, data, length = got
        if outcome != _CLAIMED:
            self._raise_for(outcome, data)
        start = data
        try:
            value = read(self._payload[slot][start:length], False)
        except Exception as exc:
            self.drop(slot, exc)
        except BaseException:
            self.put_back(slot)
            raise
        self.release(slot)
        return value

    def _get_locked(self, owner: int) -> bytearray | tuple[int, int, Any, int]:
        """A copy of a small message; else ``(outcome, slot, start or error, length)``."""
        ctl, cap, slots = self._ctl, self.capacity, self._slots
        head = ctl[HEAD]
        slot = self._ring[head % cap]
        if 0 < ctl[TAIL] - head <= cap and 0 <= slot < cap:
            # The common case, checked inline: a small, well-formed message.
            base = slot * SLOT_FIELDS
            start, length = slots[base + SLOT_START], slots[base + SLOT_LENGTH]
            if slots[base + SLOT_STATE] == READY and 0 <= start <= length <= self._small:
                ctl[HEAD] = head + 1
                copy = bytearray(self._payload[slot][start:length])
                self._free_locked(slot)
                return copy
        oldest = self._oldest_locked()
        if oldest is None:
            return self._empty_locked(), -1, None, 0
        slot, start, length, error = self._head_locked(oldest)
        if error is not None:
            return _CORRUPT, slot, error, 0
        ctl[HEAD] = oldest + 1
        if length <= LOCKED_COPY_LIMIT:
            copy = bytearray(self._payload[slot][start:length])
            self._free_locked(slot)
            return copy
        self._hold_locked(slot, READING, owner)
        return _CLAIMED, slot, start, length

    def try_get_many(self, owner: int, limit: int, read: Reader[T]) -> list[T]:
        """Take up to ``limit`` small messages in one locked round (at least one).

        A large message at the head is taken on its own. Raises like :meth:`try_get`
        if none is buffered.

        A message that cannot be read is dropped as by :meth:`try_get`, and the others
        are still received: :class:`MessageDropped` is raised after the whole batch has
        been read, and its :attr:`~MessageDropped.received` holds the messages that
        were read, in order.

        The C hot path (:mod:`aioshm._speedups`), where it is built, takes the small,
        well-formed messages at the head (at most a chunk of them, and no more than
        were buffered just before) or finds the queue empty, in the same critical
        section; when the head message is not such, or anything is out of the
        ordinary, it does nothing and this Python path takes over.
        """
        fast = self._fast
        got: Any = fast.get_many(limit) if fast is not None else -1
        if self._deferred:  # a sweep after a holder died (see _owner_died_locked)
            self._run_deferred()
        if type(got) is list:
            return self._read_copies(got, [], read)
        if got >= 0:
            self._raise_for(got)
        outcome, copies, errors = self.locked(self._get_many_locked, limit)
        if outcome != _DONE:
            self._raise_for(outcome)
        if not copies and not errors:
            return [self.try_get(owner, read)]
        return self._read_copies(copies, errors, read)

    def _read_copies(
        self, copies: list[bytearray], errors: list[Exception], read: Reader[T]
    ) -> list[T]:
        """``read`` every copy taken by a batch receive; the ones that fail, and the
        corrupt ones (``errors``), are counted as dropped and raise
        :class:`MessageDropped` after the others have been read."""
        received: list[T] = []
        undecodable = 0
        for copy in copies:
            try:
                received.append(read(copy, True))
            except Exception as exc:
                errors.append(exc)
                undecodable += 1
        if errors:
            if undecodable:
                self.locked(self._count_dropped_locked, undecodable)
            raise MessageDropped.of(errors[0], len(errors), received) from errors[0]
        return received

    def _get_many_locked(self, limit: int) -> tuple[int, list[bytearray], list[Exception]]:
        ctl = self._ctl
        copies: list[bytearray] = []
        errors: list[Exception] = []
        head = self._oldest_locked()
        if head is None:
            return self._empty_locked(), copies, errors
        while head < ctl[TAIL] and len(copies) + len(errors) < limit:
            slot, start, length, error = self._head_locked(head)
            if error is not None:
                errors.append(error)
                head = ctl[HEAD]  # taken off (and the ring repaired)
                continue
            if length > LOCKED_COPY_LIMIT:
                break
            head += 1
            ctl[HEAD] = head
            copies.append(bytearray(self._payload[slot][start:length]))
            self._free_locked(slot)
        return _DONE, copies, errors

    def take(self, owner: int) -> tuple[int, memoryview]:
        """Take the oldest message's slot for ``owner`` to read (state ``READING``).

        Returns the slot and a view of its message; the caller must :meth:`release` it,
        :meth:`put_back` it, or :meth:`drop` it. Raises :class:`MessageDropped` for a
        message whose place in its slot is corrupt.
        """
        outcome, slot, start, length = self.locked(self._take_locked, owner)
        if outcome != _DONE:
            self._raise_for(outcome, start)
        return slot, self._payload[slot][start:length]

    def _take_locked(self, owner: int) -> tuple[int, int, Any, int]:
        ctl = self._ctl
        head = self._oldest_locked()
        if head is None:
            return self._empty_locked(), -1, None, 0
        slot, start, length, error = self._head_locked(head)
        if error is not None:
            return _CORRUPT, slot, error, 0
        ctl[HEAD] = head + 1
        self._hold_locked(slot, READING, owner)
        return _DONE, slot, start, length

    def release(self, slot: int) -> None:
        """Free a slot that has been read."""
        self.locked(self._release_locked, slot)

    def _release_locked(self, slot: int) -> None:
        self._free_locked(slot)
        if self._ctl[OPEN + SEND] <= 0:  # a receiver may be waiting for the end
            self._ring_all_locked(RECV)

    def drop(self, slot: int, error: BaseException) -> NoReturn:
        """Free a taken slot whose message cannot be received, and say so.

        Counts it in :attr:`QueueCounters.dropped` and raises :class:`MessageDropped`
        with ``error`` as its cause.
        """
        self.locked(self._drop_locked, slot)
        raise MessageDropped.of(error) from error

    def _drop_locked(self, slot: int) -> None:
        self._release_locked(slot)
        self._ctl[DROPPED] += 1

    def _count_dropped_locked(self, n: int) -> None:
        self._ctl[DROPPED] += n

    def put_back(self, slot: int) -> None:
        """Return a taken slot unread to the head of the queue."""
        self.locked(self._requeue_locked, slot)

    def slot_memory(self, slot: int) -> memoryview:
        return self._payload[slot]

    # ------------------------------------------------------------ internals

    def _raise_for(self, outcome: int, error: Any = None) -> NoReturn:
        if outcome == _BROKEN:
            raise BrokenResourceError
        if outcome == _ENDED:
            raise EndOfStream
        if outcome == _CLOSED:
            raise ClosedResourceError(
                "every send handle of this channel is closed (one was closed by another "
                "thread meanwhile): the stream has ended, and nothing was sent"
            )
        if outcome == _CORRUPT:
            raise MessageDropped.of(error) from error
        self.maybe_sweep()
        raise WouldBlock

    def _empty_locked(self) -> int:
        """The outcome of a receive that finds the queue empty: ``_EMPTY`` or, for good,
        ``_ENDED``. The end is declared once no send handle is open and no message is
        being read (one being read may be put back); from then on nothing is published.
        """
        ctl = self._ctl
        if ctl[ENDED]:
            return _ENDED
        if ctl[OPEN + SEND] > 0 or self._reading_locked():
            return _EMPTY
        ctl[ENDED] = 1
        return _ENDED

    def _reading_locked(self) -> bool:
        slots = self._slots
        for base in range(0, self.capacity * SLOT_FIELDS, SLOT_FIELDS):
            if slots[base + SLOT_STATE] == READING:
                return True
        return False

    def _oldest_locked(self) -> int | None:
        """The ring position of the oldest message, or ``None`` if none is buffered.

        A head and tail more than ``capacity`` apart (or crossed) are corrupt: the ring
        is repaired (:meth:`_repair_locked`) before anything is read from it.
        """
        ctl = self._ctl
        head, tail = ctl[HEAD], ctl[TAIL]
        if head == tail:
            return None
        if not 0 < tail - head <= self.capacity:
            self._repair_locked()
            head = ctl[HEAD]
            if head == ctl[TAIL]:
                return None
        return head

    def _head_locked(self, head: int) -> tuple[int, int, int, Exception | None]:
        """``(slot, start, length, error)`` of the message at ring position ``head``.

        ``error`` says what is corrupt, if anything: the ring entry, the slot's state,
        or where the message lies in the slot. A corrupt message is then already taken
        off the queue and counted as dropped: the head is past it, its slot (if valid)
        is free, and after a corrupt ring entry the ring is repaired
        (:meth:`_repair_locked`), which queues again the slot the entry lost.
        """
        ctl, cap = self._ctl, self.capacity
        slot = self._ring[head % cap]
        if not 0 <= slot < cap or self._slots[slot * SLOT_FIELDS + SLOT_STATE] != READY:
            what = "is not a slot" if not 0 <= slot < cap else "holds no published message"
            error = CorruptMessage(f"ring entry {head % cap} names slot {slot}, which {what}")
        else:
            base = slot * SLOT_FIELDS
            start, length = self._slots[base + SLOT_START], self._slots[base + SLOT_LENGTH]
            if 0 <= start <= length <= self._stride:
                return slot, start, length, None
            ctl[HEAD] = head + 1
            ctl[DROPPED] += 1
            self._free_locked(slot)
            return (
                -1,
                0,
                0,
                CorruptMessage(
                    f"slot {slot} says its message lies at [{start}:{length}], outside the "
                    f"slot's {self._stride} bytes"
                ),
            )
        ctl[HEAD] = head + 1
        ctl[DROPPED] += 1
        self._repair_locked()
        return -1, 0, 0, error

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
            if ctl[OPEN + RECV] <= 0 or ctl[OPEN + SEND] <= 0 or ctl[ENDED]:
                return INFINITE
            return ctl[NFREE]
        buffered = ctl[TAIL] - ctl[HEAD]
        if buffered > 0:
            return buffered
        if ctl[ENDED] or (ctl[OPEN + SEND] <= 0 and not self._reading_locked()):
            return INFINITE
        return 0

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
        return self.locked(self._counters_locked)

    def _counters_locked(self) -> QueueCounters:
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
            dropped=ctl[DROPPED],
        )
