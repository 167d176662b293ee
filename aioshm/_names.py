"""Names: how any process of the machine finds a channel, or a named primitive.

**One mechanism.** Every named object, a channel or a primitive (``Lock(name=...)``,
:mod:`aioshm._named_sync`), is made by :func:`create_named`, found by
:func:`connect_named` and :func:`open_existing`, and removes its name through the
:class:`Named` mixin of its shared object. Its segment records its kind
(``ctl[KIND]``, one of :data:`KINDS`), so that a name joined as another kind is a
``TypeError`` naming both. What is said below of channels holds for every kind.

**One dispatch.** :func:`dispatch` parses every name given to
``open_channel(name=...)``, ``connect_send`` and ``connect_receive``. A plain name is
this machine's shared memory (this module). A URL (``scheme://...``) belongs to the
transport registered for its scheme in :data:`SCHEMES`; an unknown scheme is a
``ValueError`` that names it. Primitives are machine-local: :func:`check_local` refuses
a URL for them.

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
from typing import Any, Final, NamedTuple, TypeVar

from ._layout import KIND, MAX_PROCS, P_KIND, P_PID, P_START, PROC_FIELDS, RETIRED, Segment
from ._shared import _K_ACTIVE, _K_FREE, SharedObject
from ._slotqueue import SlotQueue

__all__ = [
    "KINDS",
    "SCHEMES",
    "SHM_DIR",
    "Kind",
    "Named",
    "NamedQueue",
    "check_local",
    "connect_named",
    "connect_queue",
    "create_named",
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
        raise TypeError(f"a name must be a str, not {type(name).__name__}")
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
        raise ValueError(f"malformed name {name!r}: {VALID_NAME}")
    return None


def path_of(name: str) -> str:
    return os.path.join(SHM_DIR, PREFIX + name)


class Named(SharedObject):
    """What every named object adds to its shared object (a mixin, first in the bases):
    its name, which it removes when no one holds the object any more."""

    name: str = ""

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

    def _joined_locked(self, entry: int) -> None:
        """A new holder's entry, just registered (subclasses clear leftovers there)."""

    def register_if_live(self, opened: tuple[int, int]) -> int | None:
        """Like :meth:`register`, or ``None`` if the object is retired."""
        from . import _procs

        pid, started = _procs.my_identity()

        def register_locked() -> int | None:
            if self._ctl[RETIRED]:
                return None
            entry = self._new_entry_locked(_K_ACTIVE, opened)
            base = entry * PROC_FIELDS
            self._procs[base + P_PID] = pid
            self._procs[base + P_START] = started
            self._joined_locked(entry)
            return entry

        return self.locked(register_locked)

    @property
    def retired(self) -> bool:
        return bool(self._ctl[RETIRED])

    @property
    def kind(self) -> Kind:
        """What the object is (a channel, a Lock, ...)."""
        return KINDS[int(self._ctl[KIND])]

    def remove_name(self) -> bool:
        """Remove the name if it still leads to this object; whether it did."""
        return _unlink_if_same(path_of(self.name), self.segment.fd)

    def force_retire(self) -> None:
        """Retire a live object (``aioshm remove --force``): nobody may join it any
        more, and its name goes. Its holders keep what they have (subclasses do more)."""

        def retire_locked() -> None:
            self._ctl[RETIRED] = 1

        self.locked(retire_locked)
        self.remove_name()


def a(label: str) -> str:
    """``label`` with its indefinite article: "a channel", "an Event"."""
    spelled = label[:2].isupper()  # an initial read as a letter: "an RLock"
    vowel = label[:1] in ("AEFHILMNORSX" if spelled else "AEIOUaeiou")
    return f"{'an' if vowel else 'a'} {label}"


class Kind(NamedTuple):
    """One kind of named object: how to map it, and how to talk about it."""

    label: str
    """What it is called in messages and in ``aioshm list`` (``"channel"``, ``"Lock"``)."""
    wrap: Callable[[Segment, str], Named]
    """The shared object over a mapped segment of this kind, with its name."""
    create: str
    """How to create one of a name (``{name}`` is replaced), for messages."""
    connect: str
    """How to join one by name, for messages."""


#: Every kind of named object, by the number its segment records in ``ctl[KIND]``.
#: Channels are 0; the primitives register theirs (:mod:`aioshm._named_sync`).
KINDS: dict[int, Kind] = {}


class NamedQueue(Named, SlotQueue):
    """A slot queue reachable by name, which removes its name when no one holds it."""

    def __init__(self, segment: Segment, name: str = "") -> None:
        super().__init__(segment)
        self.name = name

    def __reduce__(self) -> tuple[object, ...]:
        return (NamedQueue, (self.segment, self.name))

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


KINDS[0] = Kind(
    "channel",
    NamedQueue,
    "aioshm.open_channel(name={name!r})",
    "aioshm.connect_send/connect_receive",
)


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


