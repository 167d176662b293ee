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
Small objects (locks, events, values) are blocks of a shared *arena* instead, so that
they do not cost a file descriptor each; see :mod:`aioshm._arena`, whose blocks are
never reused either.

Every page is reserved when the memory is created (:func:`reserve_shared_memory`): if
the memory is not there, creation fails with ``OSError`` and leaves nothing behind,
rather than a process getting ``SIGBUS`` (or the OOM killer) when it first touches a
page. A memfd's pages are ``shmem`` of the creating process's memory cgroup; they do
not count against the size of the ``/dev/shm`` mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import secrets
import tempfile
import weakref
from dataclasses import dataclass
from multiprocessing import context, reduction
from typing import Any

from ._posix import MUTEX_SIZE, SEM_SIZE, RobustMutex, SharedSemaphore

__all__ = ["HEADER_RESERVE", "Layout", "Segment", "reserve_shared_memory"]

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
SLEEPERS = 10  # SLEEPERS + direction: registrations on that bell not yet answered by a post
DROPPED = 12  # messages taken off the queue because they could not be received
ENDED = 13  # 1 once a receiver was told the stream ended: final, no message comes after
RECLAIMED = 14  # slots taken back from processes that died holding them
REDELIVERED = 15  # messages put back because their receiver died reading them
UID = 16
# 17..21: the state of a primitive (aioshm._lock, _semaphore, _event, _condition).
SWEPT_AT = 22  # monotonic ns when the last liveness sweep began (one sweep per interval)
SWEEPS = 24  # liveness sweeps done, by every process
TIMED_OUT = 25  # sleeps on a bell that ended by timeout, in every process
KIND = 26  # a named object: what it is (0: a channel; see aioshm._names.KINDS)
TYPE_TAG = 27  # a named Value or Array: its typecode (as ord()); 0 otherwise
LENGTH = 28  # a named Array: its length
RETIRED = 30  # a named object: 1 once no process holds it (its name is being removed)
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
P_SLEEP = 8  # P_SLEEP + direction: this process's threads registered on that bell
PROC_FIELDS = 10


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
    """A shared object's memory, with typed views of each region.

    Either a mapping of its own (a channel: :meth:`create`), which then owns ``fd`` and
    closes it, or a block of a shared arena (a lock, an event, a value: see
    :func:`aioshm._arena.allocate`), which keeps the arena mapped while it lives.

    Picklable only while a child process is being started (the file descriptor is handed
    to the child then); a forked child simply inherits the mapping.
    """

    fd: int
    layout: Layout
    address: int

    def __init__(self, fd: int, layout: Layout) -> None:
        """Map all of ``fd``, which the segment owns once this returns (and closes)."""
        buf = mmap.mmap(fd, layout.size)
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        self._finalizer.atexit = False  # exit closes it anyway; atexit hooks may need it
        if layout.size >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            # Large slots copy faster with fewer TLB misses, where the system lets shared
            # memory use huge pages (transparent_hugepage/shmem_enabled "advise"). Only a
            # hint: a kernel without transparent huge pages refuses it (EINVAL). Pages
            # already reserved by posix_fallocate stay as they were found: huge ones
            # under shmem_enabled "always" or "within_size", small ones under "advise".
            with contextlib.suppress(OSError):
                buf.madvise(mmap.MADV_HUGEPAGE)
        self._owner: object = None
        self._reduce_as: tuple[Any, ...] | None = None
        self._view(buf, 0, layout)

    @classmethod
    def in_block(
        cls, buf: mmap.mmap, offset: int, layout: Layout, owner: object, reduce_as: tuple[Any, ...]
    ) -> Segment:
        """A segment laid over ``buf[offset:offset + layout.size]``, a block of a mapping
        that ``owner`` keeps alive; ``reduce_as`` is how it pickles (for a child)."""
        seg = cls.__new__(cls)
        seg.fd = -1
        seg._owner = owner
        seg._reduce_as = reduce_as
        seg._view(buf, offset, layout)
        return seg

    def _view(self, buf: mmap.mmap, offset: int, layout: Layout) -> None:
        self.layout = layout
        self._map = buf
        whole = memoryview(buf)[offset : offset + layout.size]
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + offset
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
        self._whole = whole
        self.address = addr

    def format(self) -> None:
        """Write a new segment's header and construct its mutex and doorbells in place
        (once, by its creator; the memory must be zeroed)."""
        layout = self.layout
        ctl = self.ctl
        ctl[MAGIC] = _MAGIC
        ctl[CAPACITY] = layout.capacity
        ctl[MAX_MESSAGE_SIZE] = layout.max_message_size
        ctl[STRIDE] = layout.stride
        ctl[UID] = int.from_bytes(secrets.token_bytes(8), "little", signed=True)
        RobustMutex.initialize(self.address + layout.mutex)
        for i in range(2):
            SharedSemaphore.initialize(self.address + layout.bells + i * SEM_SIZE, 0)

    def _unmap(self) -> None:
        """Undo a creation that failed half-way: release every view, unmap, close."""
        for view in (self.ctl, self.ring, self.free, self.slots, self.procs, *self.payload):
            view.release()
        self._whole.release()
        if self._owner is None:
            self._map.close()
            self._finalizer()

    @classmethod
    def create(cls, capacity: int, max_message_size: int, fd: int | None = None) -> Segment:
        """A new segment with a mapping of its own, every page reserved: in a new
        ``memfd``, or in ``fd`` (an empty file, for a named channel), which the segment
        takes over if this succeeds; on failure, ``fd`` stays the caller's to close.

        :raises OSError: the memory is not there (e.g. ``ENOMEM`` from the memory
            cgroup's limit, ``ENOSPC`` from a full tmpfs); nothing is left behind
        """
        layout = Layout(capacity, max_message_size)
        own = fd is None
        if fd is None:
            fd = reserve_shared_memory(layout.size)
        else:
            reserve_shared_memory(layout.size, fd)
        try:
            seg = cls(fd, layout)
        except BaseException:
            if own:
                os.close(fd)
            raise
        try:
            seg.format()
        except BaseException:
            if not own:
                seg._finalizer.detach()
            seg._unmap()
            raise
        return seg

    @staticmethod
    def read_layout(buf: Any) -> Layout:
        """The layout recorded in a segment's header (``buf``: its first bytes)."""
        ctl = memoryview(buf)[: _CTL_FIELDS * 8].cast("q")
        try:
            magic, capacity, size = ctl[MAGIC], ctl[CAPACITY], ctl[MAX_MESSAGE_SIZE]
        finally:
            ctl.release()
        if magic != _MAGIC:
            raise RuntimeError("not an aioshm segment, or one of another layout version")
        return Layout(capacity, size)

    @classmethod
    def _attach(cls, fd: Any) -> Segment:
        """Map the segment in ``fd`` (handed over at process start, or opened by name),
        which it takes over: on failure, ``fd`` is closed."""
        fd = fd.detach() if hasattr(fd, "detach") else fd
        try:
            head = mmap.mmap(fd, mmap.PAGESIZE)
            try:
                layout = cls.read_layout(head)
            finally:
                head.close()
            return cls(fd, layout)
        except BaseException:
            os.close(fd)
            raise

    def payload_address(self, slot: int) -> int:
        """The address of a slot's first byte in this process."""
        return self.address + self.layout.payloads + slot * self.layout.stride

    def __reduce__(self) -> tuple[Any, ...]:
        if context.get_spawning_popen() is None:
            raise RuntimeError(
                "aioshm shared memory can be handed to a child process only as an argument "
                "of multiprocessing.Process (or inherited under fork)"
            )
        if self._reduce_as is not None:
            return self._reduce_as
        return (Segment._attach, (reduction.DupFd(self.fd),))

    def __repr__(self) -> str:
        return (
            f"<Segment capacity={self.layout.capacity} "
            f"max_message_size={self.layout.max_message_size} pid={os.getpid()}>"
        )


