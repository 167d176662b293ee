"""The benchmark runs: ``python -m aioshm.bench --quick`` exits 0 and reports on every
workload and every contender (or says why one was skipped). Its figures are not checked."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aioshm.bench.contenders import CONTENDERS
from aioshm.bench.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent


def _sections(page: str) -> dict[str, str]:
    """The page's ``## `` sections by title."""
    parts = re.split(r"^## (.+)$", page, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.timeout(150)
def test_quick_run_reports_every_workload_and_contender(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    chart = tmp_path / "img" / "benchmarks.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aioshm.bench",
            "--quick",
            "--output",
            str(output),
            "--chart",
            str(chart),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    page = output.read_text(encoding="utf-8")
    assert page.strip() == proc.stdout.strip()
    assert "python -m aioshm.bench --quick" in page
    assert "CPUs" in page
    assert "numpy" in page and "anyio" in page
    assert "target / met?" in page

    sections = _sections(page)
    for workload in WORKLOADS.values():
        assert workload.title in sections, f"no section for {workload.key}"
        body = sections[workload.title]
        for contender in CONTENDERS:
            if workload.key not in contender.workloads:
                continue
            rows = [line for line in body.splitlines() if line.startswith(f"| {contender.label} |")]
            assert rows, f"{contender.key} missing from {workload.key}"
            if "skipped" in rows[0]:
                assert f"- {contender.label}: skipped" in body

    if importlib.util.find_spec("matplotlib") is not None:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "](img/benchmarks.png)" in page
    else:
        assert "No chart" in page


@pytest.mark.timeout(150)
def test_only_and_no_write(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "aioshm.bench", "--quick", "--no-write", "--only", "latency"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sections = _sections(proc.stdout)
    assert WORKLOADS["latency"].title in sections
    assert WORKLOADS["small"].title not in sections
    assert not list(tmp_path.iterdir()), "--no-write wrote files"
