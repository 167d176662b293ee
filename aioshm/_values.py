"""Shared ctypes storage: :func:`Value` and :func:`Array`, as in ``multiprocessing``.

The storage is a ctypes object laid over the payload slot of a shared segment
(``ctype.from_buffer``), so every process that maps the segment reads and writes the
same bytes, and :meth:`RawArray.numpy` is a view of them, not a copy. With a lock (the
default), the storage lives in the lock's own segment, a block of a shared arena
(:mod:`aioshm._arena`).

Unlike ``multiprocessing``'s synchronized wrappers, reading or writing ``.value`` (or an
item) does not take the lock: a lock that has to be awaited cannot be taken by a
property. A single aligned read or write of a simple type is atomic anyway; hold the
lock for a read-modify-write: ``async with counter.get_lock(): counter.value += 1``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Literal, overload

import numpy as np

from . import _arena
from ._layout import Segment
from ._lock import Lock, RLock
from ._posix import supported
from ._primitive import _check_spawning

__all__ = ["Array", "RawArray", "RawValue", "SynchronizedArray", "SynchronizedValue", "Value"]

#: The typecodes of ``multiprocessing.sharedctypes`` (those of the ``array`` module).
typecode_to_type: dict[str, Any] = {
    "c": ctypes.c_char,
    "u": ctypes.c_wchar,
    "b": ctypes.c_byte,
    "B": ctypes.c_ubyte,
    "h": ctypes.c_short,
    "H": ctypes.c_ushort,
    "i": ctypes.c_int,
    "I": ctypes.c_uint,
    "l": ctypes.c_long,
    "L": ctypes.c_ulong,
    "q": ctypes.c_longlong,
    "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}
_CTYPES = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)


def _ctype(typecode_or_type: str | type[Any]) -> Any:
    if isinstance(typecode_or_type, str):
        try:
            return typecode_to_type[typecode_or_type]
        except KeyError:
            codes = "".join(sorted(typecode_to_type))
            raise ValueError(
                f"unknown typecode {typecode_or_type!r} (expected one of {codes!r})"
            ) from None
    if isinstance(typecode_or_type, type) and issubclass(typecode_or_type, _CTYPES):
        return typecode_or_type
    raise TypeError(f"expected a typecode or a ctypes type, not {typecode_or_type!r}")


def _segment(nbytes: int) -> Segment:
    if not supported():
        raise OSError("aioshm needs Linux (robust process-shared mutexes)")
    return _arena.allocate(1, nbytes)


def _typecode_of(ctype: Any) -> str:
    """The typecode of a simple ctypes type, for a named value or array."""
    for code, known in typecode_to_type.items():
        if known is ctype:
            return code
    raise TypeError(
        f"a named Value or Array holds a typecode's type ({''.join(sorted(typecode_to_type))!r} "
        f"or its ctypes type), not {ctype.__name__}: other processes join it by typecode"
    )


def _named_storage(
    kind: int,
    name: str,
    mode: int,
    lock: object,
    shape: tuple[Any, int],
    initial: list[Any] | None,
) -> tuple[Segment, Lock]:
    """A named lock whose segment holds the storage, written before it has a name."""
    if lock is not True:
        raise ValueError(
            "a named Value or Array has a lock of its own, in the same named segment: "
            f"leave lock= at True, not {lock!r}"
        )
    from . import _named_sync

    ctype, length = shape
    tag = ord(_typecode_of(ctype))
    nbytes = ctypes.sizeof(ctype) * max(length, 1)

    def init(segment: Segment) -> None:
        _named_sync.record_type(segment, tag, length)
        if initial is not None:
            target = ctype * length if kind == _named_sync.ARRAY else ctype
            target.from_buffer(segment.payload[0]).__init__(*initial)

    new = Lock._with_storage(nbytes, name, mode, kind, init)
    return new._state.segment, new


def _connect_storage(
    kind: int, name: str, typecode_or_type: str | type[Any] | None, size: int | None, timeout: float
) -> tuple[Segment, Lock, Any, int]:
    """Join the named value or array ``name``: ``(segment, lock, ctype, length)``.

    :raises TypeError: it holds another type than ``typecode_or_type``
    :raises ValueError: (an array) its length is not ``size``
    """
    from . import _named_sync

    lock = Lock.__new__(Lock)
    lock._state = Lock._connect_state(name, timeout, kind)
    lock._named(name)
    tag, length = _named_sync.type_of(lock._state)
    code = chr(tag)
    what = "Array" if kind == _named_sync.ARRAY else "Value"
    try:
        if typecode_or_type is not None:
            wanted = _typecode_of(_ctype(typecode_or_type))
            if wanted != code:
                raise TypeError(
                    f"the {what} named {name!r} holds typecode {code!r} "
                    f"({typecode_to_type[code].__name__}), not {wanted!r}"
                )
        if size is not None and size != length:
            raise ValueError(f"the Array named {name!r} has {length} items, not {size}")
    except BaseException:
        lock.close()
        raise
    return lock._state.segment, lock, typecode_to_type[code], length


def _storage_and_lock(nbytes: int, lock: object) -> tuple[Segment, Lock | RLock]:
    if lock is True:
        new = Lock._with_storage(nbytes)
        return new._state.segment, new
    if isinstance(lock, Lock | RLock):
        return _segment(nbytes), lock
    raise TypeError(
        f"lock must be True, False, or an aioshm Lock or RLock, not {type(lock).__name__}"
    )


class _Storage:
    _segment: Segment
    _ctype: Any
    _obj: Any

    def _attach(self, segment: Segment, ctype: Any) -> None:
        self._segment = segment
        self._ctype = ctype
        self._obj = ctype.from_buffer(segment.payload[0])

    def get_obj(self) -> Any:
        """The ctypes object itself, laid over the shared memory."""
        return self._obj

    def _lock_or_none(self) -> Lock | RLock | None:
        return None


# ---------------------------------------------------------------------- values


class _Guarded:
    """Storage guarded by a lock: ``get_lock()``, and ``with``/``async with`` on it."""

    _lock: Lock | RLock

    def get_lock(self) -> Lock | RLock:
        """The lock guarding the storage: an aioshm :class:`~aioshm.Lock`, or the lock
        given as ``lock=``."""
        return self._lock

    def _lock_or_none(self) -> Lock | RLock | None:
        return self._lock

    @property
    def name(self) -> str | None:
        """The name it was created or joined by; ``None`` for an unnamed one."""
        return self._lock.name

    def close(self) -> None:
        """Close this handle: its lock's (see :meth:`aioshm.Lock.close`, which says when
        a name goes). Idempotent. The storage stays readable and writable through
        views and ctypes objects already taken; the lock raises
        ``anyio.ClosedResourceError``."""
        self._lock.close()

    async def __aenter__(self) -> None:
        """Acquire the lock (see :meth:`aioshm.Lock.acquire`, cancellation included)."""
        await self._lock.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self._lock.__aexit__(exc_type, exc_val, exc_tb)

    def __enter__(self) -> None:
        self._lock.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self._lock.__exit__(exc_type, exc_val, exc_tb)


class RawValue(_Storage):
    """A ctypes value in shared memory, with no lock (``multiprocessing.RawValue``).

    ``RawValue(typecode_or_type, *args)``: ``typecode_or_type`` is an ``array``-module
    typecode (``"i"``, ``"d"``, ...) or a ctypes type (a structure too); ``args``
    initialise it, otherwise it is zeroed. Pass it to other processes as an argument of
    ``multiprocessing.Process``, under any start method. Nothing here waits, so nothing
    is a cancellation point.

    :raises ValueError: unknown typecode
    :raises TypeError: neither a typecode nor a ctypes type
    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)
    """

    def __init__(self, typecode_or_type: str | type[Any], *args: Any) -> None:
        ctype = _ctype(typecode_or_type)
        self._attach(_segment(ctypes.sizeof(ctype)), ctype)
        if args:
            self._obj.__init__(*args)

    @property
    def value(self) -> Any:
        """The value (of a simple type; a structure's fields are on :meth:`get_obj`).

        Reading or writing it does not take the lock: hold ``get_lock()`` around a
        read-modify-write.
        """
        return self._obj.value

    @value.setter
    def value(self, new: Any) -> None:
        self._obj.value = new

    def __reduce__(self) -> tuple[Any, ...]:
        _check_spawning(self)
        return (_rebuild_value, (type(self), self._segment, self._ctype, self._lock_or_none()))

    def __repr__(self) -> str:
        try:
            shown = repr(self._obj.value)
        except AttributeError:
            shown = repr(self._obj)
        return f"<aioshm.{type(self).__name__} {self._ctype.__name__} {shown}>"


class SynchronizedValue(_Guarded, RawValue):
    """A ctypes value in shared memory with a lock, as :func:`Value` makes.

    ``async with v.get_lock(): v.value += 1`` (or ``async with v:``, the same) in any
    process; ``with v.get_lock():`` in code with no event loop. Cancellation: entering
    ``async with`` is the lock's :meth:`~aioshm.Lock.acquire` (a cancelled one holds
    nothing); nothing else waits.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use aioshm.Value(...) to make a SynchronizedValue")

    @classmethod
    def connect(
        cls, name: str, typecode_or_type: str | type[Any] | None = None, *, timeout: float = 0
    ) -> SynchronizedValue:
        """A new handle of the live value named ``name`` (``aioshm.Value.connect`` is
        this), with its lock. Close it when done (:meth:`close`).

        :param typecode_or_type: if given, the value must hold this type, else
            ``TypeError`` (and nothing is joined); by default, whatever it holds
        :param timeout: how long to wait, in seconds, for it to be created (blocking the
            calling thread; from async code, through ``anyio.to_thread.run_sync``)
        :raises FileNotFoundError: no live value has that name (within ``timeout``)
        :raises TypeError: the name is of another kind (a channel, a Lock, an Array,
            ...), or the value holds another type than ``typecode_or_type``
        :raises ValueError: the name is malformed or a URL
        """
        from ._named_sync import VALUE

        segment, lock, ctype, _ = _connect_storage(VALUE, name, typecode_or_type, None, timeout)
        return _synchronized_value(segment, ctype, lock)


