"""The seed's ``FloatChannel``, made async."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._channel import ReceiveChannel, SendChannel, open_channel

__all__ = ["FloatChannel"]


class FloatChannel:
    """Send lists of floats to another process through shared memory.

    The seed's class, with its constructor: ``maxsize`` is the most values one message
    holds. One object is passed to both processes (as an argument of
    ``multiprocessing.Process``); ``await ch.send(values)`` in one, ``await ch.recv()``
    in the other. Where the seed had one slot, ``capacity`` slots let the sender run
    ahead of the receiver. Each process that has the object owns both ends of the
    channel, and closes them with :meth:`close` (or by exiting).

    :param maxsize: the most values one message holds
    :param capacity: how many messages can be in flight at once
    :raises ValueError: ``maxsize`` is not a positive ``int``
    """

    def __init__(self, maxsize: int, capacity: int = 1) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, not {maxsize!r}")
        self.maxsize = maxsize
        self._tx, self._rx = open_channel[np.ndarray[Any, Any]](capacity, 8 * maxsize)

    def _check(self, values: Sequence[float] | np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
            raise TypeError(
                f"send a list, tuple or 1-d array of floats, not {type(values).__name__}"
            )
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"values must all be numbers ({exc})") from exc
        if array.ndim != 1:
            raise ValueError(f"values must be one-dimensional, not of shape {array.shape}")
        if len(array) > self.maxsize:
            raise ValueError(
                f"{len(array)} values is more than this channel's maxsize of {self.maxsize}"
            )
        return array

    async def send(self, values: Sequence[float] | np.ndarray[Any, Any]) -> None:
        """Send up to ``maxsize`` floats, waiting for a free slot.

        :raises TypeError: ``values`` is not a sequence of numbers
        :raises ValueError: more than ``maxsize`` values, or not one-dimensional

        Otherwise raises as :meth:`SendChannel.send`.

        Cancellation: if cancelled, nothing was sent.
        """
        await self._tx.send(self._check(values))

    async def recv(self) -> list[float]:
        """Receive the next list of floats, waiting for one.

        Raises as :meth:`ReceiveChannel.recv`.

        Cancellation: if cancelled, nothing was received.
        """
        array = await self._rx.recv()
        return array.tolist()  # type: ignore[no-any-return]

    def send_blocking(self, values: Sequence[float], timeout: float | None = None) -> None:
        """The seed's blocking ``send``, for code with no event loop.

        :raises TimeoutError: no slot became free within ``timeout`` seconds (nothing
            was sent)

        Otherwise raises as :meth:`send`.
        """
        self._tx.send_blocking(self._check(values), timeout)

    def recv_blocking(self, timeout: float | None = None) -> list[float]:
        """The seed's blocking ``recv``, for code with no event loop.

        :raises TimeoutError: nothing arrived within ``timeout`` seconds (nothing was
            received)
        """
        return self._rx.recv_blocking(timeout).tolist()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close this process's ends of the channel."""
        self._tx.close()
        self._rx.close()

    @property
    def send_channel(self) -> SendChannel[np.ndarray[Any, Any]]:
        """The underlying send handle (messages are 1-d ``float64`` arrays)."""
        return self._tx

    @property
    def receive_channel(self) -> ReceiveChannel[np.ndarray[Any, Any]]:
        """The underlying receive handle."""
        return self._rx
