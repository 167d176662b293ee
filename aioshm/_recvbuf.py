"""Receive buffers: the private memory a copying receive copies a large array into.

A fresh allocation of several MiB costs more than its copy suggests: the allocator
hands it back to the kernel when it is freed (or never reused it), and the next one
page-faults in again, the kernel zeroing every page (for 8 MiB, about a tenth of the
copy's time on the machines the benchmarks run on). So this process keeps a few
buffers of its own, already faulted in, and lends them out.

Each buffer is a 1-d ``uint8`` array that owns its memory; the received array is an
ordinary writable ndarray onto it (its ``base``), and so is every view derived from it
(numpy points a view's ``base`` at the array that owns the memory). A buffer is lent
again only once nothing but the pool refers to it: no received array, no view of one,
no ``memoryview``, nothing that took ``arr.base``. Nothing is ever shared between two
live arrays, an array outlives its channel like any other, and a buffer that stays in
use simply stays out of the pool's reach (a new one is allocated meanwhile).

Bounded: at most :data:`KEEP` buffers and :data:`KEEP_BYTES` bytes are kept; arrays
under :data:`MIN_BYTES` (which the allocator reuses well) are allocated as usual. A
forked child starts with an empty pool (its copies of the parent's buffers would be
copied on write). :func:`clear` forgets every buffer (those in use stay valid).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Final, Literal

import numpy as np

__all__ = ["KEEP", "KEEP_BYTES", "MIN_BYTES", "clear", "empty", "kept"]

Array = np.ndarray[Any, np.dtype[Any]]

#: Arrays smaller than this come from numpy's allocator as usual.
MIN_BYTES: Final = 1 << 20
#: The most buffers kept.
KEEP: Final = 4
#: The most bytes kept, over all buffers.
KEEP_BYTES: Final = 256 << 20

_lock = threading.Lock()
_buffers: list[Array] = []


def _refs(buffers: list[Array], i: int) -> int:
    """``sys.getrefcount`` of ``buffers[i]``, always taken the same way: compared with
    :data:`_UNUSED_REFS`, which was taken the same way (how many references the call
    itself adds differs between Python versions)."""
    buffer = buffers[i]
    return sys.getrefcount(buffer)


#: What :func:`_refs` counts for a buffer that only its list refers to: measured, not
#: assumed. One more means an array, a view or anything else still holds it.
_UNUSED_REFS: Final = _refs([np.empty(1, np.uint8)], 0)


def empty(shape: tuple[int, ...], dtype: np.dtype[Any], order: Literal["C", "F"]) -> Array:
    """A writable array of ``shape`` and ``dtype``, contents undefined, that the caller
    owns outright: from a free pooled buffer when it is large, else newly allocated."""
    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= dim
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype, order)
    with _lock:
        buffer = _take(nbytes)
    # Positional arguments: numpy parses keywords to ndarray() at twice the cost.
    return np.ndarray(shape, dtype, buffer, 0, None, order)


def _take(nbytes: int) -> Array:
    """A buffer of at least ``nbytes`` (at most a quarter more) that nothing uses."""
    spare = -1
    for i in range(len(_buffers)):
        if _refs(_buffers, i) == _UNUSED_REFS:
            buffer = _buffers[i]
            size = buffer.nbytes
            if nbytes <= size <= nbytes + nbytes // 4:
                return buffer
            spare = i  # free, but the wrong size: the first to make room
    fresh: Array = np.empty(nbytes, np.uint8)
    held = sum(buffer.nbytes for buffer in _buffers)
    if spare >= 0 and (len(_buffers) >= KEEP or held + nbytes > KEEP_BYTES):
        held -= _buffers.pop(spare).nbytes
    if len(_buffers) < KEEP and held + nbytes <= KEEP_BYTES:
        _buffers.append(fresh)
    return fresh


def kept() -> int:
    """How many buffers the pool keeps (in use or free)."""
    with _lock:
        return len(_buffers)


def clear() -> None:
    """Forget every buffer: those in use stay valid, the rest are freed."""
    with _lock:
        _buffers.clear()


def _clear_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _buffers.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_clear_in_child)
