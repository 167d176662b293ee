"""Layer 4: the message codec: Python objects to and from the bytes of a slot.

A message occupies ``slot[start:length]``: a header, then the payload at ``data_offset``,
a multiple of 64 that is at least :data:`~aioshm._layout.HEADER_RESERVE`. The header is
written right against the payload (``start = data_offset - len(header)``), so that a
small message is one contiguous run of bytes with no gap to copy. Three kinds::

    ARRAY   a numpy array of a fixed-size dtype: its raw bytes, never pickled.
            header: dtype, shape, memory order (C or Fortran).
    BYTES   bytes, bytearray, memoryview: the bytes themselves; they arrive as ``bytes``.
    PICKLE  anything else, with pickle protocol 5; out-of-band buffers (numpy arrays
            inside the object, say) follow the pickle stream, each 64-byte aligned.

The header is ``<B kind, B flags, H header_len, H ndim_or_nbuffers, H descr_len,
Q payload_len>``, then for arrays the dtype descriptor and the shape, for pickles the
buffer lengths, padded to a multiple of 16 bytes; ``header_len`` is that padded length,
so a receiver finds the payload (and the cache key for an array's header) at once.

Small messages are prebuilt as one image (header and payload together) before the slot
is taken, so that writing them is a single copy.

The *encoded size*, checked against ``max_message_size``, is the payload plus whatever
of the header does not fit in the reserved header space: for an array, its ``nbytes``.

:func:`decode` reads a message either from memory the receiver owns (a private copy:
the result may keep pointing into it) or from the slot itself (the result must copy: a
large array into a buffer of :mod:`aioshm._recvbuf`).
"""

from __future__ import annotations

import math
import operator
import pickle
import struct
from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np

from . import _recvbuf
from ._layout import ALIGN, HEADER_RESERVE
from ._slotqueue import CorruptMessage

__all__ = ["Message", "copy_into", "decode", "encode", "encode_bytes", "loan_layout", "view"]

ARRAY: Final = 1
BYTES: Final = 2
PICKLE: Final = 3

_FORTRAN = 1  # flag: the array is laid out in Fortran order
_PICKLED_DTYPE = 2  # flag: the dtype descriptor is a pickled np.dtype, not dtype.str

_FIXED = struct.Struct("<BBHHHQ")
_HEADER_ALIGN = 16
#: Messages up to this size are written from one prebuilt image of header and payload.
_IMAGE_LIMIT = 8192
_CACHE_LIMIT = 4096

Array = np.ndarray[Any, np.dtype[Any]]


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def _pad_header(header: bytes) -> bytes:
    return header + b"\0" * (-len(header) % _HEADER_ALIGN)


def _data_offset(header_len: int) -> int:
    return max(HEADER_RESERVE, _align(header_len))


class Encoded:
    """A large message ready to be written into a slot: copied piece by piece.

    It occupies ``slot[start:length]``; ``size`` is its encoded size.
    """

    __slots__ = ("_array", "_buffers", "_data", "_header", "length", "size", "start")

    def __init__(
        self,
        header: bytes,
        payload_len: int,
        array: Array | None = None,
        data: Any = None,
        buffers: list[memoryview] | None = None,
    ) -> None:
        offset = _data_offset(len(header))
        self.start = offset - len(header)
        self.length = offset + payload_len
        self.size = self.length - HEADER_RESERVE
        self._header = header
        self._array = array
        self._data = data
        self._buffers = buffers

    def write(self, slot: memoryview) -> None:
        """Copy the message into a slot's memory."""
        offset = self.start + len(self._header)
        slot[self.start : offset] = self._header
        if self._array is not None:
            array = self._array
            dst: Array = np.ndarray(
                array.shape,
                array.dtype,
                buffer=slot,
                offset=offset,
                order="F" if _is_fortran(array) else "C",
            )
            np.copyto(dst, array, casting="no")
            return
        end = offset + len(self._data)
        slot[offset:end] = self._data
        for buf in self._buffers or ():
            start = offset + _align(end - offset)
            end = start + buf.nbytes
            slot[start:end] = buf


def _is_fortran(array: Array) -> bool:
    flags = array.flags
    return bool(flags.f_contiguous and not flags.c_contiguous)


