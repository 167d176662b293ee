"""An exception out of a send or receive that waited carries no ``WouldBlock`` context.

The fast path tries the operation at once and catches ``WouldBlock`` when it must wait;
if the wait ran inside that handler, every exception raised while waiting (a timeout, a
cancellation, Ctrl-C, a closed handle) would print the ``WouldBlock`` first, then
"During handling of the above exception, another exception occurred".
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import numpy as np
import pytest
from anyio import WouldBlock

import aioshm

pytestmark = pytest.mark.timeout(60)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything along its ``__cause__`` and ``__context__`` links, and
    the members of exception groups."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        todo.extend(getattr(current, "exceptions", ()))


def assert_no_wouldblock(exc: BaseException) -> None:
    found = [type(e).__name__ for e in chain(exc)]
    assert not any(isinstance(e, WouldBlock) for e in chain(exc)), (
        f"{type(exc).__name__} carries a WouldBlock in its chain: {found}"
    )


# The operations that wait. Each gets a full channel (send side) or an empty one
# (receive side) and must wait.
Op = Callable[[Any, Any], Awaitable[object]]


async def _send_loan(tx: Any, rx: Any) -> None:
    async with tx.send_loan(4, np.uint8):
        pass


async def _recv_view(tx: Any, rx: Any) -> None:
    async with rx.recv_view():
        pass


async def _views(tx: Any, rx: Any) -> None:
    async for _ in rx.views():
        pass


SEND_OPS: dict[str, Op] = {
    "send": lambda tx, rx: tx.send(b"y"),
    "send_many": lambda tx, rx: tx.send_many([b"y", b"z"]),
    "send_loan": _send_loan,
}
RECV_OPS: dict[str, Op] = {
    "recv": lambda tx, rx: rx.recv(),
    "receive": lambda tx, rx: rx.receive(),
    "recv_many": lambda tx, rx: rx.recv_many(4),
    "recv_view": _recv_view,
    "recv_into": lambda tx, rx: rx.recv_into(np.empty(4, np.uint8)),
    "views": _views,
}
OPS = {**SEND_OPS, **RECV_OPS}


@asynccontextmanager
async def waiting_channel(name: str) -> AsyncIterator[tuple[Any, Any, int]]:
    """A channel on which ``OPS[name]`` must wait; yields ``(tx, rx, side)``."""
    tx, rx = aioshm.open_channel[Any](capacity=1, max_message_size=64)
    side = 0 if name in SEND_OPS else 1
    if side == 0:
        tx.send_nowait(b"x")
    try:
        yield tx, rx, side
    finally:
        tx.close()
        rx.close()


async def until_waiting(handle: Any, side: int) -> None:
    """Until a task of this process sleeps on ``side`` (past the spin, in the hub)."""
    while True:
        stats = handle.statistics()
        if (stats.tasks_waiting_send, stats.tasks_waiting_receive)[side]:
            return
        await anyio.sleep(0.001)


async def caught(op: Op, tx: Any, rx: Any, cancelled: list[BaseException]) -> None:
    """Run ``op``, recording the cancellation that goes through it."""
    try:
        await op(tx, rx)
    except anyio.get_cancelled_exc_class() as exc:
        cancelled.append(exc)
        raise
    raise AssertionError("the operation did not wait")


# ---------------------------------------------------------------- both backends


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("name", list(OPS))
def test_timeout_has_no_wouldblock_context(name: str, backend: str) -> None:
    async def main() -> BaseException:
        async with waiting_channel(name) as (tx, rx, _):
            try:
                with anyio.fail_after(0.05):
                    await OPS[name](tx, rx)
            except TimeoutError as exc:
                return exc
            raise AssertionError("no timeout")

    assert_no_wouldblock(anyio.run(main, backend=backend))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("name", list(OPS))
def test_cancellation_has_no_wouldblock_context(name: str, backend: str) -> None:
    async def main() -> BaseException:
        cancelled: list[BaseException] = []
        async with waiting_channel(name) as (tx, rx, side), anyio.create_task_group() as tg:
            tg.start_soon(caught, OPS[name], tx, rx, cancelled)
            await until_waiting(rx, side)
            tg.cancel_scope.cancel()
        return cancelled[0]

    assert_no_wouldblock(anyio.run(main, backend=backend))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("name", list(OPS))
def test_closed_while_waiting_has_no_wouldblock_context(name: str, backend: str) -> None:
    """The waiting handle closed by another task: ``ClosedResourceError``."""

    async def main() -> BaseException:
        async with waiting_channel(name) as (tx, rx, side), anyio.create_task_group() as tg:
            errors: list[BaseException] = []

            async def run() -> None:
                try:
                    await OPS[name](tx, rx)
                except anyio.ClosedResourceError as exc:
                    errors.append(exc)

            tg.start_soon(run)
            await until_waiting(rx, side)
            (tx, rx)[side].close()
        return errors[0]

    assert_no_wouldblock(anyio.run(main, backend=backend))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("name", list(OPS))
def test_peer_gone_while_waiting_has_no_wouldblock_context(name: str, backend: str) -> None:
    """The other side's last handle closed: ``BrokenResourceError`` for a sender,
    ``EndOfStream`` for a receiver (``views()`` simply ends: nothing to check)."""
    if name == "views":
        pytest.skip("the loop ends at the end of the stream")
    expected = anyio.BrokenResourceError if name in SEND_OPS else anyio.EndOfStream

    async def main() -> BaseException:
        async with waiting_channel(name) as (tx, rx, side), anyio.create_task_group() as tg:
            errors: list[BaseException] = []

            async def run() -> None:
                try:
                    await OPS[name](tx, rx)
                except expected as exc:
                    errors.append(exc)

            tg.start_soon(run)
            await until_waiting(rx, side)
            (tx, rx)[1 - side].close()
        return errors[0]

    assert_no_wouldblock(anyio.run(main, backend=backend))


# ---------------------------------------------------------------- one backend


@pytest.mark.parametrize("name", list(OPS))
def test_trio_too_slow_has_no_wouldblock_context(name: str) -> None:
    trio = pytest.importorskip("trio")

    async def main() -> BaseException:
        async with waiting_channel(name) as (tx, rx, _):
            try:
                with trio.fail_after(0.05):
                    await OPS[name](tx, rx)
            except trio.TooSlowError as exc:
                return cast(BaseException, exc)
            raise AssertionError("no timeout")

    assert_no_wouldblock(trio.run(main))


@pytest.mark.parametrize("form", ["timeout", "wait_for", "task_cancel"])
@pytest.mark.parametrize("name", list(OPS))
def test_native_asyncio_has_no_wouldblock_context(name: str, form: str) -> None:
    async def main() -> BaseException:
        async with waiting_channel(name) as (tx, rx, side):
            try:
                if form == "timeout":
                    async with asyncio.timeout(0.05):
                        await OPS[name](tx, rx)
                elif form == "wait_for":
                    await asyncio.wait_for(OPS[name](tx, rx), 0.05)
                else:
                    task = asyncio.ensure_future(OPS[name](tx, rx))
                    await until_waiting(rx, side)
                    task.cancel()
                    await task
            except (TimeoutError, asyncio.CancelledError) as exc:
                return exc
            raise AssertionError("the operation did not wait")

    assert_no_wouldblock(asyncio.run(main()))


# ---------------------------------------------------------------- Ctrl-C

# A real SIGINT, sent to a real process (a fresh interpreter, so that the test runner
# never sees a KeyboardInterrupt) once its main task waits on the channel.
KEYBOARD_INTERRUPT = """
import os, signal, sys, threading, time

import anyio
from anyio import WouldBlock

import aioshm

backend, side = sys.argv[1], int(sys.argv[2])
tx, rx = aioshm.open_channel(capacity=1, max_message_size=64)
if side == 0:
    tx.send_nowait(b"x")


def interrupt():
    while not (rx.statistics().tasks_waiting_send, rx.statistics().tasks_waiting_receive)[side]:
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGINT)


async def main():
    threading.Thread(target=interrupt, daemon=True).start()
    if side == 0:
        await tx.send(b"y")
    else:
        await rx.recv()


try:
    anyio.run(main, backend=backend)
except KeyboardInterrupt as exc:
    seen, todo, names = set(), [exc], []
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        names.append(type(e).__name__)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += list(getattr(e, "exceptions", ()))
    print(" ".join(names))
"""


@pytest.mark.parametrize("side", [0, 1], ids=["send", "recv"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_keyboard_interrupt_has_no_wouldblock_context(backend: str, side: int) -> None:
    code = textwrap.dedent(KEYBOARD_INTERRUPT)
    result = subprocess.run(
        [sys.executable, "-c", code, backend, str(side)],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert names[:1] == ["KeyboardInterrupt"], result.stdout + result.stderr
    assert "WouldBlock" not in names, names
