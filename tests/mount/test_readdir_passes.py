"""A directory listing through the mount shows no name twice, also when
names are created while it is read (issue 23: ``ls -la`` once listed a
directory twice after rsync through the mount)."""

import collections
import ctypes
import os
import subprocess
import threading

import pytest

pytestmark = pytest.mark.timeout(120)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.c_void_p
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]
_NAME_AT = 19  # struct dirent (glibc, 64-bit): d_ino 8, d_off 8, d_reclen 2, d_type 1, d_name


def _listing_with(path: str, between) -> list[bytes]:
    """readdir(3) of ``path``: the first entry (one getdents: the whole small
    directory), then ``between()``, then the rest up to the end."""
    d = _libc.opendir(os.fsencode(path))
    assert d, os.strerror(ctypes.get_errno())
    names = []
    try:
        first = True
        while True:
            ent = _libc.readdir(d)
            if not ent:
                break
            names.append(ctypes.string_at(ent + _NAME_AT))
            if first:
                first = False
                between()
    finally:
        _libc.closedir(d)
    return names


def test_names_created_during_a_listing_do_not_repeat_others(mounted):
    d = mounted.mnt / "dept3"
    d.mkdir()
    for i in range(12):
        (d / f"f{i}").write_text("x")

    def create_more():
        for i in range(40):
            (d / f"new{i}").write_text("y")

    names = _listing_with(str(d), create_more)
    twice = [n for n, k in collections.Counter(names).items() if k > 1]
    assert not twice, f"listed twice: {twice}"
    assert {f"f{i}".encode() for i in range(12)} <= set(names)


def test_concurrent_listings_and_creates_never_repeat_a_name(mounted):
    d = mounted.mnt / "d"
    d.mkdir()
    for i in range(20):
        (d / f"f{i}").write_text("x")
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            p = d / f"new{i}"
            p.write_text("")
            if i % 2:
                p.unlink()
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    bad = []
    try:
        for _ in range(60):
            out = subprocess.run(["ls", "-a1", str(d)], capture_output=True, check=True).stdout.split(b"\n")
            twice = [n for n, k in collections.Counter(n for n in out if n).items() if k > 1]
            if twice:
                bad.append(twice)
    finally:
        stop.set()
        t.join()
    assert not bad, f"{len(bad)} of 60 listings showed names twice, e.g. {bad[0]}"
    assert sorted(os.listdir(d)) == sorted(os.listdir(mounted.src / "d"))
