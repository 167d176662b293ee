"""The idle-CPU benchmark (``python -m aioshm.bench.idle``) runs and reports a figure."""

from __future__ import annotations

import os

import pytest

from aioshm.bench import idle


def test_cpu_seconds_of_this_process_grows() -> None:
    before = idle.cpu_seconds(os.getpid())
    sum(i * i for i in range(200_000))
    assert idle.cpu_seconds(os.getpid()) > before


@pytest.mark.parametrize("mode", ["asyncio", "blocking"])
def test_measure_reports_a_percentage(mode: str) -> None:
    percent = idle.measure(2, 0.3, mode)
    assert 0.0 <= percent < 100.0


def test_main_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert idle.main(["--waiters", "1", "--seconds", "0.2", "--mode", "trio"]) == 0
    out = capsys.readouterr().out
    assert "| idle processes | % of one core |" in out
    assert "| 1 |" in out
