"""Layer 4: the message codec: Python objects to and from the bytes of a slot.

A slot holds a header at offset 0 and the payload at ``data_offset``, a multiple of 64
that is at least :data:`~aioshm._layout.HEADER_RESERVE`. Three kinds of message::

    ARRAY   a numpy array of a fixed-size dtype: its raw bytes, never pickled.
            header: dtype, shape, memory order (C or Fortran).
    BYTES   bytes, bytearray, memoryview: the bytes themselves; they arrive as ``bytes``.
    PICKLE  anything else, with pickle protocol 5; out-of-band buffers (numpy arrays inside
            the object, say) are laid out after the pickle stream, 64-byte aligned.

The header is ``<B kind, B flags, H ndim_or_nbuffers, I descr_len, Q payload_len>``,
then for arrays the dtype descriptor and the shape, for pickles the buffer lengths.

The *encoded size* checked against ``max_message_size`` is the payload plus whatever of
the header does not fit in the reserved header space: for an array, its ``nbytes``.

Reading is split in two so that no user code runs with the channel's mutex held:
:func:`copy_out` copies the bytes (mutex held), :func:`finish` unpickles (mutex free).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Final

import numpy as np

from ._layout import ALIGN, HEADER_RESERVE

__all__ = [
    "Encoded",
    "Pickled",
    "array_layout",
    "copy_into",
    "copy_out",
    "encode",
    "finish",
    "view",
]

ARRAY: Final = 1
BYTES: Final = 2
PICKLE: Final = 3

_FORTRAN = 1  # flag: the array is laid out in Fortran order
_PICKLED_DTYPE = 2  # flag: the dtype descriptor is a pickled np.dtype, not dtype.str

_FIXED = struct.Struct("<BBHIQ")
_SHAPE_ITEM = 8
#: Arrays up to this many bytes are written with ``tobytes`` (fastest for small ones).
_SMALL_ARRAY = 4096
_CACHE_LIMIT = 4096


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _data_offset(header_len: int) -> int:
    return max(HEADER_RESERVE, _align(header_len))


class Encoded:
    """A message ready to be written into a slot.

    ``size`` is the encoded size (checked against ``max_message_size``); ``length`` is
    the number of slot bytes it fills, header included.
    """

    __slots__ = ("_array", "_buffers", "_data", "_header", "_offset", "kind", "length", "size")

    def __init__(
        self,
        kind: int,
        header: bytes,
        offset: int,
        payload_len: int,
        data: Any,
        buffers: list[memoryview] | None = None,
    ) -> None:
        self.kind = kind
        self._header = header
        self._offset = offset
        self._data = data
        self._buffers = buffers
        self.length = offset + payload_len
        self.size = self.length - HEADER_RESERVE

    def write(self, slot: memoryview) -> None:
        """Copy the message into a slot's memory."""
        header = self._header
        slot[: len(header)] = header
        offset = self._offset
        data = self._data
        if self.kind == ARRAY:
            _write_array(slot, offset, data)
            return
        end = offset + len(data)
        slot[offset:end] = data
        if self._buffers:
            for buf in self._buffers:
                start = _align(end)
                end = start + buf.nbytes
                slot[start:end] = buf


def _write_array(slot: memoryview, offset: int, array: np.ndarray[Any, Any]) -> None:
    order = "F" if _is_fortran(array) else "C"
    nbytes = array.nbytes
    if nbytes <= _SMALL_ARRAY:
        slot[offset : offset + nbytes] = array.tobytes(order)
    else:
        dst: np.ndarray[Any, Any] = np.ndarray(
            array.shape, array.dtype, buffer=slot, offset=offset, order=order
        )
        np.copyto(dst, array, casting="no")


def _is_fortran(array: np.ndarray[Any, Any]) -> bool:
    flags = array.flags
    return bool(flags.f_contiguous and not flags.c_contiguous)


