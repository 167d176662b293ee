"""Named channels: any process of the user joins by name, unrelated processes included,
with every guarantee of a handle passed in; the name lives as long as a holder does."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

import aioshm
from aioshm import _names

from .helpers import wait_until

pytestmark = pytest.mark.timeout(120)

WORKER = str(Path(__file__).with_name("reach_workers.py"))
DEADLINE = 1.0


def fresh() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/aioshm.{name}")


def unrelated(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, *args], stdout=subprocess.PIPE, text=True, **kwargs
    )


def test_open_connect_and_the_name_goes_with_the_last_handle() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[Any](capacity=4, name=name)
    assert exists(name)
    tx2, rx2 = aioshm.connect_send(name), aioshm.connect_receive(name)
    tx2.send_nowait("by name")
    assert rx.recv_nowait() == "by name"
    tx.send_nowait("to the other receiver")
    assert rx2.recv_nowait() == "to the other receiver"
    assert rx.statistics().open_send_streams == 2
    assert rx.statistics().open_receive_streams == 2
    for handle in (tx, rx, tx2):
        handle.close()
    assert exists(name)  # rx2 still holds it
    rx2.close()
    assert not exists(name)
    with pytest.raises(FileNotFoundError, match="no channel named"):
        aioshm.connect_send(name)


def test_a_live_name_is_taken_and_a_closed_one_free() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[Any](name=name)
    with pytest.raises(FileExistsError, match="exists and is in use"):
        aioshm.open_channel(name=name)
    tx.close()
    rx.close()
    tx, rx = aioshm.open_channel[Any](name=name)  # free again
    tx.close()
    rx.close()
    assert not exists(name)


@pytest.mark.parametrize(
    "bad", ["", "a/b", ".hidden", "-x", "with space", "é", "x" * 201, "../../etc/passwd"]
)
def test_malformed_names(bad: str) -> None:
    for call in (
        lambda: aioshm.open_channel[Any](name=bad),
        lambda: aioshm.connect_send(bad),
        lambda: aioshm.connect_receive(bad),
    ):
        with pytest.raises(ValueError, match="a valid name is 1 to 200 characters"):
            call()


def test_unknown_url_scheme_is_named() -> None:
    # nats:// and tls:// are served by aioshm.nats (tests/test_nats.py); others are not.
    with pytest.raises(ValueError, match=r"unknown scheme 'ftp'.*nats://, tls://"):
        aioshm.open_channel(name="ftp://localhost/x")
    with pytest.raises(ValueError, match="unknown scheme 'zmq'"):
        aioshm.connect_receive("zmq://example:4222/x")
    with pytest.raises(TypeError, match="must be a str"):
        aioshm.connect_send(b"x")  # type: ignore[arg-type]


def test_a_registered_scheme_is_dispatched() -> None:
    calls: list[tuple[Any, ...]] = []

    def demo(op: str, name: str, **kw: Any) -> str:
        calls.append((op, name, kw))
        return "handle"

    _names.SCHEMES["demo"] = demo
    try:  # the transport's "handle" is what the entry points return (typed as handles)
        assert cast(object, aioshm.connect_send("demo://x", timeout=2)) == "handle"
        assert cast(object, aioshm.open_channel[Any](name="demo://y")) == "handle"
    finally:
        del _names.SCHEMES["demo"]
    assert [c[:2] for c in calls] == [("send", "demo://x"), ("open", "demo://y")]


def test_mode() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[Any](name=name, mode=0o660)
    assert stat.S_IMODE(os.stat(f"/dev/shm/aioshm.{name}").st_mode) == 0o660
    tx.close()
    rx.close()
    with pytest.raises(ValueError, match="owner read and write"):
        aioshm.open_channel(name=fresh(), mode=0o060)
    name = fresh()
    tx, rx = aioshm.open_channel[Any](name=name)
    assert stat.S_IMODE(os.stat(f"/dev/shm/aioshm.{name}").st_mode) == 0o600
    tx.close()
    rx.close()


def _connect_as_nobody(name: str, results: Any) -> None:
    os.setgid(65534)
    os.setuid(65534)  # aioshm is imported already: this forked child is another user now
    try:
        aioshm.connect_send(name)
    except PermissionError as exc:
        results.put(("PermissionError", str(exc)))
    except BaseException as exc:
        results.put((type(exc).__name__, str(exc)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_gets_permission_error() -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    name = fresh()
    tx, rx = aioshm.open_channel[Any](name=name)
    results = ctx.SimpleQueue()
    child = ctx.Process(target=_connect_as_nobody, args=(name, results))
    child.start()
    kind, message = results.get()
    child.join(30)
    tx.close()
    rx.close()
    assert kind == "PermissionError", message
    assert "belongs to user 0" in message


def test_connect_waits_for_the_creator() -> None:
    """A consumer started before its producer waits up to ``timeout`` for the name."""
    name = fresh()
    got: list[Any] = []

    def consumer() -> None:
        with aioshm.connect_receive(name, timeout=30) as rx:
            got.append(rx.recv_blocking(timeout=30))

    thread = threading.Thread(target=consumer)
    thread.start()
    tx, rx = aioshm.open_channel[Any](name=name)
    tx.send_nowait("hello")
    thread.join(30)
    assert got == ["hello"]
    tx.close()
    rx.close()
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"within 0\.2 s"):
        aioshm.connect_send(name, timeout=0.2)
    assert time.monotonic() - started >= 0.2


# ------------------------------------------------------------ unrelated processes


def test_an_unrelated_sender_joins_by_name() -> None:
    name = fresh()
    sender = unrelated("send", name, "200")  # may start before the channel exists
    tx, rx = aioshm.open_channel[int](capacity=8, name=name)
    # Until the sender has joined, the parent's tx is the only one: keep it till then.
    wait_until(lambda: rx.statistics().open_send_streams == 2, what="the sender")
    tx.close()  # the stream ends once the unrelated sender is done

    async def main() -> list[int]:
        with anyio.fail_after(60):
            async with rx:
                return [item async for item in rx]

    assert anyio.run(main) == list(range(200))
    assert sender.wait(30) == 0
    assert not exists(name)


def test_an_unrelated_receiver_joins_by_name() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[int](capacity=8, name=name)
    rx.close()
    receiver = unrelated("receive", name, "0")
    wait_until(lambda: tx.statistics().open_receive_streams == 1, what="the receiver")
    with tx:
        for i in range(300):
            tx.send_blocking(i, timeout=60)
    out, _ = receiver.communicate(timeout=60)
    assert receiver.returncode == 0
    assert out.split() == ["300"]
    assert not exists(name)


def test_a_killed_unrelated_sender_counts_as_closed_within_a_second() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[int](capacity=8, name=name)
    holder = unrelated("hold", name, "0")
    wait_until(lambda: rx.statistics().open_send_streams == 2, what="the holder")
    tx.close()

    async def main() -> float:
        with anyio.fail_after(60):
            pid = await rx.recv()
        assert pid == holder.pid
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with anyio.fail_after(30), pytest.raises(anyio.EndOfStream):
            await rx.recv()
        return time.monotonic() - killed_at

    with rx:
        elapsed = anyio.run(main)
    holder.wait(10)
    assert elapsed < DEADLINE + 0.5, elapsed
    assert not exists(name)


def test_a_killed_creator_leaves_a_stale_name_that_the_next_open_reclaims() -> None:
    name = fresh()
    creator = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import aioshm, sys, time\n"
            f"tx, rx = aioshm.open_channel(name={name!r})\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert creator.stdout is not None
    assert creator.stdout.readline().strip() == "ready"
    with pytest.raises(FileExistsError):
        aioshm.open_channel(name=name)
    creator.kill()
    creator.wait(10)
    assert exists(name)  # stale: nobody was left to remove it
    with pytest.raises(FileNotFoundError):  # nobody holds it: no live channel
        aioshm.connect_receive(name)
    assert not exists(name)  # ... and that look reclaimed it
    # The same through open_channel, after another crash.
    crashed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import aioshm, os, signal\nt, r = aioshm.open_channel(name={name!r})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
        ]
    )
    crashed.wait(30)
    assert exists(name)
    tx, rx = aioshm.open_channel[Any](name=name)
    tx.send_nowait("fresh")
    assert rx.recv_nowait() == "fresh"
    tx.close()
    rx.close()
    assert not exists(name)


def test_a_named_handle_pickles_like_any_other() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[Any](name=name)
    copy = pickle.loads(pickle.dumps(tx))
    tx.close()
    copy.send_nowait(1)
    copy.close()
    assert rx.recv_nowait() == 1
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    rx.close()
    assert not exists(name)


def test_opening_any_name_reclaims_this_users_stale_ones() -> None:
    stale = fresh()
    creator = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import aioshm, os, signal\nt, r = aioshm.open_channel(name={stale!r})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
        ]
    )
    creator.wait(30)
    assert exists(stale)
    tx, rx = aioshm.open_channel[Any](name=fresh())
    assert not exists(stale)
    tx.close()
    rx.close()


def test_a_named_handle_unpickles_by_name_where_proc_is_closed() -> None:
    import multiprocessing

    from . import reach_workers

    ctx = multiprocessing.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    name = fresh()
    tx, rx = aioshm.open_channel[Any](name=name)
    child = ctx.Process(target=reach_workers.unpickle_without_proc, args=(queue, results))
    child.start()
    queue.put(tx.clone())
    tx.close()
    assert results.get(timeout=60) == "ok"
    child.join(30)
    with rx:
        assert rx.recv_nowait() == "by name"
        with pytest.raises(anyio.EndOfStream):
            rx.recv_nowait()
    queue.close()
    queue.join_thread()
    results.close()
    results.join_thread()