def _rebuild_value(
    cls: type[RawValue], segment: Segment, ctype: Any, lock: Lock | RLock | None
) -> RawValue:
    value = cls.__new__(cls)
    value._attach(segment, ctype)
    if lock is not None:
        assert isinstance(value, SynchronizedValue)
        value._lock = lock
    return value


@overload
def Value(typecode_or_type: str | type[Any], *args: Any, lock: Literal[False]) -> RawValue: ...
@overload
def Value(
    typecode_or_type: str | type[Any],
    *args: Any,
    lock: Literal[True] | Lock | RLock = True,
    name: str | None = None,
    mode: int = 0o600,
) -> SynchronizedValue: ...
@overload
def Value(typecode_or_type: str | type[Any], *args: Any, lock: bool) -> RawValue: ...
def Value(
    typecode_or_type: str | type[Any],
    *args: Any,
    lock: bool | Lock | RLock = True,
    name: str | None = None,
    mode: int = 0o600,
) -> RawValue:
    """A ctypes value in shared memory (``multiprocessing.Value``, async).

    ``typecode_or_type`` is an ``array``-module typecode (``"i"``, ``"d"``, ...) or a
    ctypes type; ``args`` initialise it (otherwise it is zeroed). With ``lock=True``
    (the default) it comes with a new :class:`~aioshm.Lock`, and with a given aioshm
    ``Lock`` or ``RLock`` with that one: :meth:`SynchronizedValue.get_lock` returns it.
    ``lock=False`` gives a :class:`RawValue`, which has no lock.

    ``.value`` reads and writes do not take the lock; the idiom for a read-modify-write
    is ``async with counter.get_lock(): counter.value += 1``.

    With ``name``, any process of this user joins it with ``Value.connect(name)``
    (:meth:`SynchronizedValue.connect`); its lock lives in the same named segment, and
    the name lives as long as a handle (:meth:`SynchronizedValue.close`). A named value
    holds a typecode's type (``"i"``, ``"d"``, ... or its ctypes type, not a structure).

    :raises ValueError: unknown typecode; ``name`` malformed or a URL; ``lock`` not
        ``True`` with a ``name``
    :raises TypeError: neither a typecode nor a ctypes type (with a ``name``: not a
        typecode's type), or ``lock`` is not ``True``, ``False``, or an aioshm
        ``Lock``/``RLock``
    :raises FileExistsError: a live object of this user already has that name
    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)

    Nothing here waits, so nothing is a cancellation point.
    """
    if lock is False and name is None:
        return RawValue(typecode_or_type, *args)
    ctype = _ctype(typecode_or_type)
    if name is not None:
        from ._named_sync import VALUE

        named, its_lock = _named_storage(
            VALUE, name, mode, lock, (ctype, 1), list(args) if args else None
        )
        return _synchronized_value(named, ctype, its_lock)
    segment, the_lock = _storage_and_lock(ctypes.sizeof(ctype), lock)
    value = _synchronized_value(segment, ctype, the_lock)
    if args:
        value._obj.__init__(*args)
    return value


