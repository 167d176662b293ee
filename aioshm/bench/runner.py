"""The runner: rounds, processes, the start gate, the watchdog.

One *measurement* is one contender on one workload: its transport is created in the
parent, its producer and consumer (or ping and pong) run in processes of their own,
started with ``fork``. Every child opens its endpoint and reports ready on a pipe of its
own; once all are ready, each connects its endpoints to their peers (a no-op for most
transports: see :meth:`~aioshm.bench.workloads.Connectable.connect`), reports that, and
waits at a shared gate; the parent opens the gate once all are connected, and collects
what each reports. Receiving processes are started (and ready) before sending ones, so
that a sender never waits for its receiver to come up.

A *round* runs every contender of every workload once, contenders in a shuffled order.
A measurement that fails, or overruns its timeout (its processes are killed), is
recorded with the error, and that contender is not run again on that workload.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import multiprocessing.synchronize
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import numpy as np

from .contenders import (
    CONTENDERS,
    AsyncContender,
    Contender,
    Link,
    SoloContender,
    SyncContender,
)
from .workloads import (
    Connectable,
    Workload,
    consume_async,
    consume_sync,
    memcpy_solo,
    ping_async,
    ping_sync,
    pong_async,
    pong_sync,
    produce_async,
    produce_sync,
)

__all__ = ["Measurement", "Results", "measure", "run"]

Array = np.ndarray[Any, np.dtype[Any]]
Connection = multiprocessing.connection.Connection
Context = multiprocessing.context.ForkContext

#: How long children may take to start and open their endpoints.
SETUP_TIMEOUT: Final = 30.0
#: How long children may take to close and exit once the measurement is over.
EXIT_TIMEOUT: Final = 10.0
#: The roles whose report ends a measurement; the others (senders) close only then.
_MEASURING: Final = frozenset({"consumer", "ping", "solo"})


@dataclass
class Measurement:
    """The outcome of one measurement."""

    #: the workload's figure (msg/s, GB/s or µs); ``None`` if it failed
    value: float | None = None
    #: CPU time of the consumer process (all threads) per message, seconds
    cpu_per_message: float | None = None
    #: CPU time of the consumer's receiving thread per message, seconds
    thread_cpu_per_message: float | None = None
    #: why it failed
    error: str | None = None
    #: something odd that did not spoil the figure (a process slow to exit, say)
    warning: str | None = None
    #: wall time of the whole measurement, processes included
    wall: float = 0.0


@dataclass
class Results:
    """Everything a run measured, for the report."""

    workloads: list[Workload]
    #: contenders of each workload, in report order
    contenders: dict[str, list[Contender]]
    #: contenders that could not run here, and why
    skipped: dict[str, str]
    rounds: int
    quick: bool
    seed: int
    timeout: float
    #: (workload key, contender key) -> one entry per round run
    measurements: dict[tuple[str, str], list[Measurement]] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    duration: float = 0.0
    #: the system's 1-minute load average at the start and at the end of the run
    load: tuple[float, float] = (0.0, 0.0)

    def count(self, workload: Workload) -> int:
        """Messages per measurement."""
        return workload.messages(self.quick)


# ---------------------------------------------------------------- the child side


@dataclass
class _Job:
    contender: Contender
    workload: Workload
    role: str
    count: int


@dataclass
class _Events:
    """The parent's signals to every child of a measurement."""

    #: every child has opened its endpoints: connect them
    linked: multiprocessing.synchronize.Event
    #: the start gate
    go: multiprocessing.synchronize.Event
    #: the measuring process has all it needs: senders may close
    received: multiprocessing.synchronize.Event


class _Gate:
    """A child's side of the start line, and of the finish line."""

    def __init__(self, conn: Connection, events: _Events) -> None:
        self._conn = conn
        self._events = events

    def ready_and_wait(self, *ends: Connectable) -> None:
        self._conn.send(("ready", None))
        if not self._events.linked.wait(SETUP_TIMEOUT * 4):
            raise TimeoutError("the other processes never came up")
        for end in ends:
            end.connect()
        self._conn.send(("connected", None))
        if not self._events.go.wait(SETUP_TIMEOUT * 4):
            raise TimeoutError("the parent never opened the start gate")

    def wait_received(self) -> None:
        if not self._events.received.wait(SETUP_TIMEOUT * 20):
            raise TimeoutError("the receiving side never finished")


def _child(job: _Job, events: _Events, conn: Connection, *ends: Any) -> None:
    """Entry point of every child process: play the role, report the outcome."""
    try:
        payload = _play(job, _Gate(conn, events), ends)
    except BaseException as exc:
        detail = "".join(traceback.format_exception_only(exc)).strip()
        conn.send(("error", f"{job.role}: {detail}"))
        conn.close()
        raise SystemExit(1) from None
    conn.send(("done", payload))
    conn.close()


