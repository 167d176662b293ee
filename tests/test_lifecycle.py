"""Closing, ending, exiting and forking: nothing hangs and nothing leaks."""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import Any

import anyio
import pytest

import aioshm
from aioshm import _shared
from aioshm._shared import RECV
from aioshm._wait import LINGER

from . import workers
from .helpers import Context, join_all, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_last_sender_closing_elsewhere_ends_blocked_receivers(ctx: Context, backend: str) -> None:
    """Receivers blocked in this process drain what is left and get EndOfStream within
    0.5 s of the last send handle closing in another process."""
    tx, rx = aioshm.open_channel[int](capacity=4, max_message_size=64)
    report_tx, report_rx = aioshm.open_channel[float](capacity=1, max_message_size=64)
    child = ctx.Process(target=workers.close_after, args=(tx, report_tx, 0.5, 2))
    child.start()
    tx.close()
    report_tx.close()
    ended: list[float] = []
    got: list[int] = []

    async def receiver() -> None:
        try:
            while True:
                got.append(await rx.recv())
        except anyio.EndOfStream:
            ended.append(time.monotonic())

    async def main() -> None:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(receiver)

    anyio.run(main, backend=backend)
    closed_at = report_rx.recv_blocking(timeout=10)
    join_all([child])
    assert sorted(got) == [0, 1]
    assert len(ended) == 3
    assert max(ended) - closed_at < 0.5
    rx.close()
    report_rx.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_last_receiver_closing_elsewhere_breaks_blocked_senders(ctx: Context, backend: str) -> None:
    tx, rx = aioshm.open_channel[int](capacity=1, max_message_size=64)
    report_tx, report_rx = aioshm.open_channel[float](capacity=1, max_message_size=64)
    child = ctx.Process(target=workers.close_after, args=(rx, report_tx, 0.5))
    child.start()
    rx.close()
    report_tx.close()
    broken: list[float] = []

    async def sender() -> None:
        with pytest.raises(anyio.BrokenResourceError):
            await tx.send(1)
        broken.append(time.monotonic())

    async def main() -> None:
        await tx.send(0)  # fills the only slot
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(sender)

    anyio.run(main, backend=backend)
    closed_at = report_rx.recv_blocking(timeout=10)
    join_all([child])
    assert len(broken) == 3
    assert max(broken) - closed_at < 0.5
    tx.close()
    report_rx.close()


def test_blocking_threads_are_woken_by_close() -> None:
    tx, rx = aioshm.open_channel[int](capacity=1, max_message_size=64)
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            rx.recv_blocking(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    wait_until(lambda: rx.statistics().tasks_waiting_receive == 1, what="the thread to block")
    start = time.monotonic()
    rx.close()
    thread.join(5)
    assert time.monotonic() - start < 0.5
    assert [type(e) for e in errors] == [anyio.ClosedResourceError]
    tx.close()


def test_process_exits_promptly_when_its_loop_ends_with_blocked_tasks(
    ctx: Context,
) -> None:
    """A process whose event loop ends while tasks are blocked in recv and send exits
    within 1 s: no hang in asyncio.run teardown or at interpreter exit."""
    tx, rx = aioshm.open_channel[str](capacity=1, max_message_size=64)
    report_tx, report_rx = aioshm.open_channel[float](capacity=1, max_message_size=64)
    other_rx = rx  # the child blocks in recv on a channel nobody sends to, ...
    other_tx, _keep_rx = aioshm.open_channel[str](capacity=1, max_message_size=64)
    child = ctx.Process(
        target=workers.loop_ends_with_blocked_tasks, args=(other_rx, other_tx, report_tx)
    )
    child.start()
    report_tx.close()
    loop_done = report_rx.recv_blocking(timeout=60)
    child.join(5)
    assert child.exitcode == 0
    exited = time.monotonic()
    assert exited - loop_done < 1.0
    for handle in (tx, rx, other_tx, _keep_rx, report_rx):
        handle.close()


def test_fork_while_waits_are_in_flight() -> None:
    """Forking while this process has tasks asleep in the hubs (their threads do not
    exist in the child) leaves a child that can use the handles passed to it, and the
    parent's waits carry on. (The event loop runs in another thread: forking from inside
    a running loop is unsupported by asyncio and trio themselves.)"""
    ctx = multiprocessing.get_context("fork")
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=256)
    idle_tx, idle_rx = aioshm.open_channel[Any](capacity=1, max_message_size=64)
    woken: list[Any] = []

    async def waiters() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(3):

                async def wait() -> None:
                    woken.append(await idle_rx.recv())

                tg.start_soon(wait)

    loop_thread = threading.Thread(target=anyio.run, args=(waiters,))
    loop_thread.start()
    wait_until(lambda: idle_rx.statistics().tasks_waiting_receive == 3, what="waiters")
    child = ctx.Process(target=workers.produce, args=(tx, 7, 50, "trio"))
    child.start()  # forks while the hub thread sleeps on the doorbell
    tx.close()
    got = []
    while True:
        try:
            got.append(rx.recv_blocking(timeout=30))
        except anyio.EndOfStream:
            break
    join_all([child])
    assert got == [(7, i) for i in range(50)]
    for i in range(3):
        idle_tx.send_blocking(i, timeout=10)
    loop_thread.join(10)
    assert sorted(woken) == [0, 1, 2]
    for handle in (rx, idle_tx, idle_rx):
        handle.close()


