"""Named primitives: a Lock, Semaphore, Event, Value or Array that any process of the user
joins by name, unrelated processes included; the name lives as long as a holder does,
and a name whose holders were all killed is reclaimed, leaving nothing in /dev/shm."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioshm

from . import primitive_workers
from .helpers import Context, cli, join_all, listed, shared_sleepers, wait_until

pytestmark = pytest.mark.timeout(120)

WORKER = str(Path(__file__).with_name("named_workers.py"))
KINDS = ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event"]


class Pair(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int)]


def fresh() -> str:
    return f"prim-{uuid.uuid4().hex[:12]}"


def exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/aioshm.{name}")


def unrelated(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


#: clock_nanosleep and nanosleep, as /proc/<pid>/syscall numbers them.
SLEEPS = {"x86_64": {"230", "35"}, "aarch64": {"115", "101"}}


def asleep(pid: int) -> bool:
    """Whether ``pid``'s main thread sleeps in ``time.sleep`` now: after it said
    "connecting", only connect's retry loop sleeps, so it tried once and found nothing."""
    numbers = SLEEPS.get(platform.machine())
    if numbers is None:
        pytest.skip(f"sleep syscalls of {platform.machine()} not known here")
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0] in numbers


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


# ---------------------------------------------------------------------- in one process


@pytest.mark.parametrize("kind", KINDS)
def test_create_connect_and_the_name_goes_with_the_last_handle(kind: str) -> None:
    cls = getattr(aioshm, kind)
    name = fresh()
    first = cls(name=name)
    assert first.name == name and exists(name)
    second = cls.connect(name)
    assert type(second) is cls and second.name == name
    first.close()
    assert exists(name)  # the second handle holds it
    second.close()
    second.close()  # idempotent
    assert not exists(name)
    with pytest.raises(FileNotFoundError, match=f"no {kind} named '{name}' is open"):
        cls.connect(name)
    with pytest.raises(anyio.ClosedResourceError, match=f"this {kind} has been closed"):
        second.set() if kind == "Event" else second.release()
    assert "closed" in repr(second)


def test_handles_share_the_state_and_the_process_holds_one_entry() -> None:
    name = fresh()
    lock = aioshm.Lock(name=name)
    again = aioshm.Lock.connect(name)
    again.acquire_nowait()
    assert lock.locked()
    with pytest.raises(anyio.WouldBlock):
        lock.acquire_nowait()
    lock.release()  # a Lock may be released through any handle
    assert not again.locked()
    rows = lock._state.table()
    assert [(row.pid, row.sends) for row in rows] == [(os.getpid(), 2)]
    lock.close()
    again.close()
    assert not exists(name)


def test_a_collected_handle_is_closed() -> None:
    name = fresh()
    event = aioshm.Event(name=name)
    assert exists(name)
    del event
    gc.collect()
    assert not exists(name)


def test_handles_collected_in_a_reference_cycle_close() -> None:
    class Box:
        pass

    name = fresh()
    box = Box()
    box.self = box  # type: ignore[attr-defined]
    box.handles = [aioshm.Lock(name=name), aioshm.Lock.connect(name)]  # type: ignore[attr-defined]
    del box
    gc.collect()  # the collector clears the segment's finalizer first: it must not matter
    assert not exists(name)


def test_pickling_a_primitive_says_to_name_it() -> None:
    with pytest.raises(RuntimeError, match=r"give it a name \(name=\.\.\.\) and join it"):
        pickle.dumps(aioshm.Event())
    with pytest.raises(RuntimeError, match=r"not supported$"):
        pickle.dumps(aioshm.RawValue("i"))


def test_a_semaphore_joined_by_name_keeps_its_value() -> None:
    name = fresh()
    sem = aioshm.BoundedSemaphore(3, name=name)
    sem.acquire_nowait()
    joined = aioshm.BoundedSemaphore.connect(name)
    assert joined.value == 2
    joined.release()
    with pytest.raises(ValueError, match="BoundedSemaphore released more times"):
        joined.release()
    sem.close()
    joined.close()


def test_value_and_array_by_name_with_their_type_checked() -> None:
    name = fresh()
    value = aioshm.Value("d", 1.5, name=name)
    joined = aioshm.Value.connect(name)  # type: ignore[attr-defined]  # the alias
    assert joined.value == 1.5 and joined.name == name
    assert aioshm.SynchronizedValue.connect == aioshm.Value.connect  # type: ignore[attr-defined]
    joined.value = 2.5
    assert value.value == 2.5
    with pytest.raises(TypeError, match=r"holds typecode 'd' \(c_double\), not 'i'"):
        aioshm.Value.connect(name, "i")  # type: ignore[attr-defined]
    value.close()
    joined.close()
    assert not exists(name)  # the mismatched join left nothing open either

    array = aioshm.Array("i", [1, 2, 3], name=name)
    other = aioshm.Array.connect(name, "i", 3)  # type: ignore[attr-defined]
    assert list(other) == [1, 2, 3]
    other.numpy()[1] = 20
    assert array[1] == 20
    with pytest.raises(ValueError, match="has 3 items, not 4"):
        aioshm.Array.connect(name, "i", 4)  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="not 'd'"):
        aioshm.Array.connect(name, "d")  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="names an Array, not a Value"):
        aioshm.Value.connect(name)  # type: ignore[attr-defined]
    array.close()
    other.close()
    assert not exists(name)


