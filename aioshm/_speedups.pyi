"""Types of the optional C hot path (aioshm/_speedups.c)."""

from typing import Any, Final

#: The field numbers, state and outcome codes and C type sizes the module was built
#: with; :func:`aioshm._slotqueue._load_speedups` refuses it if any differs.
LAYOUT: Final[dict[str, int]]
#: The outcome "nothing was done: take the Python path".
FALLBACK: Final[int]

class FastQueue:
    def __init__(
        self,
        address: int,
        mutex: int,
        bells: int,
        sem_size: int,
        ring: int,
        free: int,
        slots: int,
        payloads: int,
        stride: int,
        capacity: int,
        low_water: int,
        small: int,
        keepalive: object,
        owner_died: Any,
    ) -> None: ...
    def put(self, image: bytes, start: int, length: int, /) -> int: ...
    def get(self) -> bytearray | int: ...
    def put_many(self, messages: list[Any] | tuple[Any, ...], first: int, /) -> tuple[int, int]: ...
    def get_many(self, limit: int, /) -> list[bytearray] | int: ...
