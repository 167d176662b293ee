"""Running out of shared memory is an OSError at creation, never a SIGBUS later.

Each case runs in a fresh interpreter, so that a limit (or a crash) stays there: the
child prints "ok" and exits 0 when every check held; a SIGBUS shows as exit code -7.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aioshm._layout import reserve_shared_memory

# Helpers every child script starts with.
PRELUDE = textwrap.dedent(
    """
    import errno, os, resource, sys

    def fds():
        return sorted(os.listdir("/proc/self/fd"))

    def maps(word):
        with open("/proc/self/maps") as f:
            return [line for line in f if word in line]

    def refused(make, code):
        before = fds(), maps("aioshm")
        try:
            make()
        except OSError as exc:
            assert exc.errno == code, exc
            assert "cannot reserve" in str(exc), exc
        else:
            raise AssertionError("no OSError")
        assert (fds(), maps("aioshm")) == before, "something was left behind"
    """
)


def _run(script: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stderr[-3000:]}"
    assert done.stdout.split()[-1:] == ["ok"], done.stdout


def test_file_size_limit_refuses_channels_and_large_arrays() -> None:
    _run(
        """
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
        import aioshm
        refused(lambda: aioshm.open_channel(capacity=16, max_message_size=1 << 20), errno.EFBIG)
        refused(lambda: aioshm.Array("d", 1 << 18), errno.EFBIG)  # 2 MiB: an arena of its own
        value = aioshm.Value("q", 5)  # a small arena still fits
        tx, rx = aioshm.open_channel(capacity=2, max_message_size=1024)
        tx.send_nowait(b"x" * 1024)
        assert rx.receive_nowait() == b"x" * 1024 and value.value == 5
        print("ok")
        """
    )


def test_address_space_limit_leaves_no_descriptor_behind() -> None:
    # The memory is there (it is not address space), but mapping it fails.
    _run(
        """
        import aioshm
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        room = (vm << 10) + (64 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))
        refused_mmap = lambda: aioshm.open_channel(capacity=4, max_message_size=64 << 20)
        before = fds()
        try:
            refused_mmap()
        except OSError as exc:
            assert exc.errno == errno.ENOMEM, exc
        else:
            raise AssertionError("no OSError")
        assert fds() == before, "the memfd was left open"
        assert not maps("memfd:aioshm")
        try:
            aioshm.Array("b", 128 << 20)  # an arena of its own, too large to map
        except OSError as exc:
            assert exc.errno == errno.ENOMEM, exc
        else:
            raise AssertionError("no OSError")
        assert fds() == before, "the arena's memfd was left open"
        assert not maps("memfd:aioshm")
        print("ok")
        """
    )


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 8 MiB, as a full /dev/shm would be (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# memfd_create made to return an unlinked file of the small tmpfs, so that aioshm's own
# code path meets a real full filesystem.
IN_TMPFS = """
mnt = sys.argv[1]
made = []

def memfd_in_tmpfs(name, flags=0):
    path = os.path.join(mnt, f"{name}-{len(made)}")
    made.append(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    return fd

os.memfd_create = memfd_in_tmpfs

def used():
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize

import aioshm
"""


def test_a_full_tmpfs_is_an_oserror(small_tmpfs: Path) -> None:
    _run(
        IN_TMPFS
        + textwrap.dedent(
            """
            # Too large for the filesystem: refused, and nothing is left in it either.
            refused(
                lambda: aioshm.open_channel(capacity=16, max_message_size=1 << 20), errno.ENOSPC
            )
            assert used() == 0, used()
            # A primitive needs an arena, and there is no room for one.
            filler = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)
            os.posix_fallocate(filler, 0, 8 << 20)
            refused(aioshm.Lock, errno.ENOSPC)
            refused(aioshm.Event, errno.ENOSPC)
            os.ftruncate(filler, 0)
            lock = aioshm.Lock()  # room again
            lock.acquire_nowait()
            print("ok")
            """
        ),
        str(small_tmpfs),
    )


def test_memory_reserved_at_creation_cannot_be_taken_away(small_tmpfs: Path) -> None:
    # Without the reservation, the pages of the slots would be found only when first
    # touched, after the filler took them: SIGBUS (exit code -7) in the sender.
    _run(
        IN_TMPFS
        + textwrap.dedent(
            """
            tx, rx = aioshm.open_channel(capacity=4, max_message_size=1 << 20)
            value = aioshm.Value("q", 0)
            filler = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(filler, b"f" * 65536)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
            assert used() >= (8 << 20) - 65536
            for round in range(3):  # every byte of every slot is written and read
                for i in range(4):
                    tx.send_nowait(bytes([i]) * (1 << 20))
                for i in range(4):
                    assert rx.receive_nowait() == bytes([i]) * (1 << 20)
            events = [aioshm.Event() for _ in range(20)]  # the rest of the arena's blocks
            for event in events:
                event.set()
            value.value = 1
            print("ok")
            """
        ),
        str(small_tmpfs),
    )


def test_the_helper_reserves_a_given_file(small_tmpfs: Path) -> None:
    path = small_tmpfs / "named"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="cannot reserve 16777216 bytes") as caught:
            reserve_shared_memory(16 << 20, fd)
        assert caught.value.errno == errno.ENOSPC
        os.fstat(fd)  # a given descriptor stays the caller's, open
        assert reserve_shared_memory(4 << 20, fd) == fd
        st = os.statvfs(small_tmpfs)
        assert (st.f_blocks - st.f_bfree) * st.f_frsize >= 4 << 20  # reserved, not sparse
    finally:
        os.close(fd)
        path.unlink()


def test_the_helper_checks_its_size() -> None:
    with pytest.raises(ValueError, match="positive size"):
        reserve_shared_memory(0)


def _cgroup_shmem() -> int | None:
    """Bytes of shmem charged to this process's memory cgroup (v1 or v2), if readable."""
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in entries:
        if "memory" in controllers.split(","):
            stat = f"/sys/fs/cgroup/memory{path}/memory.stat"
            break
    else:
        stat = f"/sys/fs/cgroup{entries[0][2]}/memory.stat"  # v2: the one hierarchy
    try:
        with open(stat) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("shmem "))
    except (OSError, StopIteration):
        return None