def test_errors_say_what_is_wrong() -> None:
    name = fresh()
    lock = aioshm.Lock(name=name)
    with pytest.raises(FileExistsError, match=r"a Lock named .* exists and is in use"):
        aioshm.Event(name=name)
    with pytest.raises(FileExistsError):
        aioshm.open_channel(name=name)
    with pytest.raises(TypeError, match=f"'{name}' names a Lock, not an Event"):
        aioshm.Event.connect(name)
    with pytest.raises(TypeError, match="names a Lock, not an RLock"):
        aioshm.RLock.connect(name)
    with pytest.raises(TypeError, match="names a Lock, not a channel"):
        aioshm.connect_send(name)
    lock.close()
    tx, rx = aioshm.open_channel[Any](name=name)
    with pytest.raises(TypeError, match="names a channel, not a Semaphore"):
        aioshm.Semaphore.connect(name)
    tx.close()
    rx.close()
    for bad in ("", "a/b", ".hidden", "x" * 201):
        with pytest.raises(ValueError, match="a valid name is 1 to 200 characters"):
            aioshm.Semaphore(name=bad)
        with pytest.raises(ValueError, match="a valid name is 1 to 200 characters"):
            aioshm.Event.connect(bad)
    with pytest.raises(ValueError, match="a Lock is local to this machine"):
        aioshm.Lock(name="nats://localhost:4222/x")
    with pytest.raises(ValueError, match="an Event is local to this machine"):
        aioshm.Event.connect("nats://localhost:4222/x")
    with pytest.raises(ValueError, match="has a lock of its own"):
        aioshm.Value("i", name=name, lock=False)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="a named Value or Array holds a typecode's type"):
        aioshm.Value(Pair, name=name)
    with pytest.raises(ValueError, match="must let the owner read and write"):
        aioshm.Lock(name=name, mode=0o060)
    assert not exists(name)


def test_a_named_value_passed_to_a_child_works_there_and_stays_the_parents(
    ctx: Context,
) -> None:
    name = fresh()
    value = aioshm.Value("q", 0, name=name)
    child = ctx.Process(target=primitive_workers.increment, args=(value, 50, "blocking"))
    child.start()
    join_all([child])
    assert value.value == 50
    assert exists(name)  # the child's exit gave back only what it held: the parent's
    joined = aioshm.SynchronizedValue.connect(name)  # handle still holds the name
    assert [row.pid for row in joined.get_lock()._state.table()] == [os.getpid()]
    value.close()
    joined.close()
    assert not exists(name)


def test_mode_as_for_channels() -> None:
    name = fresh()
    private = aioshm.Semaphore(name=name)
    assert os.stat(f"/dev/shm/aioshm.{name}").st_mode & 0o777 == 0o600
    private.close()
    shared = aioshm.Value("i", name=name, mode=0o660)
    assert os.stat(f"/dev/shm/aioshm.{name}").st_mode & 0o777 == 0o660
    shared.close()
    assert not exists(name)


def test_connect_waits_for_the_creator() -> None:
    name = fresh()
    waiter = unrelated("join", name, "Semaphore")
    try:
        assert line(waiter) == "connecting"  # about to connect, before the name exists
        wait_until(lambda: asleep(waiter.pid), what="the joiner asleep between its tries")
        assert not exists(name)
        sem = aioshm.Semaphore(name=name)
        assert line(waiter) == f"joined {waiter.pid}"
        wait_until(lambda: len(sem._state.table()) == 2, what="the joiner's entry")
    finally:
        stop(waiter)
    sem.close()
    assert not exists(name)


# ---------------------------------------------------------------------- unrelated processes


def test_a_lock_excludes_an_unrelated_process() -> None:
    name = fresh()
    lock = aioshm.Lock(name=name)
    lock.acquire_nowait()
    worker = unrelated("lock", name)
    try:
        assert line(worker) == "busy"
        wait_until(lambda: shared_sleepers(lock) == 1, what="the worker asleep on the lock")
        assert lock.locked()
        lock.release()
        assert line(worker) == "held"
        with pytest.raises(anyio.WouldBlock):
            lock.acquire_nowait()
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
        assert line(worker) == "released"
        lock.acquire_nowait()
        lock.release()
        assert worker.wait(30) == 0
    finally:
        stop(worker)
    lock.close()
    assert not exists(name)


@pytest.mark.anyio
async def test_an_event_set_in_one_process_wakes_the_other() -> None:
    name = fresh()
    event = aioshm.Event(name=name)
    back = aioshm.Event(name=f"{name}-back")
    worker = unrelated("event-wait", name)
    try:
        assert await anyio.to_thread.run_sync(line, worker) == "ready"
        event.set()
        with anyio.fail_after(30):
            await back.wait()  # set by the worker once its wait returned
        assert await anyio.to_thread.run_sync(line, worker) == "woken"
        assert await anyio.to_thread.run_sync(worker.wait, 30) == 0
    finally:
        stop(worker)
    event.close()
    back.close()
    assert not exists(name) and not exists(f"{name}-back")


