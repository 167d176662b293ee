"""The network channel on a 3-server JetStream cluster with 3 replicas: servers die
and come back while producers and consumers run in processes of their own."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
import pytest

import aioshm.nats
from aioshm.nats import LocalCluster
from aioshm.nats._link import close_links

from . import nats_workers

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    for attempt in range(3):  # a free port can be taken by another process meanwhile
        nodes = LocalCluster(3)
        try:
            nodes.start()
            break
        except RuntimeError:
            nodes.close()
            if attempt == 2:
                raise
    yield nodes
    close_links()
    nodes.close()
    for server in nodes.servers:
        assert server.process is not None and server.process.poll() is not None


def _wait_for(value: Any, at_least: int, procs: list[Any], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while value.value < at_least:
        assert time.monotonic() < deadline, f"stuck at {value.value} < {at_least}"
        assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
        time.sleep(0.02)


def _run(
    cluster: LocalCluster, producers: int, consumers: int, count: int, kills: list[int]
) -> None:
    """``producers`` x ``count`` messages; SIGKILL server ``kills[k]`` once a
    (k+1)/(len(kills)+1) share has been received, restarting it before the next."""
    url = f"{cluster.url}/c{uuid.uuid4().hex[:10]}?replicas=3"
    ctx = multiprocessing.get_context("spawn")
    tx, rx = aioshm.nats.open_channel(url, capacity=256)
    received = ctx.Value("q", 0)
    connected = ctx.Value("q", 0)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=nats_workers.connect_and_produce, args=(url, p, count, connected))
        for p in range(producers)
    ] + [
        ctx.Process(target=nats_workers.connect_and_consume, args=(url, received, connected, out))
        for _ in range(consumers)
    ]
    for proc in procs:
        proc.start()
    _wait_for(connected, producers + consumers, procs)
    tx.close()  # the producers hold the stream open from now on
    rx.close()
    total = producers * count
    for k, victim in enumerate(kills):
        _wait_for(received, total * (k + 1) // (len(kills) + 1), procs)
        server = cluster.servers[victim]
        server.kill()
        _wait_for(received, received.value + total // (4 * (len(kills) + 1)), procs)
        server.start()
    results = [out.get(timeout=180) for _ in range(consumers)]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    everything = sorted(item for got in results for item in got)
    assert len(everything) == total  # nothing lost, nothing twice
    assert everything == sorted((p, i) for p in range(producers) for i in range(count))


@pytest.mark.slow
def test_one_server_killed_mid_stream(cluster: LocalCluster) -> None:
    _run(cluster, producers=2, consumers=2, count=300, kills=[0])


@pytest.mark.slow
def test_servers_killed_in_turn_under_20000_messages(cluster: LocalCluster) -> None:
    _run(cluster, producers=4, consumers=4, count=5000, kills=[0, 1])


@pytest.mark.slow
def test_heartbeats_lost_with_the_cluster_end_nothing(cluster: LocalCluster) -> None:
    """With the default heartbeat (5 s), two of the three servers die: the channel's
    streams have no leader, every heartbeat is lost for longer than the heartbeat, and
    the live handles' subjects expire. When a server comes back, neither side is
    judged gone."""
    name = f"c{uuid.uuid4().hex[:10]}"
    tx, rx = aioshm.nats.open_channel(f"{cluster.url}/{name}?replicas=3", capacity=8)
    tx.close()
    rx.close()
    # This process's handles, connected to the server that stays up.
    url = f"{cluster.servers[0].url}/{name}"
    tx2 = aioshm.nats.connect_send(url)
    rx2 = aioshm.nats.connect_receive(url)
    with tx2, rx2:
        assert rx2._link is not None and rx2._link.heartbeat == 5
        cluster.servers[1].kill()
        cluster.servers[2].kill()
        with pytest.raises(TimeoutError):  # no quorum: the outage outlasts the heartbeat
            rx2.recv_blocking(5 + 1)
        cluster.servers[1].start()
        # A false verdict would come within a heartbeat of the election, and a check.
        with pytest.raises(TimeoutError):
            rx2.recv_blocking(5 + 5)
        tx2.send_blocking("after", 30)
        assert rx2.recv_blocking(30) == "after"


class _Registry:
    """A channel's registry (its heartbeat stream), observed from a connection of the
    test's own; a request that finds no leader is asked again."""

    def __init__(self, link: Any, cluster: LocalCluster) -> None:
        self.stream, self.prefix = link.hb_stream, link.hb_prefix
        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect([s.url for s in cluster.servers]))
        self.js = self.nc.jetstream(timeout=1)

    def _ask(self, coro_factory: Any) -> Any:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the registry never answered"
            try:
                return self.loop.run_until_complete(coro_factory())
            except (nats.errors.Error, OSError):
                time.sleep(0.05)

    def cluster(self, stream: str | None = None) -> Any:
        """The cluster of the registry, or of another stream of the channel."""
        return self._ask(lambda: self.js.stream_info(stream or self.stream)).cluster

    def subjects(self) -> set[str]:
        info = self._ask(
            lambda: self.js.stream_info(self.stream, subjects_filter=f"{self.prefix}.>")
        )
        return set(info.state.subjects or {})

    def last_beat(self, subject: str) -> Any:
        """``subject``'s last beat stored (``None``: none now)."""

        async def last() -> Any:
            try:
                return await self.js.get_last_msg(self.stream, subject)
            except nats.js.errors.NotFoundError:
                return None

        return self._ask(last)

    def wait_for_beats(self, subject: str, since: Any, count: int) -> None:
        """Until ``count`` beats of ``subject`` stored since the server time ``since``
        have been seen."""
        beats: set[int] = set()
        while len(beats) < count:
            beat = self.last_beat(subject)
            if beat is not None and beat.time > since:
                beats.add(beat.seq)
            time.sleep(0.02)

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.close()


