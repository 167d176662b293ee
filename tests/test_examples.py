"""The README's quickstart and the examples run, as a user would run them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
