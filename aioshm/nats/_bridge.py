"""One asyncio event loop on a background thread per process, where the NATS client runs.

``nats-py`` is an asyncio library; aioshm's handles are called from asyncio, trio or
plain threads. Every process that uses a network channel gets one daemon thread running
one asyncio loop (started on first use, started afresh in a forked child), which owns
each link's own connection: setup, the registry of handles and their heartbeats, and the
sends and receives of trio and blocking callers (asyncio callers use a connection of
their own loop: see ``_lane``). Work is handed to it with :func:`spawn` (fire and
forget, from any thread) or :func:`run` (wait for the result, from a thread that is not
the bridge's own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop", "on_loop", "run", "spawn"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_tasks: set[asyncio.Task[Any]] = set()
_pid = os.getpid()


def _serve(ready: threading.Event, holder: list[asyncio.AbstractEventLoop]) -> None:
    new = asyncio.new_event_loop()
    holder.append(new)
    asyncio.set_event_loop(new)
    ready.set()
    new.run_forever()


def loop() -> asyncio.AbstractEventLoop:
    """This process's bridge loop, started on first use."""
    global _loop, _thread
    if _pid != os.getpid():
        _reset_in_child()
    current = _loop
    if current is not None:
        return current
    with _lock:
        if _loop is None:
            ready = threading.Event()
            holder: list[asyncio.AbstractEventLoop] = []
            _thread = threading.Thread(
                target=_serve, args=(ready, holder), name="aioshm-nats", daemon=True
            )
            _thread.start()
            ready.wait()
            _loop = holder[0]
        return _loop


def on_loop() -> bool:
    """Whether the caller runs on the bridge loop's thread."""
    return _pid == os.getpid() and _thread is not None and threading.current_thread() is _thread


def spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run ``coro`` on the bridge loop, from any thread, without waiting for it.

    Its task is kept referenced until it finishes; exceptions are its own business.
    """
    bridge = loop()

    def start() -> None:
        task = bridge.create_task(coro)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    if on_loop():
        start()
    else:
        bridge.call_soon_threadsafe(start)


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Run ``coro`` on the bridge loop and return a future of its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the bridge loop and wait for its result, blocking this thread.

    :raises TimeoutError: not done in ``timeout`` seconds (it is cancelled)
    """
    if on_loop():
        coro.close()
        raise RuntimeError("aioshm.nats: a blocking call made on the bridge's own thread")
    future = submit(coro)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no answer from the NATS bridge in {timeout} s") from None


def call_soon(func: Callable[..., object], *args: object) -> None:
    """Call ``func(*args)`` on the bridge loop, from any thread."""
    if on_loop():
        func(*args)
    else:
        loop().call_soon_threadsafe(func, *args)


def _reset_in_child() -> None:
    # The thread does not exist in a forked child; the next use starts a new one. This
    # is checked by pid on use rather than in an at-fork hook, because aioshm's
    # ownership hook, which runs first, may already use the bridge in the child.
    global _lock, _loop, _thread, _pid
    _pid = os.getpid()
    _lock = threading.Lock()
    _loop = None
    _thread = None
    _tasks.clear()