def _check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise ValueError(
            f"{what} encodes to {size} bytes, more than the channel's "
            f"max_message_size of {limit} bytes; nothing was sent. {too_large_advice(size)}"
        )


def too_large_advice(size: int) -> str:
    """What to do about a message of ``size`` bytes that does not fit a slot."""
    return (
        f"Open the channel with open_channel(max_message_size={size}) or more (each slot "
        "holds one message of up to that size), or send the data in smaller parts"
    )


# ---------------------------------------------------------------- array headers


def _metadata(dtype: np.dtype[Any]) -> Any:
    """Everything numpy's dtype equality ignores: the metadata, at every level."""
    if dtype.names is not None:
        fields: Any = dtype.fields or {}
        return (dtype.metadata, tuple(_metadata(fields[name][0]) for name in dtype.names))
    if dtype.subdtype is not None:
        return (dtype.metadata, _metadata(dtype.subdtype[0]))
    return dtype.metadata


def _same_dtype(cached: np.dtype[Any], dtype: np.dtype[Any]) -> bool:
    """Whether a cache entry made for ``cached`` serves ``dtype``: the caches are keyed
    on dtypes, whose equality (and hash) ignores metadata."""
    return cached is dtype or _metadata(cached) == _metadata(dtype)


_header_cache: dict[tuple[np.dtype[Any], tuple[int, ...], bool], tuple[np.dtype[Any], bytes]] = {}


