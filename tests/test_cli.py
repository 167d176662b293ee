"""``python -m aioshm`` and the ``aioshm`` script: list, show, remove, --json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest

import aioshm

from .helpers import cli, listed, wait_until

pytestmark = pytest.mark.timeout(120)

WORKER = str(Path(__file__).with_name("reach_workers.py"))


def fresh() -> str:
    return f"cli-{uuid.uuid4().hex[:12]}"


def test_a_live_channel_with_its_pids_and_counts() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[int](capacity=4, max_message_size=128, name=name)
    holder = subprocess.Popen([sys.executable, WORKER, "hold", name, "0"])
    try:
        wait_until(lambda: rx.statistics().current_buffer_used == 1, what="the holder's pid")
        row = listed(name)
        assert row["kind"] == "channel"
        assert (row["capacity"], row["max_message_size"]) == (4, 128)
        assert (row["buffered"], row["slots_in_use"]) == (1, 0)
        assert (row["senders"], row["receivers"]) == (2, 1)
        assert row["sender_pids"] == sorted([os.getpid(), holder.pid])
        assert row["receiver_pids"] == [os.getpid()]
        assert row["stale"] is False
        # The readable forms.
        table = cli().stdout.splitlines()
        assert table[0].split()[:3] == ["NAME", "KIND", "CAPACITY"]
        line = next(line for line in table if line.startswith(name))
        assert line.split()[-1] == "live"
        assert f"{holder.pid}" in line
        shown = cli("show", name)
        assert shown.returncode == 0
        assert f"pid {holder.pid}: 1 send, 0 receive (alive)" in shown.stdout
        assert "state:            live" in shown.stdout
        # Refused while live.
        refused = cli("remove", name)
        assert refused.returncode == 1
        assert "is live" in refused.stderr and "--force" in refused.stderr
    finally:
        holder.kill()
        holder.wait(10)
        tx.close()
        rx.close()


@pytest.mark.slow
def test_a_stale_channel_after_its_holders_are_killed_and_its_removal() -> None:
    name = fresh()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import aioshm, time\nt, r = aioshm.open_channel(name={name!r})\n"
            "t.send_nowait(1)\nprint('ready', flush=True)\ntime.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "ready"
    assert listed(name)["stale"] is False
    holder.kill()
    holder.wait(10)
    row = listed(name)
    assert row["stale"] is True
    assert (row["senders"], row["receivers"], row["buffered"]) == (0, 0, 1)
    assert [h["alive"] for h in row["holders"]] == [False]
    line = next(line for line in cli("list").stdout.splitlines() if line.startswith(name))
    assert line.split()[-1] == "stale"
    assert "stale (every holder is dead)" in cli("show", name).stdout
    removed = cli("remove", name, "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) == {"name": name, "removed": True, "was_stale": True}
    assert not os.path.exists(f"/dev/shm/aioshm.{name}")
    missing = cli("show", name)
    assert missing.returncode == 1 and "no channel or primitive named" in missing.stderr


def test_forced_removal_of_a_live_channel() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[int](capacity=4, name=name)
    tx.send_nowait(7)
    result = cli("remove", name, "--force")
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(f"/dev/shm/aioshm.{name}")
    with pytest.raises(anyio.BrokenResourceError):
        tx.send_nowait(8)
    assert rx.recv_nowait() == 7
    with pytest.raises(anyio.EndOfStream):
        rx.recv_nowait()
    with pytest.raises(FileNotFoundError):
        aioshm.connect_send(name)
    tx.close()
    rx.close()


def test_bad_names_and_the_console_script() -> None:
    result = cli("show", "a/b")
    assert result.returncode == 2 and "a valid name is" in result.stderr
    script = shutil.which("aioshm", path=os.path.dirname(sys.executable))
    assert script, "the aioshm console script is not installed"
    result = subprocess.run([script, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_the_last_live_holder_removes_the_name_despite_dead_ones() -> None:
    name = fresh()
    tx, rx = aioshm.open_channel[int](capacity=4, name=name)
    holder = subprocess.Popen([sys.executable, WORKER, "hold", name, "0"])
    wait_until(lambda: rx.statistics().current_buffer_used == 1, what="the holder's pid")
    holder.kill()
    holder.wait(10)
    tx.close()
    rx.close()  # the holder's entry is still there: it is found dead, and the name goes
    assert not os.path.exists(f"/dev/shm/aioshm.{name}")