def _synchronized_value(segment: Segment, ctype: Any, lock: Lock | RLock) -> SynchronizedValue:
    value = SynchronizedValue.__new__(SynchronizedValue)
    value._attach(segment, ctype)
    value._lock = lock
    return value


# ---------------------------------------------------------------------- arrays


class RawArray(_Storage):
    """A ctypes array in shared memory, with no lock (``multiprocessing.RawArray``).

    ``RawArray(typecode_or_type, size_or_initializer)``: a size gives a zeroed array,
    a sequence an array initialised from it. Supports ``len``, indexing and slicing
    (reads give Python values, as ctypes arrays do), iteration, and :meth:`numpy` for a
    numpy view of the shared memory. Pass it to other processes as an argument of
    ``multiprocessing.Process``, under any start method. Nothing here waits, so nothing
    is a cancellation point.

    :raises ValueError: unknown typecode, or a negative size
    :raises TypeError: neither a typecode nor a ctypes type
    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)
    """

    _length: int

    def __init__(
        self, typecode_or_type: str | type[Any], size_or_initializer: int | Iterable[Any]
    ) -> None:
        ctype = _ctype(typecode_or_type)
        length, initial = _size_and_initial(size_or_initializer)
        self._attach_array(_segment(ctypes.sizeof(ctype) * length), ctype, length)
        if initial is not None:
            self._obj.__init__(*initial)

    def _attach_array(self, segment: Segment, ctype: Any, length: int) -> None:
        self._length = length
        self._attach(segment, ctype * length)
        self._ctype = ctype

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        return self._obj[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        self._obj[index] = value

    def __iter__(self) -> Iterator[Any]:
        return iter(self._obj)

    def numpy(self) -> np.ndarray[Any, np.dtype[Any]]:
        """A numpy array viewing the shared memory (no copy): writes through it are
        seen by every process. Do not hold the lock's place with it: taking a view
        does not take the lock."""
        dtype = np.dtype("U1") if self._ctype is ctypes.c_wchar else np.dtype(self._ctype)
        return np.ndarray((self._length,), dtype=dtype, buffer=self._segment.payload[0])

    @property
    def value(self) -> Any:
        """The string held by a ``c_char`` or ``c_wchar`` array (up to its first NUL)."""
        return self._obj.value

    @value.setter
    def value(self, new: Any) -> None:
        self._obj.value = new

    @property
    def raw(self) -> bytes:
        """All the bytes of a ``c_char`` array."""
        return bytes(self._obj.raw)

    @raw.setter
    def raw(self, new: bytes) -> None:
        self._obj.raw = new

    def __reduce__(self) -> tuple[Any, ...]:
        _check_spawning(self)
        return (
            _rebuild_array,
            (type(self), self._segment, self._ctype, self._length, self._lock_or_none()),
        )

    def __repr__(self) -> str:
        return f"<aioshm.{type(self).__name__} {self._ctype.__name__}[{self._length}]>"


class SynchronizedArray(_Guarded, RawArray):
    """A ctypes array in shared memory with a lock, as :func:`Array` makes.

    ``async with a.get_lock(): ...`` (or ``async with a:``) in any process.
    Cancellation: entering ``async with`` is the lock's :meth:`~aioshm.Lock.acquire` (a
    cancelled one holds nothing); nothing else waits.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("use aioshm.Array(...) to make a SynchronizedArray")

    @classmethod
    def connect(
        cls,
        name: str,
        typecode_or_type: str | type[Any] | None = None,
        size: int | None = None,
        *,
        timeout: float = 0,
    ) -> SynchronizedArray:
        """A new handle of the live array named ``name`` (``aioshm.Array.connect`` is
        this), with its lock. Close it when done (:meth:`close`).

        :param typecode_or_type: if given, the array must hold this type, else
            ``TypeError``; by default, whatever it holds
        :param size: if given, the array must have this many items, else ``ValueError``;
            by default, however many it has. Nothing is joined on a mismatch.
        :param timeout: as for :meth:`SynchronizedValue.connect`
        :raises FileNotFoundError: no live array has that name (within ``timeout``)
        :raises TypeError: the name is of another kind, or the array holds another type
        :raises ValueError: the name is malformed or a URL, or the length differs
        """
        from ._named_sync import ARRAY

        segment, lock, ctype, length = _connect_storage(
            ARRAY, name, typecode_or_type, size, timeout
        )
        return _synchronized_array(segment, ctype, length, lock)


def _size_and_initial(size_or_initializer: int | Iterable[Any]) -> tuple[int, list[Any] | None]:
    if isinstance(size_or_initializer, int):
        if size_or_initializer < 0:
            raise ValueError(f"an array's size must be >= 0, not {size_or_initializer}")
        return size_or_initializer, None
    initial = list(size_or_initializer)
    return len(initial), initial


def _rebuild_array(
    cls: type[RawArray], segment: Segment, ctype: Any, length: int, lock: Lock | RLock | None
) -> RawArray:
    array = cls.__new__(cls)
    array._attach_array(segment, ctype, length)
    if lock is not None:
        assert isinstance(array, SynchronizedArray)
        array._lock = lock
    return array


@overload
def Array(
    typecode_or_type: str | type[Any],
    size_or_initializer: int | Iterable[Any],
    *,
    lock: Literal[False],
) -> RawArray: ...
@overload
def Array(
    typecode_or_type: str | type[Any],
    size_or_initializer: int | Iterable[Any],
    *,
    lock: Literal[True] | Lock | RLock = True,
    name: str | None = None,
    mode: int = 0o600,
) -> SynchronizedArray: ...
@overload
def Array(
    typecode_or_type: str | type[Any], size_or_initializer: int | Iterable[Any], *, lock: bool
) -> RawArray: ...
def Array(
    typecode_or_type: str | type[Any],
    size_or_initializer: int | Iterable[Any],
    *,
    lock: bool | Lock | RLock = True,
    name: str | None = None,
    mode: int = 0o600,
) -> RawArray:
    """A ctypes array in shared memory (``multiprocessing.Array``, async).

    ``size_or_initializer``: a size gives a zeroed array, a sequence an array
    initialised from it. ``lock`` as for :func:`Value`: a new :class:`~aioshm.Lock` by
    default (:meth:`SynchronizedArray.get_lock`), a given aioshm ``Lock``/``RLock``, or
    ``False`` for a :class:`RawArray`. ``.numpy()`` is a numpy view of the shared
    memory (no copy).

    ``name`` and ``mode`` as for :func:`Value`; others join it with
    ``Array.connect(name)`` (:meth:`SynchronizedArray.connect`), which can check its
    typecode and length.

    :raises ValueError: unknown typecode, a negative size, or a ``name`` malformed or
        a URL, or ``lock`` not ``True`` with a ``name``
    :raises TypeError: neither a typecode nor a ctypes type (with a ``name``: not a
        typecode's type), or a bad ``lock``
    :raises FileExistsError: a live object of this user already has that name
    :raises OSError: the platform has no robust process-shared mutexes (not Linux), or
        the shared memory for a new arena cannot be reserved (nothing is left behind)

    Nothing here waits, so nothing is a cancellation point.
    """
    if lock is False and name is None:
        return RawArray(typecode_or_type, size_or_initializer)
    ctype = _ctype(typecode_or_type)
    length, initial = _size_and_initial(size_or_initializer)
    if name is not None:
        from ._named_sync import ARRAY

        named, its_lock = _named_storage(ARRAY, name, mode, lock, (ctype, length), initial)
        return _synchronized_array(named, ctype, length, its_lock)
    segment, the_lock = _storage_and_lock(ctypes.sizeof(ctype) * length, lock)
    array = _synchronized_array(segment, ctype, length, the_lock)
    if initial is not None:
        array._obj.__init__(*initial)
    return array


def _synchronized_array(
    segment: Segment, ctype: Any, length: int, lock: Lock | RLock
) -> SynchronizedArray:
    array = SynchronizedArray.__new__(SynchronizedArray)
    array._attach_array(segment, ctype, length)
    array._lock = lock
    return array


Value.connect = SynchronizedValue.connect  # type: ignore[attr-defined]
Array.connect = SynchronizedArray.connect  # type: ignore[attr-defined]
