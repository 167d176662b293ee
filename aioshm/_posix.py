"""Process-shared POSIX primitives that live inside shared memory.

Two primitives, both placed at an address inside a shared segment and both usable by
every process that maps it, whatever the start method:

* :class:`RobustMutex`: a ``PTHREAD_PROCESS_SHARED`` + ``PTHREAD_MUTEX_ROBUST`` mutex.
  When its owner dies, the kernel releases it and the next locker is told so
  (``EOWNERDEAD``), which lets it repair whatever the dead owner left half-done.
* :class:`SharedSemaphore`: an unnamed ``sem_t`` with ``pshared=1``. It has no name, so
  nothing appears in ``/dev/shm`` and nothing is left for ``resource_tracker`` to clean.

They are reached through :mod:`ctypes`. Calls that cannot block keep the GIL (``PyDLL``,
cheaper); calls that may block release it (``CDLL``). The mutex is never taken by a
blocking call: a thread that took it with the GIL released would then wait for the GIL
while holding it (see :func:`_sleep_then_lock`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "MUTEX_SIZE",
    "SEM_SIZE",
    "Reentered",
    "RobustMutex",
    "SharedSemaphore",
    "abi_sizes",
    "supported",
]

#: ``(sizeof(pthread_mutex_t), sizeof(sem_t))`` for each C library and architecture
#: aioshm knows. Nothing in Python reports these sizes, so they come from the libraries'
#: headers: glibc's ``bits/pthreadtypes-arch.h`` and ``bits/semaphore.h``, musl's
#: ``alltypes.h`` (``int __i[sizeof(long)==8?10:6]`` and ``int __val[4*sizeof(long)]``).
_ABI_SIZES: dict[tuple[str, str], tuple[int, int]] = {
    ("glibc", "x86_64"): (40, 32),
    ("glibc", "aarch64"): (48, 32),
    ("glibc", "riscv64"): (40, 32),
    ("glibc", "ppc64le"): (40, 32),
    ("glibc", "s390x"): (40, 32),
    ("musl", "x86_64"): (40, 128),
    ("musl", "aarch64"): (40, 128),
    ("musl", "riscv64"): (40, 128),
}


def _c_library() -> str:
    """``"glibc"``, ``"musl"``, or what ``platform`` calls the C library."""
    name = platform.libc_ver()[0]
    if name:
        return name
    machine = platform.machine()
    if os.path.exists(f"/lib/ld-musl-{machine}.so.1"):
        return "musl"
    return "unknown"


def abi_sizes(libc: str, machine: str) -> tuple[int, int]:
    """``(sizeof(pthread_mutex_t), sizeof(sem_t))`` for ``libc`` on ``machine``.

    :raises OSError: that C library or architecture is not one aioshm knows
    """
    try:
        return _ABI_SIZES[(libc, machine)]
    except KeyError:
        known = ", ".join(f"{lib} {arch}" for lib, arch in sorted(_ABI_SIZES))
        raise OSError(
            f"aioshm does not know the size of pthread_mutex_t and sem_t for the C library "
            f"{libc!r} on {machine!r} (it knows: {known})"
        ) from None


def _reserve(size: int) -> int:
    return max(64, (size + 63) // 64 * 64)


if sys.platform.startswith("linux"):
    _MUTEX_T, _SEM_T = abi_sizes(_c_library(), platform.machine())
else:  # pragma: no cover - nothing is opened there (see supported())
    _MUTEX_T, _SEM_T = 64, 64

#: Bytes reserved for one mutex: ``sizeof(pthread_mutex_t)`` of the running C library and
#: architecture, rounded up to 64.
MUTEX_SIZE = _reserve(_MUTEX_T)
#: Bytes reserved for one semaphore: ``sizeof(sem_t)``, rounded up to 64 (musl's is 128).
SEM_SIZE = _reserve(_SEM_T)

_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_PTHREAD_MUTEX_ERRORCHECK = 2
_CLOCK_MONOTONIC = 1
_SPINS = 20
_YIELDS = 20
_FIRST_SLEEP = 20e-6
_LONGEST_SLEEP = 1e-3


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


#: A deadline long past: ``pthread_mutex_timedlock`` with it never waits.
_EPOCH = _Timespec(0, 0)


def _symbol(lib: ctypes.CDLL, name: str) -> Any:
    """A C library function, or one clear ``OSError`` naming what is missing."""
    try:
        return getattr(lib, name)
    except AttributeError:
        raise OSError(
            f"the C library has no {name}(): aioshm needs POSIX robust process-shared "
            f"mutexes and unnamed semaphores ({_c_library()} on {platform.machine()})"
        ) from None


def _bind(lib: ctypes.CDLL, name: str, *argtypes: type) -> ctypes._NamedFuncPointer:
    func: ctypes._NamedFuncPointer = _symbol(lib, name)
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
    _libc_nogil = ctypes.CDLL(None)
    _mutex_trylock = _symbol(_libc_gil, "pthread_mutex_trylock")
    _mutex_timedlock = _symbol(_libc_gil, "pthread_mutex_timedlock")
    _mutex_unlock = _symbol(_libc_gil, "pthread_mutex_unlock")
    _mutex_consistent = _symbol(_libc_gil, "pthread_mutex_consistent")
    _sem_post = _symbol(_libc_gil, "sem_post")
    _sem_trywait = _symbol(_libc_gil, "sem_trywait")
    _sem_getvalue = _symbol(_libc_gil, "sem_getvalue")
    _sem_wait = _symbol(_libc_nogil, "sem_wait")
    _sem_clockwait: Callable[[Any, int, Any], int]
    if hasattr(_libc, "sem_clockwait"):  # glibc >= 2.30: wait against the monotonic clock
        _sem_clockwait = _libc_nogil.sem_clockwait
        _sem_timed_clock = time.CLOCK_MONOTONIC
    else:  # pragma: no cover - musl
        _timedwait = _symbol(_libc_nogil, "sem_timedwait")

        def _sem_clockwait(sem: Any, _clock: int, ts: Any) -> int:
            return int(_timedwait(sem, ts))

        _sem_timed_clock = time.CLOCK_REALTIME


#: The uncontended fast path, on :attr:`RobustMutex.ptr`; both keep the GIL and return
#: an error number (0: done). ``unlock`` by a thread that does not hold the mutex is
#: refused with ``EPERM`` and changes nothing (an error-checking, robust mutex).
trylock: Callable[[Any], int]
unlock: Callable[[Any], int]
if supported():
    trylock = _mutex_trylock
    unlock = _mutex_unlock


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


class Reentered(RuntimeError):
    """The calling thread already holds the mutex (a finalizer or signal handler ran
    inside a critical section)."""


class RobustMutex:
    """A robust, process-shared, error-checking mutex at a fixed address.

    Not re-entrant: a thread that locks it twice gets :class:`Reentered` instead of a
    deadlock. The owner is a thread: it must be released by the thread that acquired it,
    and a release by any other thread is refused (``EPERM``) and changes nothing, which
    is what lets :meth:`aioshm._shared.SharedObject.locked` release "if held" after an
    asynchronous exception without knowing how far the acquisition got.

    The fast path is :data:`trylock` and :data:`unlock` called on :attr:`ptr` directly,
    with the GIL held; :meth:`acquire_contended` takes the slow path.
    """

    __slots__ = ("_addr", "ptr")

    def __init__(self, addr: int) -> None:
        self._addr = addr
        self.ptr = ctypes.c_void_p(addr)

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
        return self.acquire_contended(_mutex_trylock(self.ptr))

    def acquire_contended(self, result: int) -> bool:
        """Finish an acquisition whose first ``trylock`` returned ``result`` (not 0).

        Returns ``True`` if the previous owner died holding the lock (see
        :meth:`acquire`); raises :class:`Reentered` if this thread holds it already.
        """
        ptr = self.ptr
        if result == errno.EBUSY:
            # Critical sections last a microsecond or two: spin a little before
            # sleeping, as an adaptive mutex would.
            for _ in range(_SPINS):
                result = _mutex_trylock(ptr)
                if result != errno.EBUSY:
                    break
            else:
                result = _sleep_then_lock(ptr)
        if result == 0:
            return False
        if result == errno.EOWNERDEAD:
            _check(_mutex_consistent(ptr), "pthread_mutex_consistent")
            return True
        if result == errno.EDEADLK:
            raise Reentered("this thread already holds the mutex")
        raise OSError(result, f"pthread_mutex_lock: {os.strerror(result)}")

    def seize(self) -> bool:
        """Whether this thread holds the mutex, taking it if it is free; never waits.

        For recovery after an asynchronous exception, when the caller does not know
        whether its acquisition completed. ``False``: another thread or process holds
        it. ``True``: this thread holds it, consistent (release it afterwards).
        """
        result = _mutex_timedlock(self.ptr, ctypes.byref(_EPOCH))
        if result == errno.EOWNERDEAD:
            _mutex_consistent(self.ptr)
            return True
        return result in (0, errno.EDEADLK)

    def release(self) -> None:
        """Unlock; refused (and harmless) if this thread does not hold it."""
        _mutex_unlock(self.ptr)


def _sleep_then_lock(ptr: Any) -> int:
    """Wait for a held mutex, and take it only while holding the GIL.

    ``pthread_mutex_lock`` would wait with the GIL released and return holding the
    mutex, and then wait for the GIL: while another thread of this process runs Python,
    up to the switch interval (5 ms), holding up every process that needs the mutex.
    Here the thread sleeps (GIL released, mutex not held) and tries again with the GIL
    held: first after yielding the CPU (a few times), then after sleeps backing off from
    20 us to 1 ms.
    """
    for _ in range(_YIELDS):
        os.sched_yield()
        result: int = _mutex_trylock(ptr)
        if result != errno.EBUSY:
            return result
    delay = _FIRST_SLEEP
    while True:
        time.sleep(delay)
        result = _mutex_trylock(ptr)
        if result != errno.EBUSY:
            return result
        delay = min(delay * 2, _LONGEST_SLEEP)


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
