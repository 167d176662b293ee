"""Functions run in pool workers, queue consumers and unrelated processes (module level,
so that every start method can import them)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import anyio

import aioshm


def send_range(tx: aioshm.SendChannel[Any], task: int, count: int) -> int:
    """A pool task: send ``count`` items tagged with ``task``, closing the handle."""
    with tx:
        for i in range(count):
            tx.send_blocking((task, i), timeout=60)
    return os.getpid()


def send_without_closing(tx: aioshm.SendChannel[Any], task: int) -> int:
    """A pool task that returns without closing its handle (it is closed when the task's
    copy is collected, at the task's end)."""
    tx.send_blocking((task, 0), timeout=60)
    return os.getpid()


def send_and_raise(tx: aioshm.SendChannel[Any], task: int) -> None:
    """A task that raises without closing its handle."""
    tx.send_blocking((task, 0), timeout=60)
    raise ValueError(f"task {task} failed")


def send_then_hang(tx: aioshm.SendChannel[Any]) -> None:
    """Announce our pid, then hold the handle until killed."""
    tx.send_blocking(os.getpid(), timeout=60)
    time.sleep(600)


def make_channel_and_return_receiver(count: int) -> aioshm.ReceiveChannel[Any]:
    """A pool task whose *result* is a handle: the parent receives what was sent."""
    tx, rx = aioshm.open_channel[Any](capacity=count + 1)
    with tx:
        for i in range(count):
            tx.send_nowait(i)
    return rx  # this process's rx is collected after the result is pickled


def return_a_clone(rx: aioshm.ReceiveChannel[Any]) -> aioshm.ReceiveChannel[Any]:
    """Receive a handle as an argument and hand a clone back as the result."""
    with rx:
        return rx.clone()


async def async_send_range(tx: aioshm.SendChannel[Any], task: int, count: int) -> int:
    async with tx:
        for i in range(count):
            await tx.send((task, i))
    return os.getpid()


def anyio_send_range(tx: aioshm.SendChannel[Any], task: int, count: int) -> int:
    """For anyio.to_process: a worker with an event loop of its own."""
    return anyio.run(async_send_range, tx, task, count)


def consume_from_queue(queue: Any, results: Any) -> None:
    """Take a receive handle from ``queue``, drain it, report what arrived."""
    try:
        rx = queue.get(timeout=60)
    except BaseException as exc:
        results.put(("error", type(exc).__name__, str(exc)))
        return
    with rx:
        got = []
        try:
            while True:
                got.append(rx.recv_blocking(timeout=60))
        except anyio.EndOfStream:
            pass
    results.put(("ok", got))


def hold_from_queue(queue: Any, ready: Any) -> None:
    """Take a handle from ``queue`` and hold it until killed."""
    handle = queue.get(timeout=60)
    ready.set()
    time.sleep(600)
    handle.close()  # pragma: no cover - killed first


def produce_from_queue(queue: Any, count: int) -> None:
    tx = queue.get(timeout=60)
    with tx:
        for i in range(count):
            tx.send_blocking(i, timeout=60)


class SlowToUnpickle:
    """An argument that takes ``seconds`` to unpickle: a child killed meanwhile dies
    during start-up, before it has claimed the handles that follow it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __setstate__(self, state: dict[str, Any]) -> None:
        time.sleep(state["seconds"])
        self.__dict__.update(state)


def child_with_slow_start(gate: SlowToUnpickle, tx: aioshm.SendChannel[Any]) -> None:
    with tx:  # pragma: no cover - killed before it gets here
        tx.send_blocking("should not arrive", timeout=10)


def drain_and_exit(rx: aioshm.ReceiveChannel[Any], ready: Any) -> None:
    """Receive until the end of the stream; exit code 0 means the stream ended."""
    ready.set()
    with rx:
        try:
            while True:
                rx.recv_blocking(timeout=60)
        except anyio.EndOfStream:
            return


def main() -> None:
    """An unrelated program: ``python reach_workers.py send|receive NAME COUNT``."""
    role, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "send":
        with aioshm.connect_send(name, timeout=30) as tx:
            for i in range(count):
                tx.send_blocking(i, timeout=60)
    elif role == "receive":
        got = 0
        with aioshm.connect_receive(name, timeout=30) as rx:
            try:
                while True:
                    assert rx.recv_blocking(timeout=60) == got
                    got += 1
            except anyio.EndOfStream:
                pass
        print(got, flush=True)
    elif role == "hold":  # announce, then hold a send handle until killed
        with aioshm.connect_send(name, timeout=30) as tx:
            tx.send_blocking(os.getpid(), timeout=60)
            time.sleep(600)


if __name__ == "__main__":
    main()


def loop_back(queue: Any, results: Any, count: int) -> None:
    """Take a send and a receive handle of one channel from ``queue``; send through one
    and receive through the other."""
    tx, rx = queue.get(timeout=60), queue.get(timeout=60)
    with tx:
        for i in range(count):
            tx.send_blocking(i, timeout=60)
    got = []
    with rx:
        try:
            while True:
                got.append(rx.recv_nowait())
        except anyio.EndOfStream:
            pass
    results.put(got)


def unpickle_without_proc(queue: Any, results: Any) -> None:
    """As if /proc/<pid>/fd were closed to this process: a named handle still arrives."""
    from aioshm import _ownership

    def refuse(*args: Any) -> Any:
        raise PermissionError("no /proc here")

    _ownership.import_segment = refuse  # type: ignore[assignment]
    try:
        with queue.get(timeout=60) as tx:
            tx.send_blocking("by name", timeout=60)
        results.put("ok")
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")