def _play(job: _Job, gate: _Gate, ends: Sequence[Any]) -> dict[str, float]:
    contender, workload, role, count = job.contender, job.workload, job.role, job.count
    data = workload.data()
    if isinstance(contender, SoloContender):
        return memcpy_solo(data, count, gate)
    if isinstance(contender, AsyncContender):
        return anyio.run(_play_async, job, gate, ends, data, backend=contender.backend)
    assert isinstance(contender, SyncContender)
    if role == "producer":
        return produce_sync(contender.sync_sender(ends[0], workload, data), count, gate)
    if role == "consumer":
        return consume_sync(contender.sync_receiver(ends[0], workload, data), count, gate)
    sender = contender.sync_sender(ends[0], workload, data)
    receiver = contender.sync_receiver(ends[1], workload, data)
    if role == "ping":
        return ping_sync(sender, receiver, data, count, gate)
    return pong_sync(sender, receiver, count, gate)


async def _play_async(job: _Job, gate: _Gate, ends: Sequence[Any], data: Array) -> dict[str, float]:
    contender, workload, role, count = job.contender, job.workload, job.role, job.count
    assert isinstance(contender, AsyncContender)
    if role == "producer":
        return await produce_async(contender.async_sender(ends[0], workload, data), count, gate)
    if role == "consumer":
        receiver = contender.async_receiver(ends[0], workload, data)
        return await consume_async(receiver, count, gate)
    sender = contender.async_sender(ends[0], workload, data)
    receiver = contender.async_receiver(ends[1], workload, data)
    if role == "ping":
        return await ping_async(sender, receiver, data, count, gate)
    return await pong_async(sender, receiver, count, gate)


# ---------------------------------------------------------------- the parent side


class _Failed(Exception):
    """A measurement went wrong; the message says how."""


@dataclass
class _Child:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    role: str
    #: the last message it sent: "started" (none yet), "ready", "connected" or "done"
    state: str = "started"
    payload: dict[str, float] | None = None


def _collect(
    children: list[_Child], kind: str, deadline: float, required: list[_Child] | None = None
) -> None:
    """Read what the children send until every child of ``required`` (all, by default)
    has sent a message of ``kind`` (``"ready"``, ``"connected"``, ``"done"``, in that
    order); raise :class:`_Failed` on an error from any child, an early exit, or the
    deadline."""
    required = children if required is None else required
    pending = {child.conn: child for child in children if child.state != kind}
    while any(child.state != kind for child in required):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            late = ", ".join(sorted(c.role for c in required if c.state != kind))
            what = {"ready": "start", "connected": "connect"}.get(kind, "finish")
            raise _Failed(f"timed out: {late} did not {what} in time")
        for conn in multiprocessing.connection.wait(list(pending), remaining):
            child = pending[conn]  # type: ignore[index]
            try:
                message, payload = child.conn.recv()
            except EOFError:
                child.process.join(1)
                raise _Failed(
                    f"{child.role} process exited (code {child.process.exitcode}) without reporting"
                ) from None
            if message == "error":
                raise _Failed(str(payload))
            if message != kind:
                raise _Failed(f"{child.role} sent {message!r}, expected {kind!r}")
            child.state = message
            child.payload = payload
            del pending[conn]  # type: ignore[arg-type]


def _stop(children: list[_Child], grace: float) -> str | None:
    """Join every child within ``grace`` seconds, killing those that do not exit."""
    deadline = time.monotonic() + grace
    late = []
    for child in children:
        child.process.join(max(0.0, deadline - time.monotonic()))
        if child.process.is_alive():
            late.append(child.role)
            child.process.kill()
            child.process.join(5)
        child.conn.close()
    if late:
        return f"{', '.join(late)} did not exit within {grace:.0f} s of finishing (killed)"
    return None


