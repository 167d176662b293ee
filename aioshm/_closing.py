"""The forms of closing that every closable object here shares.

A class defines ``close()`` (synchronous and idempotent); this mixin adds ``aclose()``
and the ``with`` block, both of which call it. Channel handles (shared memory and
NATS) and the local NATS servers use it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """``aclose()`` and ``with`` for a class whose ``close()`` does the work."""

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close (see :meth:`close`). Not a cancellation point: the close always
        happens, even in a cancelled scope."""
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()