def array_layout(dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> bytes:
    """The (padded) header of an array message."""
    key = (dtype, shape, fortran)
    cached = _header_cache.get(key)
    if cached is not None and _same_dtype(cached[0], dtype):
        return cached[1]
    if dtype.hasobject:
        raise TypeError(f"dtype {dtype} holds Python objects and has no raw-bytes form")
    flags = _FORTRAN if fortran else 0
    if dtype.fields is None and dtype.subdtype is None and not dtype.metadata:
        descr = dtype.str.encode()
    else:
        descr = pickle.dumps(dtype, protocol=5)
        flags |= _PICKLED_DTYPE
    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= dim
    body = _pad_to(descr, _FIXED.size) + struct.pack(f"<{len(shape)}q", *shape)
    header_len = len(_pad_header(b"\0" * _FIXED.size + body))
    if header_len > 0xFFFF or len(descr) > 0xFFFF:
        raise TypeError(f"dtype {dtype} is too complex for a raw-bytes header")
    header = _pad_header(
        _FIXED.pack(ARRAY, flags, header_len, len(shape), len(descr), nbytes) + body
    )
    if len(_header_cache) >= _CACHE_LIMIT:
        _header_cache.clear()
    _header_cache[key] = (dtype, header)
    return header


def _pad_to(descr: bytes, before: int) -> bytes:
    return descr + b"\0" * (-(before + len(descr)) % 8)


def loan_layout(
    dtype: Any, shape: int | Sequence[int]
) -> tuple[np.dtype[Any], tuple[int, ...], bytes, int, int, int]:
    """``(dtype, shape, header, start, data_offset, length)`` of a C-ordered array
    message of ``shape`` and ``dtype``, checked: nothing is claimed before this.

    :raises TypeError: a dimension is not an integer, or the dtype is not one of a fixed
        size without Python objects
    :raises ValueError: a dimension is negative
    """
    dtype = np.dtype(dtype)
    dims = (shape,) if not isinstance(shape, Sequence) else shape
    checked: list[int] = []
    for dim in dims:
        if isinstance(dim, bool):
            raise TypeError(f"a loan's shape must hold integers, not {dim!r} (in {shape!r})")
        try:
            size = operator.index(dim)
        except TypeError:
            raise TypeError(
                f"a loan's shape must hold integers, not {type(dim).__name__} {dim!r} "
                f"(in {shape!r})"
            ) from None
        if size < 0:
            raise ValueError(f"a loan's shape cannot hold a negative dimension ({shape!r})")
        checked.append(size)
    if dtype.hasobject:
        raise TypeError(f"dtype {dtype} holds Python objects and cannot be loaned")
    shape = tuple(checked)
    header = array_layout(dtype, shape, False)
    offset = _data_offset(len(header))
    nbytes = dtype.itemsize * math.prod(shape)
    return dtype, shape, header, offset - len(header), offset, offset + nbytes


# ---------------------------------------------------------------- encoding


class _Image:
    """A small message written from one prebuilt image of header and payload."""

    __slots__ = ("image", "length", "start")

    def __init__(self, start: int, length: int, image: bytes) -> None:
        self.start = start
        self.length = length
        self.image = image

    @property
    def size(self) -> int:
        """The encoded size (computed when asked: one of these is made per message)."""
        return self.length - HEADER_RESERVE

    def write(self, slot: memoryview) -> None:
        slot[self.start : self.length] = self.image


class _ArrayPlan:
    """How arrays of one dtype, shape and order are laid out (cached)."""

    __slots__ = ("dtype", "header", "length", "nbytes", "order", "size", "start")

    def __init__(self, dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> None:
        self.dtype = dtype
        self.header = array_layout(dtype, shape, fortran)
        offset = _data_offset(len(self.header))
        self.nbytes = dtype.itemsize * math.prod(shape)
        self.start = offset - len(self.header)
        self.length = offset + self.nbytes
        self.size = self.length - HEADER_RESERVE
        self.order: Literal["C", "F"] = "F" if fortran else "C"


_plans: dict[tuple[np.dtype[Any], tuple[int, ...], tuple[int, ...]], _ArrayPlan] = {}

#: A message ready to be written into a slot.
Message = Encoded | _Image


def encode(obj: object, limit: int) -> Message:
    """Encode ``obj`` for a slot of ``limit`` payload bytes.

    Raises ``ValueError`` if it does not fit and ``TypeError`` if it cannot be pickled.
    """
    kind = type(obj)
    if kind is np.ndarray:
        array: Array = obj  # type: ignore[assignment]
        dtype = array.dtype
        # Keyed on the strides, which (with the shape and itemsize) decide the memory
        # order: cheaper than asking for the array's flags on every message.
        key = (dtype, array.shape, array.strides)
        plan = _plans.get(key)
        if plan is None or (plan.dtype is not dtype and not _same_dtype(plan.dtype, dtype)):
            flags = array.flags
            fortran = not flags.c_contiguous and flags.f_contiguous
            if dtype.hasobject:
                plan = None
            elif plan is not None:
                plan = _ArrayPlan(dtype, array.shape, fortran)  # equal but for metadata
            else:
                if len(_plans) >= _CACHE_LIMIT:
                    _plans.clear()
                plan = _plans[key] = _ArrayPlan(dtype, array.shape, fortran)
        if plan is not None:
            if plan.size > limit:
                _check_size(plan.size, limit, f"an array of {plan.nbytes} bytes")
            if plan.nbytes <= _IMAGE_LIMIT:
                return _Image(plan.start, plan.length, plan.header + array.tobytes(plan.order))
            return Encoded(plan.header, plan.nbytes, array=array)
    elif kind is bytes or kind is bytearray or kind is memoryview:
        data: Any = _flat_bytes(obj) if kind is memoryview else obj  # type: ignore[arg-type]
        nbytes = len(data)
        header = _FIXED.pack(BYTES, 0, _FIXED.size, 0, 0, nbytes)
        offset = _data_offset(len(header))
        _check_size(
            offset + nbytes - HEADER_RESERVE, limit, f"a {kind.__name__} object of {nbytes} bytes"
        )
        if nbytes <= _IMAGE_LIMIT:
            return _Image(offset - len(header), offset + nbytes, header + bytes(data))
        return Encoded(header, nbytes, data=data)
    return _encode_pickle(obj, limit)


def encode_bytes(obj: object, limit: int) -> bytes | memoryview:
    """Encode ``obj`` as one run of bytes (header, then payload) that :func:`decode`
    reads back: for transports that carry messages rather than fill slots.

    Raises as :func:`encode`.
    """
    message = encode(obj, limit)
    if type(message) is _Image:
        return message.image
    buffer = bytearray(message.length)
    message.write(memoryview(buffer))
    return memoryview(buffer)[message.start :]


def _flat_bytes(view: memoryview) -> memoryview | bytes:
    """A memoryview as a flat run of bytes, without a copy where possible."""
    if view.c_contiguous:
        try:
            return view.cast("B")
        except (TypeError, ValueError):
            pass
    return view.tobytes()


def _encode_pickle(obj: object, limit: int) -> Message:
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise TypeError(
            f"cannot send an object of type {type(obj).__qualname__}: it cannot be pickled "
            f"({type(exc).__name__}: {exc}); nothing was sent"
        ) from exc
    raws = [buf.raw() for buf in buffers]
    lengths = b"".join(struct.pack("<q", raw.nbytes) for raw in raws)
    header_len = _align(_FIXED.size + len(lengths), _HEADER_ALIGN)
    header = _pad_header(_FIXED.pack(PICKLE, 0, header_len, len(raws), 0, len(data)) + lengths)
    span = len(data)
    for raw in raws:
        span = _align(span) + raw.nbytes
    offset = _data_offset(len(header))
    _check_size(offset + span - HEADER_RESERVE, limit, f"a pickled {type(obj).__qualname__}")
    if not raws and span <= _IMAGE_LIMIT:
        return _Image(offset - len(header), offset + span, header + data)
    return Encoded(header, span, data=data, buffers=raws)


# ---------------------------------------------------------------- decoding


class _ArrayInfo:
    __slots__ = ("dtype", "length", "nbytes", "offset", "order", "shape")

    def __init__(
        self,
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
        order: Literal["C", "F"],
        offset: int,
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.order = order
        self.offset = offset
        self.nbytes = dtype.itemsize * math.prod(shape)
        self.length = offset + self.nbytes


_info_cache: dict[bytes, _ArrayInfo] = {}


def _corrupt(what: str) -> CorruptMessage:
    return CorruptMessage(f"corrupt message header: {what}")


def _fixed(message: memoryview | bytearray) -> tuple[int, int, int, int, int, int]:
    """The fixed part of a header, checked against the message's length."""
    n = len(message)
    if n < _FIXED.size:
        raise _corrupt(f"the message has {n} bytes, fewer than a header's {_FIXED.size}")
    fields: tuple[int, int, int, int, int, int] = _FIXED.unpack_from(message)
    if not _FIXED.size <= fields[2] <= n:
        raise _corrupt(f"a header length of {fields[2]} in a message of {n} bytes")
    return fields


def _array_info(message: memoryview | bytearray) -> _ArrayInfo:
    try:
        key = bytes(message[: message[2] | message[3] << 8])
    except IndexError:
        raise _corrupt(f"the message has {len(message)} bytes, fewer than a header's") from None
    info = _info_cache.get(key)
    if info is None:
        info = _parse_array_header(message, key)
        if len(_info_cache) >= _CACHE_LIMIT:
            _info_cache.clear()
        _info_cache[key] = info
    if info.length != len(message):
        raise _corrupt(
            f"an array of {info.nbytes} bytes after a {info.offset}-byte header does not "
            f"fill a message of {len(message)} bytes"
        )
    return info


def _parse_array_header(message: memoryview | bytearray, key: bytes) -> _ArrayInfo:
    _, flags, header_len, ndim, descr_len, payload_len = _fixed(message)
    shape_at = _FIXED.size + descr_len
    shape_at += -shape_at % 8
    if shape_at + 8 * ndim > header_len:
        raise _corrupt(f"a dtype of {descr_len} bytes and {ndim} dimensions overrun it")
    descr = key[_FIXED.size : _FIXED.size + descr_len]
    try:
        dtype = pickle.loads(descr) if flags & _PICKLED_DTYPE else np.dtype(descr.decode())
    except Exception as exc:
        raise _corrupt(f"unreadable dtype {descr!r} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _corrupt(f"{dtype!r} is not a dtype of raw bytes")
    shape = struct.unpack_from(f"<{ndim}q", key, shape_at)
    if any(dim < 0 for dim in shape):
        raise _corrupt(f"a negative dimension in shape {shape}")
    info = _ArrayInfo(dtype, shape, "F" if flags & _FORTRAN else "C", header_len)
    if info.nbytes != payload_len:
        raise _corrupt(f"{payload_len} payload bytes for an array of {info.nbytes}")
    return info


def _array_view(message: memoryview | bytearray, info: _ArrayInfo) -> Array:
    # Positional arguments: numpy parses keywords to ndarray() at twice the cost.
    return np.ndarray(info.shape, info.dtype, message, info.offset, None, info.order)


def _bytes_span(message: memoryview | bytearray) -> tuple[int, int]:
    """``(offset, length)`` of a bytes message's data, checked."""
    _, _, offset, _, _, payload_len = _fixed(message)
    if offset + payload_len != len(message):
        raise _corrupt(
            f"{payload_len} bytes after a {offset}-byte header in a message of {len(message)} bytes"
        )
    return offset, payload_len


def _pickle_spans(message: memoryview | bytearray) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the pickle stream and of each out-of-band buffer, checked."""
    _, _, offset, nbuffers, _, payload_len = _fixed(message)
    if _FIXED.size + 8 * nbuffers > offset:
        raise _corrupt(f"{nbuffers} buffer lengths overrun a header of {offset} bytes")
    spans = [(offset, offset + payload_len)]
    end = offset + payload_len
    for n in struct.unpack_from(f"<{nbuffers}q", message, _FIXED.size):
        if n < 0:
            raise _corrupt(f"a buffer of {n} bytes")
        start = offset + _align(end - offset)
        end = start + n
        spans.append((start, end))
    if end != len(message):
        raise _corrupt(f"a pickle and buffers ending at {end} in a message of {len(message)}")
    return spans


def decode(message: memoryview | bytearray, owned: bool) -> Any:
    """Turn a message's bytes back into an object.

    ``owned``: ``message`` is a private copy the result may point into; otherwise it is
    the slot itself and everything is copied out.

    :raises CorruptMessage: the header makes no sense for the message's length (nothing
        is read past the message, and nothing is silently cut short)
    :raises Exception: whatever unpickling raises
    """
    try:
        kind = message[0]
    except IndexError:
        raise _corrupt("an empty message") from None
    if kind == ARRAY:
        # The hot path, inlined: a header seen before, in a message of the right length
        # (anything else goes through _array_info, which checks and explains).
        try:
            info = _info_cache.get(bytes(message[: message[2] | message[3] << 8]))
        except IndexError:
            info = None
        if info is None or info.length != len(message):
            info = _array_info(message)
        # Positional arguments: numpy parses keywords to ndarray() at twice the cost.
        array = np.ndarray(info.shape, info.dtype, message, info.offset, None, info.order)
        if owned:
            return array
        out = _recvbuf.empty(info.shape, info.dtype, info.order)
        np.copyto(out, array, casting="no")
        return out
    if kind == BYTES:
        offset, length = _bytes_span(message)
        return bytes(message[offset : offset + length])
    if kind == PICKLE:
        view = memoryview(message)
        (start, end), *rest = _pickle_spans(message)
        buffers = [view[a:b] if owned else bytearray(view[a:b]) for a, b in rest]
        return pickle.loads(view[start:end], buffers=buffers)
    raise _corrupt(f"unknown kind {kind}")


def view(message: memoryview) -> Array:
    """A read-only array onto a message's data in its slot: no copy. Arrays and bytes."""
    kind = message[0] if len(message) else 0
    if kind == ARRAY:
        info = _array_info(message)
        try:
            out = _array_view(message, info)
        except (TypeError, ValueError) as exc:  # e.g. a shape too big for numpy
            raise _corrupt(f"numpy refuses it ({exc})") from exc
    elif kind == BYTES:
        offset, length = _bytes_span(message)
        out = np.frombuffer(message, np.uint8, length, offset)
    elif kind == PICKLE:
        raise TypeError("the next message is a pickled object, not an array or bytes")
    else:
        raise _corrupt(f"unknown kind {kind}")
    out.flags.writeable = False
    return out


def copy_into(message: memoryview, out: Array) -> Array:
    """Copy an array (or bytes) message into ``out`` and return ``out``.

    Raises ``TypeError`` for a pickled message and ``ValueError`` for a dtype or shape
    that does not match; ``out`` is untouched then.
    """
    src = view(message)
    if src.dtype != out.dtype or src.shape != out.shape:
        raise ValueError(
            f"the message is an array of dtype {src.dtype} and shape {src.shape}, "
            f"which does not fit an output of dtype {out.dtype} and shape {out.shape}"
        )
    np.copyto(out, src, casting="no")
    return out
