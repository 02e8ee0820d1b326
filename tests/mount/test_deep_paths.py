"""Paths longer than PATH_MAX: reached with os.chdir and relative names, as natively.

The kernel refuses a path string longer than PATH_MAX (4096 bytes), but a
process can work in a directory whose full path is longer by going there
step by step.  SRC's own path plus a deep tree then exceeds PATH_MAX for
the daemon too: every operation must still behave as on ext4 (the native
side of each comparison is a directory of the same filesystem, just as
deep), and every save there is a version that `cat` returns.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(180)

NAME = "d" * 200  # 25 of these: about 5,000 bytes below the root
DEPTH = 25


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def steps() -> list[tuple[str, object]]:
    """(what, function of nothing) run in the deep directory; each returns what a program sees."""

    def create_write_fsync():
        fd = os.open("f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        try:
            os.write(fd, b"one\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return os.stat("f").st_size

    def truncate():
        os.truncate("f", 2)
        return open("f", "rb").read()

    def open_trunc_write():
        fd = os.open("f", os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b"two\n")
        finally:
            os.close(fd)
        return open("f", "rb").read()

    def ftruncate_fsync():
        fd = os.open("f", os.O_RDWR)
        try:
            os.ftruncate(fd, 3)
            os.fsync(fd)
            return os.pread(fd, 10, 0)
        finally:
            os.close(fd)

    def append():
        with open("f", "ab") as f:
            f.write(b"three\n")
        return open("f", "rb").read()

    def rename():
        os.rename("f", "g")
        return sorted(os.listdir("."))

    def mkdir_rmdir():
        os.mkdir("sub", 0o750)
        inside = os.listdir("sub")
        os.rmdir("sub")
        return inside, os.path.exists("sub")

    def unlink():
        with open("h", "wb") as f:
            f.write(b"gone soon\n")
        os.unlink("h")
        return sorted(os.listdir("."))

    def chmod_utime():
        os.chmod("g", 0o600)
        os.utime("g", ns=(1_000_000_000, 2_000_000_123))
        st = os.stat("g")
        return oct(st.st_mode), st.st_mtime_ns, st.st_size, st.st_nlink

    def errors():
        return [outcome(os.rmdir, "g"), outcome(os.unlink, "missing"),
                outcome(os.open, "g/x", os.O_RDONLY), outcome(os.mkdir, "g")]

    return [(fn.__name__, fn) for fn in (create_write_fsync, truncate, open_trunc_write,
                                         ftruncate_fsync, append, rename, mkdir_rmdir, unlink,
                                         chmod_utime, errors)]


def run_deep(root, out: list) -> None:
    old = os.getcwd()
    try:
        os.chdir(root)
        for _ in range(DEPTH):
            os.mkdir(NAME)
            os.chdir(NAME)
        for what, fn in steps():
            out.append((what, outcome(fn)))
    finally:
        os.chdir(old)


def test_deep_paths_behave_as_on_ext4(mounted, tmp_path):
    native = tmp_path / "native"
    native.mkdir()
    deep_rel = "/".join([NAME] * DEPTH)
    assert len(os.fsencode(os.path.join(str(mounted.src), deep_rel))) > 4096  # beyond PATH_MAX
    got_native, got_mount = [], []
    run_deep(native, got_native)
    run_deep(mounted.mnt, got_mount)
    for (what, a), (_, b) in zip(got_native, got_mount):
        assert a == b, f"{what}: native {a!r} != mount {b!r}"
    assert got_native[0][1][0] == "ok" and len(got_mount) == len(steps())

    # every save is a version `cat` returns (the journal knows the deep path); g was f before a
    # rename, so its history before that is under f: log --follow lists it
    run_cli("flush", mounted.mnt, check=True)
    rel = deep_rel + "/g"
    res = run_cli("log", "--records", "--follow", "--journal", mounted.journal, rel, "--json", check=True)
    versions = [json.loads(x) for x in res.stdout.decode().splitlines()]
    writes = sorted((v for v in versions if v["op"] == "write"), key=lambda v: v["version"])
    assert {v["path"] for v in writes} == {deep_rel + "/f"}  # saved before the rename
    contents = [run_cli("cat", "--journal", mounted.journal, v["path"], "--version", str(v["version"]),
                        check=True).stdout for v in writes]
    assert contents == [b"one\n", b"on", b"two\n", b"two", b"twothree\n"], contents
    st = json.loads(run_cli("status", mounted.mnt, "--json", check=True).stdout)
    assert st["capture"]["failures"] == 0 and st["capture"]["gap"] == 0
    mounted.umount()  # no WARNING or ERROR logged