LEAK_SCRIPT = textwrap.dedent(
    """
    import gc, multiprocessing, os, sys, threading, time
    import anyio
    import aioshm

    BACKENDS = ("asyncio", "trio")

    def child(go, pairs, backend):
        assert go.recv_blocking(timeout=30) == b"go"
        go.close()

        async def one(tx, rx):
            async with tx, rx:
                await tx.send(b"ping")
                assert await rx.recv() == b"pong"

        async def main():
            async with anyio.create_task_group() as tg:
                for tx, rx in pairs:
                    tg.start_soon(one, tx, rx)

        anyio.run(main, backend=backend)

    def counts():
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
        return {
            "threads": len(os.listdir("/proc/self/task")),  # every thread, not only ours
            "fds": len(os.listdir("/proc/self/fd")),
            "segment mappings": sum(
                "/memfd:aioshm" in line or "/dev/shm/" in line for line in lines
            ),
            "mappings": len(lines),
        }

    def snapshot(like=None):
        # Hub threads exit once their last handle is closed: give them 10 s to go.
        deadline = time.monotonic() + 10
        while True:
            gc.collect()
            now = counts()
            if like is None or now["threads"] <= like["threads"] or time.monotonic() > deadline:
                return now
            time.sleep(0.01)

    hub_waits = 0

    def run(method, channels, per_child):
        global hub_waits
        ctx = multiprocessing.get_context(method)
        for batch in range(channels // per_child):
            ours, theirs = [], []
            for _ in range(per_child):
                a_tx, a_rx = aioshm.open_channel(capacity=2, max_message_size=64)
                b_tx, b_rx = aioshm.open_channel(capacity=2, max_message_size=64)
                ours.append((b_tx, a_rx))
                theirs.append((a_tx, b_rx))
            go_tx, go_rx = aioshm.open_channel(capacity=1, max_message_size=64)
            backend = BACKENDS[batch % 2]
            proc = ctx.Process(target=child, args=(go_rx, theirs, BACKENDS[batch % 2 - 1]))
            proc.start()
            go_rx.close()
            for tx, rx in theirs:
                tx.close(); rx.close()

            async def main():
                async def one(tx, rx):
                    async with tx, rx:
                        assert await rx.recv() == b"ping"
                        await tx.send(b"pong")

                async with anyio.create_task_group() as tg:
                    for tx, rx in ours:
                        tg.start_soon(one, tx, rx)
                    # Every task asleep in a hub (a thread of ours) before the child
                    # sends anything: the async wait path, not the fast one.
                    with anyio.fail_after(30):
                        while sum(
                            rx.statistics().tasks_waiting_receive for _, rx in ours
                        ) < len(ours):
                            await anyio.sleep(0.001)
                    assert any(t.name.startswith("aioshm-hub") for t in threading.enumerate())
                    global hub_waits
                    hub_waits += len(ours)
                    await go_tx.send(b"go")
                go_tx.close()

            anyio.run(main, backend=backend)
            proc.join(30)
            assert proc.exitcode == 0, proc.exitcode

    if __name__ == "__main__":
        run("fork", 40, 20)  # warm up: imports, forkserver, lazy allocations, threads
        run("forkserver", 40, 20)
        run("spawn", 40, 20)
        before = snapshot()
        run("fork", 600, 20)
        run("spawn", 200, 50)
        run("forkserver", 200, 50)
        after = snapshot(like=before)
        print("hub waits", hub_waits, "before", before, "after", after, flush=True)
        assert hub_waits >= 1120, hub_waits
        for what in ("threads", "fds", "segment mappings"):
            assert after[what] == before[what], (what, before, after)
        # Other mappings come and go with the allocator (malloc and pymalloc arenas);
        # one leaked per channel would add a thousand.
        assert after["mappings"] - before["mappings"] < 64, (before, after)
        print("no leaks")
    """
)


