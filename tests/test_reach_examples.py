"""The reach examples run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_stream_example(method: str) -> None:
    """At 10x the capacity in results, and more tasks than the pool has workers."""
    result = subprocess.run(
        [
            sys.executable,
            "examples/pool_stream.py",
            "--start-method",
            method,
            "--tasks",
            "40",
            "--per-task",
            "4",
            "--capacity",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    squares = sum(n * n for n in range(160))
    assert result.stdout.splitlines() == [
        f"40 tasks streamed 160 results; sum of squares {squares}"
    ]


def test_two_terminals_example() -> None:
    """Two unrelated programs; the producer starts first and waits for the name."""
    name = f"example-{uuid.uuid4().hex[:12]}"
    script = "examples/two_terminals.py"
    producer = subprocess.Popen(
        [sys.executable, script, "produce", name, "--count", "3"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    consumer = subprocess.run(
        [sys.executable, script, "consume", name],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    _, errors = producer.communicate(timeout=60)
    assert producer.returncode == 0, errors
    assert consumer.returncode == 0, consumer.stderr
    assert consumer.stdout.splitlines() == [
        f"channel {name!r} open; waiting for a producer",
        "got: message 0",
        "got: message 1",
        "got: message 2",
        "the producer is gone",
    ]
    assert not os.path.exists(f"/dev/shm/aioshm.{name}")
