"""Small shared objects live in shared arenas: few file descriptors, blocks never reused."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.context
import os
import subprocess
import sys
import textwrap
from typing import Any, cast

import pytest

import aioshm
from aioshm import _arena

from .helpers import Context


def _arena_maps() -> set[str]:
    """The arenas this process maps (their inodes)."""
    with open("/proc/self/maps") as f:
        return {line.split()[4] for line in f if "aioshm-arena" in line}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _where(obj: Any) -> tuple[int, int]:
    """(arena uid, address of the block) of a primitive or value."""
    state = getattr(obj, "_state", None)
    segment = state.segment if state is not None else obj._segment
    return segment._owner.uid, segment.address


# A script run in a fresh interpreter, its soft fd limit lowered to 256: 10,000 Values,
# each with its own Lock, then handed to a child of each start method, which adds one to
# every value under its lock.
TEN_THOUSAND = textwrap.dedent(
    """
    import multiprocessing, os, resource, sys
    import aioshm

    def child(values):
        for v in values:
            with v.get_lock():
                v.value += 1
        with open("/proc/self/maps") as f:
            arenas = {line.split()[4] for line in f if "aioshm-arena" in line}
        sys.exit(0 if len(os.listdir("/proc/self/fd")) < 200 and arenas else 3)

    if __name__ == "__main__":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        values = [aioshm.Value("q", i) for i in range(10_000)]
        events = [aioshm.Event() for _ in range(1_000)]
        for method in ("fork", "spawn", "forkserver"):
            p = multiprocessing.get_context(method).Process(target=child, args=(values,))
            p.start()
            p.join()
            assert p.exitcode == 0, (method, p.exitcode)
        assert [v.value for v in values] == [i + 3 for i in range(10_000)]
        print(len(os.listdir("/proc/self/fd")))
    """
)


@pytest.mark.slow
def test_ten_thousand_values_open_under_a_low_fd_limit(tmp_path: Any) -> None:
    script = tmp_path / "ten_thousand.py"
    script.write_text(TEN_THOUSAND)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) < 200  # fds in the creator, 11,000 objects open


def test_objects_share_an_arena() -> None:
    before = _fds()
    locks = [aioshm.Lock() for _ in range(20)]
    assert len({_where(lock)[0] for lock in locks}) <= 2
    assert _fds() - before <= 4  # an arena is one memfd, plus the one mmap keeps


def test_a_block_is_never_reused_in_a_process() -> None:
    seen = set()
    for _ in range(300):  # created and dropped at once: the worst case for reuse
        value = aioshm.Value("q", 1)
        assert _where(value) not in seen
        seen.add(_where(value))
        del value


def test_threads_get_distinct_blocks() -> None:
    import threading

    made: list[Any] = []
    guard = threading.Lock()

    def make() -> None:
        mine = [aioshm.RawValue("q") for _ in range(200)]
        with guard:
            made.extend(mine)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({_where(v) for v in made}) == 800


def _hold_and_write(value: Any, ready: Any, go: Any, result: Any) -> None:
    ready.send(value.value)
    go.recv()  # the parent dropped its copy and made new objects meanwhile
    result.send(value.value)
    value.value = -5


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_block_a_child_still_uses_is_not_handed_to_a_new_object(method: str) -> None:
    ctx = cast(Context, multiprocessing.get_context(method))
    ready_r, ready_w = ctx.Pipe(duplex=False)
    go_r, go_w = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    old = aioshm.Value("q", 41)
    child: multiprocessing.process.BaseProcess = ctx.Process(
        target=_hold_and_write, args=(old, ready_w, go_r, result_w)
    )
    child.start()
    assert ready_r.recv() == 41
    del old
    child._args = ()  # type: ignore[attr-defined]  # no reference left in this process
    gc.collect()
    new = [aioshm.Value("q", 7) for _ in range(300)]
    go_w.send(None)
    assert result_r.recv() == 41  # the child's object kept its memory
    child.join(30)
    assert child.exitcode == 0
    assert all(v.value == 7 for v in new)  # and the child's write went to it alone


def _allocate_after_fork(conn: Any) -> None:
    value = aioshm.Value("q", 0)
    value.value = 99
    conn.send(_where(value))


def test_a_forked_child_allocates_from_an_arena_of_its_own() -> None:
    ctx = multiprocessing.get_context("fork")
    before = aioshm.Value("q", 0)  # the parent has a current arena with room left
    r, w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_allocate_after_fork, args=(w,))
    child.start()
    assert r.poll(60), "the forked child could not allocate"
    childs = r.recv()
    child.join(30)
    assert child.exitcode == 0
    after = [aioshm.Value("q", 0) for _ in range(5)]
    assert _where(before)[0] == _where(after[0])[0]  # the parent goes on with its arena
    assert childs[0] != _where(before)[0]
    assert all(v.value == 0 for v in after)


def test_arenas_are_unmapped_once_their_objects_are_gone() -> None:
    gc.collect()
    maps_before, fds_before = _arena_maps(), _fds()
    locks = [aioshm.Lock() for _ in range(3000)]  # about 26 MB: several arenas
    for lock in locks[::100]:
        lock.acquire_nowait()
        lock.release()
    assert len(_arena_maps() - maps_before) >= 4
    del locks, lock
    gc.collect()
    assert len(_arena_maps() - maps_before) <= 1  # the one this process allocates from
    assert _fds() - fds_before <= 2


def _kill_holding(lock: Any) -> None:
    lock.acquire_blocking()
    os.kill(os.getpid(), 9)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_neighbours_in_an_arena_are_independent(method: str) -> None:
    ctx = cast(Context, multiprocessing.get_context(method))
    a, b = aioshm.Lock(), aioshm.Lock()
    assert _where(a)[0] == _where(b)[0]
    child = ctx.Process(target=_kill_holding, args=(a,))
    child.start()
    child.join(30)
    assert child.exitcode == -9
    b.acquire_nowait()  # the neighbour is free
    assert a.acquire_blocking(timeout=10)  # the dead holder's lock is recovered
    assert a.owner_died and not b.owner_died
    a.release()
    b.release()


def test_pickling_outside_process_start_is_refused() -> None:
    import pickle

    with pytest.raises(RuntimeError, match=r"argument of multiprocessing\.Process"):
        pickle.dumps(aioshm.Value("q", 1))
    with pytest.raises(RuntimeError, match=r"argument of multiprocessing\.Process"):
        pickle.dumps(_arena._allocator.arena)


def _fill(array: Any) -> None:
    array.numpy()[:] = 3.0


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_large_array_gets_an_arena_of_its_own(method: str) -> None:
    small = aioshm.Value("q")
    large = aioshm.Array("d", 300_000)  # 2.4 MB: more than an arena block may be
    assert _where(large)[0] != _where(small)[0]
    assert cast(_arena.Arena, large._segment._owner).size < 2 * 300_000 * 8
    child = cast(Context, multiprocessing.get_context(method)).Process(target=_fill, args=(large,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert float(large.numpy().sum()) == 900_000.0


def test_a_view_outliving_its_array_keeps_its_memory() -> None:
    # Why blocks are not reused even within one process: a numpy view (or a ctypes
    # object from get_obj()) can outlive the object it came from.
    view = aioshm.Array("d", 64).numpy()
    gc.collect()
    fresh = [aioshm.Array("d", 64) for _ in range(300)]
    for array in fresh:
        array.numpy()[:] = 1.0
    assert not view.any()
    view[:] = 2.0
    assert all(float(array.numpy().sum()) == 64.0 for array in fresh)


def test_an_arena_received_twice_is_mapped_once() -> None:
    value = aioshm.Value("q")
    arena = cast(_arena.Arena, value._segment._owner)
    fds = _fds()
    again = _arena._attach_arena(os.dup(arena.fd), arena.uid)
    assert again is arena
    assert _fds() == fds  # the duplicate descriptor was closed
