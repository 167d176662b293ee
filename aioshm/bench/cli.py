"""The command line: ``python -m aioshm.bench [--quick] [--rounds N] [--only WORKLOAD] ...``."""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
from collections.abc import Sequence

from .chart import draw
from .report import relative, render
from .runner import run
from .workloads import WORKLOADS

__all__ = ["main"]

#: Rounds of a full run: the latency and fan-in figures are the median of at least 5.
DEFAULT_ROUNDS = 5
#: Seconds one measurement may take before it is killed (full run, ``--quick``).
TIMEOUT = 120.0
QUICK_TIMEOUT = 30.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aioshm.bench",
        description=(
            "Benchmark aioshm against the seed's FloatChannel, multiprocessing and the "
            "installed peers; write a markdown report and a chart."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny message counts, one round (a few seconds)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="N",
        help=f"rounds (default {DEFAULT_ROUNDS}, or 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(WORKLOADS),
        metavar="WORKLOAD",
        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--output",
        default=os.path.join("docs", "benchmarks.md"),
        metavar="PATH",
        help="markdown report (default docs/benchmarks.md)",
    )
    parser.add_argument(
        "--chart",
        default=os.path.join("docs", "img", "benchmarks.png"),
        metavar="PATH",
        help="PNG chart (default docs/img/benchmarks.png)",
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="write no files; print the report on stdout only",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the shuffled order (default: random)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"kill a measurement after this long (default {TIMEOUT:g}, "
        f"{QUICK_TIMEOUT:g} with --quick)",
    )
    parser.add_argument(
        "--idle",
        action="store_true",
        help="instead, measure the CPU that processes idle in recv cost (4, 16 and 64 of "
        "them, 10 s each; python -m aioshm.bench.idle --help for more)",
    )
    parser.add_argument(
        "--network",
        action="store_true",
        help="instead, the network section: aioshm over NATS JetStream against raw "
        "nats-py JetStream and pyzmq, on loopback (needs aioshm[nats]; with --quick, a "
        "smoke run; python -m aioshm.bench.network --help for more)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    if args.idle:
        from .idle import main as idle

        return idle([])
    if args.network:
        from .network import main as network

        return network(["--quick"] if args.quick else [])
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else DEFAULT_ROUNDS)
    if rounds < 1:
        _parser().error("--rounds must be at least 1")
    timeout = args.timeout or (QUICK_TIMEOUT if args.quick else TIMEOUT)
    workloads = [w for key, w in WORKLOADS.items() if not args.only or key in args.only]
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    results = run(workloads, rounds=rounds, quick=args.quick, timeout=timeout, seed=seed)

    command = " ".join(["python -m aioshm.bench", *map(shlex.quote, args_list)])
    chart_link: str | None = None
    chart_note: str | None = None
    if not args.no_write:
        chart_note = draw(results, args.chart)
        if chart_note is None:
            chart_link = relative(args.chart, args.output)
        else:
            print(f"no chart: {chart_note}", file=sys.stderr)
    page = render(results, command, chart_link, chart_note)
    if not args.no_write:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(page)
        print(
            f"wrote {args.output}" + ("" if chart_link is None else f" and {args.chart}"),
            file=sys.stderr,
        )
    print(page)
    return 0
