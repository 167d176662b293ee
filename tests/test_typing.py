"""The public API's static types, as a user's ``mypy --strict`` sees them.

Each ``assert_type`` is checked by the type checker (CI runs ``mypy --strict`` over
``tests/`` too), and is a no-op when the test runs: the channel calls themselves run for
real, so the file stays true to the code.
"""

from __future__ import annotations

from typing import Any, assert_type

import numpy as np

import aioshm


def test_a_plain_open_channel_gives_any_handles_and_a_parameter_narrows_them() -> None:
    # The README's form: no annotation needed, even under --strict.
    tx, rx = aioshm.open_channel(4, 64)
    assert_type(tx, aioshm.SendChannel[Any])
    assert_type(rx, aioshm.ReceiveChannel[Any])
    with tx, rx:
        tx.send_nowait({"any": "object"})
        assert rx.recv_nowait() == {"any": "object"}

    ints_tx, ints_rx = aioshm.open_channel[int](4, 64)
    assert_type(ints_tx, aioshm.SendChannel[int])
    assert_type(ints_rx, aioshm.ReceiveChannel[int])
    with ints_tx, ints_rx:
        ints_tx.send_nowait(7)
        assert_type(ints_rx.recv_nowait(), int)


def test_array_handles_and_named_values_are_typed() -> None:
    tx, rx = aioshm.open_channel[np.ndarray[Any, np.dtype[np.float64]]](4, 1024)
    with tx, rx:
        tx.send_nowait(np.zeros(8))
        received = rx.recv_nowait()
        assert_type(received, np.ndarray[Any, np.dtype[np.float64]])
        assert received.shape == (8,)

    value = aioshm.Value("d", 1.5, name=f"typing-{id(tx):x}")
    try:
        assert_type(value, aioshm.SynchronizedValue)
        joined = aioshm.SynchronizedValue.connect(f"typing-{id(tx):x}", "d")
        assert_type(joined, aioshm.SynchronizedValue)
        assert joined.value == 1.5
        joined.close()
    finally:
        value.close()
