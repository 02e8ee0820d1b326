"""Sparse files stay sparse: holes are not read at capture and not written at restore.

How much the daemon read is its /proc/PID/io ``rchar`` (bytes read by
read/pread calls): a count, not a time, so the test holds on a loaded
machine.  Allocation is ``st_blocks``.
"""

from __future__ import annotations

import json
import os

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(300)

GiB = 1 << 30
MiB = 1 << 20


def daemon_read(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_10_gib_file_with_one_byte_is_captured_and_restored_sparse(mounted, tmp_path):
    pid = json.loads(run_cli("status", mounted.mnt, "--json", check=True).stdout)["pid"]
    before = daemon_read(pid)
    with open(mounted.mnt / "big.img", "wb") as f:
        f.truncate(10 * GiB)
        f.seek(7 * GiB)
        f.write(b"x")
    run_cli("flush", mounted.mnt, check=True)
    assert daemon_read(pid) - before < 64 * MiB  # the 10 GiB of holes were not read
    assert allocated(mounted.src / "big.img") < MiB  # and SRC stays sparse
    log = [json.loads(x) for x in run_cli("log", "--records", mounted.mnt / "big.img", "--json", check=True).stdout.splitlines()]
    assert [e["size"] for e in log if e["op"] == "write"] == [10 * GiB]

    dest = tmp_path / "restored.img"
    run_cli("restore", mounted.mnt / "big.img", "--to", dest, check=True, timeout=300)
    assert os.path.getsize(dest) == 10 * GiB
    assert allocated(dest) < MiB  # restore wrote no zeros
    fd = os.open(dest, os.O_RDONLY)
    try:
        assert os.pread(fd, 3, 7 * GiB - 1) == b"\0x\0"
        assert os.lseek(fd, 0, os.SEEK_DATA) >= 7 * GiB - 64 * 1024  # a hole up to the data
    finally:
        os.close(fd)


def test_a_punched_hole_is_captured_and_restored_as_a_hole(mounted, tmp_path):
    body = os.urandom(4 * MiB)
    p = mounted.mnt / "db"
    p.write_bytes(body)
    fd = os.open(p, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 1)  # plain mode passes through too
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE over the middle 2 MiB
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        assert libc.fallocate(fd, 0x03, MiB, 2 * MiB) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    want = body[:MiB] + bytes(2 * MiB) + body[3 * MiB:]
    assert p.read_bytes() == want
    run_cli("flush", mounted.mnt, check=True)
    assert run_cli("cat", p, check=True).stdout == want  # the captured version has the hole's zeros
    assert allocated(mounted.src / "db") < 3 * MiB
    dest = tmp_path / "db"
    run_cli("restore", p, "--to", dest, check=True)
    assert dest.read_bytes() == want
    assert allocated(dest) < 3 * MiB  # the hole (all-zero chunks) was not written
