"""What crosses a channel, and how: arrays as raw bytes, bytes, pickles; and bad input.

Property tests send random values through a real channel: everything that fits
round-trips exactly; everything that does not raises ``ValueError`` with nothing sent;
after every error the channel works and its capacity is intact.
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Iterator
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aioshm
from aioshm import _codec
from aioshm._slotqueue import LOCKED_COPY_LIMIT

pytestmark = pytest.mark.timeout(120)

LIMIT = 4096
BIG = 3 * LOCKED_COPY_LIMIT


@pytest.fixture(scope="module")
def channel() -> Iterator[tuple[aioshm.SendChannel[Any], aioshm.ReceiveChannel[Any]]]:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=LIMIT)
    yield tx, rx
    tx.close()
    rx.close()


@pytest.fixture(scope="module")
def big_channel() -> Iterator[tuple[aioshm.SendChannel[Any], aioshm.ReceiveChannel[Any]]]:
    tx, rx = aioshm.open_channel[Any](capacity=2, max_message_size=BIG)
    yield tx, rx
    tx.close()
    rx.close()


def roundtrip(channel: tuple[aioshm.SendChannel[Any], aioshm.ReceiveChannel[Any]], x: Any) -> Any:
    tx, rx = channel
    tx.send_nowait(x)
    return rx.recv_nowait()


def assert_intact(channel: tuple[aioshm.SendChannel[Any], aioshm.ReceiveChannel[Any]]) -> None:
    stats = channel[0].statistics()
    assert stats.free_slots == stats.max_buffer_size
    assert (stats.current_buffer_used, stats.slots_in_use) == (0, 0)


def assert_same_array(got: Any, sent: np.ndarray[Any, Any]) -> None:
    assert type(got) is np.ndarray
    assert got.dtype == sent.dtype
    assert got.shape == sent.shape
    if sent.dtype.names and not sent.flags.c_contiguous:
        # numpy copies a structured array that is not C-contiguous field by field, so
        # its padding bytes are undefined, even in sent.tobytes(). Every field, exact:
        for name in sent.dtype.names:
            assert got[name].tobytes() == sent[name].tobytes()
    else:
        assert got.tobytes() == sent.tobytes()  # bit-exact (NaNs, padding and all)
    if sent.flags.f_contiguous and not sent.flags.c_contiguous:
        assert got.flags.f_contiguous
    assert got.flags.writeable


FIXED_DTYPES = [
    "?", "i1", "u1", "<i2", ">i2", "<u4", "<i8", ">f4", "<f8", "<f2", "<c8", "<c16",
    "<M8[ns]", "<M8[D]", "<m8[s]", "S7", "<U5", "V3",
    np.dtype([("a", "<i4"), ("b", "<f8")]),
    np.dtype([("a", "u1"), ("b", "<f8")], align=True),
    np.dtype([("x", "<f4", (3,)), ("name", "S4"), ("when", "<M8[us]")]),
]  # fmt: skip


@pytest.mark.parametrize("dtype", FIXED_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)], ids=str)
def test_arrays_roundtrip_as_raw_bytes(channel: Any, dtype: Any, shape: tuple[int, ...]) -> None:
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(0).integers(0, 256, max(1, int(np.prod(shape))) * dtype.itemsize)
    sent = np.frombuffer(raw.astype(np.uint8).tobytes(), dtype=dtype)[: int(np.prod(shape))]
    sent = sent.reshape(shape)
    assert_same_array(roundtrip(channel, sent), sent)


def test_orders_and_strides(channel: Any, big_channel: Any) -> None:
    base = np.arange(24 * 40, dtype=np.float64).reshape(24, 40)
    cases = [
        np.asfortranarray(base[:4, :5]),
        base[::2, ::3],
        base.T[:5, :6],
        base[:, 7],
        np.broadcast_to(np.arange(3.0), (4, 3)),
    ]
    for sent in cases:
        assert_same_array(roundtrip(channel, sent), sent)
    large = np.asfortranarray(np.arange(BIG // 8, dtype=np.float64).reshape(-1, 8))
    assert_same_array(roundtrip(big_channel, large), large)
    assert_same_array(roundtrip(big_channel, large[::2]), large[::2])


def _layouts(base: np.ndarray[Any, Any]) -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
    """``base`` in every memory layout a sender may hand over."""
    yield "c", base
    yield "f", np.asfortranarray(base)
    if base.ndim:
        yield "strided", base[::2]
        yield "transposed", base.T
        yield "reversed", base[::-1]
    yield "0-d", base.reshape(-1)[:1].reshape(())


def _sample(dtype: Any, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.random.default_rng(1).integers(0, 256, max(1, count) * dtype.itemsize)
    # A writeable copy: pickle keeps a read-only array read-only across the channel.
    return np.frombuffer(raw.astype(np.uint8).tobytes(), dtype=dtype)[:count].reshape(shape).copy()


@pytest.mark.parametrize("dtype", FIXED_DTYPES, ids=str)
def test_arrays_are_not_pickled(channel: Any, monkeypatch: pytest.MonkeyPatch, dtype: Any) -> None:
    """Every fixed-size dtype (structured ones included), in every layout (C, Fortran,
    strided, transposed, reversed, 0-d) and several shapes, travels as an ARRAY message
    of raw bytes: no array goes through pickle either way. (A structured dtype's
    *descriptor* may be pickled into the header; the data never is.)"""
    pickled: list[Any] = []
    real_dumps, real_loads = pickle.dumps, pickle.loads

    def dumps(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        pickled.append(obj)
        return real_dumps(obj, *args, **kwargs)

    def loads(data: Any, *args: Any, **kwargs: Any) -> Any:
        value = real_loads(data, *args, **kwargs)
        pickled.append(value)
        return value

    monkeypatch.setattr(pickle, "dumps", dumps)
    monkeypatch.setattr(pickle, "loads", loads)
    for shape in [(6,), (4, 6), (2, 3, 4)]:
        for layout, sent in _layouts(_sample(dtype, shape)):
            message = _codec.encode(sent, LIMIT)
            first = message.image if isinstance(message, _codec._Image) else message._header
            assert first[0] == _codec.ARRAY, (layout, sent.shape)
            got = roundtrip(channel, sent)
            assert_same_array(got, sent)
    assert not [obj for obj in pickled if not isinstance(obj, np.dtype)], pickled


def test_arrays_inside_objects_travel_out_of_band(big_channel: Any) -> None:
    """Every array that numpy lets pickle protocol 5 take out of band (contiguous, C
    or Fortran order, 0-d; numpy keeps datetime64 and timedelta64 data, and
    non-contiguous arrays, in band) is written as a buffer after the pickle stream, not
    copied into it. All arrive intact and writeable."""
    arrays = [_sample(dtype, (8, 5)) for dtype in FIXED_DTYPES]
    arrays += [np.asfortranarray(_sample("<f8", (8, 5))), _sample("<i4", ())]
    arrays += [_sample("<f8", (16, 5))[::2]]

    def out_of_band(array: np.ndarray[Any, Any]) -> bool:
        buffers: list[pickle.PickleBuffer] = []
        pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
        return bool(buffers)

    offered = [a for a in arrays if out_of_band(a)]
    in_band = [a for a in arrays if not out_of_band(a)]
    assert len(offered) >= len(FIXED_DTYPES) - 4 and in_band  # both kinds are covered
    value = {"arrays": arrays, "note": "a pickled object"}
    message = _codec.encode(value, BIG)
    assert isinstance(message, _codec.Encoded)
    kind, _, _, nbuffers, _, stream_len = _codec._FIXED.unpack_from(message._header)
    assert (kind, nbuffers) == (_codec.PICKLE, len(offered))
    # The stream holds the in-band arrays' data, and none of the others'.
    assert stream_len < sum(a.nbytes for a in in_band) + 200 * len(arrays)
    assert sum(a.nbytes for a in offered) > 200 * len(arrays)
    got = roundtrip(big_channel, value)
    for sent, received in zip(arrays, got["arrays"], strict=True):
        assert_same_array(received, sent)


def test_bytes_like_arrive_as_bytes(channel: Any, big_channel: Any) -> None:
    assert roundtrip(channel, b"") == b""
    assert roundtrip(channel, b"abc") == b"abc"
    assert roundtrip(channel, bytearray(b"xyz")) == b"xyz"
    assert type(roundtrip(channel, bytearray(b"xyz"))) is bytes
    assert roundtrip(channel, memoryview(b"hello")[1:4]) == b"ell"
    strided = np.arange(10, dtype=np.uint8).data[::2]
    assert roundtrip(channel, strided) == bytes(range(0, 10, 2))
    words = np.arange(4, dtype=np.int32).data
    assert roundtrip(channel, words) == np.arange(4, dtype=np.int32).tobytes()
    blob = bytes(range(256)) * (BIG // 256)
    assert roundtrip(big_channel, blob) == blob


def test_objects_and_object_arrays_are_pickled(channel: Any, big_channel: Any) -> None:
    value = {"a": [1, 2.5, None], "b": ("x", {3}), "when": datetime.date(2026, 11, 26)}
    assert roundtrip(channel, value) == value
    objs = np.array([1, "two", None], dtype=object)
    got = roundtrip(channel, objs)
    assert got.dtype == object and list(got) == [1, "two", None]
    matrix = np.ma.masked_array([1.0, 2.0], mask=[False, True])
    got = roundtrip(channel, matrix)
    assert type(got) is np.ma.MaskedArray and got.mask.tolist() == [False, True]
    nested = {"frames": [np.arange(BIG // 16, dtype=np.float64), np.ones((3, 3))]}
    got = roundtrip(big_channel, nested)  # arrays inside travel out of band
    assert np.array_equal(got["frames"][0], nested["frames"][0])
    assert got["frames"][0].flags.writeable
    assert np.array_equal(got["frames"][1], nested["frames"][1])


def test_oversize_is_checked_before_sending(channel: Any) -> None:
    tx, _ = channel
    for too_big in (np.zeros(LIMIT + 1, np.uint8), b"x" * (LIMIT + 1), ["y" * LIMIT]):
        with pytest.raises(ValueError, match=f"max_message_size of {LIMIT}"):
            tx.send_nowait(too_big)
    assert_intact(channel)


def test_corrupt_kind_is_detected() -> None:
    with pytest.raises(aioshm.CorruptMessage, match="corrupt"):
        _codec.decode(bytearray(64), owned=True)


# ---------------------------------------------------------------- properties

settings.register_profile(
    "aioshm", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("aioshm")

_dtypes = st.one_of(
    hnp.scalar_dtypes(),
    hnp.byte_string_dtypes(max_len=8),
    hnp.unicode_string_dtypes(max_len=8),
    hnp.array_dtypes(
        subtype_strategy=hnp.scalar_dtypes(), min_size=1, max_size=4, allow_subarrays=True
    ),
)


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    array = draw(
        hnp.arrays(
            dtype=_dtypes,
            shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        )
    )
    view = draw(st.sampled_from(["c", "f", "strided", "transposed"]))
    if view == "f":
        return np.asfortranarray(array)
    if view == "strided" and array.ndim:
        return array[::2]
    if view == "transposed":
        return array.T
    return array


@given(sent=_arrays())
def test_property_arrays(channel: Any, sent: np.ndarray[Any, Any]) -> None:
    tx, _ = channel
    # An array's size is its nbytes, plus whatever its header needs beyond the slot's
    # reserve: only a structured dtype with long field names has such a header.
    size = _codec.encode(sent, 1 << 40).size
    if sent.dtype.names is None:
        assert size == sent.nbytes
    else:
        assert size >= sent.nbytes
    if size > LIMIT:
        with pytest.raises(ValueError, match="max_message_size"):
            tx.send_nowait(sent)
    else:
        assert_same_array(roundtrip(channel, sent), sent)
    assert_intact(channel)


@given(blob=st.binary(min_size=0, max_size=LIMIT + 64))
def test_property_bytes(channel: Any, blob: bytes) -> None:
    tx, _ = channel
    if len(blob) > LIMIT:
        with pytest.raises(ValueError, match="max_message_size"):
            tx.send_nowait(blob)
    else:
        assert roundtrip(channel, blob) == blob
    assert_intact(channel)


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_objects = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=5), children, max_size=5),
    ),
    max_leaves=60,
)


@given(value=_objects)
def test_property_objects(channel: Any, value: Any) -> None:
    tx, _ = channel
    size = len(pickle.dumps(value, protocol=5))
    if size > LIMIT:
        with pytest.raises(ValueError, match="max_message_size"):
            tx.send_nowait(value)
    else:
        assert roundtrip(channel, value) == value
    assert_intact(channel)
