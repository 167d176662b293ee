"""Liveness and the wait bridge: no false death, no stranded waiter, bounded idle cost.

* A peer whose liveness cannot be told (no ``/proc``, ``hidepid``, a sandbox) is kept:
  only proof of death reclaims anything.
* A hub thread that fails hands its failure to the waiting tasks; none hangs.
* A dead sleeper's registration on a bell is taken back by the sweep that finds it.
* Idle waiters cost a bounded number of sweeps and wake-ups, linear in their number,
  and a dead peer is still noticed within a second.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import anyio
import pytest

import aioshm
from aioshm import _procs
from aioshm._shared import RECV, SPACING, SWEEP_INTERVAL

from . import workers
from .helpers import wait_until

pytestmark = pytest.mark.timeout(120)

FORK = multiprocessing.get_context("fork")
DEADLINE = 1.0  # the bound for noticing a dead peer
LATE = 1.0  # a sleeper woken by its post, not by its turn after missing it


def _queue(handle: Any) -> Any:
    return handle._queue


def _sleepers(handle: Any, side: int = RECV) -> int:
    return int(_queue(handle).wait_counters().sleepers[side])


# ---------------------------------------------------------------- unknown is alive


def _hide_proc(monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    """From now on, ``/proc/<pid>/stat`` of every other process is unreadable to aioshm
    in this process, failing with ``error`` (``EACCES``: a sandbox; ``ENOENT``:
    ``hidepid`` or no ``/proc``). This process's own identity is already known (cached).
    Install it after forking: a child must read its own."""
    _procs.my_identity()
    me = f"/proc/{os.getpid()}/"

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(path)
        if name.startswith("/proc/") and name.endswith("/stat") and not name.startswith(me):
            raise OSError(error, os.strerror(error), name)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(_procs, "open", fake_open, raising=False)


def _loan_holder() -> tuple[
    multiprocessing.process.BaseProcess, aioshm.SendChannel[Any], aioshm.ReceiveChannel[Any]
]:
    """A forked child that holds the only send handle and a loan (a slot being written)."""
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=16 << 10)
    ready_tx, ready_rx = aioshm.open_channel[str](capacity=1, max_message_size=64)
    child = FORK.Process(target=workers.hold_loan, args=(tx, ready_tx))
    child.start()
    tx.close()
    ready_tx.close()
    assert ready_rx.recv_blocking(timeout=30) == "ready"
    ready_rx.close()
    stats = rx.statistics()
    assert (stats.open_send_streams, stats.slots_in_use) == (1, 1)
    return child, tx, rx


def _nothing_reclaimed(rx: aioshm.ReceiveChannel[Any]) -> None:
    for _ in range(3):
        _queue(rx).sweep(force=True)
    stats = rx.statistics()
    assert stats.open_send_streams == 1, "a peer of unknown liveness was declared dead"
    assert (stats.slots_in_use, stats.reclaimed_slots) == (1, 0), "its loan was reclaimed"
    with pytest.raises(anyio.WouldBlock):
        rx.receive_nowait()  # no false end of stream


@pytest.mark.parametrize("error", [errno.EACCES, errno.ENOENT])
def test_unreadable_proc_of_a_live_peer_reclaims_nothing(
    monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    child, _, rx = _loan_holder()
    _hide_proc(monkeypatch, error)
    try:
        assert _procs.probe(child.pid or 0, _procs.start_time(child.pid or 0)) is (
            _procs.Liveness.UNKNOWN
        )
        _nothing_reclaimed(rx)
    finally:
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(10)
    # Once the child is reaped, kill(pid, 0) says ESRCH: proof of death, even unseen.
    wait_until(lambda: rx.statistics().open_send_streams == 0, what="the reaped child swept")
    assert rx.statistics().reclaimed_slots == 1
    rx.close()


def test_killed_zombie_that_cannot_be_seen_is_not_reclaimed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILLed, not reaped, and its /proc entry unreadable: a zombie cannot be told
    from a live process by ``kill(pid, 0)``, so it is kept until it is reaped."""
    child, _, rx = _loan_holder()
    os.kill(child.pid or 0, signal.SIGKILL)
    wait_until(lambda: _state(child.pid) == "Z", what="the child to become a zombie")
    _hide_proc(monkeypatch, errno.EACCES)
    _nothing_reclaimed(rx)
    child.join(10)
    wait_until(lambda: rx.statistics().open_send_streams == 0, what="the reaped child swept")
    rx.close()


