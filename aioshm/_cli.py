"""``python -m aioshm`` (or ``aioshm``): this user's named channels and primitives, for
operators.

::

    aioshm [list] [--json]          every named object of this user, one line each
    aioshm show NAME [--json]       one object, with each holder's pid and handles
    aioshm remove NAME [--force]    reclaim a stale object; --force retires a live one

Listing and showing change nothing: they read the object's tables under its mutex and
ask the kernel whether each holder is alive. An object is *stale* when no holder is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import _names, _procs

__all__ = ["describe", "main"]


def _holders(obj: _names.Named) -> list[dict[str, Any]]:
    holders: list[dict[str, Any]] = []
    for row in obj.table(sweep=False):
        holder: dict[str, Any] = {"pending": bool(row.reserved_by)}
        if row.pid == 0:  # pickled, or a child being started: its pickler or parent vouches
            holder["pid"], holder["pickled_by"] = None, row.vouched_by
            holder["alive"] = _procs.is_alive(row.vouched_by, row.vouched_started)
        else:
            holder["pid"] = row.pid
            holder["alive"] = _procs.is_alive(row.pid, row.started)
        holder["senders"], holder["receivers"] = row.sends, row.receives
        holders.append(holder)
    return holders


def describe(obj: _names.Named) -> dict[str, Any]:
    """A snapshot of a named channel or primitive, as plain data (what ``show --json``
    prints)."""
    if not isinstance(obj, _names.NamedQueue):
        return _describe_primitive(obj)
    queue = obj
    counters = queue.counters()
    retired = queue.retired
    holders = _holders(queue)
    live = [h for h in holders if h["alive"]]
    return {
        "name": queue.name,
        "kind": "channel",
        "capacity": queue.capacity,
        "max_message_size": queue.max_message_size,
        "buffered": counters.buffered,
        "slots_in_use": counters.writing + counters.reading,
        "senders": sum(h["senders"] for h in live),
        "receivers": sum(h["receivers"] for h in live),
        "sender_pids": sorted({h["pid"] or h["pickled_by"] for h in live if h["senders"]}),
        "receiver_pids": sorted({h["pid"] or h["pickled_by"] for h in live if h["receivers"]}),
        "stale": retired or not live,
        "holders": holders,
    }


def _describe_primitive(obj: _names.Named) -> dict[str, Any]:
    """A named primitive: its holders are processes with handles open (``handles``), or
    which used it and have not exited (0 handles: they may hold the lock or a permit)."""
    retired = obj.retired
    holders = []
    for holder in _holders(obj):
        holder["handles"] = holder.pop("senders")
        del holder["receivers"]
        holders.append(holder)
    live = [h for h in holders if h["alive"]]
    return {
        "name": obj.name,
        "kind": obj.kind.label,
        "handles": sum(h["handles"] for h in live),
        "holder_pids": sorted({h["pid"] or h["pickled_by"] for h in live}),
        "stale": retired or not live,
        "holders": holders,
    }


def _describe_name(name: str) -> dict[str, Any] | None:
    queue = _names.open_existing(name)
    return None if queue is None else describe(queue)


def _pids(pids: Sequence[int]) -> str:
    return ",".join(map(str, pids)) or "-"


_COLUMNS = (
    ("NAME", "name"),
    ("KIND", "kind"),
    ("CAPACITY", "capacity"),
    ("MSG SIZE", "max_message_size"),
    ("BUFFERED", "buffered"),
    ("IN USE", "slots_in_use"),
    ("SENDERS", "senders"),
    ("RECEIVERS", "receivers"),
    ("HOLDERS", "holders"),
    ("STATE", "state"),
)


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for title, _ in _COLUMNS]]
    for row in rows:
        shown = dict(row)
        if row["kind"] == "channel":
            shown["senders"] = f"{row['senders']} ({_pids(row['sender_pids'])})"
            shown["receivers"] = f"{row['receivers']} ({_pids(row['receiver_pids'])})"
            shown["holders"] = "-"
        else:
            shown["holders"] = f"{row['handles']} ({_pids(row['holder_pids'])})"
        shown["state"] = "stale" if row["stale"] else "live"
        cells.append([str(shown.get(key, "-")) for _, key in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def _show(info: dict[str, Any]) -> str:
    lines = [
        f"name:             {info['name']}",
        f"kind:             {info['kind']}",
        f"state:            {'stale (every holder is dead)' if info['stale'] else 'live'}",
    ]
    channel = info["kind"] == "channel"
    if channel:
        lines += [
            f"capacity:         {info['capacity']} slots",
            f"max message size: {info['max_message_size']} bytes",
            f"buffered:         {info['buffered']} messages",
            f"slots in use:     {info['slots_in_use']} (loans, views, large copies)",
            f"senders:          {info['senders']} (pids {_pids(info['sender_pids'])})",
            f"receivers:        {info['receivers']} (pids {_pids(info['receiver_pids'])})",
        ]
    else:
        lines.append(f"handles:          {info['handles']} (pids {_pids(info['holder_pids'])})")
    lines.append("holders:")
    for h in info["holders"]:
        who = f"pid {h['pid']}" if h["pid"] else f"pickled by pid {h['pickled_by']}"
        held = (
            f"{h['senders']} send, {h['receivers']} receive"
            if channel
            else f"{h['handles']} handles"
        )
        lines.append(f"  {who}: {held} ({'alive' if h['alive'] else 'dead'})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aioshm",
        description="List, show and remove this user's named aioshm channels and primitives.",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command")
    listing = commands.add_parser("list", help="every named object of this user (default)")
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    show = commands.add_parser("show", help="one channel or primitive, with its holders")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    remove = commands.add_parser(
        "remove", help="reclaim a stale channel or primitive (a live one only with --force)"
    )
    remove.add_argument("name")
    remove.add_argument(
        "--force",
        action="store_true",
        help="retire a live one too: a channel's senders get BrokenResourceError, its "
        "receivers what is buffered, then EndOfStream; a primitive loses its name, and "
        "its holders keep using it unnamed",
    )
    remove.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = sys.stdout

    if args.command in (None, "list"):
        rows = [info for name in _names.listing() if (info := _safe(name)) is not None]
        out.write((json.dumps(rows, indent=2) if args.json else _table(rows)) + "\n")
        return 0
    try:
        _names.dispatch(args.name)
    except (TypeError, ValueError) as exc:
        print(f"aioshm: {exc}", file=sys.stderr)
        return 2
    info = _describe_name(args.name)
    if info is None:
        print(f"aioshm: no channel or primitive named {args.name!r}", file=sys.stderr)
        return 1
    if args.command == "show":
        out.write((json.dumps(info, indent=2) if args.json else _show(info)) + "\n")
        return 0
    # remove
    if not info["stale"] and not args.force:
        if info["kind"] == "channel":
            who = (
                f"senders: pids {_pids(info['sender_pids'])}; "
                f"receivers: pids {_pids(info['receiver_pids'])}"
            )
        else:
            who = f"a {info['kind']} held by pids {_pids(info['holder_pids'])}"
        print(f"aioshm: {args.name!r} is live ({who}); use --force to retire it", file=sys.stderr)
        return 1
    queue = _names.open_existing(args.name)
    removed = False
    if queue is not None:
        if info["stale"]:
            queue.sweep(force=True)  # frees every dead holder, which removes the name
            removed = queue.remove_name() or not _names.open_existing(args.name)
        else:
            queue.force_retire()
            removed = True
    result = {"name": args.name, "removed": removed, "was_stale": info["stale"]}
    out.write((json.dumps(result) if args.json else f"removed {args.name}") + "\n")
    return 0


def _safe(name: str) -> dict[str, Any] | None:
    try:
        return _describe_name(name)
    except (OSError, ValueError):  # removed meanwhile, or not a channel
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