def test_memfd_memory_counts_in_the_memory_cgroup_not_in_dev_shm() -> None:
    # What the docs say about Docker's 64 MB /dev/shm: a memfd is not in that mount, and
    # it is charged to the memory cgroup as shmem. Other processes of the machine change
    # these counters too, so the best of three tries counts.
    if not os.path.isdir("/dev/shm") or _cgroup_shmem() is None:
        pytest.skip("no /dev/shm, or no readable memory cgroup")
    size = 256 << 20
    charged, taken = [], []
    for _ in range(3):
        before, shm_before = _cgroup_shmem(), os.statvfs("/dev/shm")
        fd = reserve_shared_memory(size)
        try:
            after, shm_after = _cgroup_shmem(), os.statvfs("/dev/shm")
        finally:
            os.close(fd)
        assert before is not None and after is not None
        charged.append(after - before)
        taken.append((shm_before.f_bfree - shm_after.f_bfree) * shm_after.f_frsize)
    assert max(charged) >= size * 9 // 10, charged
    assert min(taken) < size // 10, taken


def test_a_creation_failing_after_the_mapping_unmaps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: the mutex cannot be constructed once the memory is mapped.
    import aioshm
    from aioshm import _posix

    def refuse(addr: int) -> None:
        raise OSError(errno.EINVAL, "pthread_mutex_init: injected")

    def maps() -> list[str]:
        with open("/proc/self/maps") as f:
            return [
                line
                for line in f
                if "memfd:aioshm " in line or line.endswith("memfd:aioshm (deleted)\n")
            ]

    before = sorted(os.listdir("/proc/self/fd")), maps()
    monkeypatch.setattr(_posix.RobustMutex, "initialize", staticmethod(refuse))
    try:
        aioshm.open_channel(capacity=2, max_message_size=1 << 20)
    except OSError as exc:
        caught = exc  # kept, as a caller that logs it would: its traceback too
    assert "injected" in str(caught)
    assert (sorted(os.listdir("/proc/self/fd")), maps()) == before


def test_a_segment_in_a_given_file_of_a_full_tmpfs(small_tmpfs: Path) -> None:
    # The named-channel path: Segment.create in a file the caller made, which it takes
    # over only on success: refused, and left to the caller to close (and unlink), when
    # the tmpfs is too small; reserved when it fits.
    from aioshm._layout import Segment

    path = small_tmpfs / "named"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with pytest.raises(OSError) as caught:
        Segment.create(16, 1 << 20, fd)
    assert caught.value.errno == errno.ENOSPC
    os.fstat(fd)  # still open (raises if it was closed): the caller closes it
    os.close(fd)
    assert path.stat().st_blocks == 0  # nothing of the failed reservation is kept
    path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    segment = Segment.create(4, 1 << 20, fd)
    assert os.stat(path).st_blocks * 512 >= 4 << 20  # every page found at creation
    del segment
    path.unlink()


def test_more_than_the_machine_has_is_refused_up_front() -> None:
    # Never reserved page by page: the kernel would run the whole machine out of memory.
    import aioshm

    before = sorted(os.listdir("/proc/self/fd"))
    for make in (
        lambda: reserve_shared_memory(1 << 46),
        lambda: aioshm.open_channel[Any](4, 1 << 44),
        lambda: aioshm.Array("b", 1 << 46),
    ):
        with pytest.raises(OSError, match="available") as caught:
            make()
        assert caught.value.errno == errno.ENOMEM
    assert sorted(os.listdir("/proc/self/fd")) == before