def reserve_shared_memory(size: int, fd: int | None = None, *, name: str = "aioshm") -> int:
    """Shared memory of ``size`` bytes whose every page is reserved now; returns its fd.

    With ``fd=None``, a new anonymous ``memfd`` (close-on-exec, labelled ``name`` in
    ``/proc/<pid>/maps``), which this function closes again if it fails. With ``fd``, a
    file the caller opened (in ``/dev/shm``, say), which is sized and reserved and, on
    failure, left open for the caller to close (and unlink).

    The reservation (``posix_fallocate``) makes the kernel find every page now, so that a
    full tmpfs or a memory cgroup at its limit fails here, with ``OSError``, instead of
    sending ``SIGBUS`` to whichever process first touches a missing page later.

    A request larger than the memory available (:func:`available_memory`: the machine's,
    or what is left under this process's memory cgroup limit) is refused before anything
    is created: the kernel would otherwise take pages until the OOM killer stepped in.

    :raises OSError: ``ENOMEM`` (more than the machine has available, or a memory
        cgroup at its limit), ``ENOSPC`` (a full tmpfs), ``EFBIG`` (``RLIMIT_FSIZE``)
        and the like, with a message that names the size
    """
    if size <= 0:
        raise ValueError(f"shared memory must have a positive size, not {size}")
    available = available_memory()
    if available is not None and size > available:
        # posix_fallocate on a memfd is limited by nothing but memory: past what is
        # available it would wake the OOM killer instead of failing.
        raise OSError(
            errno.ENOMEM,
            f"cannot reserve {size} bytes of shared memory: only about {available} bytes "
            "of memory are available (see 'Where the memory lives' in the FAQ)",
        )
    own = fd is None
    if fd is None:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
        if hasattr(os, "posix_fallocate"):  # retried by Python if a signal interrupts it
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if own:
            os.close(fd)
        raise OSError(
            exc.errno,
            f"cannot reserve {size} bytes of shared memory: {exc.strerror} (see "
            "'Where the memory lives' in the FAQ)",
        ) from exc
    except BaseException:
        if own:
            os.close(fd)
        raise
    return fd


def available_memory() -> int | None:
    """Bytes of memory this process could still be given: the system's available memory
    and free swap, or less under a memory cgroup (v2) limit; ``None`` if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            info = {line.split(b":")[0]: int(line.split()[1]) * 1024 for line in f if b":" in line}
        free = info[b"MemAvailable"] + info.get(b"SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None
    try:
        with open("/proc/self/cgroup", "rb") as f:
            path = next(line[3:].strip() for line in f if line.startswith(b"0::"))
        group = "/sys/fs/cgroup" + os.fsdecode(path)
        with open(group + "/memory.max", "rb") as f:
            limit = f.read().strip()
        if limit != b"max":
            with open(group + "/memory.current", "rb") as f:
                free = min(free, int(limit) - int(f.read()))
    except (OSError, StopIteration, ValueError):
        pass
    return max(free, 0)