@contextlib.contextmanager
def _receiver_elsewhere(url: str, capacity: int) -> Iterator[tuple[Any, Any]]:
    """``(tx, child)``: a send handle here, and a receive handle held by a child process
    (by URL), already counted here; the child is killed at the end."""
    tx, rx = aioshm.nats.open_channel(url, capacity=capacity)
    rx.close()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=nats_workers.hold_receiver_by_url, args=(url, ready))
    child.start()
    try:
        while not ready.wait(0.1):
            assert child.exitcode is None, "the child failed"
        while tx.statistics().open_receive_streams == 0:
            time.sleep(0.02)
        yield tx, child
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        tx.close()


@pytest.mark.slow
def test_no_verdict_within_a_heartbeat_of_a_new_registry_leader(cluster: LocalCluster) -> None:
    """The registry's leader dies: while the cluster elects another, every beat is lost
    and handles expire. This process's beats are stored again as soon as there is a
    leader; another process's receiver (stopped since half a heartbeat before: slow to
    come back) only after this process has beaten three times, two quarters of the
    heartbeat later, but within a heartbeat of the election. This process's sender,
    counting the receivers all along, must not judge them all gone meanwhile. (A
    heartbeat of 10 s: room for those beats on either side on a loaded machine.)"""
    url = f"{cluster.url}/c{uuid.uuid4().hex[:10]}?replicas=3&heartbeat=10"
    failures: list[BaseException] = []
    stop = threading.Event()
    with _receiver_elsewhere(url, capacity=4) as (tx, child):

        def send_all_along() -> None:  # into a full channel: each send counts receivers
            # (and none was on the wire while no server answered: it would wait for room)
            while not stop.is_set():
                try:
                    tx.send_blocking(0, 0.5)
                except TimeoutError:
                    pass
                except BaseException as exc:
                    failures.append(exc)
                    return

        sender = threading.Thread(target=send_all_along, daemon=True)
        assert tx._link is not None and tx._link.heartbeat == 10
        registry = _Registry(tx._link, cluster)
        try:
            [mine] = tx._link.owned
            [theirs] = [s for s in registry.subjects() if s.startswith(f"{registry.prefix}.r.")]
            victim = next(s for s in cluster.servers if s.name == registry.cluster().leader)
            for i in range(4):  # full: a send started after the election counts receivers
                tx.send_blocking(i, 30)
            os.kill(child.pid, signal.SIGSTOP)
            # Stopped for half a heartbeat before the fault: it expires early in the
            # election.
            registry.wait_for_beats(mine, registry.last_beat(theirs).time, 3)
            assert theirs in registry.subjects()
            victim.kill()
            while (elected := registry.cluster()).leader in (None, victim.name):
                time.sleep(0.02)
            while registry.cluster(tx._link.stream).leader in (None, victim.name):
                time.sleep(0.02)  # the messages' stream too: a send now gets an answer
            sender.start()
            # This process beats three times after the election; the stopped one expired.
            registry.wait_for_beats(mine, elected.leader_since, 3)
            assert theirs not in registry.subjects()
            os.kill(child.pid, signal.SIGCONT)
            while theirs not in registry.subjects():
                assert not failures, failures
                time.sleep(0.02)
            stop.set()
            sender.join(60)
            assert not sender.is_alive(), "a send is stuck"
            assert not failures, failures
        finally:
            stop.set()
            registry.close()


@pytest.mark.slow
def test_a_send_unanswered_in_an_election_still_sees_the_receivers_go(
    cluster: LocalCluster,
) -> None:
    """A send waits for room in a full channel. The messages' stream loses its leader,
    and the send's attempts during the election go unanswered: past that point it may
    have been stored, and never retreats. The receiving process is then killed: the
    send raises ``BrokenResourceError`` rather than wait for room that no receiver will
    ever make."""
    url = f"{cluster.url}/c{uuid.uuid4().hex[:10]}?replicas=3"
    outcome: list[BaseException | None] = []
    with _receiver_elsewhere(url, capacity=1) as (tx, child):

        def send_one() -> None:  # a task, on its loop's own connection
            try:
                anyio.run(tx.send, 1)
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        sender = threading.Thread(target=send_one, daemon=True)
        assert tx._link is not None
        registry = _Registry(tx._link, cluster)
        try:
            tx.send_blocking(0, 30)  # full
            sender.start()
            while tx.statistics().tasks_waiting_send == 0:
                time.sleep(0.02)
            stream = tx._link.stream
            victim = next(s for s in cluster.servers if s.name == registry.cluster(stream).leader)
            victim.kill()  # the election lasts seconds; the send tries every 20 ms
            while registry.cluster(stream).leader in (None, victim.name):
                time.sleep(0.02)
            assert not outcome, outcome  # still waiting for room
            os.kill(child.pid, signal.SIGKILL)
            sender.join(90)
            assert not sender.is_alive(), "the send still waits for room"
            assert len(outcome) == 1 and isinstance(outcome[0], anyio.BrokenResourceError), outcome
        finally:
            registry.close()
