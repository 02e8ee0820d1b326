"""The mount passes operations through with native semantics."""

import errno
import os
import stat
import subprocess

import pytest
from pathlib import Path

from fusetools import IN_CI

pytestmark = pytest.mark.timeout(60)


def test_files_written_through_appear_in_src(mounted):
    (mounted.mnt / "a.txt").write_text("hello\n")
    assert (mounted.src / "a.txt").read_text() == "hello\n"
    with open(mounted.mnt / "a.txt", "a") as f:
        f.write("world\n")
    assert (mounted.src / "a.txt").read_text() == "hello\nworld\n"
    assert (mounted.mnt / "a.txt").read_text() == "hello\nworld\n"


def test_journal_is_invisible_and_unreachable(mounted):
    assert mounted.journal.is_dir()
    assert ".deltafs" not in os.listdir(mounted.mnt)
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.mnt / ".deltafs")
    with pytest.raises(FileNotFoundError):
        open(mounted.mnt / ".deltafs" / "lock")
    with pytest.raises(OSError):
        os.rename(mounted.mnt / ".deltafs", mounted.mnt / "stolen")
    assert mounted.journal.is_dir()


def test_hard_links_are_one_inode(mounted):
    p = mounted.mnt / "x"
    p.write_text("1")
    os.link(p, mounted.mnt / "y")
    a, b = os.stat(p), os.stat(mounted.mnt / "y")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert os.stat(mounted.src / "x").st_ino == os.stat(mounted.src / "y").st_ino


def test_unlinked_open_file_stays_usable(mounted):
    p = mounted.mnt / "tmp"
    with open(p, "w+") as f:
        f.write("abc")
        f.flush()
        os.unlink(p)
        f.write("def")
        f.flush()
        f.seek(0)
        assert f.read() == "abcdef"
        assert os.fstat(f.fileno()).st_nlink == 0
    assert not (mounted.src / "tmp").exists()


def test_rename_flags(mounted):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    a, b = mounted.mnt / "a", mounted.mnt / "b"
    a.write_text("A")
    b.write_text("B")
    AT_FDCWD = -100
    res = libc.renameat2(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), 1)  # NOREPLACE
    assert res == -1 and ctypes.get_errno() == errno.EEXIST
    res = libc.renameat2(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), 2)  # EXCHANGE
    assert res == 0
    assert a.read_text() == "B" and b.read_text() == "A"


def test_xattrs(mounted):
    p = mounted.mnt / "f"
    p.write_text("x")
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    assert "user.color" in os.listxattr(p)
    assert os.getxattr(mounted.src / "f", "user.color") == b"blue"
    with pytest.raises(OSError) as e:
        os.getxattr(p, "user.missing")
    assert e.value.errno == errno.ENODATA
    os.removexattr(p, "user.color")
    assert "user.color" not in os.listxattr(p)


