"""The markdown report: the machine, the method, one table per workload, the targets."""

from __future__ import annotations

import os
import statistics
from datetime import timedelta

from . import machine
from .contenders import BATCH, CONTENDERS, Contender
from .runner import Results
from .targets import TARGETS, Target, median_ratio, median_value, values
from .workloads import LATENCY_WARMUP, Workload

__all__ = ["fmt_value", "label", "relative", "render"]

TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"

_LABELS = {c.key: c.label for c in CONTENDERS}


def label(key: str) -> str:
    """A contender's display name."""
    return _LABELS.get(key, key)


def fmt_value(value: float, unit: str) -> str:
    """A figure with the precision its unit deserves."""
    if unit == "msg/s":
        return f"{value:,.0f}"
    if unit == "GB/s":
        return f"{value:.2f}"
    return f"{value:,.1f}"


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return DASH
    return f"{ratio:.2f}{TIMES}" if ratio < 100 else f"{ratio:.0f}{TIMES}"


def _fmt_cpu(process: float | None, thread: float | None) -> str:
    if process is None or thread is None:
        return DASH
    return f"{process * 1e6:,.1f} µs ({thread * 1e6:,.1f})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _state(results: Results, workload: str, contender: Contender) -> tuple[str | None, int]:
    """``(error, failed round)`` of a contender on a workload, or ``(None, 0)``."""
    for i, m in enumerate(results.measurements.get((workload, contender.key), []), 1):
        if m.error is not None:
            return m.error, i
    return None, 0


def _judge(results: Results, target: Target) -> tuple[float | None, str]:
    ratio = median_ratio(results, target.workload, target.contender, target.other, target.metric)
    if ratio is None:
        return None, "not measured"
    return ratio, "✓ met" if target.met(ratio) else "✗ **missed**"


def _target_cell(results: Results, workload: str, contender: str) -> str:
    parts = []
    for target in TARGETS:
        if target.workload == workload and target.contender == contender:
            ratio, verdict = _judge(results, target)
            measured = f" (is {_fmt_ratio(ratio)})" if ratio is not None else ""
            parts.append(f"{target.describe(label(target.other))}{measured}: {verdict}")
    return "; ".join(parts)


