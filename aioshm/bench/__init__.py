"""The benchmark: ``python -m aioshm.bench``.

It runs aioshm (on asyncio, on trio, blocking, and its batch, view and loan variants),
the seed's one-slot ``FloatChannel``, and the peers that are installed
(``multiprocessing.Queue`` and ``Pipe``, aioprocessing, faster-fifo, pyzmq, and
iceoryx2, the reference) through the same workloads, in separate processes, interleaved
over several rounds, and writes ``docs/benchmarks.md`` and ``docs/img/benchmarks.png``.
See ``--help``.

Modules, one job each: :mod:`.workloads` (what is sent, and the loops),
:mod:`.contenders` (the transports), :mod:`.iox` (iceoryx2), :mod:`.runner` (processes,
rounds, timeouts), :mod:`.targets` (the issue's targets, per-round ratios),
:mod:`.report` (markdown), :mod:`.chart` (the PNG), :mod:`.machine` (what it ran on),
:mod:`.cli` (the command line).
"""

from .cli import main

__all__ = ["main"]
