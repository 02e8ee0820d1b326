"""Syscalls the os module lacks: renameat2, fallocate with modes, the AT_EMPTY_PATH forms,
and paths longer than PATH_MAX (``at_path``).

The mount keeps one O_PATH descriptor per inode the kernel knows; these
wrappers act on the inode behind such a descriptor (also a symlink's own
inode), which chmod/chown/utime through /proc/self/fd cannot always do.
"""

from __future__ import annotations

import ctypes
import errno
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int = 0) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE)."""
    if flags == 0:
        os.rename(old, new, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    _check(_libc.renameat2(olddirfd, old, newdirfd, new, flags), "renameat2")


def _ts(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def utimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of the inode behind fd (O_PATH allowed); None = leave as is."""
    times = (_Timespec * 2)(_ts(atime_ns), _ts(mtime_ns))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH), "utimensat")


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the inode behind fd (O_PATH allowed, symlinks not followed); -1 = keep."""
    _check(
        _libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        "fchownat",
    )


_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
AT_SYMLINK_FOLLOW = 0x400


def link_fd(fd: int, newdirfd: int, newname: bytes) -> None:
    """Hard-link the inode behind fd (O_PATH allowed) as newdirfd/newname.

    AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; without it, link through the
    /proc/self/fd magic link, which works for unprivileged daemons.
    """
    if _libc.linkat(fd, b"", newdirfd, newname, AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EPERM):  # no CAP_DAC_READ_SEARCH
        raise OSError(err, f"linkat: {os.strerror(err)}")
    src = f"/proc/self/fd/{fd}".encode()
    _check(_libc.linkat(-100, src, newdirfd, newname, AT_SYMLINK_FOLLOW), "linkat")


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


PATH_SAFE = 3072  # joined paths up to this long are used as they are


def at_path(root: bytes, rel: bytes, fn, *args, **kw):
    """``fn(name, *args, dir_fd=D, **kw)`` for the file at root/rel, at any depth.

    A path longer than PATH_MAX is refused by the kernel, though the file
    is reachable step by step: the directories are opened a few components
    at a time (``O_PATH``, following symlinks as a whole path would), and
    fn gets the last component relative to the last of them.  Short paths
    go in one call (dir_fd=None).  ``fn`` is any os function with dir_fd:
    os.open, os.stat, os.readlink...
    """
    path = os.path.join(root, rel) if rel else root
    if len(path) <= PATH_SAFE:
        return fn(path, *args, dir_fd=None, **kw)
    head, name = os.path.split(path)
    parts = head.split(b"/")
    dfd = os.open(b"/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        i = 1  # parts[0] is b"" (absolute path)
        while i < len(parts):
            j, size = i, 0
            while j < len(parts) and (j == i or size + len(parts[j]) + 1 <= PATH_SAFE):
                size += len(parts[j]) + 1
                j += 1
            nxt = os.open(b"/".join(parts[i:j]) or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                          dir_fd=dfd)
            os.close(dfd)
            dfd = nxt
            i = j
        return fn(name or b".", *args, dir_fd=dfd, **kw)
    finally:
        os.close(dfd)


_libc.syncfs.argtypes = [ctypes.c_int]


def syncfs(fd: int) -> None:
    """syncfs(2): write out every dirty page and inode of the filesystem holding ``fd``
    (one call instead of an fsync per file)."""
    _check(_libc.syncfs(fd), "syncfs")


def set_bdi_readahead(mnt: str, kib: int) -> None:
    """Set the kernel's read-ahead of the FUSE mount at ``mnt`` (absolute and
    resolved) to ``kib`` KiB, through /sys/class/bdi.  The mount's device
    number comes from /proc/self/mountinfo: nothing here touches the mount
    point (even a realpath() of it would ask the daemon serving it).  Call it
    once the INIT reply is sent: the kernel caps read-ahead then.  Needs root;
    raises OSError otherwise or when the mount is not listed."""
    # mountinfo escapes blanks and backslashes as octal
    want = "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in mnt)
    with open("/proc/self/mountinfo") as f:
        devs = [parts[2] for parts in map(str.split, f) if len(parts) > 4 and parts[4] == want]
    if not devs:
        raise OSError(errno.ENOENT, "not in /proc/self/mountinfo", mnt)
    with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
        f.write(str(kib))
