"""Child-process targets for the network-channel tests (importable under spawn)."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio

import aioshm.nats


def produce(tx: aioshm.nats.SendChannel[Any], producer: int, count: int, backend: str) -> None:
    """Send ``(producer, i)`` for i in range(count), then close."""

    async def main() -> None:
        async with tx:
            for i in range(count):
                await tx.send((producer, i))

    anyio.run(main, backend=backend)


def consume(rx: aioshm.nats.ReceiveChannel[Any], out: Any, backend: str) -> None:
    """Receive until the end of the stream, then put everything received on ``out``."""

    async def main() -> list[Any]:
        got = []
        async with rx:
            async for item in rx:
                got.append(item)
        return got

    out.put(anyio.run(main, backend=backend))


def take_one_then_stop(url: str) -> None:
    """Receive one message (with messages pulled ahead), then stop dead, holding them."""
    rx = aioshm.nats.connect_receive(url)
    rx.recv_blocking(30)
    os.kill(os.getpid(), signal.SIGSTOP)


def hold_sender(url: str, ready: Any) -> None:
    """Open a send handle and wait to be killed."""
    tx = aioshm.nats.connect_send(url)
    ready.set()
    signal.pause()
    tx.close()


def hold_given_sender(tx: aioshm.nats.SendChannel[Any], ready: Any) -> None:
    """Own a send handle passed by the parent; send one message; wait to be killed."""
    tx.send_blocking("from the child", 30)
    ready.set()
    signal.pause()


def connect_and_produce(url: str, producer: int, count: int, connected: Any) -> None:
    """Connect a sender by URL, say so, send ``(producer, i)`` for every i, close."""
    tx = aioshm.nats.connect_send(url, connect_timeout=20)
    with connected.get_lock():
        connected.value += 1

    async def main() -> None:
        async with tx:
            for i in range(count):
                await tx.send((producer, i))

    anyio.run(main)


def connect_and_consume(url: str, received: Any, connected: Any, out: Any) -> None:
    """Connect a receiver by URL and receive in batches until the end of the stream,
    counting in ``received``; then put everything received on ``out``."""
    rx = aioshm.nats.connect_receive(url, connect_timeout=20)
    with connected.get_lock():
        connected.value += 1

    async def main() -> list[Any]:
        got: list[Any] = []
        async with rx:
            while True:
                try:
                    batch = await rx.recv_many(64)
                except anyio.EndOfStream:
                    return got
                got += batch
                with received.get_lock():
                    received.value += len(batch)

    out.put(anyio.run(main))


def take_one_then_close(url: str) -> None:
    """Receive one message (with messages pulled ahead), then close and exit."""
    rx = aioshm.nats.connect_receive(url)
    rx.recv_blocking(30)
    rx.close()


def hold_receiver(rx: aioshm.nats.ReceiveChannel[Any], ready: Any) -> None:
    """Own a receive handle passed by the parent; wait to be killed."""
    ready.set()
    signal.pause()
    rx.close()


def hold_receiver_by_url(url: str, ready: Any) -> None:
    """Open a receive handle by URL and wait to be killed (or stopped and continued)."""
    rx = aioshm.nats.connect_receive(url, connect_timeout=20)
    ready.set()
    while True:
        signal.pause()
    rx.close()
