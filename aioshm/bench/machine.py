"""What the benchmark ran on: CPUs, operating system, and the versions that matter."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from typing import Final

__all__ = ["PEER_DISTRIBUTIONS", "cpu_model", "describe", "version"]

#: Distributions whose versions the report gives, with what they are.
PEER_DISTRIBUTIONS: Final = ("aioprocessing", "faster-fifo", "pyzmq", "matplotlib")


def version(distribution: str) -> str | None:
    """The installed version of a distribution, or ``None``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's model name, if the system says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _libzmq() -> str | None:
    try:
        return str(importlib.import_module("zmq").zmq_version())
    except ImportError:
        return None


def describe() -> list[tuple[str, str]]:
    """``(what, value)`` rows for the report's header."""
    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    cpu = f"{cpus}" if usable == cpus else f"{cpus} ({usable} usable by this process)"
    model = cpu_model()
    if model:
        cpu += f", {model}"
    peers = []
    for dist in PEER_DISTRIBUTIONS:
        v = version(dist)
        text = f"{dist} {v}" if v else f"{dist} not installed"
        if dist == "pyzmq" and v:
            text += f" (libzmq {_libzmq()})"
        peers.append(text)
    return [
        ("CPUs", cpu),
        ("System", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("numpy", version("numpy") or "?"),
        ("anyio", version("anyio") or "?"),
        ("trio", version("trio") or "not installed"),
        ("aioshm", f"{version('aioshm') or '?'} ({_hot_path()})"),
        ("Peers", ", ".join(peers)),
    ]


def _hot_path() -> str:
    """Which hot path aioshm runs on here: its C extension, or pure Python."""
    from aioshm._slotqueue import speedups

    if speedups is not None:
        return "C hot path, aioshm._speedups"
    return "pure-Python hot path: aioshm._speedups not built, or AIOSHM_PURE_PYTHON=1"
