"""Differential test: one random sequence of filesystem calls, native vs. the mount.

A hypothesis state machine applies every call to a directory on the native
filesystem and to the same relative path inside a deltafs mount (SRC lives
on the same filesystem as the native directory), and compares what came
back: the value or the errno of every call, and after every step the whole
tree (listings, file contents, symlink targets, xattrs, and the stat fields
that must match: mode, nlink, uid, gid, size; mtime and atime right after
they were set explicitly).  Not compared: st_ino, st_dev, st_blocks, atime
and ctime in general (docs/fuse-notes.md lists the known differences).

DELTAFS_DIFF_EXAMPLES=500 runs a longer search (the default keeps a run
to about 150 compared calls per case, a few seconds).  One case runs with
the default descriptor budget, one with ``--fd-budget 4``: the daemon then
closes and reopens its inode descriptors all the time, so hard links,
renames of open files and unlinked-but-open files are compared while their
descriptors come and go.

fallocate(2) runs in every mode FUSE passes on (plain, KEEP_SIZE,
PUNCH_HOLE, ZERO_RANGE, each with and without KEEP_SIZE where allowed);
COLLAPSE_RANGE, INSERT_RANGE and UNSHARE_RANGE are left out: the kernel
answers EOPNOTSUPP for them on every FUSE filesystem before the daemon sees
them.  Where the backing filesystem refuses a mode, both sides must refuse
it alike.  Sparse files come from truncate and writes past EOF; their
holes are compared by SEEK_DATA/SEEK_HOLE only where the mount supports
lseek (it answers as for a file without holes otherwise, as FUSE does).

Names come from a three-letter alphabet in a two-level tree, so calls
collide: renames over files and directories, unlinks of open files,
rmdir of non-empty directories, renames of a directory into itself.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat

import pyfuse3
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from fusetools import run_cli

pytestmark = pytest.mark.timeout(300)

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_OMIT = (1 << 30) - 2
MAX_FDS = 4
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10
# deltafs's pyfuse3 build passes fallocate on; a stock pyfuse3 answers EOPNOTSUPP (the fallback)
PATCHED_FALLOCATE = "fallocate" in getattr(pyfuse3, "DELTAFS_PATCHES", ())
FALLOC_MODES = [0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, FALLOC_ZERO_RANGE,
                FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE,
                FALLOC_PUNCH_HOLE]  # PUNCH_HOLE alone: EOPNOTSUPP on both sides


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.getxattr.restype = ctypes.c_ssize_t
_libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.listxattr.restype = ctypes.c_ssize_t
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _ok(res: int) -> int:
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return res


def renameat2(old: str, new: str, flags: int) -> None:
    _ok(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def utimensat(path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
    def ts(ns):
        return _Timespec(0, UTIME_OMIT) if ns is None else _Timespec(ns // 10**9, ns % 10**9)
    times = (_Timespec * 2)(ts(atime_ns), ts(mtime_ns))
    _ok(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0))


def fallocate(fd: int, mode: int, offset: int, length: int) -> tuple:
    """fallocate(2) with a mode; -> the size and content after it (what a program sees)."""
    _ok(_libc.fallocate(fd, mode, offset, length))
    size = os.fstat(fd).st_size
    return size, os.pread(fd, size + 1, 0)


def getxattr_sized(path: str, name: str, size: int) -> bytes | int:
    """getxattr(2) with a caller-sized buffer: size 0 returns the length, too small gives ERANGE."""
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _ok(_libc.getxattr(os.fsencode(path), name.encode(), buf if size else None, size))
    return n if size == 0 else buf.raw[:n]


def listxattr_sized(path: str, size: int) -> bytes | int:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _ok(_libc.listxattr(os.fsencode(path), buf if size else None, size))
    if size == 0:
        return n
    return b"\0".join(sorted(buf.raw[:n].split(b"\0")))


def outcome(fn, *args):
    """('ok', value) or ('err', errno name): what a program would see."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def stat_key(s: os.stat_result) -> tuple:
    return (stat.filemode(s.st_mode), s.st_nlink, s.st_uid, s.st_gid, s.st_size)