def _shares(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _stages(
    contender: Contender, workload: Workload, count: int, ctx: Context, tmpdir: str
) -> tuple[list[list[tuple[str, int, tuple[Any, ...]]]], list[Link]]:
    """The processes to start, stage by stage (receivers first), and the links made."""
    if isinstance(contender, SoloContender):
        return [[("solo", count, ())]], []
    if workload.kind == "latency":
        there = contender.open(workload, 1, ctx, tmpdir)
        back = contender.open(workload, 1, ctx, tmpdir)
        stages = [
            [("pong", count, (back.senders[0], there.receiver))],
            [("ping", count, (there.senders[0], back.receiver))],
        ]
        return stages, [there, back]
    link = contender.open(workload, workload.producers, ctx, tmpdir)
    producers = [
        ("producer", share, (link.senders[i],))
        for i, share in enumerate(_shares(count, workload.producers))
    ]
    return [[("consumer", count, (link.receiver,))], producers], [link]


def measure(
    contender: Contender,
    *,
    workload: Workload,
    count: int,
    ctx: Context,
    timeout: float,
    tmpdir: str,
) -> Measurement:
    """Run one measurement; never raises for a contender's failure."""
    started = time.monotonic()
    children: list[_Child] = []
    events = _Events(linked=ctx.Event(), go=ctx.Event(), received=ctx.Event())
    result = Measurement()
    links: list[Link] = []
    try:
        stages, links = _stages(contender, workload, count, ctx, tmpdir)
        for stage in stages:
            batch = []
            for role, n, ends in stage:
                reader, writer = ctx.Pipe(duplex=False)
                job = _Job(contender, workload, role, n)
                process = ctx.Process(
                    target=_child,
                    args=(job, events, writer, *ends),
                    name=f"aioshm-bench-{contender.key}-{role}",
                    daemon=True,
                )
                process.start()
                writer.close()
                batch.append(_Child(process, reader, role))
            children.extend(batch)
            _collect(batch, "ready", time.monotonic() + SETUP_TIMEOUT)
        events.linked.set()
        _collect(children, "connected", time.monotonic() + SETUP_TIMEOUT)
        _release(contender, links)
        opened = time.monotonic()
        events.go.set()
        measuring = [child for child in children if child.role in _MEASURING]
        _collect(children, "done", opened + timeout, measuring)
        events.received.set()  # now the senders may close
        _collect(children, "done", time.monotonic() + EXIT_TIMEOUT)
        result = _figure(contender, workload, count, children, opened)
    except _Failed as exc:
        result = Measurement(error=str(exc))
    except Exception as exc:  # the contender's own setup failed in the parent
        result = Measurement(error="".join(traceback.format_exception_only(exc)).strip())
    finally:
        _release(contender, links)
        grace = EXIT_TIMEOUT if result.error is None else 0.5
        late = _stop(children, grace)
        if result.error is None and late:
            result.warning = late
        result.wall = time.monotonic() - started
        gc.collect()
    return result


def _release(contender: Contender, links: list[Link]) -> None:
    """Close the parent's copies of the transports (once)."""
    while links:
        link = links.pop()
        with contextlib.suppress(Exception):  # a broken transport: the error says why
            contender.release(link)


def _figure(
    contender: Contender, workload: Workload, count: int, children: list[_Child], opened: float
) -> Measurement:
    by_role = {child.role: child.payload or {} for child in children}
    if isinstance(contender, SoloContender):
        solo = by_role["solo"]
        return Measurement(value=workload.figure(count, solo["elapsed"]))
    if workload.kind == "latency":
        ping = by_role["ping"]
        if not ping.get("verified"):
            raise _Failed("the message that came back is not the one sent")
        return Measurement(value=ping["median"] * 1e6)
    consumer = by_role["consumer"]
    if not consumer.get("verified"):
        raise _Failed("the last message received is not the one sent")
    elapsed = consumer["end"] - opened
    return Measurement(
        value=workload.figure(count, elapsed),
        cpu_per_message=consumer["cpu"] / count,
        thread_cpu_per_message=consumer["thread_cpu"] / count,
    )


# ---------------------------------------------------------------- rounds


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _progress(text: str) -> None:
    sys.stderr.write("\r" + text[:119].ljust(119))
    sys.stderr.flush()


def run(
    workloads: Sequence[Workload],
    *,
    rounds: int,
    quick: bool,
    timeout: float,
    seed: int,
    progress: Callable[[str], None] = _progress,
) -> Results:
    """Run ``rounds`` rounds of every available contender on ``workloads``."""
    ctx = multiprocessing.get_context("fork")
    skipped = {}
    for contender in CONTENDERS:
        reason = contender.missing()
        if reason is not None:
            skipped[contender.key] = reason
    results = Results(
        workloads=list(workloads),
        contenders={w.key: [c for c in CONTENDERS if c.takes_part(w)] for w in workloads},
        skipped=skipped,
        rounds=rounds,
        quick=quick,
        seed=seed,
        timeout=timeout,
    )
    rng = random.Random(seed)
    plan = [(w, c) for w in workloads for c in results.contenders[w.key] if c.key not in skipped]
    total = rounds * len(plan)
    done = 0
    failed: set[tuple[str, str]] = set()
    start = time.monotonic()
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="aioshm-bench-") as tmpdir:
        for round_no in range(rounds):
            for workload in workloads:
                order = [c for w, c in plan if w is workload]
                rng.shuffle(order)
                for contender in order:
                    done += 1
                    key = (workload.key, contender.key)
                    if key in failed:
                        continue
                    elapsed = time.monotonic() - start
                    progress(
                        f"[{done}/{total}] round {round_no + 1}/{rounds} "
                        f"{workload.key}: {contender.label} ({elapsed:.0f} s)"
                    )
                    outcome = measure(
                        contender,
                        workload=workload,
                        count=results.count(workload),
                        ctx=ctx,
                        timeout=timeout,
                        tmpdir=tmpdir,
                    )
                    results.measurements.setdefault(key, []).append(outcome)
                    if outcome.error is not None:
                        failed.add(key)
    results.duration = time.monotonic() - start
    results.load = (load_before, _load())
    progress(f"done: {total} measurements in {results.duration:.0f} s")
    sys.stderr.write("\n")
    return results
