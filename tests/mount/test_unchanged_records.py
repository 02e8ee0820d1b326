"""A metadata call that changes nothing leaves no record (issue 17).

vim, after every save, chmods the file to the mode it already has and sets
a system.posix_acl_access equal to that mode: history must show the save
as one content version and nothing else.  Calls that do change something
are still recorded (the controls below).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from deltafs.journal import Journal
from fusetools import IN_CI

pytestmark = pytest.mark.timeout(120)

VIM = "vim.tiny"  # Makefile's apt list installs vim-tiny


def records_of(journal, path: str) -> list:
    with Journal.open(str(journal), readonly=True) as j, j.reader() as r:
        return [(rec.op, rec.cause, r.read_content(rec.seq) if rec.op == "write" else None)
                for rec in r.records() if rec.path == path.encode()]


def acl_for_mode(mode: int) -> bytes:
    """The minimal POSIX ACL (owner, group, other) equivalent to mode, as vim writes it."""
    entries = ((0x01, mode >> 6 & 7), (0x04, mode >> 3 & 7), (0x20, mode & 7))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                           for tag, perm in entries)


def test_vim_save_is_one_content_version(mounted):
    if shutil.which(VIM) is None:
        msg = f"{VIM} is not installed (apt-get install vim-tiny)"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    p = mounted.mnt / "notes.txt"
    p.write_bytes(b"first line\n")
    os.chmod(p, 0o640)
    for word in ("second", "third"):
        res = subprocess.run([VIM, "-u", "NONE", "-i", "NONE", "-N", "-n", "-es",
                              "-c", f"normal Go{word} line", "-c", "wq", str(p)],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert p.read_bytes() == b"first line\nsecond line\nthird line\n"
    assert os.stat(p).st_mode & 0o7777 == 0o640
    mounted.umount()
    # each save: exactly one content version, no setattr or setxattr record
    assert records_of(mounted.journal, "notes.txt") == [
        ("create", None, None), ("write", "write", b"first line\n"), ("setattr", None, None),
        ("write", "fsync", b"first line\nsecond line\n"),
        ("write", "fsync", b"first line\nsecond line\nthird line\n")]


def test_metadata_calls_that_change_nothing(mounted):
    p = mounted.mnt / "f"
    p.write_bytes(b"data\n")
    os.chmod(p, 0o600)  # a change: recorded
    st = os.stat(p)
    os.chmod(p, 0o600)  # the same mode
    os.chown(p, st.st_uid, st.st_gid)  # the same owner
    os.setxattr(p, "system.posix_acl_access", acl_for_mode(0o600))  # equal to the mode
    os.setxattr(p, "user.tag", b"one")  # a change: recorded
    os.setxattr(p, "user.tag", b"one")  # the same value
    os.setxattr(p, "system.posix_acl_access", acl_for_mode(0o640))  # changes the mode: recorded
    # (in SRC: the kernel keeps the mode it cached, an ACL does not invalidate it)
    assert os.stat(mounted.src / "f").st_mode & 0o7777 == 0o640
    os.chmod(p, 0o640)  # the mode SRC has now
    mounted.umount()
    ops = [op for op, _, _ in records_of(mounted.journal, "f")]
    assert ops == ["create", "write", "setattr", "setxattr", "setxattr"], ops
