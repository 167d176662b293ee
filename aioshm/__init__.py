"""aioshm: an async inter-process channel over shared-memory slots.

``tx, rx = aioshm.open_channel()`` gives a pair of handles; pass them to
``multiprocessing.Process`` children and ``await tx.send(x)`` / ``await rx.recv()`` in
any process, on asyncio or trio. numpy arrays cross as raw bytes.
"""

from . import _named_sync as _named_sync  # registers the named primitives' kinds
from ._channel import (
    ChannelStatistics,
    HandleHolder,
    ReceiveChannel,
    SendChannel,
    connect_receive,
    connect_send,
    items_sent,
    open_channel,
)
from ._child import run_child
from ._condition import Condition, ConditionStatistics
from ._event import Event, EventStatistics
from ._float_channel import FloatChannel
from ._lock import Lock, LockStatistics, RLock
from ._semaphore import BoundedSemaphore, Semaphore, SemaphoreStatistics
from ._slotqueue import CorruptMessage, MessageDropped
from ._values import Array, RawArray, RawValue, SynchronizedArray, SynchronizedValue, Value
from ._wait import HubFailed

__all__ = [
    "Array",
    "BoundedSemaphore",
    "ChannelStatistics",
    "Condition",
    "ConditionStatistics",
    "CorruptMessage",
    "Event",
    "EventStatistics",
    "FloatChannel",
    "HandleHolder",
    "HubFailed",
    "Lock",
    "LockStatistics",
    "MessageDropped",
    "RLock",
    "RawArray",
    "RawValue",
    "ReceiveChannel",
    "Semaphore",
    "SemaphoreStatistics",
    "SendChannel",
    "SynchronizedArray",
    "SynchronizedValue",
    "Value",
    "connect_receive",
    "connect_send",
    "items_sent",
    "open_channel",
    "run_child",
]
__version__ = "0.1.0"
