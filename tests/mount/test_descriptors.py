"""Descriptors running short: the daemon sheds its own cache, never dies, says so once.

Both tests cause the shortage for real: a daemon started under
``prlimit --nofile=1024:1024`` whose limit is then lowered below what it
holds (``prlimit --pid``), and programs holding more files open in the
mount than the daemon may serve while keeping its reserve free.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusetools import run_cli

pytestmark = pytest.mark.timeout(300)

LIMIT = 1024


def status(m) -> dict:
    return json.loads(run_cli("status", m.mnt, "--json", check=True, timeout=60).stdout)


def warnings(m) -> list[str]:
    return [ln for ln in m.log_text().splitlines() if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln]


def test_control_socket_answers_when_the_limit_drops_below_what_the_daemon_holds(mount_factory):
    m = mount_factory(None, prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}"])
    d = m.mnt / "d"
    d.mkdir()
    for i in range(600):
        (d / f"f{i}").write_bytes(b"x")
    for i in range(600):
        os.listxattr(d / f"f{i}")  # the daemon opens (and caches) each inode's own descriptor
    before = status(m)["descriptors"]
    assert before["cached"] == before["budget"] == LIMIT // 4
    # now it holds more descriptors than it may have: every open, every accept fails
    low = before["open"] - 60
    subprocess.run(["prlimit", "--pid", str(m.proc.pid), f"--nofile={low}:{low}"], check=True)
    st = status(m)  # answered: the accept loop shed cached descriptors and accepted again
    fds = st["descriptors"]
    assert fds["shortages"] == 1 and fds["shed"] >= 60 and fds["open"] < low
    assert (d / "f1").read_bytes() == b"x"  # the mount works on
    (d / "new").write_bytes(b"new")
    assert status(m)["capture"]["failures"] == 0
    check = run_cli("status", m.mnt, "--check")
    assert check.returncode == 1 and b"descriptors ran short 1 time(s)" in check.stdout + check.stderr
    warned = warnings(m)
    assert len(warned) == 1 and "descriptors ran short" in warned[0], warned  # once per incident
    m.umount(check=False)
    assert len(warnings(m)) == 1


def test_open_files_beyond_the_reserve_are_refused_and_the_mount_recovers(mount_factory):
    m = mount_factory(None, prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}"])
    for i in range(LIMIT):
        (m.mnt / f"f{i}").write_bytes(b"%d" % i)
    held, refused = [], None
    try:
        for i in range(LIMIT):
            try:
                held.append(os.open(m.mnt / f"f{i}", os.O_RDONLY))
            except OSError as e:
                refused = e.errno
                break
        assert refused == errno.EMFILE  # a program holding too many files is told so
        fds = status(m)["descriptors"]  # ... and the daemon still answers
        assert fds["refused"] >= 1 and fds["handles"] == len(held)
        assert fds["open"] <= LIMIT - fds["reserve"] + 1  # the reserve stayed free
        assert len(held) > LIMIT // 2
        assert os.pread(held[-1], 10, 0) == b"%d" % (len(held) - 1)
    finally:
        for fd in held:
            os.close(fd)
    # room again: opens, writes and captures work
    with open(m.mnt / "f0", "ab") as f:
        f.write(b"+")
    run_cli("flush", m.mnt, check=True)
    assert run_cli("cat", m.mnt / "f0", check=True).stdout == b"0+"
    st = status(m)
    assert st["capture"]["failures"] == 0 and st["descriptors"]["handles"] == 0
    text = run_cli("status", m.mnt, check=True).stdout.decode()
    assert "descriptors" in text and "refused" in text
    prom = {f.name: f.samples[0].value for f in text_string_to_metric_families(
        run_cli("status", m.mnt, "--prometheus", check=True).stdout.decode()) if f.samples}
    assert prom["deltafs_descriptors_limit"] == LIMIT and prom["deltafs_descriptor_shortages"] == 1
    assert prom["deltafs_descriptors_budget"] == LIMIT // 4 and prom["deltafs_inodes"] >= LIMIT
    warned = warnings(m)
    assert len(warned) == 1 and "descriptors ran short" in warned[0], warned
    m.umount(check=False)


def test_syncfs_after_atomic_saves_of_files_whose_descriptors_were_shed(mount_factory):
    """Files saved atomically (a temp file renamed over them) after the daemon shed their
    descriptors: the kernel's writeback cache then flushes the replaced inodes' times, which
    no name leads to any more.  `sync -f MNT` (syncfs) used to fail with ESTALE (a sync
    group's mount renames over files every pass, so it hit this all the time)."""
    m = mount_factory(None, "--fd-budget", "64")
    for i in range(20):
        (m.mnt / f"f{i}").write_text(f"{i}\n")
    (m.mnt / "d").mkdir()
    for i in range(300):  # the daemon sheds the descriptors of f*
        (m.mnt / "d" / f"g{i}").write_text(f"{i}\n")
    for i in range(20):
        (m.mnt / f"t{i}").write_text(f"x{i}\n")
        os.rename(m.mnt / f"t{i}", m.mnt / f"f{i}")
    res = subprocess.run(["sync", "-f", str(m.mnt)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [(m.mnt / f"f{i}").read_text() for i in range(20)] == [f"x{i}\n" for i in range(20)]
    m.umount()
