"""``aioshm.run_child``: Ctrl-C (a real SIGINT to a real process group) is the parent's
to handle; the children stop as their channels end, with no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import aioshm

pytestmark = pytest.mark.timeout(120)

# The parent (on asyncio) consumes what two children send until Ctrl-C; then it closes
# its handle, and the children, whose next send raises BrokenResourceError, return.
PROGRAM = """
import asyncio
import multiprocessing
import os
import sys

import anyio

import aioshm


def producer(tx, backend):  # a child process
    async def main(tx):
        async with tx:
            await tx.send(("hello", os.getpid()))  # SIGINT is ignored from here on
            try:
                while True:
                    await tx.send(("data", 0))
            except anyio.BrokenResourceError:  # the parent has closed its handle
                pass
        return "done"

    assert aioshm.run_child(main, tx, backend=backend) == "done"


async def consume(rx):
    hellos = 0
    async for kind, _ in rx:
        if kind == "hello":
            hellos += 1
            if hellos == 2:  # both children are in run_child: Ctrl-C may come
                print("ready", flush=True)


if __name__ == "__main__":
    method, backend = sys.argv[1:]
    ctx = multiprocessing.get_context(method)
    tx, rx = aioshm.open_channel(capacity=8)
    procs = [ctx.Process(target=producer, args=(tx, backend)) for _ in range(2)]
    for proc in procs:
        proc.start()
    tx.close()
    try:
        # asyncio turns SIGINT into a cancellation at an await, then raises
        # KeyboardInterrupt; trio would raise it at any bytecode of the parent
        asyncio.run(consume(rx))
    except KeyboardInterrupt:
        print("parent: Ctrl-C", flush=True)
    rx.close()  # the parent decides: the children stop
    for proc in procs:
        proc.join(60)
    print("children:", [proc.exitcode for proc in procs], flush=True)
"""


@pytest.mark.parametrize(
    ("method", "backend"), [("fork", "trio"), ("spawn", "trio"), ("forkserver", "asyncio")]
)
def test_ctrl_c_stops_children_without_a_traceback(
    method: str, backend: str, tmp_path: Path
) -> None:
    pytest.importorskip("trio")
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    proc = subprocess.Popen(
        [sys.executable, str(script), method, backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == "ready\n", first + proc.stderr.read()  # type: ignore[union-attr]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the parent and both children
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["parent: Ctrl-C", "children: [0, 0]"], out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_run_child_refuses_the_main_process() -> None:
    async def main() -> None:
        raise AssertionError("must not run")

    with pytest.raises(RuntimeError, match="child process"):
        aioshm.run_child(main)
