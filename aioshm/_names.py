"""Names: how any process of the machine finds a channel.

**One dispatch.** :func:`dispatch` parses every name given to
``open_channel(name=...)``, ``connect_send`` and ``connect_receive``. A plain name is
this machine's shared memory (this module). A URL (``scheme://...``) belongs to the
transport registered for its scheme in :data:`SCHEMES`; an unknown scheme is a
``ValueError`` that names it.

**Where a name lives.** A named channel is a file ``/dev/shm/aioshm.<name>``, created
with mode ``0o600`` (or ``mode=``), so the kernel's file permissions decide who may join:
another user gets ``PermissionError``. The file is made complete before it gets its name
(``O_TMPFILE``, then ``link``), so a process that finds the name always finds a whole
channel, and a creator killed half-way leaves nothing.

**How long it lives.** The name stays while any process table entry of the channel is
in use: an open handle in a live process, or a handle pickled and not yet unpickled (see
``_ownership``). The process that frees the last entry, by closing its last handle or by
a liveness sweep that finds the last holder dead, marks the channel retired (under the
channel's mutex, so that no one can join it any more) and removes the name. If every
holder is killed at once, nobody is left to do that: the file stays, *stale*, until the
next ``open_channel`` of any name by this user, or ``connect_*`` of that name, or
``aioshm remove``, sweeps it, finds every holder dead and removes it; ``aioshm list``
shows it as stale meanwhile.

**Removing a name safely.** Whoever removes a name first takes ``flock`` on the file it
has open and checks that the name still leads to that very file, so it never removes a
newer channel of the same name; a creator's ``link`` fails while the old file is there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from collections.abc import Callable
from typing import Any, Final

from ._layout import MAX_PROCS, P_KIND, P_PID, P_START, PROC_FIELDS, RETIRED, Segment
from ._shared import _K_ACTIVE, _K_FREE
from ._slotqueue import SlotQueue

__all__ = [
    "SCHEMES",
    "SHM_DIR",
    "NamedQueue",
    "connect_queue",
    "create_queue",
    "dispatch",
    "path_of",
    "queue_for",
]

#: Where named channels live.
SHM_DIR: Final = "/dev/shm"
PREFIX: Final = "aioshm."
MAX_NAME: Final = 200
_VALID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: What a valid name is, for error messages.
VALID_NAME: Final = (
    f"a valid name is 1 to {MAX_NAME} characters among letters, digits, '_', '-' and '.', "
    "not starting with '-' or '.' (for example 'frames' or 'job-queue.v2')"
)

#: Transports of other schemes: ``SCHEMES["nats"]`` serves ``nats://...`` names. Each is
#: called with the operation (``"open"``, ``"send"`` or ``"receive"``), the name and the
#: keyword arguments of the call.
SCHEMES: dict[str, Callable[..., Any]] = {}


def dispatch(name: object) -> Callable[..., Any] | None:
    """Parse ``name``: ``None`` for this machine's shared memory, otherwise the transport
    that serves its URL scheme.

    :raises TypeError: ``name`` is not a string
    :raises ValueError: ``name`` is malformed, or its URL scheme is unknown
    """
    if not isinstance(name, str):
        raise TypeError(f"a channel name must be a str, not {type(name).__name__}")
    url = _URL.match(name)
    if url:
        scheme = url.group(1).lower()
        if scheme not in SCHEMES:
            known = ", ".join(f"{s}://" for s in sorted(SCHEMES)) or "none yet"
            raise ValueError(
                f"unknown scheme {scheme!r} in the channel name {name!r} (schemes known: "
                f"{known}); a plain name is a channel of this machine, and {VALID_NAME}"
            )
        return SCHEMES[scheme]
    if not name or len(name) > MAX_NAME or not _VALID.match(name):
        raise ValueError(f"malformed channel name {name!r}: {VALID_NAME}")
    return None


def path_of(name: str) -> str:
    return os.path.join(SHM_DIR, PREFIX + name)


class NamedQueue(SlotQueue):
    """A slot queue reachable by name, which removes its name when no one holds it."""

    def __init__(self, segment: Segment, name: str = "") -> None:
        super().__init__(segment)
        self.name = name

    def __reduce__(self) -> tuple[object, ...]:
        return (NamedQueue, (self.segment, self.name))

    def _free_entry_locked(self, entry: int) -> None:
        super()._free_entry_locked(entry)
        if not self._ctl[RETIRED] and not self._entries_locked():
            self._ctl[RETIRED] = 1  # nobody may join any more
            self.defer(self.remove_name)

    def drop_handle(self, entry: int, side: int) -> None:
        super().drop_handle(entry, side)
        if not self._ctl[RETIRED]:
            # Holders that died unnoticed must not keep the name once the live ones
            # are gone.
            self.sweep(force=True)

    def _entries_locked(self) -> int:
        procs = self._procs
        bases = range(0, MAX_PROCS * PROC_FIELDS, PROC_FIELDS)
        return sum(procs[base + P_KIND] != _K_FREE for base in bases)

    def register_if_live(self, opened: tuple[int, int]) -> int | None:
        """Like :meth:`register`, or ``None`` if the channel is retired."""
        from . import _procs

        pid, started = _procs.my_identity()

        def register_locked() -> int | None:
            if self._ctl[RETIRED]:
                return None
            entry = self._new_entry_locked(_K_ACTIVE, opened)
            base = entry * PROC_FIELDS
            self._procs[base + P_PID] = pid
            self._procs[base + P_START] = started
            return entry

        return self.locked(register_locked)

    @property
    def retired(self) -> bool:
        return bool(self._ctl[RETIRED])

    def remove_name(self) -> bool:
        """Remove the name if it still leads to this channel; whether it did."""
        return _unlink_if_same(path_of(self.name), self.segment.fd)

    def force_retire(self) -> None:
        """Retire a live channel (``aioshm remove --force``): its senders get
        ``BrokenResourceError``, its receivers what is buffered, then ``EndOfStream``."""
        from ._layout import OPEN, P_OPEN
        from ._shared import RECV, SEND

        procs = self._procs

        def retire_locked() -> None:
            for base in range(0, MAX_PROCS * PROC_FIELDS, PROC_FIELDS):
                procs[base + P_OPEN] = procs[base + P_OPEN + 1] = 0
            self._ctl[OPEN] = self._ctl[OPEN + 1] = 0
            self._ctl[RETIRED] = 1
            self._ring_all_locked(SEND)
            self._ring_all_locked(RECV)

        self.locked(retire_locked)
        self.remove_name()


def queue_for(segment: Segment, name: str | None) -> SlotQueue:
    """The queue object for a mapped segment: a :class:`NamedQueue` if it has a name."""
    return NamedQueue(segment, name) if name else SlotQueue(segment)


def _unlink_if_same(path: str, fd: int) -> bool:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        try:
            found = os.stat(path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        if (found.st_dev, found.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        os.unlink(path)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def open_existing(name: str) -> NamedQueue | None:
    """Map the channel named ``name``; ``None`` if there is none.

    :raises PermissionError: it belongs to another user, whose mode does not let us in
    """
    path = path_of(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        try:
            owner = os.stat(path).st_uid
        except OSError:
            owner = -1
        raise PermissionError(
            exc.errno,
            f"the channel named {name!r} belongs to user {owner}, and its mode does not "
            "let this user join it (the creator may widen it with open_channel(mode=...))",
            path,
        ) from None
    try:
        segment = Segment._attach(fd)  # takes the descriptor over (closes it on failure)
    except (RuntimeError, ValueError, OSError) as exc:
        raise FileExistsError(
            errno.EEXIST, f"{path} exists but is not an aioshm channel ({exc})", path
        ) from None
    return NamedQueue(segment, name)


def _check_not_stale(queue: NamedQueue) -> bool:
    """Sweep ``queue``: whether it is still live (a stale one removes its name)."""
    queue.sweep(force=True)
    if queue.retired:
        queue.remove_name()  # its retirer may have been killed before removing it
        return False
    return True


def reclaim_stale() -> list[str]:
    """Remove every stale name of this user (every holder dead); the names removed."""
    removed = []
    for name in listing():
        try:
            queue = open_existing(name)
            if queue is not None and not _check_not_stale(queue):
                removed.append(name)
        except OSError:  # removed meanwhile, or not a channel
            continue
    return removed


def create_queue(
    name: str, capacity: int, max_message_size: int, mode: int
) -> tuple[NamedQueue, int]:
    """Create the channel ``name``, holding one handle of each side; ``(queue, entry)``.

    Creating a name also reclaims this user's stale ones, whatever their names.

    :raises FileExistsError: a live channel has that name
    """
    reclaim_stale()
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits such as 0o600 or 0o660, not {mode!r}")
    if mode & 0o600 != 0o600:
        raise ValueError(f"mode {mode:#o} must let the owner read and write (0o600)")
    path = path_of(name)
    try:
        fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot create a named channel in {SHM_DIR}: {exc.strerror}"
        ) from None
    try:
        os.fchmod(fd, mode)  # whatever the umask
        # Sized and every page reserved: a full /dev/shm is an OSError here.
        queue = NamedQueue.create(capacity, max_message_size, fd)
    except BaseException:
        os.close(fd)
        raise
    queue.name = name
    entry = queue.register((1, 1))
    while True:
        if _publish(fd, name):
            return queue, entry
        existing = open_existing(name)
        if existing is not None and _check_not_stale(existing):
            raise FileExistsError(
                errno.EEXIST,
                f"a channel named {name!r} exists and is in use: connect to it with "
                "aioshm.connect_send/connect_receive, or pick another name",
                path,
            )


def _publish(fd: int, name: str) -> bool:
    """Give the complete file ``fd`` its name; ``False`` if the name is taken."""
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names an O_TMPFILE file; a directory
    # fd makes os.link use linkat rather than link, which would not follow the link.
    directory = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", PREFIX + name, dst_dir_fd=directory)
    except FileExistsError:
        return False
    finally:
        os.close(directory)
    return True


def connect_queue(name: str, opened: tuple[int, int], timeout: float) -> tuple[NamedQueue, int]:
    """Join the channel ``name`` with ``opened`` handles per side; ``(queue, entry)``.

    Waits up to ``timeout`` seconds for it to be created.

    :raises FileNotFoundError: no live channel has that name
    """
    if timeout < 0:
        raise ValueError(f"timeout must be 0 or more, not {timeout}")
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        queue = open_existing(name)
        if queue is not None and _check_not_stale(queue):
            entry = queue.register_if_live(opened)
            if entry is not None:
                return queue, entry
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waited = f" within {timeout} s" if timeout else ""
            raise FileNotFoundError(
                errno.ENOENT,
                f"no channel named {name!r} is open{waited}: create it with "
                f"aioshm.open_channel(name={name!r}), or pass timeout= to wait for it",
                path_of(name),
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def listing() -> list[str]:
    """Names of the named objects in :data:`SHM_DIR` that belong to this user."""
    uid = os.getuid()
    names = []
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(PREFIX):
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    names.append(entry.name[len(PREFIX) :])
            except FileNotFoundError:
                continue
    return sorted(names)


def _nats(op: str, name: str, **kwargs: Any) -> Any:
    """The ``nats://`` and ``tls://`` transport, imported on first use (it needs
    ``pip install 'aioshm[nats]'``)."""
    try:
        from .nats import transport
    except ImportError as exc:
        raise ImportError(
            f"the channel {name.rsplit('@', maxsplit=1)[-1]!r} is a NATS URL, which needs nats-py: "
            "pip install 'aioshm[nats]'"
        ) from exc
    return transport(op, name, **kwargs)


SCHEMES["nats"] = SCHEMES["tls"] = _nats
