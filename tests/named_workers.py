"""An unrelated process that joins named primitives by name: ``python named_workers.py
COMMAND NAME [ARG]``. It shares nothing with the test but the name. Each command says
what it did on stdout, a line at a time, for the test to wait on."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import anyio

import aioshm


def say(what: str) -> None:
    print(what, flush=True)


def lock(name: str) -> None:
    """Find the lock held by the test, wait for it, hold it until told on stdin."""
    held = aioshm.Lock.connect(name)
    try:
        held.acquire_nowait()
    except anyio.WouldBlock:
        say("busy")
    else:
        say("free")
        return
    assert held.acquire_blocking(timeout=60)
    say("held")
    sys.stdin.readline()
    held.release()
    held.close()
    say("released")


def event_wait(name: str) -> None:
    """Wait for the test's event, then set the test's second event ``NAME-back``."""

    async def main() -> None:
        event = aioshm.Event.connect(name)
        back = aioshm.Event.connect(f"{name}-back", timeout=60)
        say("ready")
        await event.wait()
        say("woken")
        back.set()
        event.close()
        back.close()

    anyio.run(main)


def count(name: str, times: str) -> None:
    """Add 1 to the named value ``times`` times under its lock, pausing inside the
    critical section (not to synchronise anything: to make sure that, were the lock
    not to exclude the other processes, their increments would overlap and be lost)."""

    async def main() -> None:
        value = aioshm.SynchronizedValue.connect(name, "q")
        say("ready")
        for _ in range(int(times)):
            async with value.get_lock():
                seen = value.value
                await anyio.sleep(0.001)
                value.value = seen + 1
        value.close()
        say("done")

    anyio.run(main)


def create(name: str, kind: str) -> None:
    """Create a named primitive of ``kind`` (holding it: a lock acquired, a permit
    taken), say so, and stay until killed."""
    made: object
    if kind == "Lock":
        made = aioshm.Lock(name=name)
        made.acquire_nowait()
    elif kind == "Semaphore":
        made = aioshm.Semaphore(2, name=name)
        made.__enter__()
    else:
        made = aioshm.Event(name=name)
    say(f"ready {os.getpid()}")
    time.sleep(600)
    print(made)


def join(name: str, kind: str) -> None:
    """Join a named primitive of ``kind`` (waiting up to 60 s for it to be created),
    say so, and stay until killed."""
    say("connecting")
    joined = getattr(aioshm, kind).connect(name, timeout=60)
    say(f"joined {os.getpid()}")
    time.sleep(600)
    print(joined)


def exit_without_closing(name: str) -> None:
    """Create a named lock and exit normally without closing it."""
    aioshm.Lock(name=name).acquire_nowait()
    say("made")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    commands: dict[str, Callable[..., None]] = {
        "lock": lock,
        "event-wait": event_wait,
        "count": count,
        "create": create,
        "join": join,
        "exit": exit_without_closing,
    }
    commands[command](*args)
