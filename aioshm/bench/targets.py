"""The performance targets from the issue, and the statistics they are judged on.

Every ratio is taken *within a round* (both figures measured minutes apart at most,
under the same load), and the median of those per-round ratios is what is reported and
judged. A target is judged on the rounds where both contenders succeeded.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Final

from .runner import Measurement, Results

__all__ = ["TARGETS", "Target", "median_ratio", "median_value", "values"]


@dataclass(frozen=True)
class Target:
    """``metric(contender) / metric(other)`` must satisfy ``relation threshold``."""

    workload: str
    contender: str
    other: str
    #: ``">="``, ``"<="`` or ``"<"``
    relation: str
    threshold: float
    #: ``"value"`` (the workload's figure), ``"cpu"`` (consumer process CPU time per
    #: message) or ``"thread_cpu"`` (the consumer's receiving thread only)
    metric: str = "value"

    def met(self, ratio: float) -> bool:
        """Whether ``ratio`` meets the target."""
        if self.relation == ">=":
            return ratio >= self.threshold
        if self.relation == "<=":
            return ratio <= self.threshold
        return ratio < self.threshold

    def describe(self, other_label: str) -> str:
        """E.g. ``>= 2.5 times multiprocessing.Queue``, with the signs spelt out."""
        sign = {">=": "≥", "<=": "≤", "<": "<"}[self.relation]
        what = "CPU/msg " if self.metric == "cpu" else ""
        return f"{what}{sign} {self.threshold:g}\N{MULTIPLICATION SIGN} {other_label}"


#: The targets, issue 13's first (in its order): iceoryx2 is the reference; then the
#: earlier issues' targets that it does not supersede.
TARGETS: Final[list[Target]] = [
    Target("small", "aioshm-asyncio", "iceoryx2-wait", ">=", 1.1),
    Target("small", "aioshm-trio", "aioshm-asyncio", ">=", 0.9),
    Target("latency", "aioshm-asyncio", "mp-pipe", "<=", 0.5),
    Target("latency", "aioshm-trio", "mp-pipe", "<=", 1.0),
    Target("fanin", "aioshm-asyncio", "mp-queue", ">=", 2),
    Target("large", "aioshm-asyncio", "iceoryx2-wait", ">=", 1.2),
    Target("large", "aioshm-view", "iceoryx2-inplace", ">=", 1.0),
    Target("large", "aioshm-view", "aioshm-asyncio", "<=", 0.1, metric="cpu"),
    Target("small", "aioshm-asyncio", "aioprocessing", ">=", 20),
    Target("small", "aioshm-batch", "mp-queue", ">=", 5),
    Target("large", "aioshm-asyncio", "mp-queue", ">=", 10),
    Target("latency", "aioshm-asyncio", "aioprocessing", "<=", 0.35),
]


def _metric(measurement: Measurement, metric: str) -> float | None:
    if metric == "cpu":
        return measurement.cpu_per_message
    if metric == "thread_cpu":
        return measurement.thread_cpu_per_message
    return measurement.value


def values(results: Results, workload: str, contender: str, metric: str = "value") -> list[float]:
    """The successful figures of a contender, one per round."""
    out = []
    for m in results.measurements.get((workload, contender), []):
        v = _metric(m, metric)
        if m.error is None and v is not None:
            out.append(v)
    return out


def median_value(
    results: Results, workload: str, contender: str, metric: str = "value"
) -> float | None:
    """The median over rounds, or ``None`` if it never succeeded."""
    got = values(results, workload, contender, metric)
    return statistics.median(got) if got else None


def median_ratio(
    results: Results, workload: str, contender: str, other: str, metric: str = "value"
) -> float | None:
    """The median over rounds of ``contender / other`` measured in the same round."""
    mine = results.measurements.get((workload, contender), [])
    theirs = results.measurements.get((workload, other), [])
    ratios = []
    for a, b in zip(mine, theirs, strict=False):
        x, y = _metric(a, metric), _metric(b, metric)
        if a.error is None and b.error is None and x is not None and y:
            ratios.append(x / y)
    return statistics.median(ratios) if ratios else None
