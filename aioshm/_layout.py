"""Layer 1: the shared-memory layout of one channel.

A channel is one anonymous shared mapping carved into regions, in this order::

    control     int64 fields: counters, totals, statistics (see the field names below)
    mutex       the robust mutex that guards every region but the payloads
    bells       two doorbell semaphores: one wakes senders, one wakes receivers
    ring        published slot numbers, in order of publication (a ring of ``capacity``)
    free        a stack of free slot numbers
    slot table  per slot: its state, the process-table entry holding it, where its message lies
    procs       the process table: who holds handles, and how many
    payloads    ``capacity`` slots of ``stride`` bytes, 64-byte aligned

Every region but the payloads is read and written only with the mutex held. The layout
knows nothing of what the fields mean beyond their names; layer 2 gives them meaning.

The mapping is a ``memfd`` (the kind of memory ``multiprocessing.RawArray`` is carved
from), one per channel. ``RawArray`` itself is not used because its allocator hands a
freed block to the next ``RawArray`` of the same process while child processes may still
map it; a mapping of its own is never reused while anyone maps it. Like ``RawArray`` it
has no name, so nothing is left in ``/dev/shm`` and ``resource_tracker`` is not involved.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import tempfile
import weakref
from dataclasses import dataclass
from multiprocessing import context, reduction
from typing import Any

from ._posix import MUTEX_SIZE, SEM_SIZE, RobustMutex, SharedSemaphore

__all__ = ["HEADER_RESERVE", "Layout", "Segment"]

ALIGN = 64
_HUGE_PAGE = 2 << 20
#: Bytes at the start of each slot kept for the message header (dtype, shape).
HEADER_RESERVE = 256
#: Entries in the process table: processes (and pending children) holding handles.
MAX_PROCS = 128
_MAGIC = 0x61696F73686D0001  # "aioshm", layout version 1

# Control fields (int64 each).
MAGIC = 0
CAPACITY = 1
MAX_MESSAGE_SIZE = 2
STRIDE = 3
HEAD = 4  # ring position of the oldest published message
TAIL = 5  # ring position one past the newest
NFREE = 6  # entries on the free stack
OPEN = 8  # OPEN + direction: open handles over all live processes
SLEEPERS = 10  # SLEEPERS + direction: threads registered on that direction's bell
DROPPED = 12  # messages taken off the queue because they could not be received
ENDED = 13  # 1 once a receiver was told the stream ended: final, no message comes after
RECLAIMED = 14  # slots taken back from processes that died holding them
REDELIVERED = 15  # messages put back because their receiver died reading them
UID = 16
_CTL_FIELDS = 32

# Slot table fields.
SLOT_STATE = 0
SLOT_OWNER = 1
SLOT_START = 2  # the message is slot[start:length]
SLOT_LENGTH = 3
SLOT_FIELDS = 4

# Process table fields.
P_KIND = 0
P_PID = 1
P_START = 2
P_OPEN = 3  # P_OPEN + direction
P_RES_PID = 5  # the process that made a reservation for a child
P_RES_START = 6
P_NONCE = 7
PROC_FIELDS = 8


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Layout:
    """Byte offsets of each region, derived from the two sizing parameters."""

    capacity: int
    max_message_size: int

    @property
    def stride(self) -> int:
        return _align(HEADER_RESERVE + self.max_message_size)

    @property
    def mutex(self) -> int:
        return _align(_CTL_FIELDS * 8)

    @property
    def bells(self) -> int:
        return self.mutex + MUTEX_SIZE

    @property
    def ring(self) -> int:
        return _align(self.bells + 2 * SEM_SIZE)

    @property
    def free(self) -> int:
        return _align(self.ring + 8 * self.capacity)

    @property
    def slots(self) -> int:
        return _align(self.free + 8 * self.capacity)

    @property
    def procs(self) -> int:
        return _align(self.slots + 8 * SLOT_FIELDS * self.capacity)

    @property
    def payloads(self) -> int:
        return _align(self.procs + 8 * PROC_FIELDS * MAX_PROCS)

    @property
    def size(self) -> int:
        return self.payloads + self.stride * self.capacity


class Segment:
    """A channel's shared memory, with typed views of each region.

    Picklable only while a child process is being started (the file descriptor is handed
    to the child then); a forked child simply inherits the mapping.
    """

    def __init__(self, fd: int, layout: Layout) -> None:
        self.fd = fd
        self.layout = layout
        self._map = mmap.mmap(fd, layout.size)
        if layout.size >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            # Large slots copy faster with fewer TLB misses, where the system lets shared
            # memory use huge pages (transparent_hugepage/shmem_enabled "advise"). Only a
            # hint: a kernel without transparent huge pages refuses it (EINVAL).
            with contextlib.suppress(OSError):
                self._map.madvise(mmap.MADV_HUGEPAGE)
        self._finalizer = weakref.finalize(self, os.close, fd)
        whole = memoryview(self._map)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.ctl = whole[: _CTL_FIELDS * 8].cast("q")
        self.mutex = RobustMutex(addr + layout.mutex)
        self.bells = (
            SharedSemaphore(addr + layout.bells),
            SharedSemaphore(addr + layout.bells + SEM_SIZE),
        )
        self.ring = whole[layout.ring : layout.ring + 8 * layout.capacity].cast("q")
        self.free = whole[layout.free : layout.free + 8 * layout.capacity].cast("q")
        self.slots = whole[layout.slots : layout.slots + 8 * SLOT_FIELDS * layout.capacity].cast(
            "q"
        )
        self.procs = whole[layout.procs : layout.procs + 8 * PROC_FIELDS * MAX_PROCS].cast("q")
        stride = layout.stride
        self.payload = [
            whole[layout.payloads + i * stride : layout.payloads + (i + 1) * stride]
            for i in range(layout.capacity)
        ]
        self.address = addr

    @classmethod
    def create(cls, capacity: int, max_message_size: int) -> Segment:
        layout = Layout(capacity, max_message_size)
        fd = _anonymous_fd(layout.size)
        try:
            seg = cls(fd, layout)
        except BaseException:
            os.close(fd)
            raise
        ctl = seg.ctl
        ctl[MAGIC] = _MAGIC
        ctl[CAPACITY] = capacity
        ctl[MAX_MESSAGE_SIZE] = max_message_size
        ctl[STRIDE] = layout.stride
        ctl[UID] = int.from_bytes(secrets.token_bytes(8), "little", signed=True)
        RobustMutex.initialize(seg.address + layout.mutex)
        for i in range(2):
            SharedSemaphore.initialize(seg.address + layout.bells + i * SEM_SIZE, 0)
        return seg

    @classmethod
    def _attach(cls, fd: Any) -> Segment:
        """Map a segment handed over at process start (in a spawned child)."""
        fd = fd.detach() if hasattr(fd, "detach") else fd
        head = mmap.mmap(fd, mmap.PAGESIZE)
        try:
            ctl = memoryview(head)[: _CTL_FIELDS * 8].cast("q")
            magic, capacity, size = ctl[MAGIC], ctl[CAPACITY], ctl[MAX_MESSAGE_SIZE]
            ctl.release()
        finally:
            head.close()
        if magic != _MAGIC:
            raise RuntimeError("not an aioshm segment, or one of another layout version")
        return cls(fd, Layout(capacity, size))

    def payload_address(self, slot: int) -> int:
        """The address of a slot's first byte in this process."""
        return self.address + self.layout.payloads + slot * self.layout.stride

    def __reduce__(self) -> tuple[Any, ...]:
        if context.get_spawning_popen() is None:
            raise RuntimeError(
                "aioshm shared memory can be handed to a child process only as an argument "
                "of multiprocessing.Process (or inherited under fork)"
            )
        return (Segment._attach, (reduction.DupFd(self.fd),))

    def __repr__(self) -> str:
        return (
            f"<Segment capacity={self.layout.capacity} "
            f"max_message_size={self.layout.max_message_size} pid={os.getpid()}>"
        )


def _anonymous_fd(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("aioshm", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