def snapshot(root: str) -> dict:
    """Everything about a tree that must be the same natively and through the mount."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        out[rel_dir + "/"] = ("dir", sorted(dirnames + filenames), stat_key(os.lstat(dirpath)),
                              sorted(os.listxattr(dirpath)))
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            s = os.lstat(p)
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("link", os.readlink(p), stat_key(s))
            elif stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
                xattrs = {n: os.getxattr(p, n) for n in os.listxattr(p)}
                out[rel] = ("file", data, stat_key(s), xattrs)
            else:
                out[rel] = ("other", stat_key(s))
    return out


names = st.sampled_from(["a", "b", "c"])
paths = st.lists(names, min_size=1, max_size=2).map("/".join)
modes = st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o444, 0o640, 0o4755, 0o1777])
offsets = st.one_of(st.integers(0, 64), st.sampled_from([4095, 4096, 5000, 70000]))
data = st.binary(min_size=0, max_size=80)
sizes = st.one_of(st.integers(0, 100), st.sampled_from([4096, 9000]))
targets = st.sampled_from(["a", "b", "c/a", "../a", "b/../a", ".", "missing"])
xnames = st.sampled_from(["user.x", "user.y", "user.zz"])
xvalues = st.binary(min_size=0, max_size=20)
times = st.integers(0, 2**33).map(lambda s: s * 10**9 + 123_456_789)
open_flags = st.tuples(
    st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]),
    st.sampled_from([0, os.O_CREAT, os.O_CREAT, os.O_CREAT | os.O_EXCL]),
    st.sampled_from([0, os.O_TRUNC]),
    st.sampled_from([0, os.O_APPEND]),
).map(lambda t: t[0] | t[1] | t[2] | t[3])


def make_machine(native_base: str, mount_base: str, calls: list[int]):
    """calls[0] counts the compared calls, so a test can tell it did real work."""
    counter = [0]

    class Differential(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            counter[0] += 1
            run = f"r{counter[0]}"
            self.roots = (os.path.join(native_base, run), os.path.join(mount_base, run))
            for r in self.roots:
                os.mkdir(r)
            self.fds: list[tuple[int, int, str]] = []  # (native fd, mount fd, description)

        @initialize(kinds=st.lists(st.sampled_from(["file", "dir", "dir", "none"]), min_size=3, max_size=3),
                    content=data)
        def seed(self, kinds, content):
            """Start from a small tree, so most calls find something to act on."""
            for root in self.roots:
                for name, kind in zip("abc", kinds):
                    p = os.path.join(root, name)
                    if kind == "file":
                        with open(p, "wb") as f:
                            f.write(content)
                    elif kind == "dir":
                        os.mkdir(p)
                        for child in "ab":
                            with open(os.path.join(p, child), "wb") as f:
                                f.write(content + child.encode())

        # ---- helpers -------------------------------------------------

        def both(self, fn, *rels, extra=()):
            """Apply fn(abs paths..., *extra) on each side and check both saw the same."""
            calls[0] += 1
            results = []
            for root in self.roots:
                results.append(outcome(fn, *[os.path.join(root, r) for r in rels], *extra))
            assert results[0] == results[1], f"{getattr(fn, '__name__', fn)}{rels + tuple(extra)}: " \
                                             f"native {results[0]!r} != mount {results[1]!r}"
            return results[0]

        def on_fd(self, i, fn, *extra):
            calls[0] += 1
            nfd, mfd, what = self.fds[i % len(self.fds)]
            a, b = outcome(fn, nfd, *extra), outcome(fn, mfd, *extra)
            assert a == b, f"{fn.__name__}({what}, {extra}): native {a!r} != mount {b!r}"
            return a

        # ---- open files ------------------------------------------------

        @precondition(lambda self: len(self.fds) < MAX_FDS)
        @rule(path=paths, flags=open_flags, mode=modes)
        def open(self, path, flags, mode):
            # O_NONBLOCK: opening a FIFO must not wait for a peer.
            flags |= os.O_NONBLOCK | os.O_CLOEXEC
            got = [outcome(os.open, os.path.join(r, path), flags, mode) for r in self.roots]
            if got[0][0] == got[1][0] == "ok":
                self.fds.append((got[0][1], got[1][1], f"{path} flags={flags:#o}"))
                return
            for kind, fd in got:
                if kind == "ok":
                    os.close(fd)
            assert got[0] == got[1], f"open({path}, {flags:#o}): native {got[0]!r} != mount {got[1]!r}"

        @precondition(lambda self: self.fds)
        @rule(i=st.integers(0, MAX_FDS), off=offsets, buf=data)
        def pwrite(self, i, off, buf):
            self.on_fd(i, os.pwrite, buf, off)

        @precondition(lambda self: self.fds)
        @rule(i=st.integers(0, MAX_FDS), buf=data)
        def write(self, i, buf):
            self.on_fd(i, os.write, buf)

        @precondition(lambda self: self.fds)
        @rule(i=st.integers(0, MAX_FDS), off=offsets, size=st.integers(0, 200))
        def pread(self, i, off, size):
            self.on_fd(i, os.pread, size, off)

        @precondition(lambda self: self.fds)
        @rule(i=st.integers(0, MAX_FDS), size=sizes)
        def ftruncate(self, i, size):
            self.on_fd(i, os.ftruncate, size)

        @precondition(lambda self: self.fds and PATCHED_FALLOCATE)
        @rule(i=st.integers(0, MAX_FDS), mode=st.sampled_from(FALLOC_MODES), off=offsets,
              length=st.one_of(st.integers(1, 100), st.sampled_from([4096, 8192, 70000])))
        def fallocate(self, i, mode, off, length):
            self.on_fd(i, fallocate, mode, off, length)

        @precondition(lambda self: self.fds)
        @rule(i=st.integers(0, MAX_FDS))
        def fsync(self, i):
            self.on_fd(i, os.fsync)

        @precondition(lambda self: self.fds)
        @rule(i=st.integers(0, MAX_FDS))
        def fstat(self, i):
            self.on_fd(i, lambda fd: stat_key(os.fstat(fd)))

        @precondition(lambda self: self.fds)
        @rule(i=st.integers(0, MAX_FDS))
        def close(self, i):
            nfd, mfd, _ = self.fds.pop(i % len(self.fds))
            a, b = outcome(os.close, nfd), outcome(os.close, mfd)
            assert a == b

        # ---- namespace ---------------------------------------------------

        @rule(path=paths, size=sizes)
        def truncate(self, path, size):
            self.both(os.truncate, path, extra=(size,))

        @rule(path=paths)
        def unlink(self, path):
            self.both(os.unlink, path)

        @rule(path=paths, mode=st.sampled_from([0o755, 0o700, 0o777, 0o2755]))
        def mkdir(self, path, mode):
            self.both(os.mkdir, path, extra=(mode,))

        @rule(path=paths)
        def rmdir(self, path):
            self.both(os.rmdir, path)

        @rule(old=paths, new=paths, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
        def rename(self, old, new, flags):
            self.both(renameat2, old, new, extra=(flags,))

        @rule(old=paths, new=paths)
        def link(self, old, new):
            self.both(os.link, old, new)

        @rule(dest=targets, path=paths)
        def symlink(self, dest, path):
            self.both(lambda p: os.symlink(dest, p), path)

        @rule(path=paths)
        def readlink(self, path):
            self.both(os.readlink, path)

        @rule(path=paths)
        def mkfifo(self, path):
            self.both(os.mkfifo, path, extra=(0o640,))

        @rule(path=paths, mode=modes)
        def chmod(self, path, mode):
            self.both(os.chmod, path, extra=(mode,))

        @rule(path=paths)
        def listdir(self, path):
            self.both(lambda p: sorted(os.listdir(p)), path)

        @rule(path=paths)
        def lstat(self, path):
            self.both(lambda p: stat_key(os.lstat(p)), path)

        @rule(path=paths, atime=times, mtime=times)
        def utime(self, path, atime, mtime):
            def set_and_get(p):
                os.utime(p, ns=(atime, mtime))
                s = os.stat(p)
                return s.st_atime_ns, s.st_mtime_ns
            self.both(set_and_get, path)

        @rule(path=paths, t=times, which=st.sampled_from(["atime", "mtime"]))
        def utime_omit(self, path, t, which):
            """utimensat with UTIME_OMIT for one of the two times."""
            def set_and_get(p):
                before = os.stat(p)
                utimensat(p, t if which == "atime" else None, t if which == "mtime" else None)
                after = os.stat(p)
                if which == "atime":
                    return after.st_atime_ns, after.st_mtime_ns == before.st_mtime_ns
                return after.st_mtime_ns, after.st_atime_ns == before.st_atime_ns
            self.both(set_and_get, path)

        # ---- xattrs ------------------------------------------------------

        @rule(path=paths, name=xnames, value=xvalues,
              flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))
        def setxattr(self, path, name, value, flags):
            self.both(os.setxattr, path, extra=(name, value, flags))

        @rule(path=paths, name=xnames)
        def getxattr(self, path, name):
            self.both(os.getxattr, path, extra=(name,))

        @rule(path=paths, name=xnames, size=st.integers(0, 3))
        def getxattr_small_buffer(self, path, name, size):
            self.both(getxattr_sized, path, extra=(name, size))

        @rule(path=paths, size=st.sampled_from([0, 1, 7, 1024]))
        def listxattr(self, path, size):
            self.both(listxattr_sized, path, extra=(size,))

        @rule(path=paths, name=xnames)
        def removexattr(self, path, name):
            self.both(os.removexattr, path, extra=(name,))

        # ---- the whole tree after every step ---------------------------------

        @invariant()
        def trees_match(self):
            a, b = snapshot(self.roots[0]), snapshot(self.roots[1])
            if a != b:
                diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
                raise AssertionError(f"trees differ (native, mount): {diff}")

        def teardown(self):
            for nfd, mfd, _ in self.fds:
                os.close(nfd)
                os.close(mfd)
            self.fds.clear()

    return Differential


@pytest.mark.parametrize("budget", [None, "4"], ids=["default-budget", "fd-budget-4"])
def test_native_and_mount_agree(mount_factory, tmp_path, budget):
    mounted = mount_factory(None, *(["--fd-budget", budget] if budget else []))
    native = tmp_path / "native"
    native.mkdir()
    calls = [0]
    machine = make_machine(str(native), str(mounted.mnt), calls)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=int(os.environ.get("DELTAFS_DIFF_EXAMPLES", "8")), stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    print(f"{calls[0]} calls compared")
    assert calls[0] >= 100
    if budget:  # the small budget really made the daemon close and reopen descriptors
        st = json.loads(run_cli("status", mounted.mnt, "--json", check=True).stdout)
        assert st["descriptors"]["budget"] == 4
        assert st["descriptors"]["evictions"] > 0 and st["descriptors"]["reopens"] > 0
    mounted.umount()


def test_unlinked_open_file_matches_native(mounted, tmp_path):
    """The deterministic core of the machine: unlink an open file, keep using it."""
    native = tmp_path / "native"
    native.mkdir()
    results = []
    for root in (native, mounted.mnt):
        p = root / "f"
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o640)
        try:
            os.write(fd, b"hello")
            os.unlink(p)
            os.pwrite(fd, b"XY", 0)  # O_APPEND: Linux appends whatever the offset
            os.ftruncate(fd, 6)
            os.fsync(fd)
            s = os.fstat(fd)
            results.append((os.pread(fd, 100, 0), s.st_nlink, s.st_size, stat.S_IMODE(s.st_mode),
                            os.path.lexists(p)))
        finally:
            os.close(fd)
    assert results[0] == results[1] == [(b"helloX", 0, 6, 0o640, False)][0]


def test_edge_cases_match_native(mounted, tmp_path):
    """Errors the random search reaches only rarely, compared call by call."""
    native = tmp_path / "native"
    native.mkdir()
    roots = (str(native), str(mounted.mnt))
    seen = []

    def open_close(path, flags, mode=0o600):
        os.close(os.open(path, flags, mode))

    def both(fn, *rels, extra=()):
        got = [outcome(fn, *[os.path.join(r, p) for p in rels], *extra) for r in roots]
        assert got[0] == got[1], f"{fn.__name__}{rels}: native {got[0]!r} != mount {got[1]!r}"
        seen.append(got[0])
        return got[0]

    for r in roots:
        os.makedirs(os.path.join(r, "d/sub"))
        os.makedirs(os.path.join(r, "e"))
        with open(os.path.join(r, "d/f"), "wb") as f:
            f.write(b"0123456789")
        with open(os.path.join(r, "g"), "wb") as f:
            f.write(b"g")
    assert both(renameat2, "d", "d/sub/x", extra=(0,)) == ("err", "EINVAL")  # into itself
    assert both(renameat2, "d", "d/sub", extra=(0,)) == ("err", "EINVAL")
    assert both(renameat2, "e", "d", extra=(0,)) == ("err", "ENOTEMPTY")  # over a non-empty dir
    assert both(renameat2, "g", "e", extra=(0,)) == ("err", "EISDIR")
    assert both(renameat2, "e", "g", extra=(0,)) == ("err", "ENOTDIR")
    assert both(renameat2, "g", "d/f", extra=(RENAME_NOREPLACE,)) == ("err", "EEXIST")
    assert both(renameat2, "g", "d/f", extra=(RENAME_EXCHANGE,)) == ("ok", None)
    assert both(renameat2, "g", "nope", extra=(RENAME_EXCHANGE,)) == ("err", "ENOENT")
    assert both(renameat2, "e", "d/f", extra=(RENAME_EXCHANGE,)) == ("ok", None)  # dir <-> file
    assert both(renameat2, "g", "g", extra=(0,)) == ("ok", None)
    assert both(renameat2, "d/sub", "e2", extra=(RENAME_NOREPLACE | RENAME_EXCHANGE,)) == ("err", "EINVAL")
    assert both(os.rmdir, "d") == ("err", "ENOTEMPTY")
    assert both(os.rmdir, "d/sub") == ("ok", None)
    assert both(os.link, "d", "dl") == ("err", "EPERM")  # no hard links to directories
    os.setxattr(os.path.join(roots[0], "g"), "user.long", b"x" * 100)
    os.setxattr(os.path.join(roots[1], "g"), "user.long", b"x" * 100)
    assert both(getxattr_sized, "g", extra=("user.long", 0)) == ("ok", 100)
    assert both(getxattr_sized, "g", extra=("user.long", 10)) == ("err", "ERANGE")
    assert both(getxattr_sized, "g", extra=("user.long", 100)) == ("ok", b"x" * 100)
    assert both(listxattr_sized, "g", extra=(3,)) == ("err", "ERANGE")
    assert both(os.getxattr, "g", extra=("user.none",)) == ("err", "ENODATA")
    assert both(os.setxattr, "g", extra=("user.long", b"y", os.XATTR_CREATE)) == ("err", "EEXIST")
    assert both(os.setxattr, "g", extra=("user.new", b"y", os.XATTR_REPLACE)) == ("err", "ENODATA")
    assert both(os.removexattr, "g", extra=("user.none",)) == ("err", "ENODATA")
    assert both(open_close, "g", extra=(os.O_CREAT | os.O_EXCL | os.O_WRONLY,)) == ("err", "EEXIST")
    assert both(open_close, "d/f", extra=(os.O_WRONLY,)) == ("err", "EISDIR")  # exchanged above
    assert both(open_close, "g/x", extra=(os.O_RDONLY,)) == ("err", "ENOTDIR")
    os.mkfifo(os.path.join(roots[0], "p"))
    os.mkfifo(os.path.join(roots[1], "p"))
    assert both(open_close, "p", extra=(os.O_WRONLY | os.O_NONBLOCK,)) == ("err", "ENXIO")
    os.symlink("loop", os.path.join(roots[0], "loop"))
    os.symlink("loop", os.path.join(roots[1], "loop"))
    assert both(os.stat, "loop")[1] == "ELOOP"
    assert both(open_close, "loop", extra=(os.O_RDONLY | os.O_NOFOLLOW,)) == ("err", "ELOOP")
    assert both(lambda p: os.truncate(p, -1), "g") == ("err", "EINVAL")
    assert both(lambda p: (utimensat(p, None, 5 * 10**9 + 1), os.stat(p).st_mtime_ns)[1], "g") \
        == ("ok", 5 * 10**9 + 1)
    assert both(lambda p: (utimensat(p, 7 * 10**9, None), os.stat(p).st_mtime_ns)[1], "g") \
        == ("ok", 5 * 10**9 + 1)
    assert snapshot(roots[0]) == snapshot(roots[1])


def test_fallocate_modes_match_native(mounted, tmp_path):
    """Each fallocate mode FUSE passes on, on a file with content, compared with native; the
    version captured at close is the content the program sees (punched and zeroed ranges
    included), and `cat` returns it."""
    native = tmp_path / "native"
    native.mkdir()
    body = bytes(range(256)) * 400  # 100 KiB, no zero runs of its own
    if not PATCHED_FALLOCATE:  # stock pyfuse3: the documented fallback, EOPNOTSUPP
        (mounted.mnt / "f").write_bytes(body)
        fd = os.open(mounted.mnt / "f", os.O_RDWR)
        try:
            assert all(outcome(fallocate, fd, mode, 0, 10) == ("err", "EOPNOTSUPP") for mode in FALLOC_MODES)
        finally:
            os.close(fd)
        return
    cases = [(mode, off, length) for mode in FALLOC_MODES
             for off, length in ((4096, 8192), (100, 5), (90000, 30000), (200000, 4096))]
    for n, (mode, off, length) in enumerate(cases):
        got = []
        for root in (native, mounted.mnt):
            p = root / f"f{n}"
            p.write_bytes(body)
            fd = os.open(p, os.O_RDWR)
            try:
                got.append(outcome(fallocate, fd, mode, off, length))
            finally:
                os.close(fd)
        assert got[0] == got[1], f"fallocate(mode={mode:#x}, {off}, {length}): native {got[0][0]} " \
                                 f"{got[0][1] if got[0][0] == 'err' else ''} != mount {got[1][0]}"
    run_cli("flush", mounted.mnt, check=True)
    changed = 0
    for n, _ in enumerate(cases):
        want = (native / f"f{n}").read_bytes()
        assert (mounted.mnt / f"f{n}").read_bytes() == want
        res = run_cli("cat", mounted.mnt / f"f{n}", check=True)
        assert res.stdout == want, f"case {cases[n]}: the captured version differs from the file"
        changed += want != body
    assert changed >= 12  # the modes really changed content (punch, zero, extend)