def test_probe_reporting_unknown_reclaims_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's own check: a probe that reports "unknown" for a SIGKILLed, reaped
    child holding a loan; nothing is reclaimed until the probe can tell."""
    child, _, rx = _loan_holder()
    monkeypatch.setattr(_procs, "probe", lambda pid, started: _procs.Liveness.UNKNOWN)
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join(10)
    _nothing_reclaimed(rx)
    monkeypatch.undo()
    _queue(rx).sweep(force=True)
    stats = rx.statistics()
    assert (stats.open_send_streams, stats.slots_in_use, stats.reclaimed_slots) == (0, 0, 1)
    with pytest.raises(anyio.EndOfStream):
        rx.receive_nowait()
    rx.close()


def test_probe_answers() -> None:
    me = os.getpid()
    started = _procs.start_time(me)
    assert started > 0
    assert _procs.probe(me, started) is _procs.Liveness.ALIVE
    assert _procs.probe(me, started + 1) is _procs.Liveness.DEAD  # a reused pid
    assert _procs.probe(me, 0) is _procs.Liveness.ALIVE  # start time not known
    child = FORK.Process(target=time.sleep, args=(0,))
    child.start()
    child.join(10)
    assert child.pid is not None
    assert _procs.probe(child.pid, 0) is _procs.Liveness.DEAD
    assert _procs.start_time(child.pid) == -1
    assert _procs.probe(child.pid, -1) is _procs.Liveness.DEAD
    assert not _procs.is_alive(child.pid, 0)


def test_unreadable_proc_self_fails_opening_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_procs, "open", no_proc, raising=False)
    monkeypatch.setattr(_procs, "_identity", None)
    with pytest.raises(OSError, match=r"cannot read /proc/\d+/stat .*mounted /proc"):
        aioshm.open_channel[int](capacity=1, max_message_size=8)


def _state(pid: int | None) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# ---------------------------------------------------------------- a failing hub


@pytest.mark.anyio
async def test_failing_hub_thread_fails_its_waiters_and_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tx, rx = aioshm.open_channel[int](capacity=2, max_message_size=8)
    queue = _queue(rx)
    failures: list[BaseException] = []

    def broken_wait(side: int, timeout: float | None, reserved: int = 0) -> int:
        raise OSError(errno.EINVAL, "injected")

    async def waiter() -> None:
        try:
            await rx.recv()
        except aioshm.HubFailed as exc:
            failures.append(exc)

    monkeypatch.setattr(queue, "wait", broken_wait)
    with anyio.fail_after(10):  # a stranded waiter would hang here
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
    assert len(failures) == 2
    assert all(isinstance(exc.__cause__, OSError) for exc in failures)
    assert rx.statistics().tasks_waiting_receive == 0
    assert rx.statistics().current_buffer_used == 0  # the failed receives took nothing

    monkeypatch.undo()  # the next wait starts a new hub thread
    got: list[int] = []

    async def receive() -> None:
        got.append(await rx.recv())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            while rx.statistics().tasks_waiting_receive == 0:
                await anyio.sleep(0.001)
            await anyio.to_thread.run_sync(tx.send_blocking, 42)
    assert got == [42]
    tx.close()
    rx.close()


def test_a_waiter_being_woken_is_still_counted_as_waiting() -> None:
    """A wake-up moves a waiter from the hub's queue to its woken count; a statistics
    read in between (the waking thread may drop the GIL in the notification's syscall)
    must still count it, or ``tasks_waiting_*`` reads 0 before the woken task has run."""
    tx, rx = aioshm.open_channel[int](capacity=1)
    hub = rx._channel.hubs[RECV]
    notifying, finish = threading.Event(), threading.Event()

    class SlowToNotify:
        woken = False

        def notify(self) -> bool:
            notifying.set()
            finish.wait(10)
            return True

    hub._waiters.append(SlowToNotify())  # type: ignore[arg-type]
    waker = threading.Thread(target=hub._wake, args=(1,))
    waker.start()
    assert notifying.wait(10)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(hub.waiting))
    reader.start()
    reader.join(0.2)  # it waits for the waker, which is mid-way
    finish.set()
    for thread in (waker, reader):
        thread.join(10)
    assert seen == [1]
    hub._retried()
    tx.close()
    rx.close()


# ---------------------------------------------------------------- many idle waiters


def idle_receiver(
    rx: aioshm.ReceiveChannel[Any], report: aioshm.SendChannel[Any], backend: str
) -> None:
    """Block in ``recv``; report (pid, what arrived, when, /proc reads made)."""
    reads = [0]
    original = _procs._read_stat

    def counting(pid: int) -> Any:
        reads[0] += 1
        return original(pid)

    _procs._read_stat = counting

    async def main() -> Any:
        async with rx:
            try:
                return await rx.recv()
            except anyio.EndOfStream:
                return None

    value = anyio.run(main, backend=backend)
    arrived = time.monotonic()
    with report:
        report.send_blocking((os.getpid(), value, arrived, reads[0]), timeout=60)


def _start_idle(
    count: int, backend: str, extra: int = 0
) -> tuple[
    list[multiprocessing.process.BaseProcess],
    aioshm.SendChannel[Any],
    aioshm.ReceiveChannel[Any],
]:
    """``count`` forked children blocked in ``recv`` on a fresh channel (the parent keeps
    the send handle); returns them, the send handle and the report receiver."""
    tx, rx = aioshm.open_channel[Any](capacity=max(count, 1), max_message_size=64)
    report_tx, report_rx = aioshm.open_channel[Any](capacity=count + extra, max_message_size=256)
    procs: list[multiprocessing.process.BaseProcess] = [
        FORK.Process(target=idle_receiver, args=(rx, report_tx, backend), daemon=True)
        for _ in range(count)
    ]
    for proc in procs:
        proc.start()
    rx.close()
    report_tx.close()
    wait_until(lambda: _sleepers(tx) == count, timeout=60, what=f"{count} sleeping receivers")
    return procs, tx, report_rx


def _reports(report_rx: aioshm.ReceiveChannel[Any], count: int) -> list[Any]:
    return [report_rx.recv_blocking(timeout=60) for _ in range(count)]


@pytest.mark.slow
def test_idle_waiters_cost_linear_sweeps_and_wakeups() -> None:
    """64 processes idle in ``recv``: the sweeps are shared (one per interval for the
    channel, not one per sleeper) and the sleepers wake in turn (about one per
    ``SPACING``, not each of them every so often). Counted, not timed: a loaded
    machine makes fewer wake-ups, never more."""
    count, idle = 64, 2.0
    began = time.monotonic()
    procs, tx, report_rx = _start_idle(count, "asyncio")
    before = _queue(tx).wait_counters()
    time.sleep(idle)  # the measured window, not a synchronisation
    after = _queue(tx).wait_counters()
    window = time.monotonic() - began
    for i in range(count):
        tx.send_nowait(i)
    reports = _reports(report_rx, count)
    elapsed = time.monotonic() - began
    for proc in procs:
        proc.join(30)
    assert sorted(value for _, value, _, _ in reports) == list(range(count))
    # /proc reads of all waiters together: one sweep of the table per interval, plus a
    # few for start-up; the per-sleeper sweeps of old read (count + 1) entries each,
    # ten times a second, in each of the count processes.
    reads = sum(r for _, _, _, r in reports)
    sweeps_bound = elapsed / SWEEP_INTERVAL + 4
    assert reads <= sweeps_bound * (count + 2) + count, f"{reads} /proc reads in {elapsed:.1f} s"
    assert after.sweeps - before.sweeps <= window / SWEEP_INTERVAL + 2
    # Wake-ups by timeout: one per SPACING in turn, plus at most two each for the
    # sleepers that registered while few others were (at start-up).
    timed_out = after.timed_out - before.timed_out
    assert timed_out <= window / SPACING + 2 * count, f"{timed_out} in {window:.1f} s"
    report_rx.close()
    tx.close()


@pytest.mark.slow
@pytest.mark.parametrize("survivors", [16, 8])
def test_dead_peer_noticed_within_a_second_by_idle_waiters(survivors: int) -> None:
    """16 idle receivers; the sole sender is SIGKILLed, and with it all but
    ``survivors`` of the receivers (so those whose turn to wake is next may be dead
    too). The survivors see the end of the stream within a second."""
    count = 16
    tx, rx = aioshm.open_channel[Any](capacity=4, max_message_size=64)
    report_tx, report_rx = aioshm.open_channel[Any](capacity=count, max_message_size=256)
    ready_tx, ready_rx = aioshm.open_channel[str](capacity=1, max_message_size=64)
    sender = FORK.Process(target=workers.hold_forever, args=(tx, ready_tx))
    sender.start()
    procs = [
        FORK.Process(target=idle_receiver, args=(rx, report_tx, "asyncio")) for _ in range(count)
    ]
    for proc in procs:
        proc.start()
    queue = _queue(tx)
    for handle in (tx, rx, report_tx, ready_tx):
        handle.close()
    wait_until(
        lambda: queue.wait_counters().sleepers[RECV] == count,
        timeout=60,
        what=f"{count} sleeping receivers",
    )
    time.sleep(2.0)  # idle past start-up, into the steady turns (not a synchronisation)
    victims = procs[survivors:]
    killed_at = time.monotonic()
    for proc in [sender, *victims]:
        os.kill(proc.pid or 0, signal.SIGKILL)
    reports = _reports(report_rx, survivors)
    assert all(value is None for _, value, _, _ in reports)  # end of stream
    latency = max(arrived for _, _, arrived, _ in reports) - killed_at
    assert latency < DEADLINE, f"the survivors noticed the death after {latency:.2f} s"
    for proc in [sender, *procs]:
        proc.join(30)
    report_rx.close()
    ready_rx.close()


def test_half_of_64_sleepers_killed_registrations_taken_back_no_lost_wakeup() -> None:
    """64 processes asleep in ``recv``, 32 of them SIGKILLed: the sweep takes the dead
    ones' registrations off the bell (the shared count falls to 32, not stays at 64),
    and 32 messages then wake the 32 survivors at once, not a slice later."""
    count = 64
    procs, tx, report_rx = _start_idle(count, "asyncio")
    victims, survivors = procs[::2], procs[1::2]
    for proc in victims:
        os.kill(proc.pid or 0, signal.SIGKILL)
    for proc in victims:
        proc.join(30)
    wait_until(
        lambda: tx.statistics().open_receive_streams == len(survivors),
        what="the victims swept",
    )
    wait_until(
        lambda: _sleepers(tx) == len(survivors),
        what=f"the shared sleeper count back to {len(survivors)}",
    )
    sent_at = time.monotonic()
    for i in range(len(survivors)):
        tx.send_nowait(i)
    reports = _reports(report_rx, len(survivors))
    assert sorted(value for _, value, _, _ in reports) == list(range(len(survivors)))
    assert {pid for pid, _, _, _ in reports} == {proc.pid for proc in survivors}
    latency = max(arrived for _, _, arrived, _ in reports) - sent_at
    # Woken by the posts: a survivor whose post went to a dead registration would sleep
    # on to its turn, about (k + 1) * SPACING (k others asleep; 2.3 s for the last of 32,
    # jittered by half). Waking 32 processes on two loaded cores alone took 0.31 s once,
    # so the bound is LATE, well apart from both.
    assert latency < LATE, f"the last survivor woke {latency:.2f} s after the send"
    for proc in survivors:
        proc.join(30)
        assert proc.exitcode == 0
    assert _queue(tx).wait_counters().sleepers == (0, 0)
    report_rx.close()
    tx.close()


def close_while_asleep(rx: aioshm.ReceiveChannel[Any]) -> None:
    """Close the receive handle while this process's hub thread sleeps on the bell, then
    exit at once (the daemon thread dies asleep, still registered)."""

    async def main() -> None:
        async def waiter() -> None:
            with contextlib.suppress(anyio.ClosedResourceError):
                await rx.recv()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            while _sleepers(rx) < 1:
                await anyio.sleep(0.001)
            rx.close()

    anyio.run(main)


def test_process_that_exits_with_a_thread_asleep_leaves_no_registration() -> None:
    tx, rx = aioshm.open_channel[int](capacity=2, max_message_size=8)
    child = FORK.Process(target=close_while_asleep, args=(rx,))
    child.start()
    rx.close()
    child.join(30)
    assert child.exitcode == 0
    _queue(tx).sweep(force=True)
    assert _queue(tx).wait_counters().sleepers == (0, 0)
    tx.close()


def test_sleeper_bookkeeping_balances_under_timeouts_and_rings() -> None:
    """Threads that sleep with short timeouts while others ring: whoever takes which
    post, once every sleeper has returned nothing is left registered or posted."""
    tx, rx = aioshm.open_channel[int](capacity=2, max_message_size=8)
    queue = _queue(rx)
    stop = time.monotonic() + 1.0

    def sleeper() -> None:
        while time.monotonic() < stop:
            queue.wait(RECV, 0.001)

    def ringer() -> None:
        while time.monotonic() < stop:
            queue.forward(RECV)
            queue.wake_all(RECV)

    threads = [threading.Thread(target=sleeper) for _ in range(6)]
    threads += [threading.Thread(target=ringer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert queue.wait_counters().sleepers == (0, 0)
    tx.close()
    rx.close()


def test_the_spin_decision_counts_a_load_that_lasts_and_never_this_process() -> None:
    """Whether a waiting task may spin hangs on how many *other* tasks keep the CPUs
    busy: this process's own running threads are not counted, a task runnable at one
    sample only is not counted, one runnable at every sample of the window is."""
    counts = iter([3, 3, 9, 3, 3, 5, 5, 5, 5])  # the machine's runnable tasks, per sample
    window = _procs.RunnableWindow(every=1.0, size=4)
    got = [window.get(float(t), 2, lambda: next(counts)) for t in range(9)]
    # 2 of the 3 runnable are this process's; a blip of 9 at one sample shows nowhere;
    # 5 shows once four samples in a row have had it.
    assert got == [1, 1, 1, 1, 1, 1, 1, 1, 3]

    def unexpected() -> int:
        raise AssertionError("read although no sample was due")

    assert window.get(8.5, 2, unexpected) == 3
    assert 0 <= _procs.others_runnable() < 10_000  # the real count, read from /proc


def test_a_hub_thread_asleep_is_not_counted_as_running() -> None:
    """A task's spin decision discounts this process's hub threads that are awake; one
    asleep (on the doorbell, or idle waiting for work) is not among them."""
    from aioshm import _wait

    tx, rx = aioshm.open_channel[int](capacity=1, max_message_size=64)
    hub = rx._channel.hubs[RECV]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rx.recv)
            with anyio.fail_after(10):
                while hub.waiting < 1 or rx._channel.queue.wait_counters().sleepers[RECV] < 1:
                    await anyio.sleep(0.001)
            wait_until(lambda: _wait._awake == 0, what="the hub asleep on the doorbell")
            tx.send_nowait(1)
        wait_until(lambda: _wait._awake == 0, what="the hub asleep, waiting for work")
        assert hub._thread is not None and hub._thread.is_alive()

    try:
        anyio.run(main)
    finally:
        tx.close()
        rx.close()
