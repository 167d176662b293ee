"""The main of a child process: an async function run with Ctrl-C left to the parent."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, TypeVarTuple

import anyio

__all__ = ["run_child"]

T = TypeVar("T")
PosArgs = TypeVarTuple("PosArgs")


def run_child(
    func: Callable[[*PosArgs], Awaitable[T]],
    *args: *PosArgs,
    backend: str = "asyncio",
    backend_options: dict[str, Any] | None = None,
) -> T:
    """Run ``await func(*args)`` on ``backend`` as the main of a child process, with
    Ctrl-C left to the parent; return its result.

    Ctrl-C in a terminal sends ``SIGINT`` to every process of the foreground group, the
    parent and each of its children alike. Left to itself, each child would raise
    ``KeyboardInterrupt`` wherever it happens to be, and print its own traceback (on
    trio, through every nursery on the way: tens of lines per child). The pattern
    aioshm recommends instead: the children ignore ``SIGINT``; the parent alone decides
    what Ctrl-C means, and closes its handles (or exits, which closes them); each child
    then ends as its streams do: ``async for`` over a channel ends once no sender is
    left, and ``send`` raises ``anyio.BrokenResourceError`` once no receiver is left.

    ``run_child`` ignores ``SIGINT`` in the calling process, then runs
    ``anyio.run(func, *args, backend=backend, backend_options=backend_options)``.
    Call it from the function a ``multiprocessing.Process`` runs, in place of
    ``asyncio.run`` or ``trio.run``. ``SIGTERM`` and ``SIGKILL`` still stop the child.

    :raises RuntimeError: called in the main process, where ignoring ``SIGINT`` would
        leave Ctrl-C without effect
    """
    if multiprocessing.parent_process() is None:
        raise RuntimeError(
            "run_child() is for the main function of a child process started with "
            "multiprocessing; in the main process, use anyio.run, asyncio.run or trio.run"
        )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return anyio.run(func, *args, backend=backend, backend_options=backend_options)