@pytest.mark.slow
@pytest.mark.anyio
async def test_value_increments_under_its_lock_add_up_across_processes() -> None:
    name = fresh()
    times = 200
    counter = aioshm.Value("q", 0, name=name)
    workers = [unrelated("count", name, str(times)) for _ in range(2)]
    try:
        for worker in workers:
            assert await anyio.to_thread.run_sync(line, worker) == "ready"
        for _ in range(times):
            async with counter.get_lock():
                seen = counter.value
                await anyio.sleep(0.001)  # a window for lost updates, were it unexcluded
                counter.value = seen + 1
        for worker in workers:
            assert await anyio.to_thread.run_sync(line, worker) == "done"
            assert await anyio.to_thread.run_sync(worker.wait, 30) == 0
    finally:
        for worker in workers:
            stop(worker)
    assert counter.value == 3 * times
    counter.close()
    assert not exists(name)


def test_a_normal_exit_gives_the_name_back_even_holding_the_lock() -> None:
    name = fresh()
    worker = unrelated("exit", name)
    assert line(worker) == "made"
    assert worker.wait(30) == 0
    assert not exists(name)


@pytest.mark.parametrize("kind", ["Lock", "Semaphore", "Event"])
def test_sigkill_of_the_only_holder_and_the_next_create_reclaims_the_name(kind: str) -> None:
    name = fresh()
    holder = unrelated("create", name, kind)
    try:
        assert line(holder) == f"ready {holder.pid}"
        with pytest.raises(FileExistsError):
            getattr(aioshm, kind)(name=name)
    finally:
        holder.send_signal(signal.SIGKILL)
        stop(holder)
    assert exists(name)  # stale: nobody was left to remove it
    again = getattr(aioshm, kind)(name=name)  # reclaims it, and is a fresh one
    if kind == "Lock":
        again.acquire_nowait()
        assert not again.owner_died
        again.release()
    elif kind == "Semaphore":
        assert again.value == 1
    again.close()
    assert not exists(name)


def test_a_held_permit_of_a_killed_joiner_comes_back() -> None:
    name = fresh()
    holder = unrelated("create", name, "Semaphore")  # takes one of 2 permits, held
    try:
        assert line(holder) == f"ready {holder.pid}"
        sem = aioshm.Semaphore.connect(name)
        assert sem.value == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        stop(holder)
    wait_until(lambda: sem._state.sweep(force=True) or sem.value == 2, what="the permit back")
    assert sem.value == 2 and exists(name)  # still ours
    sem.close()
    assert not exists(name)


# ---------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_the_cli_lists_a_named_primitive_with_its_pids_then_stale_and_removes_it() -> None:
    name = fresh()
    creator = unrelated("create", name, "Lock")
    joiner = unrelated("join", name, "Lock")
    try:
        assert line(creator) == f"ready {creator.pid}"
        assert line(joiner) == "connecting"
        assert line(joiner) == f"joined {joiner.pid}"
        row = listed(name)
        assert row["kind"] == "Lock"
        assert row["holder_pids"] == sorted([creator.pid, joiner.pid])
        assert row["handles"] == 2
        assert row["stale"] is False
        table = cli("list").stdout.splitlines()
        shown = next(text for text in table if text.startswith(name))
        assert shown.split()[1] == "Lock" and shown.split()[-1] == "live"
        assert f"2 ({','.join(map(str, sorted([creator.pid, joiner.pid])))})" in shown
        details = cli("show", name).stdout
        assert f"pid {creator.pid}: 1 handles (alive)" in details
        refused = cli("remove", name)
        assert refused.returncode == 1
        assert "is live (a Lock held by pids" in refused.stderr and "--force" in refused.stderr
    finally:
        for proc in (creator, joiner):
            proc.send_signal(signal.SIGKILL)
            stop(proc)
    row = listed(name)
    assert row["stale"] is True
    assert [holder["alive"] for holder in row["holders"]] == [False, False]
    shown = next(text for text in cli("list").stdout.splitlines() if text.startswith(name))
    assert shown.split()[-1] == "stale"
    assert "stale (every holder is dead)" in cli("show", name).stdout
    removed = cli("remove", name, "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) == {"name": name, "removed": True, "was_stale": True}
    assert not exists(name)


def test_forced_removal_of_a_live_primitive_leaves_its_holders_working() -> None:
    name = fresh()
    event = aioshm.Event(name=name)
    result = cli("remove", name, "--force")
    assert result.returncode == 0, result.stderr
    assert not exists(name)
    with pytest.raises(FileNotFoundError):
        aioshm.Event.connect(name)
    event.set()  # still an event, without a name
    assert event.is_set()
    renamed = aioshm.Event(name=name)  # the name is free for a new one
    assert not renamed.is_set()
    renamed.close()
    event.close()
    assert not exists(name)