def _too_large(size: int, limit: int, what: str) -> ValueError:
    return ValueError(
        f"{what} encodes to {size} bytes, more than the channel's max_message_size of "
        f"{limit} bytes; nothing was sent"
    )


# ---------------------------------------------------------------- array headers

_header_cache: dict[tuple[np.dtype[Any], tuple[int, ...], bool], tuple[bytes, int]] = {}


def array_layout(dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> tuple[bytes, int]:
    """The header of an array message and the offset of its data in the slot."""
    key = (dtype, shape, fortran)
    cached = _header_cache.get(key)
    if cached is not None:
        return cached
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
    fixed = _FIXED.pack(ARRAY, flags, len(shape), len(descr), nbytes)
    pad = b"\0" * (-(len(fixed) + len(descr)) % _SHAPE_ITEM)
    header = fixed + descr + pad + struct.pack(f"<{len(shape)}q", *shape)
    result = (header, _data_offset(len(header)))
    if len(_header_cache) >= _CACHE_LIMIT:
        _header_cache.clear()
    _header_cache[key] = result
    return result


# ---------------------------------------------------------------- encoding

_BYTES_HEADER_LEN = _FIXED.size


def encode(obj: object, limit: int) -> Encoded:
    """Encode ``obj`` for a slot of ``limit`` payload bytes.

    Raises ``ValueError`` if it does not fit and ``TypeError`` if it cannot be pickled.
    """
    kind = type(obj)
    if kind is np.ndarray:
        array: np.ndarray[Any, Any] = obj  # type: ignore[assignment]
        if not array.dtype.hasobject:
            header, offset = array_layout(array.dtype, array.shape, _is_fortran(array))
            message = Encoded(ARRAY, header, offset, array.nbytes, array)
            if message.size > limit:
                raise _too_large(message.size, limit, f"an array of {array.nbytes} bytes")
            return message
    elif kind is bytes or kind is bytearray or kind is memoryview:
        data: Any = obj
        if kind is memoryview:
            data = _flat_bytes(data)
        nbytes = len(data)
        header = _FIXED.pack(BYTES, 0, 0, 0, nbytes)
        message = Encoded(BYTES, header, HEADER_RESERVE, nbytes, data)
        if message.size > limit:
            raise _too_large(message.size, limit, f"a {kind.__name__} of {nbytes} bytes")
        return message
    return _encode_pickle(obj, limit)


def _flat_bytes(view: memoryview) -> memoryview | bytes:
    """A memoryview as a flat run of bytes, without a copy where possible."""
    if view.c_contiguous:
        try:
            return view.cast("B")
        except (TypeError, ValueError):
            pass
    return view.tobytes()


def _encode_pickle(obj: object, limit: int) -> Encoded:
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise TypeError(
            f"cannot send an object of type {type(obj).__qualname__}: it cannot be pickled "
            f"({type(exc).__name__}: {exc}); nothing was sent"
        ) from exc
    raws = [buf.raw() for buf in buffers]
    header = _FIXED.pack(PICKLE, 0, len(raws), 0, len(data)) + b"".join(
        struct.pack("<q", raw.nbytes) for raw in raws
    )
    offset = _data_offset(len(header))
    span = len(data)
    for raw in raws:
        span = _align(span) + raw.nbytes
    message = Encoded(PICKLE, header, offset, span, data, raws)
    if message.size > limit:
        raise _too_large(message.size, limit, f"a pickled {type(obj).__qualname__}")
    return message


# ---------------------------------------------------------------- decoding


class Pickled:
    """A pickle copied out of a slot, to be unpickled once the mutex is released."""

    __slots__ = ("buffers", "data")

    def __init__(self, data: bytes, buffers: list[bytearray]) -> None:
        self.data = data
        self.buffers = buffers


class _ArrayInfo:
    __slots__ = ("dtype", "nbytes", "offset", "order", "shape")

    def __init__(
        self, dtype: np.dtype[Any], shape: tuple[int, ...], order: str, offset: int, nbytes: int
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.order = order
        self.offset = offset
        self.nbytes = nbytes


_info_cache: dict[bytes, _ArrayInfo] = {}


def _array_info(slot: memoryview) -> _ArrayInfo:
    _, flags, ndim, descr_len, _ = _FIXED.unpack_from(slot)
    shape_at = _FIXED.size + descr_len
    shape_at += -shape_at % _SHAPE_ITEM
    header_len = shape_at + ndim * _SHAPE_ITEM
    key = bytes(slot[:header_len])
    info = _info_cache.get(key)
    if info is not None:
        return info
    descr = key[_FIXED.size : _FIXED.size + descr_len]
    dtype = pickle.loads(descr) if flags & _PICKLED_DTYPE else np.dtype(descr.decode())
    shape = struct.unpack_from(f"<{ndim}q", key, shape_at)
    order = "F" if flags & _FORTRAN else "C"
    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= dim
    info = _ArrayInfo(dtype, shape, order, _data_offset(header_len), nbytes)
    if len(_info_cache) >= _CACHE_LIMIT:
        _info_cache.clear()
    _info_cache[key] = info
    return info


def _array_view(slot: memoryview, info: _ArrayInfo) -> np.ndarray[Any, Any]:
    return np.ndarray(info.shape, info.dtype, buffer=slot, offset=info.offset, order=info.order)


def copy_out(slot: memoryview, length: int) -> object:
    """Copy a message out of a slot. Runs no user code (safe with the mutex held).

    Returns the message, or a :class:`Pickled` for :func:`finish` to unpickle.
    """
    kind = slot[0]
    if kind == ARRAY:
        info = _array_info(slot)
        return _array_view(slot, info).copy(order="K")
    payload_len = _FIXED.unpack_from(slot)[4]
    if kind == BYTES:
        return bytes(slot[HEADER_RESERVE : HEADER_RESERVE + payload_len])
    if kind == PICKLE:
        nbuffers = _FIXED.unpack_from(slot)[2]
        lengths = struct.unpack_from(f"<{nbuffers}q", slot, _FIXED.size)
        offset = _data_offset(_FIXED.size + 8 * nbuffers)
        end = offset + payload_len
        data = bytes(slot[offset:end])
        buffers = []
        for n in lengths:
            start = offset + _align(end - offset)
            end = start + n
            buffers.append(bytearray(slot[start:end]))
        return Pickled(data, buffers)
    raise RuntimeError(f"corrupt message header (kind {kind})")


def finish(value: object) -> Any:
    """Complete :func:`copy_out` outside the mutex: unpickle if needed."""
    if type(value) is Pickled:
        return pickle.loads(value.data, buffers=value.buffers)
    return value


def view(slot: memoryview) -> np.ndarray[Any, Any]:
    """A read-only array onto a slot's data: no copy. Arrays and bytes only."""
    kind = slot[0]
    if kind == ARRAY:
        out = _array_view(slot, _array_info(slot))
    elif kind == BYTES:
        out = np.frombuffer(slot, np.uint8, _FIXED.unpack_from(slot)[4], HEADER_RESERVE)
    else:
        raise TypeError("the next message is a pickled object, not an array or bytes")
    out.flags.writeable = False
    return out


def copy_into(slot: memoryview, out: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Copy an array (or bytes) message into ``out``, and return ``out``.

    Raises ``TypeError`` for a pickled message and ``ValueError`` for a dtype or shape
    that does not match; ``out`` is untouched then.
    """
    src = view(slot)
    if src.dtype != out.dtype or src.shape != out.shape:
        raise ValueError(
            f"the message is an array of dtype {src.dtype} and shape {src.shape}, "
            f"which does not fit an output of dtype {out.dtype} and shape {out.shape}"
        )
    np.copyto(out, src, casting="no")
    return out