def test_new_files_get_caller_mode_and_owner(mounted):
    old = os.umask(0o027)
    try:
        fd = os.open(mounted.mnt / "m", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(mounted.mnt / "d", 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(mounted.src / "m").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(mounted.src / "d").st_mode) == 0o750


def test_special_files(mounted):
    os.mkfifo(mounted.mnt / "fifo")
    assert stat.S_ISFIFO(os.stat(mounted.src / "fifo").st_mode)
    os.symlink("target/../x", mounted.mnt / "ln")
    assert os.readlink(mounted.mnt / "ln") == "target/../x"
    os.utime(mounted.mnt / "ln", ns=(5 * 10**9, 7 * 10**9), follow_symlinks=False)
    assert os.lstat(mounted.src / "ln").st_mtime_ns == 7 * 10**9


def test_statfs_matches_backing(mounted):
    a, b = os.statvfs(mounted.mnt), os.statvfs(mounted.src)
    assert a.f_namemax == b.f_namemax and a.f_blocks == b.f_blocks and a.f_bsize == b.f_bsize


def test_sparse_file_blocks(mounted):
    p = mounted.mnt / "sparse"
    with open(p, "wb") as f:
        f.seek(100 << 20)
        f.write(b"x")
    assert os.stat(p).st_size == (100 << 20) + 1
    assert os.stat(p).st_blocks < 1000


def test_mmap_writes_reach_src(mounted):
    import mmap
    p = mounted.mnt / "mm"
    p.write_bytes(b"\0" * 8192)
    with open(p, "r+b") as f:
        with mmap.mmap(f.fileno(), 8192) as m:
            m[100:105] = b"hello"
            m.flush()
    assert (mounted.src / "mm").read_bytes()[100:105] == b"hello"


def test_fsync_and_odirect(mounted):
    p = mounted.mnt / "direct"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    try:
        buf = bytearray(4096)
        os.write(fd, bytes(buf))
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (mounted.src / "direct").stat().st_size == 4096


def test_large_directory_listing(mounted):
    d = mounted.mnt / "many"
    d.mkdir()
    names = {f"file-{i:05d}-{'x' * 40}" for i in range(3000)}
    for n in names:
        (d / n).touch()
    assert set(os.listdir(d)) == names
    assert set(os.listdir(mounted.src / "many")) == names


def test_cached_listings_follow_every_change(mounted):
    """The kernel keeps directory listings (patched pyfuse3: no opendir);
    every change through the mount must still show in the next listing."""
    d = mounted.mnt / "d"
    d.mkdir()
    (d / "a").write_text("a")
    (d / "sub").mkdir()
    steps = [
        (lambda: (d / "b").write_text("b"), {"a", "b", "sub"}),
        (lambda: os.unlink(d / "a"), {"b", "sub"}),
        (lambda: os.rename(d / "b", d / "c"), {"c", "sub"}),
        (lambda: os.rename(d / "c", mounted.mnt / "moved"), {"sub"}),
        (lambda: os.link(mounted.mnt / "moved", d / "hard"), {"hard", "sub"}),
        (lambda: os.symlink("hard", d / "sym"), {"hard", "sub", "sym"}),
        (lambda: os.rmdir(d / "sub"), {"hard", "sym"}),
        (lambda: os.mkdir(d / "new"), {"hard", "new", "sym"}),
    ]
    for change, expected in steps:
        assert os.listdir(d) == os.listdir(d)  # the second listing comes from the cache
        change()
        assert set(os.listdir(d)) == expected
        assert set(os.listdir(mounted.src / "d")) == expected
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # fsyncdir reaches the backing directory
    finally:
        os.close(fd)
    assert sorted(e.name for e in os.scandir(mounted.mnt)) == sorted(["d", "moved"])


def test_names_that_did_not_exist_appear_when_created(mounted):
    """Failed lookups are cached by the kernel (negative entries); every way
    of creating a name through the mount must still make it visible."""
    m = mounted.mnt
    (m / "src").write_text("x")
    makers = {
        "created": lambda p: p.write_text("new"),
        "made-dir": lambda p: p.mkdir(),
        "renamed": lambda p: os.rename(m / "src", p),
        "linked": lambda p: os.link(m / "renamed", p),
        "symlinked": lambda p: os.symlink("renamed", p),
        "fifo": lambda p: os.mkfifo(p),
    }
    for name, make in makers.items():
        p = m / name
        for _ in range(2):  # the second miss is answered from the kernel's cache
            assert not os.path.lexists(p)
        make(p)
        assert os.path.lexists(p) and os.path.lexists(mounted.src / name)
    os.unlink(m / "created")
    assert not os.path.lexists(m / "created")
    (m / "created").write_text("again")
    assert (m / "created").read_text() == "again"


def test_read_ahead_raised_to_a_request_per_mib(mounted):
    """Sequential reads go to the daemon in 1 MiB requests, not 128 KiB ones."""
    if os.geteuid() != 0:
        pytest.skip("only root may change a device's read-ahead")
    (mounted.mnt / "f").write_bytes(b"x")  # the mount has answered INIT and served
    with open("/proc/self/mountinfo") as f:
        dev = next(ln.split()[2] for ln in f if ln.split()[4] == str(mounted.mnt))
    with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
        assert int(f.read()) == 1024


def test_patched_pyfuse3_in_use():
    """make builds pyfuse3 with tools/pyfuse3/patch.py; CI must test that build."""
    import pyfuse3
    from deltafs.ops import Operations
    if not IN_CI and "dir_handle_is_inode" not in getattr(pyfuse3, "DELTAFS_PATCHES", ()):
        pytest.skip("stock pyfuse3: run make venv for the patched build")
    assert "dir_handle_is_inode" in pyfuse3.DELTAFS_PATCHES and Operations.dir_handle_is_inode


def test_sigterm_unmounts_cleanly(mount_factory):
    m = mount_factory()
    (m.mnt / "f").write_text("x")
    m.proc.terminate()
    assert m.proc.wait(timeout=60) == 0
    m.proc = None
    assert not m.is_mounted()


def test_background_mount_and_umount(tmp_path):
    """A background mount's daemon (started with cwd /) runs the same deltafs
    as the command that started it, even when that one found it only through
    its own cwd (no PYTHONPATH)."""
    import deltafs
    from deltafs import mounttable
    from fusetools import force_unmount, require_fuse, run_cli
    require_fuse()
    src, mnt = tmp_path / "s", tmp_path / "m"
    src.mkdir()
    mnt.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(deltafs.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        res = run_cli("mount", src, mnt, cwd=root, env=env)
        assert res.returncode == 0, res.stderr
        pid = mounttable.read_record(str(mnt))["pid"]
        with open(f"/proc/{pid}/environ", "rb") as f:
            daemon_env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        assert daemon_env[b"PYTHONPATH"].split(b":")[0] == root.encode()
        (mnt / "f").write_text("hi")
        with open("/proc/self/mountinfo") as f:
            line = next(l for l in f if l.split()[4] == str(mnt))
        assert " - fuse.deltafs " + str(src) + " " in line
        res = run_cli("umount", mnt)
        assert res.returncode == 0, res.stderr
        assert (src / "f").read_text() == "hi"
        assert "mounted" in (src / ".deltafs" / "deltafs.log").read_text()
    finally:
        force_unmount(mnt)


def _as_nobody(*cmd):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                          capture_output=True, timeout=30)


@pytest.fixture
def open_dir():
    """A directory other users can traverse (pytest's tmp dirs are 0700).

    Requested before mount_factory, so it is removed after the mounts are gone.
    """
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="deltafs-allow-other-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_allow_other_lets_other_users_in(open_dir, mount_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    base = open_dir
    plain = mount_factory(base / "s1", mnt=base / "m1")
    shared = mount_factory(base / "s2", "-o", "allow_other", mnt=base / "m2")
    for m in (plain, shared):
        (m.mnt / "f.txt").write_text("hello\n")
        os.chmod(m.mnt / "f.txt", 0o644)
    res = _as_nobody("cat", str(plain.mnt / "f.txt"))
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    res = _as_nobody("cat", str(shared.mnt / "f.txt"))
    assert res.returncode == 0 and res.stdout == b"hello\n", res.stderr
    # default_permissions: the kernel checks modes for that user, as on a native fs
    os.chmod(shared.mnt / "f.txt", 0o600)
    res = _as_nobody("cat", str(shared.mnt / "f.txt"))
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    res = _as_nobody("touch", str(shared.mnt / "new"))
    assert res.returncode != 0 and not (shared.src / "new").exists()


def test_security_capability_is_real_with_the_inline_answer(mounted):
    """The patched pyfuse3 answers security.capability in C for inodes deltafs
    knows have none ('nocaps_inodes'); a file in SRC that has one still shows it,
    and a write through the mount strips it as on ext4."""
    import struct
    blob = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # VFS_CAP_REVISION_2, cap_net_raw+ep
    (mounted.src / "capped").write_bytes(b"#!/bin/true\n")
    try:
        os.setxattr(mounted.src / "capped", "security.capability", blob)
    except OSError as e:
        pytest.skip(f"cannot set security.capability here: {e}")
    assert os.getxattr(mounted.mnt / "capped", "security.capability") == blob
    (mounted.mnt / "new").write_bytes(b"x" * 10000)  # created through the mount: known to have none
    for _ in range(2):  # the second answer comes from the inline path
        with pytest.raises(OSError) as ei:
            os.getxattr(mounted.mnt / "new", "security.capability")
        assert ei.value.errno == errno.ENODATA
    assert os.getxattr(mounted.mnt / "capped", "security.capability") == blob
    with open(mounted.mnt / "capped", "r+b") as f:  # the kernel removes capabilities on write
        f.write(b"#")
    with pytest.raises(OSError) as ei:
        os.getxattr(mounted.src / "capped", "security.capability")
    assert ei.value.errno == errno.ENODATA
    os.setxattr(mounted.mnt / "new", "security.capability", blob)  # set through the mount: shown
    assert os.getxattr(mounted.mnt / "new", "security.capability") == blob