def _table(results: Results, workload: Workload) -> list[str]:
    key = workload.key
    count = results.count(workload)
    throughput = workload.kind == "throughput"
    head = ["contender", f"median {workload.unit}", f"min {DASH} max"]
    head += [f"{TIMES} {label(b)}" for b in workload.baselines]
    if throughput:
        head.append("consumer CPU / msg: process (receiving thread)")
    head.append("target / met?")
    lines = [
        f"## {workload.title}",
        "",
        workload.description,
        "",
        f"{count:,} messages per measurement"
        + (" (in all, over the producers)." if workload.producers > 1 else "."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|",
    ]
    notes = []
    for contender in results.contenders[key]:
        name = contender.label
        row: list[str]
        if contender.key in results.skipped:
            row = [name, "skipped", "", *[""] * len(workload.baselines)]
            notes.append(f"- {name}: skipped, {results.skipped[contender.key]}")
        else:
            error, failed_round = _state(results, key, contender)
            got = values(results, key, contender.key)
            if error is not None:
                row = [name, "**failed**", "", *[""] * len(workload.baselines)]
                notes.append(f"- {name}: **failed** in round {failed_round}: `{_cell(error)}`")
            elif not got:
                row = [name, "not run", "", *[""] * len(workload.baselines)]
            else:
                med = statistics.median(got)
                row = [
                    name,
                    fmt_value(med, workload.unit),
                    f"{fmt_value(min(got), workload.unit)} {DASH} "
                    f"{fmt_value(max(got), workload.unit)}",
                ]
                for baseline in workload.baselines:
                    if baseline == contender.key:
                        row.append(f"1{TIMES}")
                    else:
                        row.append(_fmt_ratio(median_ratio(results, key, contender.key, baseline)))
            for m in results.measurements.get((key, contender.key), []):
                if m.warning:
                    notes.append(f"- {name}: {_cell(m.warning)}")
                    break
        if throughput:
            measured = row[1] not in ("skipped", "**failed**", "not run")
            row.append(
                _fmt_cpu(
                    median_value(results, key, contender.key, "cpu") if measured else None,
                    median_value(results, key, contender.key, "thread_cpu") if measured else None,
                )
            )
        row.append(_target_cell(results, key, contender.key))
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    if notes:
        lines += ["", *notes]
    return lines


def _targets(results: Results) -> list[str]:
    measured = {w.key for w in results.workloads}
    rows = [t for t in TARGETS if t.workload in measured]
    if not rows:
        return []
    titles = {w.key: w.title for w in results.workloads}
    lines = [
        "## Targets",
        "",
        "Each ratio is the median, over the rounds, of the ratio of the two figures "
        "measured in the same round. For latency and CPU time, lower is better, so the "
        "target is a maximum.",
        "",
        "| workload | contender | target | measured | met? |",
        "|---|---|---|---:|---|",
    ]
    met = 0
    for target in rows:
        ratio, verdict = _judge(results, target)
        met += verdict.startswith("✓")
        lines.append(
            f"| {titles[target.workload]} | {label(target.contender)} | "
            f"{target.describe(label(target.other))} | {_fmt_ratio(ratio)} | {verdict} |"
        )
    lines += ["", f"{met} of {len(rows)} targets met."]
    return lines


def _method(results: Results) -> list[str]:
    order = "a shuffled order" if results.rounds > 1 else "a shuffled order (one round)"
    lines = [
        "## Method",
        "",
        f"- {results.rounds} round(s); each round runs every contender of every workload "
        f"once, in {order} (seed {results.seed}). The tables give the median over the "
        "rounds and the range; every ratio is computed within a round, and the median of "
        "those ratios is given.",
        "- Every contender runs in real separate processes, started with the `fork` "
        "method, on the same data (the same float64 array for every contender), through "
        "the same loops; only the send and receive calls differ. Transports are created "
        "in the parent the way a user would create them and handed to the children as "
        "`multiprocessing.Process` arguments (pyzmq sockets are created in the children).",
        "- Every process opens its endpoint and reports ready (receivers before senders); "
        "once all are, each connects its endpoint to its peers (only iceoryx2 needs "
        "that, see below) and reports it; "
        "the clock starts when the parent releases them all at once, and stops when the "
        "consumer has the last message (`time.monotonic()`, one clock for all "
        "processes). The last message is checked against what was sent.",
        "- Consumer CPU / msg is the consumer process's CPU time (user + system, all its "
        "threads, `getrusage`) from the start to the last message, per message; in "
        "brackets, that of its receiving thread alone (`time.thread_time()`), which "
        "leaves out helper threads (aioshm's wait hub, pyzmq's I/O thread, "
        "aioprocessing's executor). Time spent waiting counts where it is spent spinning.",
        f"- Latency: the ping process times each round trip with `time.perf_counter()`; "
        f"{LATENCY_WARMUP} warm-up round trips are not counted.",
        "- Senders close their endpoints only once the consumer (or the ping side) has "
        "everything, as long-lived senders would. (Closing a pyzmq PUSH socket while "
        "messages were still in flight made the `zmq.asyncio` PULL side miss its wake-up "
        "and hang in about one run in ten on this machine; that shutdown race is not what "
        "is measured here.)",
        f"- A measurement that fails or takes more than {results.timeout:g} s is killed "
        "and reported as failed, with its error; that contender is not run again on that "
        "workload.",
        "- iceoryx2 is the reference for shared-memory transports. It has no async API, "
        "so it runs through blocking calls, in its two ways of waiting: a `WaitSet` on an "
        "event service notified after each send, and a busy poll. It would drop "
        "messages silently when its subscriber's buffer overflows, when the publisher "
        "starts before the subscriber, or when the publisher fills the buffer of a "
        "subscriber that has not yet attached to it (a subscriber attaches to a "
        "publisher created after it only when it next looks for samples; until then "
        "`send` discards and returns 0 recipients): safe overflow is disabled (the "
        "publisher retries instead), the subscriber is created first, and both ports "
        "connect (`update_connections`, `has_samples`) once every process is up, before "
        "the clock starts. The counts are checked: a send that reaches no subscriber or "
        "a notification that wakes no listener fails the measurement, and so does a "
        "receiver whose count falls short (nothing for a while) or goes over.",
        "- memcpy (one core, `np.copyto`) is context, not a ceiling: where the cache holds "
        "both buffers (8 MiB here) it copies from cache, faster than any transport "
        "between two cores; the 64 MiB workload shows it from memory.",
        "- *Two copies, no transport* is the ceiling of a copying receive: the sender's "
        "array copied into a shared slot and out into the receiver's own array, each copy "
        "on its own core, with nothing else (no header, no allocation, pages mapped before "
        "the clock starts). Both copies are needed by any transport that hands over an "
        "array the sender keeps as an array the receiver keeps, so no copying receive, "
        "aioshm's or iceoryx2's, can pass it; the column shows how close each comes.",
        f"- `send_many`/`recv_many` use batches of {BATCH}. `recv_view` rows read only the "
        "last message through (to check it); the others are mapped and released, which "
        "is the point of a view. The in-place `send_loan` row writes every byte of every "
        "message (`buf.fill(i)`) and reads nothing: it is what a producer that computes "
        "its result straight into the slot would get.",
    ]
    if results.quick:
        lines.append(
            "- **This is a `--quick` smoke run**: tiny message counts and one round. The "
            "figures say that everything runs, not how fast."
        )
    lines += ["", "Transports:", ""]
    seen = set()
    for contender in CONTENDERS:
        if (
            contender.setup
            and contender.setup not in seen
            and any(contender in cs for cs in results.contenders.values())
        ):
            seen.add(contender.setup)
            lines.append(f"- {contender.label}: {contender.setup}")
    return lines


def render(results: Results, command: str, chart: str | None, chart_note: str | None) -> str:
    """The whole page. ``chart`` is the image's path relative to the page."""
    when = results.started.strftime("%Y-%m-%d %H:%M UTC")
    took = str(timedelta(seconds=round(results.duration)))
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m aioshm.bench`: do not edit by hand. -->",
        "",
        "Regenerate this page and its chart from the repository root (with the `bench` "
        "extra installed, `pip install -e '.[bench]'`):",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Run on {when}; it took {took}. The 1-minute load average was "
        f"{results.load[0]:.2f} at the start and {results.load[1]:.2f} at the end.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {what} | {_cell(value)} |" for what, value in machine.describe()],
        "",
        "The machine is shared and noisy: read the ratios (taken within a round) rather "
        "than the absolute figures.",
        "",
    ]
    if chart:
        lines += [f"![Benchmark chart]({chart})", ""]
    elif chart_note:
        lines += [f"*No chart: {chart_note}.*", ""]
    lines += _targets(results)
    for workload in results.workloads:
        lines += ["", *_table(results, workload)]
    lines += ["", *_method(results), ""]
    return "\n".join(lines)


def relative(path: str, start_file: str) -> str:
    """``path`` relative to the directory of ``start_file`` (for the image link)."""
    return os.path.relpath(path, os.path.dirname(os.path.abspath(start_file)))