def open_existing(name: str) -> Named | None:
    """Map the object named ``name``; ``None`` if there is none.

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
            f"the object named {name!r} belongs to user {owner}, and its mode does not "
            "let this user join it (the creator may widen it with mode=...)",
            path,
        ) from None
    try:
        segment = Segment._attach(fd)  # takes the descriptor over (closes it on failure)
    except (RuntimeError, ValueError, OSError) as exc:
        raise FileExistsError(
            errno.EEXIST, f"{path} exists but is not an aioshm object ({exc})", path
        ) from None
    kind = KINDS.get(int(segment.ctl[KIND]))
    if kind is None:
        raise FileExistsError(
            errno.EEXIST,
            f"{path} is an aioshm object of a kind this version does not know "
            f"({int(segment.ctl[KIND])})",
            path,
        )
    return kind.wrap(segment, name)


def _check_not_stale(obj: Named) -> bool:
    """Sweep ``obj``: whether it is still live (a stale one removes its name)."""
    obj.sweep(force=True)
    if obj.retired:
        obj.remove_name()  # its retirer may have been killed before removing it
        return False
    return True


def reclaim_stale() -> list[str]:
    """Remove every stale name of this user (every holder dead); the names removed."""
    removed = []
    for name in listing():
        try:
            obj = open_existing(name)
            if obj is not None and not _check_not_stale(obj):
                removed.append(name)
        except OSError:  # removed meanwhile, or not an aioshm object
            continue
    return removed


N = TypeVar("N", bound=Named)


def create_named(
    name: str, kind: int, mode: int, make: Callable[[int], N], opened: tuple[int, int]
) -> tuple[N, int]:
    """Create the object ``name`` of ``kind``, holding ``opened`` handles per side;
    ``(object, entry)``. ``make(fd)`` builds the object in the empty file ``fd``, which it
    takes over if it succeeds (on failure, ``fd`` is closed here).

    Creating a name also reclaims this user's stale ones, whatever their names.

    :raises FileExistsError: a live object has that name
    """
    reclaim_stale()
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits such as 0o600 or 0o660, not {mode!r}")
    if mode & 0o600 != 0o600:
        raise ValueError(f"mode {mode:#o} must let the owner read and write (0o600)")
    what = KINDS[kind]
    path = path_of(name)
    try:
        fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot create {a('named ' + what.label)} in {SHM_DIR}: {exc.strerror}"
        ) from None
    try:
        os.fchmod(fd, mode)  # whatever the umask
        # Sized and every page reserved: a full /dev/shm is an OSError here.
        obj = make(fd)
    except BaseException:
        os.close(fd)
        raise
    obj.name = name
    obj.segment.ctl[KIND] = kind  # before it has a name: nobody sees it without
    entry = obj.register(opened)
    while True:
        if _publish(fd, name):
            return obj, entry
        existing = open_existing(name)
        if existing is not None and _check_not_stale(existing):
            theirs = existing.kind
            raise FileExistsError(
                errno.EEXIST,
                f"{a(theirs.label)} named {name!r} exists and is in use: connect to it with "
                f"{theirs.connect}, or pick another name",
                path,
            )


def create_queue(
    name: str, capacity: int, max_message_size: int, mode: int
) -> tuple[NamedQueue, int]:
    """Create the channel ``name``, holding one handle of each side; ``(queue, entry)``.

    :raises FileExistsError: a live object has that name
    """

    def make(fd: int) -> NamedQueue:
        return NamedQueue.create(capacity, max_message_size, fd)

    return create_named(name, 0, mode, make, (1, 1))


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


def connect_named(
    name: str, kind: int, opened: tuple[int, int], timeout: float
) -> tuple[Named, int]:
    """Join the object ``name``, which must be of ``kind``, with ``opened`` handles per
    side; ``(object, entry)``. Waits up to ``timeout`` seconds for it to be created.

    :raises FileNotFoundError: no live object has that name
    :raises TypeError: the object of that name is of another kind
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if timeout < 0:
        raise ValueError(f"timeout must be 0 or more, not {timeout}")
    wanted = KINDS[kind]
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        obj = open_existing(name)
        if obj is not None and _check_not_stale(obj):
            found = int(obj.segment.ctl[KIND])
            if found != kind:
                raise TypeError(
                    f"{name!r} names {a(KINDS[found].label)}, not {a(wanted.label)}: join it "
                    f"with {KINDS[found].connect}"
                )
            entry = obj.register_if_live(opened)
            if entry is not None:
                return obj, entry
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waited = f" within {timeout} s" if timeout else ""
            raise FileNotFoundError(
                errno.ENOENT,
                f"no {wanted.label} named {name!r} is open{waited}: create it with "
                f"{wanted.create.format(name=name)}, or pass timeout= to wait for it",
                path_of(name),
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def connect_queue(name: str, opened: tuple[int, int], timeout: float) -> tuple[NamedQueue, int]:
    """Join the channel ``name`` with ``opened`` handles per side; ``(queue, entry)``.

    :raises FileNotFoundError: no live channel has that name
    :raises TypeError: ``name`` is a primitive's
    """
    queue, entry = connect_named(name, 0, opened, timeout)
    assert isinstance(queue, NamedQueue)
    return queue, entry


def check_local(name: object, what: str) -> str:
    """Check the name of a named primitive, ``what``: a plain name (primitives are
    machine-local; a URL is a ``ValueError`` that says so)."""
    if isinstance(name, str) and _URL.match(name):
        raise ValueError(
            f"{name!r} is a URL, but {a(what)} is local to this machine: its name is a "
            f"plain name, and {VALID_NAME}"
        )
    dispatch(name)
    assert isinstance(name, str)
    return name


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