@pytest.mark.slow
def test_a_thousand_channels_leave_nothing_behind(tmp_path: Any) -> None:
    """1,000 channels opened, used across processes (fork, spawn, forkserver) by tasks
    that wait in the hubs (asyncio and trio), and closed, leave no growth in threads
    (all of them), file descriptors or mappings of shared memory, and no "leaked
    semaphore" warning at exit."""
    script = tmp_path / "leaks.py"
    script.write_text(LEAK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no leaks" in result.stdout
    assert "leaked" not in result.stderr, result.stderr


@pytest.mark.anyio
async def test_fast_path_never_touches_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Operations that can proceed at once start no thread, not even the hub's."""
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def spy(self: threading.Thread) -> None:
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", spy)
    tx, rx = aioshm.open_channel[Any](capacity=8, max_message_size=4096)
    for i in range(500):
        await tx.send(i)
        assert await rx.recv() == i
    await tx.send_many(range(8))
    assert await rx.recv_many(8) == list(range(8))
    async with tx.send_loan(4):
        pass
    async with rx.recv_view():
        pass
    ours = [t for t in started if t.name.startswith("aioshm")]
    assert ours == []
    with anyio.move_on_after(0.05):
        await rx.recv()  # this one must wait: now the hub thread starts
    assert [t.name for t in started if t.name.startswith("aioshm")] == ["aioshm-hub-1"]
    tx.close()
    rx.close()


def _tasks() -> set[str]:
    """The thread ids of this process, every thread (Python's or not)."""
    return set(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_no_thread_is_left_after_close(backend: str) -> None:
    """The waits start the channel's hub threads and no other thread, and every thread
    started here is gone within 2 s of the last handle closing. Threads are compared one
    by one (every thread of the process, Python's or not), not by a global count, which
    hub threads that earlier tests left lingering, and that exit meanwhile, would skew.
    The loop runs under ``anyio.run``: the pytest plugin runs trio in guest mode, whose
    I/O thread would linger from trio's own thread cache."""
    before, tasks_before = set(threading.enumerate()), _tasks()
    started: set[threading.Thread] = set()

    async def main() -> None:
        tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=64)
        await tx.send("fills")
        clones = [rx.clone() for _ in range(3)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(tx.send, "blocked")
            for clone in clones:  # two receive what was sent; the third waits
                tg.start_soon(clone.recv)
            with anyio.fail_after(10):
                while rx.statistics().tasks_waiting_receive < 1:
                    await anyio.sleep(0.005)
            started.update(set(threading.enumerate()) - before)
            hubs = {hub._thread for hub in rx._channel.hubs}
            recv_hub = rx._channel.hubs[RECV]._thread
            assert recv_hub is not None and recv_hub in started
            assert started <= hubs, f"threads other than the hubs started: {started - hubs}"
            assert len(_tasks() - tasks_before) == len(started)  # no native thread either
            tg.cancel_scope.cancel()
        for handle in (tx, rx, *clones):
            handle.close()
        with anyio.fail_after(2):  # the hub threads exit once their object is closed here
            while _tasks() - tasks_before:
                await anyio.sleep(0.01)

    anyio.run(main, backend=backend)
    assert not any(thread.is_alive() for thread in started)
    assert not set(threading.enumerate()) - before


def test_hub_threads_exit_when_the_last_handle_is_collected_unclosed() -> None:
    """A handle that is garbage-collected without ``close()`` (a pool task's copy of its
    argument, say) counts as the process's last handle as ``close()`` does: the hub
    threads exit at once, not after their idle :data:`~aioshm._wait.LINGER`."""

    async def main() -> threading.Thread:
        tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=64)
        async with anyio.create_task_group() as tg:  # a wait starts the receive hub
            tg.start_soon(rx.recv)
            with anyio.fail_after(10):
                while rx.statistics().tasks_waiting_receive < 1:
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
        thread = rx._channel.hubs[RECV]._thread
        assert thread is not None and thread.is_alive()
        tx.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del rx
            gc.collect()
        return thread

    thread = anyio.run(main)
    thread.join(LINGER / 2)
    assert not thread.is_alive(), "the hub thread waited out its idle linger"


def test_a_hub_passes_on_a_wake_up_its_tasks_left_before_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hub sleeps on the doorbell for a task, which is then cancelled: a wake-up the
    hub takes for the next message, which nobody here waits for any more, goes on to
    the other sleeper (a blocking receive in a thread), which would otherwise sleep out
    its turn (made a minute long here)."""
    monkeypatch.setattr(_shared, "SWEEP_INTERVAL", 60.0)
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=64)
    hub, queue = rx._channel.hubs[RECV], rx._channel.queue

    async def main() -> None:
        for i in range(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(rx.recv)
                while hub.waiting < 1 or queue.wait_counters().sleepers[RECV] < 1:
                    await anyio.sleep(0.001)
                tg.cancel_scope.cancel()
            # The task is gone; the hub still sleeps on the doorbell.
            assert hub.waiting == 0
            got: list[Any] = []
            thread = threading.Thread(target=lambda: got.append(rx.recv_blocking(30)))
            thread.start()
            while queue.wait_counters().sleepers[RECV] < 2:
                await anyio.sleep(0.001)
            tx.send_nowait(("for the thread", i))
            await anyio.to_thread.run_sync(thread.join, 10)
            assert got == [("for the thread", i)]

    try:
        anyio.run(main)
    finally:
        tx.close()
        rx.close()
