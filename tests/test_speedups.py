"""The optional C hot path (aioshm._speedups) against the pure-Python path.

CI runs the default selection twice: as installed (the extension must then be loaded:
a silent fallback would hide a broken build), and with ``AIOSHM_PURE_PYTHON=1``.
The cross-checks below need the extension and are skipped in the second run.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import sys
import threading
from typing import Any

import anyio
import numpy as np
import pytest

import aioshm
from aioshm import _layout, _posix, _slotqueue
from aioshm._codec import _Image, decode, encode
from aioshm._slotqueue import SlotQueue

from .helpers import mutex_held

pytestmark = pytest.mark.timeout(60)

PURE = os.environ.get("AIOSHM_PURE_PYTHON", "") not in ("", "0")
needs_c = pytest.mark.skipif(_slotqueue.speedups is None, reason="the C hot path is off")


def test_the_extension_is_loaded_unless_forced_off() -> None:
    """A normal install (a C compiler at hand, as in CI) must run the C hot path; with
    AIOSHM_PURE_PYTHON=1 it must not."""
    tx, rx = aioshm.open_channel[Any](4, 64)
    with tx, rx:
        if PURE:
            assert _slotqueue.speedups is None
            assert tx._queue._fast is None
        else:
            assert _slotqueue.speedups is not None, "aioshm._speedups was not built or loaded"
            assert tx._queue._fast is not None


def test_the_environment_variable_forces_the_pure_python_path() -> None:
    code = "from aioshm import _slotqueue; print(_slotqueue.speedups is None)"
    for value, pure in (("1", True), ("", not _built()), ("0", not _built())):
        env = {**os.environ, "AIOSHM_PURE_PYTHON": value}
        out = _run(code, env)
        assert out == str(pure), (value, out)


def _built() -> bool:
    try:
        from aioshm import _speedups  # noqa: F401
    except ImportError:
        return False
    return True


def _run(code: str, env: dict[str, str]) -> str:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# ------------------------------------------------------------------ cross-checks


def _pure_twin(queue: SlotQueue) -> SlotQueue:
    """Another SlotQueue over the same segment, on the pure-Python path."""
    twin = SlotQueue(queue.segment)
    twin._fast = None
    return twin


def _state(queue: SlotQueue) -> tuple[Any, ...]:
    """Everything the queue's critical sections read or write, but the mutex and bells'
    internals (their counts, the semaphores' values, are compared)."""
    seg = queue.segment
    ctl = list(seg.ctl)
    ctl[_layout.UID] = 0
    payload = [bytes(p) for p in seg.payload]
    return (
        ctl,
        list(seg.ring),
        list(seg.free),
        list(seg.slots),
        list(seg.procs),
        payload,
        seg.bells[0].value(),
        seg.bells[1].value(),
    )


def _outcome(action: Any) -> Any:
    try:
        return ("ok", action())
    except BaseException as exc:
        return ("raised", type(exc).__name__)


def _value(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _value(v) for k, v in x.items()}
    return x.tolist() if isinstance(x, np.ndarray) else x


@needs_c
@pytest.mark.parametrize("seed", range(4))
def test_c_and_python_paths_leave_identical_segments(seed: int) -> None:
    """The same random operations on two queues, one on each path: same results, and the
    same bytes in every region after every step (sleepers, ends and closes included)."""
    rng = random.Random(seed)
    cap = rng.choice([1, 2, 3, 8])
    fast = SlotQueue.create(cap, 512)
    pure = SlotQueue.create(cap, 512)
    pure._fast = None
    assert fast._fast is not None
    entries = [q.register((1, 1)) for q in (fast, pure)]
    assert entries[0] == entries[1]
    for q in (fast, pure):  # no liveness sweep: its timing would differ between the two
        q._ctl[_layout.SWEPT_AT] = 1 << 62
    me = entries[0]
    items: list[Any] = [
        np.arange(10, dtype=np.float64),
        b"abc",
        b"",
        np.zeros((2, 3), np.int16, order="F"),
        {"k": 1},
        np.arange(3, dtype=np.uint8),
        {"oob": np.arange(3)},  # a pickle with an out-of-band buffer: not one image
    ]
    for _ in range(400):
        op = rng.random()
        if op < 0.25:
            item = rng.choice(items)
            results = [
                _outcome(lambda q=q: q.try_put(me, encode(item, q.max_message_size)))
                for q in (fast, pure)
            ]
        elif op < 0.5:
            results = [_outcome(lambda q=q: _value(q.try_get(me, decode))) for q in (fast, pure)]
        elif op < 0.65:
            batch = rng.choices(items, k=rng.randint(1, 2 * cap + 1))
            results = [_put_all(q, me, batch) for q in (fast, pure)]
        elif op < 0.8:
            limit = rng.randint(1, 2 * cap + 1)
            results = [
                _outcome(lambda q=q: [_value(x) for x in q.try_get_many(me, limit, decode)])
                for q in (fast, pure)
            ]
        elif op < 0.86:
            side = rng.choice([0, 1])
            for q in (fast, pure):  # a sleeper registered on a side (no thread sleeps)
                q._ctl[_layout.SLEEPERS + side] += 1
            results = []
        elif op < 0.9:
            side = rng.choice([0, 1])
            results = [_outcome(lambda q=q: q.drop_handle(me, side)) for q in (fast, pure)]
        elif op < 0.94:
            side = rng.choice([0, 1])
            results = [_outcome(lambda q=q: q.add_handle(me, side)) for q in (fast, pure)]
        else:
            results = [_outcome(lambda q=q: q.counters()) for q in (fast, pure)]
        if results:
            assert results[0] == results[1]
        assert _state(fast) == _state(pure)


@needs_c
@pytest.mark.parametrize("seed", range(4))
def test_c_and_python_batches_leave_identical_segments(seed: int) -> None:
    """Batches on an open channel, mixed with single messages and sleepers: the same
    results, and the same bytes in every region after every step; then the end of the
    stream, as a batch receive finds it."""
    rng = random.Random(seed)
    cap = rng.choice([2, 3, 8, 16])
    fast, pure = _twin_queues(cap)
    me = 0
    items: list[Any] = [
        np.arange(10, dtype=np.float64),
        b"abc",
        b"",
        {"k": 1},
        {"oob": np.arange(3)},  # a pickle with an out-of-band buffer: not one image
    ]
    taken = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.35:
            batch = rng.choices(items, k=rng.randint(1, 2 * cap + 1))
            results = [_put_all(q, me, batch) for q in (fast, pure)]
        elif op < 0.7:
            limit = rng.randint(1, 2 * cap + 1)
            results = [
                _outcome(lambda q=q: [_value(x) for x in q.try_get_many(me, limit, decode)])
                for q in (fast, pure)
            ]
            if results[0][0] == "ok":
                taken += len(results[0][1])
        elif op < 0.8:
            item = rng.choice(items)
            results = [
                _outcome(lambda q=q: q.try_put(me, encode(item, q.max_message_size)))
                for q in (fast, pure)
            ]
        elif op < 0.9:
            results = [_outcome(lambda q=q: _value(q.try_get(me, decode))) for q in (fast, pure)]
        else:
            side = rng.choice([0, 1])
            for q in (fast, pure):  # a sleeper registered on a side (no thread sleeps)
                q._ctl[_layout.SLEEPERS + side] += 1
            results = []
        if results:
            assert results[0] == results[1]
        assert _state(fast) == _state(pure)
    assert taken > 50  # batches did flow
    for q in (fast, pure):
        q.drop_handle(me, 0)
    while True:
        results = [_outcome(lambda q=q: len(q.try_get_many(me, 3, decode))) for q in (fast, pure)]
        assert results[0] == results[1]
        assert _state(fast) == _state(pure)
        if results[0][0] == "raised":
            assert results[0][1] == "EndOfStream"
            break


def _twin_queues(cap: int) -> tuple[SlotQueue, SlotQueue]:
    """Two queues alike, one on each path, with one entry holding both sides."""
    fast = SlotQueue.create(cap, 512)
    pure = SlotQueue.create(cap, 512)
    pure._fast = None
    assert fast._fast is not None
    entries = [q.register((1, 1)) for q in (fast, pure)]
    assert entries == [0, 0]
    for q in (fast, pure):  # no liveness sweep: its timing would differ between the two
        q._ctl[_layout.SWEPT_AT] = 1 << 62
    return fast, pure


def _put_all(queue: SlotQueue, me: int, items: list[Any]) -> Any:
    """``items`` put as ``send_many`` puts them: prefixes, until all are sent or one
    round raises; how many were sent, and what was raised. (The C path may end a prefix
    sooner than the Python path: at a message that is not one image.)"""
    batch = [encode(item, queue.max_message_size) for item in items]
    sent = 0
    try:
        while sent < len(batch):
            sent += queue.try_put_many(me, batch, sent)
    except BaseException as exc:
        return ("raised", type(exc).__name__, sent)
    return ("ok", sent)


@needs_c
def test_messages_cross_between_the_paths_on_one_segment() -> None:
    queue = SlotQueue.create(4, 256)
    me = queue.register((1, 1))
    twin = _pure_twin(queue)
    for i in range(40):
        writer, reader = (queue, twin) if i % 2 else (twin, queue)
        for j in range(3):
            writer.try_put(me, encode(np.full(10, i * 10 + j, np.float64), 256))
        for j in range(3):
            assert reader.try_get(me, decode).tolist() == [float(i * 10 + j)] * 10
    with pytest.raises(anyio.WouldBlock):
        queue.try_get(me, decode)
    with pytest.raises(anyio.WouldBlock):
        twin.try_get(me, decode)


@needs_c
def test_the_c_path_stands_aside_while_the_mutex_is_held() -> None:
    """A held mutex (here by this thread) makes the C path do nothing at all."""
    queue = SlotQueue.create(4, 256)
    me = queue.register((1, 1))
    queue.try_put(me, encode(b"x", 256))
    fast = queue._fast
    assert fast is not None
    image = encode(b"y", 256)
    assert isinstance(image, _Image)
    before = _state(queue)
    queue._mutex.acquire()
    try:
        assert fast.put(image.image, image.start, image.length) == fast_fallback()
        assert fast.get() == fast_fallback()
        assert fast.put_many([image, image], 0) == (fast_fallback(), 0)
        assert fast.get_many(4) == fast_fallback()
        assert _state(queue) == before
    finally:
        queue._mutex.release()
    assert queue.try_get(me, decode) == b"x"


def fast_fallback() -> int:
    speedups = _slotqueue.speedups
    assert speedups is not None
    return int(speedups.FALLBACK)


@needs_c
def test_the_c_path_stands_aside_for_a_corrupt_ring_and_python_repairs() -> None:
    queue = SlotQueue.create(4, 256)
    me = queue.register((1, 1))
    queue.try_put(me, encode(b"a", 256))
    queue.try_put(me, encode(b"b", 256))
    queue._ring[queue._ctl[_layout.HEAD] % 4] = 99  # not a slot
    before = _state(queue)
    assert queue._fast is not None
    assert queue._fast.get() == fast_fallback()
    assert _state(queue) == before
    with pytest.raises(aioshm.MessageDropped):
        queue.try_get(me, decode)
    # The repair queues again the slot that the corrupt entry lost (at the head).
    assert [queue.try_get(me, decode) for _ in range(2)] == [b"a", b"b"]
    assert queue.counters().dropped == 1


@needs_c
def test_a_batch_stops_before_a_corrupt_ring_entry_and_python_repairs() -> None:
    """The C path takes the well-formed messages before a corrupt entry and stops; the
    Python path then drops the entry, repairs the ring, and every message arrives."""
    queue = SlotQueue.create(4, 256)
    me = queue.register((1, 1))
    batch = [encode(b, 256) for b in (b"a", b"b", b"c")]
    assert queue.try_put_many(me, batch) == 3
    queue._ring[(queue._ctl[_layout.HEAD] + 1) % 4] = 99  # not a slot
    assert queue.try_get_many(me, 10, decode) == [b"a"]
    with pytest.raises(aioshm.MessageDropped) as caught:
        queue.try_get_many(me, 10, decode)
    # The repair queues again the slot that the corrupt entry lost (at the head).
    assert (caught.value.dropped, caught.value.received) == (1, [b"b", b"c"])
    assert queue.counters().dropped == 1
    assert queue.counters().free == 4


@needs_c
def test_a_batch_ends_its_prefix_at_a_message_that_is_not_one_image() -> None:
    """put_many publishes the leading images only; the rest go through the Python path
    on the next round, in order."""
    queue = SlotQueue.create(8, 256)
    me = queue.register((1, 1))
    batch = [encode(x, 256) for x in (b"a", {"oob": np.arange(3)}, b"c")]
    assert not hasattr(batch[1], "image")
    assert queue._fast is not None
    assert queue._fast.put_many(batch, 1) == (fast_fallback(), 0)
    assert queue.try_put_many(me, batch) == 1
    assert queue.try_put_many(me, batch, 1) == 2
    got = queue.try_get_many(me, 8, decode)
    assert [_value(x) for x in got] == [b"a", {"oob": [0, 1, 2]}, b"c"]


@needs_c
def test_no_collection_runs_while_the_c_path_holds_the_mutex() -> None:
    """Nothing the C path allocates under the mutex can set off the garbage collector,
    whose callbacks and finalizers would run Python code there: a batch's list is
    made before the lock, its result tuple after. Collections are made to come at
    almost every allocation, and each one looks at the mutex."""
    queue = SlotQueue.create(8, 256)
    queue.register((1, 1))  # both sides open
    fast = queue._fast
    assert fast is not None
    addr = queue.segment.mutex.ptr
    seen: list[int] = []

    def look(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            code = _posix._mutex_trylock(addr)  # EBUSY if this thread holds it
            if code == 0:
                _posix._mutex_unlock(addr)
            seen.append(code)

    images = [encode(bytes([i]), 256) for i in range(8)]
    assert isinstance(images[0], _Image)
    # An object taken from a free list does not count towards a collection, and a freed
    # one takes its count back: empty the free lists of tuples and lists, keep everything.
    ballast = [(i, -i) for i in range(5000)] + [[i] for i in range(500)]
    kept: list[Any] = []
    threshold = gc.get_threshold()
    gc.callbacks.append(look)
    gc.set_threshold(2)
    try:
        for _ in range(50):
            kept.append(fast.put_many(images, 0))
            kept.append(fast.get_many(8))
            kept.append(fast.put(images[0].image, images[0].start, images[0].length))
            kept.append(fast.get())
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(look)
    assert len(seen) > 20
    assert set(seen) == {0}, seen
    assert [len(got) for got in kept[1::4]] == [8] * 50
    del ballast


def _die_holding(queue: SlotQueue) -> None:
    queue._mutex.acquire()
    os._exit(0)


@needs_c
def test_a_holder_that_died_is_repaired_by_the_python_path() -> None:
    """EOWNERDEAD: the C path stands aside; the Python path repairs, then C runs again."""
    queue = SlotQueue.create(4, 256)
    me = queue.register((1, 1))
    queue.try_put(me, encode(b"a", 256))
    proc = multiprocessing.get_context("fork").Process(target=_die_holding, args=(queue,))
    proc.start()
    proc.join(30)
    queue._ctl[_layout.NFREE] = 0  # left half-done by the dead holder: the repair fixes it
    sweeps = queue._ctl[_layout.SWEEPS]
    assert queue.try_get(me, decode) == b"a"  # the C path, after the Python repair
    assert not mutex_held(queue)
    assert queue.counters().free == 4
    assert queue._ctl[_layout.SWEEPS] > sweeps  # the sweep deferred by the repair ran
    queue.try_put(me, encode(b"b", 256))
    assert queue.try_get(me, decode) == b"b"


@needs_c
@pytest.mark.parametrize("batch_op", ["get", "put"])
def test_a_holder_that_died_is_repaired_before_a_batch(batch_op: str) -> None:
    """EOWNERDEAD met by get_many or put_many: the Python repair, then the C batch."""
    queue = SlotQueue.create(4, 256)
    me = queue.register((1, 1))
    assert queue.try_put_many(me, [encode(b, 256) for b in (b"a", b"b")]) == 2
    proc = multiprocessing.get_context("fork").Process(target=_die_holding, args=(queue,))
    proc.start()
    proc.join(30)
    queue._ctl[_layout.NFREE] = 0  # left half-done by the dead holder: the repair fixes it
    sweeps = queue._ctl[_layout.SWEEPS]
    if batch_op == "get":
        assert queue.try_get_many(me, 8, decode) == [b"a", b"b"]
        free = 4
    else:
        assert queue.try_put_many(me, [encode(b, 256) for b in (b"c", b"d")]) == 2
        free = 0
    assert not mutex_held(queue)
    assert queue._ctl[_layout.SWEEPS] > sweeps  # the sweep deferred by the repair ran
    assert queue.counters().free == free


def _child_sends(tx: aioshm.SendChannel[Any], n: int) -> None:
    from aioshm import _slotqueue as sq

    assert (sq.speedups is None) == (os.environ.get("AIOSHM_PURE_PYTHON") == "1")
    with tx:
        for i in range(n):
            tx.send_blocking(np.full(10, i, np.float64), timeout=30)
            tx.send_blocking(b"x" * (i % 7), timeout=30)


def _child_receives(rx: aioshm.ReceiveChannel[Any], out: Any, n: int) -> None:
    from aioshm import _slotqueue as sq

    assert (sq.speedups is None) == (os.environ.get("AIOSHM_PURE_PYTHON") == "1")
    with rx:
        got = 0
        for i in range(n):
            ok = rx.recv_blocking(timeout=30).tolist() == [float(i)] * 10
            ok = ok and rx.recv_blocking(timeout=30) == b"x" * (i % 7)
            got += ok
        out.send(got)


@needs_c
@pytest.mark.parametrize("child_pure", [True, False])
def test_a_process_with_the_extension_and_one_without_share_a_channel(
    monkeypatch: pytest.MonkeyPatch, child_pure: bool
) -> None:
    """Both directions, through a small queue that fills up (so that both sides sleep
    and wake each other): the child on the other path than the parent, or the same."""
    ctx = multiprocessing.get_context("spawn")
    monkeypatch.setenv("AIOSHM_PURE_PYTHON", "1" if child_pure else "0")
    n = 2000
    tx, rx = aioshm.open_channel[Any](2, 128)
    sender = ctx.Process(target=_child_sends, args=(tx, n))
    with tx:
        sender.start()
    with rx:
        for i in range(n):
            assert rx.recv_blocking(timeout=30).tolist() == [float(i)] * 10
            assert rx.recv_blocking(timeout=30) == b"x" * (i % 7)
        with pytest.raises(anyio.EndOfStream):
            rx.recv_blocking(timeout=30)
    sender.join(30)
    assert sender.exitcode == 0

    tx, rx = aioshm.open_channel[Any](2, 128)
    mine, theirs = ctx.Pipe()
    receiver = ctx.Process(target=_child_receives, args=(rx, theirs, n))
    with rx:
        receiver.start()
    with tx:
        for i in range(n):
            tx.send_blocking(np.full(10, i, np.float64), timeout=30)
            tx.send_blocking(b"x" * (i % 7), timeout=30)
    assert mine.recv() == n
    receiver.join(30)
    assert receiver.exitcode == 0


def _batch_items(i: int) -> list[Any]:
    """Batch ``i``: images of two kinds, and now and then a message that is not one."""
    items: list[Any] = [np.full(10, i, np.float64), b"x" * (i % 7)]
    if i % 5 == 0:
        items.append({"oob": np.arange(i % 4)})
    return items


def _flat(batches: int) -> list[Any]:
    return [_value(x) for i in range(batches) for x in _batch_items(i)]


def _child_sends_batches(tx: aioshm.SendChannel[Any], n: int) -> None:
    from aioshm import _slotqueue as sq

    assert (sq.speedups is None) == (os.environ.get("AIOSHM_PURE_PYTHON") == "1")

    async def main() -> None:
        async with tx:
            for i in range(n):
                await tx.send_many(_batch_items(i))

    anyio.run(main)


@needs_c
@pytest.mark.parametrize("child_pure", [True, False])
def test_batches_cross_between_a_process_with_the_extension_and_one_without(
    monkeypatch: pytest.MonkeyPatch, child_pure: bool
) -> None:
    """send_many in a child on either path, recv_many here on the C path, through a
    queue smaller than a batch: both sides sleep and wake each other, and every message
    arrives once, in order."""
    ctx = multiprocessing.get_context("spawn")
    monkeypatch.setenv("AIOSHM_PURE_PYTHON", "1" if child_pure else "0")
    n = 600
    tx, rx = aioshm.open_channel[Any](2, 256)
    sender = ctx.Process(target=_child_sends_batches, args=(tx, n))
    with tx:
        sender.start()
    got: list[Any] = []

    async def main() -> None:
        async with rx:
            with anyio.fail_after(30):
                while True:
                    try:
                        got.extend(_value(x) for x in await rx.recv_many(3))
                    except anyio.EndOfStream:
                        return

    anyio.run(main)
    sender.join(30)
    assert sender.exitcode == 0
    assert got == _flat(n)


@needs_c
def test_threads_on_both_paths_share_a_queue() -> None:
    """Contention within a process: the C path meets a held mutex and falls back."""
    queue = SlotQueue.create(2, 128)
    me = queue.register((2, 2))
    twin = _pure_twin(queue)
    n = 3000
    got: list[bytes] = []

    def produce(q: SlotQueue, tag: bytes) -> None:
        for i in range(n):

            def attempt(i: int = i) -> None:
                q.try_put(me, encode(tag + str(i).encode(), 128))

            q.block(0, attempt, 30)

    def consume(q: SlotQueue) -> None:
        for _ in range(n):
            got.append(q.block(1, lambda: q.try_get(me, decode), 30))

    threads = [
        threading.Thread(target=produce, args=(queue, b"c")),
        threading.Thread(target=produce, args=(twin, b"p")),
        threading.Thread(target=consume, args=(queue,)),
        threading.Thread(target=consume, args=(twin,)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted([b"c%d" % i for i in range(n)] + [b"p%d" % i for i in range(n)])
    for tag in (b"c", b"p"):
        mine = [int(g[1:]) for g in got if g[:1] == tag]
        assert len(mine) == n
    counters = queue.counters()
    assert (counters.free, counters.buffered) == (2, 0)
