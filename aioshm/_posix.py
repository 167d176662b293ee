"""Process-shared POSIX primitives that live inside shared memory.

Two primitives, both placed at an address inside a shared segment and both usable by
every process that maps it, whatever the start method:

* :class:`RobustMutex`: a ``PTHREAD_PROCESS_SHARED`` + ``PTHREAD_MUTEX_ROBUST`` mutex.
  When its owner dies, the kernel releases it and the next locker is told so
  (``EOWNERDEAD``), which lets it repair whatever the dead owner left half-done.
* :class:`SharedSemaphore`: an unnamed ``sem_t`` with ``pshared=1``. It has no name, so
  nothing appears in ``/dev/shm`` and nothing is left for ``resource_tracker`` to clean.

They are reached through :mod:`ctypes`. Calls that cannot block keep the GIL (``PyDLL``,
cheaper); calls that may block release it (``CDLL``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MUTEX_SIZE", "SEM_SIZE", "Reentered", "RobustMutex", "SharedSemaphore", "supported"]

#: Bytes reserved for one mutex: at least ``sizeof(pthread_mutex_t)`` on every Linux ABI
#: (40 on x86-64, 48 on aarch64).
MUTEX_SIZE = 64
#: Bytes reserved for one semaphore: at least ``sizeof(sem_t)`` (32 on 64-bit Linux).
SEM_SIZE = 64

_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_PTHREAD_MUTEX_ERRORCHECK = 2
_CLOCK_MONOTONIC = 1
_SPINS = 20


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _bind(lib: ctypes.CDLL, name: str, *argtypes: type) -> ctypes._NamedFuncPointer:
    func: ctypes._NamedFuncPointer = getattr(lib, name)
    func.argtypes = list(argtypes)
    func.restype = ctypes.c_int
    return func


def supported() -> bool:
    """Whether this platform has robust process-shared mutexes and unnamed semaphores."""
    return sys.platform.startswith("linux")


if supported():
    # Functions that cannot block keep the GIL (PyDLL, cheaper). Their arguments are
    # prebuilt ctypes objects (no per-call conversion) and their results are error codes
    # (no errno bookkeeping).
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc_gil = ctypes.PyDLL(None, use_errno=False)
    _vp = ctypes.c_void_p
    _mutexattr_init = _bind(_libc, "pthread_mutexattr_init", _vp)
    _mutexattr_setpshared = _bind(_libc, "pthread_mutexattr_setpshared", _vp, ctypes.c_int)
    _mutexattr_setrobust = _bind(_libc, "pthread_mutexattr_setrobust", _vp, ctypes.c_int)
    _mutexattr_settype = _bind(_libc, "pthread_mutexattr_settype", _vp, ctypes.c_int)
    _mutexattr_destroy = _bind(_libc, "pthread_mutexattr_destroy", _vp)
    _mutex_init = _bind(_libc, "pthread_mutex_init", _vp, _vp)
    _sem_init = _bind(_libc, "sem_init", _vp, ctypes.c_int, ctypes.c_uint)
    _mutex_trylock = _libc_gil.pthread_mutex_trylock
    _mutex_lock = ctypes.CDLL(None).pthread_mutex_lock
    _mutex_unlock = _libc_gil.pthread_mutex_unlock
    _mutex_consistent = _libc_gil.pthread_mutex_consistent
    _sem_post = _libc_gil.sem_post
    _sem_trywait = _libc_gil.sem_trywait
    _sem_getvalue = _libc_gil.sem_getvalue
    _sem_wait = ctypes.CDLL(None).sem_wait
    _sem_clockwait: Callable[[Any, int, Any], int]
    if hasattr(_libc, "sem_clockwait"):  # glibc >= 2.30: wait against the monotonic clock
        _sem_clockwait = ctypes.CDLL(None).sem_clockwait
        _sem_timed_clock = time.CLOCK_MONOTONIC
    else:  # pragma: no cover - musl
        _timedwait = ctypes.CDLL(None).sem_timedwait

        def _sem_clockwait(sem: Any, _clock: int, ts: Any) -> int:
            return int(_timedwait(sem, ts))

        _sem_timed_clock = time.CLOCK_REALTIME


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


class Reentered(RuntimeError):
    """The calling thread already holds the mutex (a finalizer or signal handler ran
    inside a critical section)."""


class RobustMutex:
    """A robust, process-shared, error-checking mutex at a fixed address.

    Not re-entrant: a thread that locks it twice gets :class:`Reentered` instead of a
    deadlock. The owner is a thread: it must be released by the thread that acquired it.
    """

    __slots__ = ("_addr", "_ptr")

    def __init__(self, addr: int) -> None:
        self._addr = addr
        self._ptr = ctypes.c_void_p(addr)

    @staticmethod
    def initialize(addr: int) -> None:
        """Construct the mutex in place (once, by the creator of the segment)."""
        attr = ctypes.create_string_buffer(64)
        _check(_mutexattr_init(attr), "pthread_mutexattr_init")
        try:
            _check(_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED), "setpshared")
            _check(_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST), "setrobust")
            _check(_mutexattr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK), "settype")
            _check(_mutex_init(addr, attr), "pthread_mutex_init")
        finally:
            _mutexattr_destroy(attr)

    def acquire(self) -> bool:
        """Lock, waiting as long as needed.

        Returns ``True`` when the previous owner died while holding the lock. The mutex
        is then marked consistent again, and the caller must repair the state it guards.
        """
        ptr = self._ptr
        result = _mutex_trylock(ptr)
        if result == errno.EBUSY:
            # Critical sections last a microsecond or two: spin a little before
            # sleeping in the kernel, as an adaptive mutex would.
            for _ in range(_SPINS):
                result = _mutex_trylock(ptr)
                if result != errno.EBUSY:
                    break
            else:
                result = _mutex_lock(ptr)
        if result == 0:
            return False
        if result == errno.EOWNERDEAD:
            _check(_mutex_consistent(ptr), "pthread_mutex_consistent")
            return True
        if result == errno.EDEADLK:
            raise Reentered("this thread already holds the mutex")
        raise OSError(result, f"pthread_mutex_lock: {os.strerror(result)}")

    def release(self) -> None:
        _mutex_unlock(self._ptr)


class SharedSemaphore:
    """An unnamed, process-shared counting semaphore at a fixed address."""

    __slots__ = ("_addr", "_ptr")

    def __init__(self, addr: int) -> None:
        self._addr = addr
        self._ptr = ctypes.c_void_p(addr)

    @staticmethod
    def initialize(addr: int, value: int = 0) -> None:
        """Construct the semaphore in place (once, by the creator of the segment)."""
        if _sem_init(addr, 1, value) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sem_init: {os.strerror(err)}")

    def post(self) -> None:
        _sem_post(self._ptr)

    def try_wait(self) -> bool:
        """Take one unit if one is there; never blocks."""
        return bool(_sem_trywait(self._ptr) == 0)

    def wait(self, timeout: float | None) -> bool:
        """Take one unit, waiting up to ``timeout`` seconds (``None``: for ever).

        Returns ``False`` on timeout. The GIL is released while waiting. An interrupting
        signal ends the wait early with ``False``, so that Python signal handlers run.
        """
        if timeout is None:
            return bool(_sem_wait(self._ptr) == 0)
        deadline = time.clock_gettime(_sem_timed_clock) + max(timeout, 0.0)
        sec = int(deadline)
        ts = _Timespec(sec, int((deadline - sec) * 1e9))
        return bool(_sem_clockwait(self._ptr, _CLOCK_MONOTONIC, ctypes.byref(ts)) == 0)

    def value(self) -> int:
        out = ctypes.c_int()
        _sem_getvalue(self._ptr, ctypes.byref(out))
        return out.value
