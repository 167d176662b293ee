"""Layer 1: small shared objects packed into shared arenas.

A lock, an event, a semaphore, a condition or a ctypes value needs a few kilobytes of
shared memory. A mapping of its own would cost a file descriptor each (two, counting the
one ``mmap`` keeps), and a thousand of them would exhaust the default limit. So, as
``multiprocessing.heap`` does for ``RawArray``, they are blocks of larger mappings, the
*arenas*: one ``memfd`` each, reserved whole when created (see
:func:`~aioshm._layout.reserve_shared_memory`), 256 KiB at first and twice as large each
time up to 4 MiB. A block larger than 1 MiB gets an arena of its own.

**A block is never reused.** ``multiprocessing``'s heap hands a freed block to the next
object of the same process while a child may still map and use the old one; here a
process only ever takes fresh blocks, from the top of an arena it created itself (a
forked child forgets its parent's arena and starts one of its own). An arena is unmapped
and its descriptor closed in a process once no object of that process uses it (and it
is not the one this process allocates from), and its memory goes back to the system once
no process maps it. Reuse would not be safe even within one process without a child:
a numpy view or a ctypes object taken from a value can outlive the value. The price: a
live object keeps its whole arena's memory reserved.

**Children.** An object handed to a child as it starts (spawn, forkserver) pickles as
its arena plus an offset. The arena pickles once per start, however many of its objects
go (pickle's memo), as a file descriptor handed to the child; a process that receives an
arena it maps already uses the mapping it has.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import threading
import weakref
from multiprocessing import context, reduction
from typing import Any, Final

from ._layout import Layout, Segment, reserve_shared_memory

__all__ = ["Arena", "allocate"]

#: Blocks start at multiples of this (a cache line: no two objects share one).
ALIGN: Final = 64
#: Bytes at the start of an arena: its magic number and identity.
HEADER: Final = 64
#: The first arena a process creates, and the largest it grows to by doubling.
FIRST_SIZE: Final = 256 << 10
MAX_SIZE: Final = 4 << 20
#: Blocks larger than this get an arena of their own.
LARGE: Final = 1 << 20

_MAGIC: Final = 0x61696F73686D4152  # "aioshmAR"


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


class Arena:
    """One shared mapping that blocks are carved from; see the module docstring."""

    fd: int
    size: int
    uid: int

    def __init__(self, fd: int, size: int) -> None:
        """Map all of ``fd`` (``size`` bytes), which the arena owns from now on."""
        try:
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self._finalizer = weakref.finalize(self, os.close, fd)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        header = memoryview(self.map)[:16].cast("q")
        try:
            if header[0] == 0:  # a new arena: stamp it
                header[1] = int.from_bytes(secrets.token_bytes(8), "little", signed=True)
                header[0] = _MAGIC
            magic, self.uid = header[0], header[1]
        finally:
            header.release()
        if magic != _MAGIC:
            self.map.close()
            self._finalizer()
            raise RuntimeError("not an aioshm arena, or one of another version")
        _mapped[self.uid] = self

    @classmethod
    def create(cls, size: int) -> Arena:
        """A new arena of ``size`` bytes, every page reserved.

        :raises OSError: the memory is not there; nothing is left behind
        """
        size = _align(size, mmap.PAGESIZE)
        return cls(reserve_shared_memory(size, name="aioshm-arena"), size)

    def block(self, offset: int) -> Segment:
        """The segment whose block starts at ``offset``, as its creator formatted it."""
        layout = Segment.read_layout(memoryview(self.map)[offset : offset + mmap.PAGESIZE])
        return self._segment(offset, layout)

    def _segment(self, offset: int, layout: Layout) -> Segment:
        if offset < HEADER or offset + layout.size > self.size:
            raise RuntimeError(f"block [{offset}, +{layout.size}) lies outside the arena")
        return Segment.in_block(self.map, offset, layout, self, (_attach_block, (self, offset)))

    def __reduce__(self) -> tuple[Any, ...]:
        if context.get_spawning_popen() is None:
            raise RuntimeError(
                "aioshm shared memory can be handed to a child process only as an argument "
                "of multiprocessing.Process (or inherited under fork)"
            )
        return (_attach_arena, (reduction.DupFd(self.fd), self.uid))

    def __repr__(self) -> str:
        return f"<aioshm Arena size={self.size} pid={os.getpid()}>"


#: The arenas this process maps, by identity, so that one received twice is mapped once.
_mapped: weakref.WeakValueDictionary[int, Arena] = weakref.WeakValueDictionary()


def _attach_arena(fd: Any, uid: int) -> Arena:
    """Map an arena handed over at process start (in a spawned child)."""
    fd = fd.detach() if hasattr(fd, "detach") else fd
    known = _mapped.get(uid)
    if known is not None:
        os.close(fd)
        return known
    try:
        size = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise
    return Arena(fd, size)


def _attach_block(arena: Arena, offset: int) -> Segment:
    return arena.block(offset)


class _Allocator:
    """This process's source of fresh blocks: the top of the arena it allocates from."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.forget()

    def forget(self) -> None:
        """Start afresh (in a forked child: the parent goes on allocating from its arena)."""
        self.mutex = threading.Lock()
        self.arena: Arena | None = None
        self.top = 0
        self.next_size = FIRST_SIZE

    def before_fork(self) -> None:
        self.mutex.acquire()  # no fork in the middle of a take

    def after_fork_in_parent(self) -> None:
        self.mutex.release()

    def take(self, size: int) -> tuple[Arena, int]:
        """A fresh block of ``size`` bytes: its arena, and its offset in the arena."""
        size = _align(size)
        if size > LARGE:
            return Arena.create(HEADER + size), HEADER
        with self.mutex:
            arena = self.arena
            if arena is None or self.top + size > arena.size:
                arena = Arena.create(max(self.next_size, HEADER + size))
                self.arena, self.top = arena, HEADER
                self.next_size = min(2 * self.next_size, MAX_SIZE)
            offset = self.top
            self.top += size
        return arena, offset


_allocator = _Allocator()


def allocate(capacity: int, max_message_size: int) -> Segment:
    """A new, formatted segment in a block of an arena (for a small shared object).

    :raises OSError: a new arena was needed and its memory is not there; nothing is
        left behind
    """
    layout = Layout(capacity, max_message_size)
    arena, offset = _allocator.take(layout.size)
    seg = arena._segment(offset, layout)
    seg.format()
    return seg


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(
        before=_allocator.before_fork,
        after_in_parent=_allocator.after_fork_in_parent,
        after_in_child=_allocator.forget,
    )
