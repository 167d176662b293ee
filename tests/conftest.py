"""Shared fixtures: start methods, backends, and a guard against leaked processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from typing import cast

import pytest

from .helpers import Context

START_METHODS = ("fork", "spawn", "forkserver")

# Ctrl-C as in a terminal. A shell without job control starts a background command with
# SIGINT ignored, and Python, trio, asyncio and every program a test starts would then
# keep ignoring it: the tests that deliver a real SIGINT would wait for ever. A handler
# (not an ignore) is also what lets the programs the tests exec start with the default.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Context:
    """A multiprocessing context for each start method."""
    return cast(Context, multiprocessing.get_context(request.param))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """Kill any child process a test left running, so that a failure cannot hang CI."""
    yield
    for child in multiprocessing.active_children():
        if child.is_alive() and child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)
        child.join(5)
