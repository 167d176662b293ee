"""Receive buffers: a copying receive of a large array lends a pooled buffer, and never
one that a live array (or a view, or a memoryview, of one) still uses."""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np
import pytest

import aioshm
from aioshm import _recvbuf

from . import workers
from .helpers import join_all

pytestmark = pytest.mark.timeout(60)

#: Elements of a float64 array just large enough to be pooled.
LARGE = _recvbuf.MIN_BYTES // 8


def relay(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Send ``array`` through a channel and receive the copy."""
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=array.nbytes)
    with tx, rx:
        tx.send_nowait(array)
        received: np.ndarray[Any, Any] = rx.recv_nowait()
    return received


def test_arrays_from_another_process_never_share_memory() -> None:
    """Whatever the receiver keeps (arrays, views, memoryviews) keeps its own bytes while
    later messages are received into pooled buffers."""
    ctx = multiprocessing.get_context("fork")
    count = 3 * _recvbuf.KEEP + 3
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=LARGE * 8)
    _recvbuf.clear()
    child = ctx.Process(target=workers.produce_filled, args=(tx, count, LARGE))
    child.start()
    tx.close()
    kept: dict[int, Any] = {}
    with rx:
        for i in range(count):
            array = rx.recv_blocking(timeout=30)
            assert array.flags.writeable and array.shape == (LARGE,)
            if i % 3 == 0:
                kept[i] = array
            elif i % 3 == 1:
                kept[i] = array[1:]  # a view: its base is the pooled buffer
            elif i % 4 == 2:
                kept[i] = memoryview(array)
            del array
    join_all([child])
    for i, thing in kept.items():
        assert np.all(np.asarray(thing) == float(i)), f"message {i} was overwritten"
    assert _recvbuf.kept() <= _recvbuf.KEEP


def test_a_dropped_array_gives_its_buffer_back() -> None:
    _recvbuf.clear()
    data = np.arange(LARGE, dtype=np.float64)
    first = relay(data)
    where = first.__array_interface__["data"][0]
    del first
    second = relay(data)
    assert second.__array_interface__["data"][0] == where
    assert np.array_equal(second, data)
    assert _recvbuf.kept() == 1


def test_the_pool_is_bounded() -> None:
    _recvbuf.clear()
    held = [relay(np.full(LARGE, float(i))) for i in range(2 * _recvbuf.KEEP)]
    assert _recvbuf.kept() == _recvbuf.KEEP
    assert len({id(a.base) for a in held}) == len(held)
    assert all(np.all(a == float(i)) for i, a in enumerate(held))


def test_layout_and_small_arrays() -> None:
    fortran = np.asfortranarray(np.arange(LARGE, dtype=np.float32).reshape(512, -1))
    got = relay(fortran)
    assert got.flags.f_contiguous and not got.flags.c_contiguous
    assert got.dtype == fortran.dtype and np.array_equal(got, fortran)
    before = _recvbuf.kept()
    assert np.array_equal(relay(np.arange(10.0)), np.arange(10.0))
    just_under = np.arange(LARGE - 1, dtype=np.float64)
    assert np.array_equal(relay(just_under), just_under)
    assert _recvbuf.kept() == before  # smaller ones are numpy's own


def test_a_forked_child_starts_with_an_empty_pool() -> None:
    relay(np.zeros(LARGE))
    assert _recvbuf.kept() >= 1
    ctx = multiprocessing.get_context("fork")
    tx, rx = aioshm.open_channel[int](capacity=1)
    with tx, rx:
        child = ctx.Process(target=workers.pool_is_empty_after_fork, args=(tx,))
        child.start()
        assert rx.recv_blocking(timeout=30) == 0
        join_all([child])
