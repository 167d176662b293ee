"""The README's quickstart and the examples run, as a user would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=90, cwd=cwd
    )


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S)
    assert code, "the README has no quickstart"
    script = tmp_path / "quickstart.py"
    script.write_text(code.group(1))
    result = run(str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["[0 0 0 0]", "[1 1 1 1]", "[2 2 2 2]"]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_float_channel_example(method: str) -> None:
    result = run("examples/float_channel.py", "--start-method", method)
    assert result.returncode == 0, result.stderr
    values = str([float(x) for x in range(10)])
    assert result.stdout.splitlines() == [
        f"sent: {values}",
        "stored length: 10",
        values,
        f"received: {values}",
        "done",
    ]


def test_float_channel_example_sizes_and_trio() -> None:
    result = run(
        "examples/float_channel.py", "--count", "3", "--messages", "2", "--backend", "trio"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("received: [0.0, 1.0, 2.0]") == 2
    assert result.stdout.splitlines()[-1] == "done"


# ---------------------------------------------------------------- the examples


def numbers(pattern: str, text: str) -> tuple[float, ...]:
    """The numbers captured by ``pattern`` in ``text`` (which must match)."""
    match = re.search(pattern, text, re.M)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return tuple(float(group.replace(",", "")) for group in match.groups())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_numpy_frames_example(method: str) -> None:
    result = run(
        "examples/numpy_frames.py",
        *("--frames", "40", "--height", "108", "--width", "192", "--capacity", "3"),
        *("--start-method", method),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert numbers(r"^producer: sent (\d+) frames$", out) == (40,)
    received, nbytes = numbers(
        r"^consumer: received (\d+) frames of 108x192x3 uint8 \(([\d,]+) bytes each\), "
        r"every pixel checked$",
        out,
    )
    assert (received, nbytes) == (40, 108 * 192 * 3)
    fps, gbps = numbers(r"^throughput: ([\d.]+) frames/s, ([\d.]+) GB/s$", out)
    assert fps > 0
    assert gbps == pytest.approx(fps * nbytes / 1e9, rel=0.01, abs=0.001)


@pytest.mark.timeout(60)
def test_numpy_frames_example_full_hd_frames() -> None:
    """The default 1080p frames, a few of them: frames larger than the 64 KiB that
    are copied under the mutex, loaned and viewed in place."""
    result = run("examples/numpy_frames.py", "--frames", "12")
    assert result.returncode == 0, result.stderr
    assert "producer: sent 12 frames" in result.stdout
    assert "received 12 frames of 1080x1920x3 uint8 (6,220,800 bytes each)" in result.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_fan_in_example(method: str) -> None:
    result = run(
        "examples/fan_in.py",
        *("--producers", "3", "--messages", "500", "--capacity", "8", "--start-method", method),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for ident in range(3):
        assert numbers(rf"^producer {ident}: (\d+) messages, in order$", out) == (500,)
    total, producers, _ = numbers(
        r"^total: (\d+) messages from (\d+) producers in ([\d.]+) s$", out
    )
    assert (total, producers) == (1500, 3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_trio_pipeline_example(method: str) -> None:
    pytest.importorskip("trio")
    result = run(
        "examples/trio_pipeline.py",
        *("--jobs", "2000", "--workers", "3", "--capacity", "16", "--start-method", method),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    handled = [numbers(rf"^worker {ident}: (\d+) jobs$", out)[0] for ident in range(3)]
    assert sum(handled) == 2000
    expected = sum(n * n for n in range(2000))
    assert numbers(r"^sink: (\d+) results, sum of squares (\d+)$", out) == (2000, expected)
    assert numbers(r"^expected: (\d+) results, sum of squares (\d+)$", out) == (2000, expected)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_mixed_sync_async_example(method: str) -> None:
    result = run(
        "examples/mixed_sync_async.py",
        *("--messages", "300", "--size", "16", "--capacity", "4", "--start-method", method),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert numbers(r"^producer: sent (\d+) arrays of (\d+) float64, no event loop$", out) == (
        300,
        16,
    )
    count, _, total = numbers(r"^consumer: received (\d+) arrays in ([\d.]+) s, sum (\d+)$", out)
    assert (count, total) == (300, 16 * sum(range(300)))


@pytest.mark.timeout(90)
def test_across_machines_example_starts_its_own_server() -> None:
    pytest.importorskip("nats")
    result = run("examples/across_machines.py", "--frames", "12", "--start-method", "forkserver")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:1] == ["started a local nats-server"]
    assert "producer: sent 12 frames" in lines
    assert "consumer: received 12 frames, in order" in lines


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


def test_every_example_is_tested() -> None:
    """A new example needs a test here (and a line in docs/getting-started.md)."""
    source = Path(__file__).read_text()
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    for path in sorted((ROOT / "examples").glob("*.py")):
        if path.name == "shared_counter.py":  # tested with the primitives
            continue
        assert f'"examples/{path.name}"' in source, f"{path.name} has no test"
        assert path.name in guide, f"{path.name} is not mentioned in Getting started"


# ---------------------------------------------------------------- the documentation

#: Every page of docs/: each ```python block in it is a complete program, run as a
#: script; the first ```text block after it, if one comes before the next ```python
#: block, is its exact output.
#: across-machines.md's snippets need a NATS server: tests/test_nats.py runs them against
#: one it starts.
DOC_PAGES = tuple(
    sorted(path.name for path in (ROOT / "docs").glob("*.md") if path.name != "across-machines.md")
)

_BLOCK = re.compile(r"^```(python|text)\n(.*?)^```$", re.S | re.M)


def doc_snippets() -> list[Any]:
    params = []
    for page in DOC_PAGES:
        path = ROOT / "docs" / page
        if not path.exists():
            continue
        text = path.read_text()
        blocks = list(_BLOCK.finditer(text))
        for i, block in enumerate(blocks):
            if block[1] != "python":
                continue
            output = None
            for after in blocks[i + 1 :]:
                if after[1] == "python":
                    break
                output = after[2]
                break
            line = text.count("\n", 0, block.start()) + 1
            params.append(pytest.param(block[2], output, id=f"{page}:{line}"))
    return params


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("code", "output"), doc_snippets())
def test_doc_snippet_runs(code: str, output: str | None, tmp_path: Path) -> None:
    assert "import aioshm" in code, "a snippet that does not use aioshm: make it a program"
    script = tmp_path / "snippet.py"
    script.write_text(code)
    result = run(str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if output is not None:
        assert result.stdout.splitlines() == output.splitlines()
