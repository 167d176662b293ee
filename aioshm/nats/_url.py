"""Channel addresses: ``nats://[user:password@]host:port[,host:port...]/CHANNEL[?query]``.

The scheme is ``nats`` (plain TCP) or ``tls`` (TLS from the first byte of each
connection). Query parameters, each optional:

``replicas``   copies of the channel's data in a cluster (1 to 5; default 1)
``storage``    ``file`` (default: survives a server restart) or ``memory``
``heartbeat``  seconds within which a dead process's handles stop counting (default 5)
``ack_wait``   seconds after which a message held by a dead receiver is delivered again
               (default 5)
``prefetch``   messages a receiving process may pull ahead of its callers (default 0)
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

__all__ = ["Address", "parse"]

SCHEMES = ("nats", "tls")
_CHANNEL = re.compile(r"[A-Za-z0-9_-]{1,200}")
_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


@dataclass(frozen=True)
class Address:
    """A parsed channel address."""

    url: str
    """The address as given, with any password hidden (for messages)."""
    scheme: str
    servers: tuple[str, ...]
    """``scheme://host:port`` of each server."""
    channel: str
    source: str = field(default="", repr=False)
    """The address exactly as given (with any password)."""
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    replicas: int = 1
    storage: str = "file"
    heartbeat: float = 5.0
    ack_wait: float = 5.0
    prefetch: int = 0

    @property
    def key(self) -> tuple[object, ...]:
        """What identifies one channel on one set of servers with one identity."""
        return (self.servers, self.channel, self.user, self.password)


def _bad(url: str, what: str) -> ValueError:
    return ValueError(
        f"malformed NATS channel address {url!r}: {what}; the form is "
        "nats://[user:password@]host:port[,host:port...]/CHANNEL[?replicas=N&storage=file|memory]"
    )


def _number(url: str, name: str, text: str, kind: type[int] | type[float], low: float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise _bad(url, f"{name}={text!r} is not a number") from None
    if value < low:
        raise _bad(url, f"{name} must be at least {low}, not {text}")
    return value


def is_network(name: str) -> bool:
    """Whether ``name`` names a network channel (``nats://`` or ``tls://``)."""
    return name.partition("://")[0].lower() in SCHEMES and "://" in name


def parse(url: str) -> Address:
    """Parse a channel address.

    :raises ValueError: an unknown scheme, no server, a bad port, no channel name, a
        channel name that is not letters, digits, ``-`` and ``_``, or a bad query
        parameter; the message names what was wrong
    """
    if not isinstance(url, str):
        raise TypeError(f"a channel address is a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise _bad(url, "no scheme (nats:// or tls://)")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme!r} in channel address {url!r}: network channels "
            "use nats:// or tls://"
        )
    netloc, slash, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    user = password = None
    shown = netloc
    if "@" in netloc:
        credentials, _, netloc = netloc.rpartition("@")
        user_text, colon, password_text = credentials.partition(":")
        user = urllib.parse.unquote(user_text) or None
        password = urllib.parse.unquote(password_text) if colon else None
        shown = f"{user_text}:***@{netloc}" if colon else f"{user_text}@{netloc}"
    if not netloc:
        raise _bad(url, "no server")
    servers = []
    for part in netloc.split(","):
        match = _HOST_PORT.fullmatch(part)
        if match is None:
            raise _bad(url, f"server {part!r} is not host:port")
        if not 0 < int(match.group(1)) < 65536:
            raise _bad(url, f"port {match.group(1)} is out of range")
        servers.append(f"{scheme}://{part}")
    if not slash or not path:
        raise _bad(url, "no channel name after the servers")
    if not _CHANNEL.fullmatch(path):
        raise _bad(url, f"channel name {path!r} must be letters, digits, '-' and '_'")
    options: dict[str, object] = {}
    for name, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        if name == "replicas":
            replicas = int(_number(url, name, value, int, 1))
            if replicas > 5:
                raise _bad(url, f"replicas must be at most 5, not {replicas}")
            options[name] = replicas
        elif name == "storage":
            if value not in ("file", "memory"):
                raise _bad(url, f"storage must be file or memory, not {value!r}")
            options[name] = value
        elif name in ("heartbeat", "ack_wait"):
            options[name] = _number(url, name, value, float, 0.5)
        elif name == "prefetch":
            options[name] = int(_number(url, name, value, int, 0))
        else:
            raise _bad(
                url,
                f"unknown parameter {name!r} (known: replicas, storage, heartbeat, "
                "ack_wait, prefetch)",
            )
    shown_url = f"{scheme}://{shown}/{path}" + (f"?{query}" if query else "")
    return Address(
        url=shown_url,
        scheme=scheme,
        servers=tuple(servers),
        channel=path,
        source=url,
        user=user,
        password=password,
        **options,  # type: ignore[arg-type]
    )
