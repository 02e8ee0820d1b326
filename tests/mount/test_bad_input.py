"""Bad input to `deltafs mount` / `deltafs umount` (DESIGN.md section 7).

Every case must print exactly one line on stderr (no traceback), exit with
its documented status (2 bad input, 3 journal locked, 4 FUSE missing or
mount failed), mount nothing, and leave SRC and MNT exactly as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fusetools import require_fuse, run_cli

pytestmark = pytest.mark.timeout(60)


def mounts_at(*paths: Path) -> list[str]:
    want = {str(p) for p in paths}
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4] in want]


def state(*paths: Path) -> dict:
    """What a failed command must not change: every entry and its bytes."""
    out = {}
    for root in paths:
        if not os.path.lexists(root):
            out[str(root)] = None
            continue
        if not root.is_dir():
            out[str(root)] = root.read_bytes()
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = p.read_bytes() if p.is_file() and not p.is_symlink() else p.is_dir()
        out[str(root)] = "dir"
    return out


def check_failure(res, code: int, *words: str) -> str:
    err = res.stderr.decode(errors="replace")
    assert res.returncode == code, f"exit {res.returncode}, want {code}: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"want one line on stderr, got {lines!r}"
    assert lines[0].startswith("deltafs: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert res.stdout == b""
    return lines[0]


@pytest.fixture
def dirs(tmp_path):
    require_fuse()
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "keep.txt").write_text("precious\n")
    return src, mnt


def bad_mount(src: Path, mnt: Path, code: int, *words: str, args=(), env=None) -> str:
    before = state(src, mnt)
    mounts_before = mounts_at(src, mnt)
    res = run_cli("mount", *args, src, mnt, env=env, timeout=60)
    line = check_failure(res, code, *words)
    assert mounts_at(src, mnt) == mounts_before  # nothing mounted (or unmounted)
    after = state(src, mnt)
    # Nothing lost or changed; a journal directory (with the daemon's log
    # saying why it stopped) is the only thing a failed mount may leave.
    # (A running mount's own journal changes meanwhile: not compared.)
    assert {k: after.get(k) for k in before if "/.deltafs/" not in k} == \
        {k: v for k, v in before.items() if "/.deltafs/" not in k}
    extra = [k for k in after if k not in before and "/.deltafs" not in k]
    assert not extra, extra
    return line


def test_src_missing(dirs, tmp_path):
    _, mnt = dirs
    bad_mount(tmp_path / "nope", mnt, 2, "does not exist")


def test_src_is_a_file(dirs, tmp_path):
    _, mnt = dirs
    f = tmp_path / "file"
    f.write_text("x")
    bad_mount(f, mnt, 2, "not a directory")


def test_mnt_missing(dirs, tmp_path):
    src, _ = dirs
    bad_mount(src, tmp_path / "nope", 2, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_mnt_is_a_file(dirs, tmp_path):
    src, _ = dirs
    f = tmp_path / "file"
    f.write_text("x")
    bad_mount(src, f, 2, "not a directory")


def test_mnt_not_empty(dirs):
    src, mnt = dirs
    (mnt / "something").write_text("mine\n")
    bad_mount(src, mnt, 2, "not empty")


def test_mnt_already_mounted(mount_factory, tmp_path):
    first = mount_factory()
    (first.mnt / "f").write_text("through the first mount\n")
    other = tmp_path / "other"
    other.mkdir()
    line = bad_mount(other, first.mnt, 2, "already")
    assert "deltafs" in line
    assert (first.mnt / "f").read_text() == "through the first mount\n"  # still serving
    assert not (other / ".deltafs").exists()


def test_src_inside_mnt(dirs):
    _, mnt = dirs
    inner = mnt / "inner"
    inner.mkdir()
    bad_mount(inner, mnt, 2, "inside")


def test_mnt_inside_src(dirs):
    src, _ = dirs
    inner = src / "inner"
    inner.mkdir()
    bad_mount(src, inner, 2, "inside")


def test_journal_locked_by_another_mount(mount_factory, tmp_path):
    first = mount_factory()
    (first.mnt / "f").write_text("one\n")
    mnt2 = tmp_path / "mnt-second"
    mnt2.mkdir()
    line = bad_mount(first.src, mnt2, 3, ".deltafs")
    assert "locked" in line or "in use" in line, line
    # The first mount is untouched and keeps working.
    (first.mnt / "f").write_text("two\n")
    assert (first.src / "f").read_text() == "two\n"


def test_unknown_mount_option(dirs):
    src, mnt = dirs
    line = bad_mount(src, mnt, 4, args=("-o", "no_such_option_xyz"))
    assert "cannot mount" in line


def test_no_fusermount3(dirs):
    """PATH without fusermount3: what a machine without the fuse3 package sees."""
    src, mnt = dirs
    env = {**os.environ, "PATH": "/nonexistent"}
    bad_mount(src, mnt, 4, "fusermount3", "apt-get install fuse3", env=env)


def test_no_dev_fuse(dirs, tmp_path):
    """No /dev/fuse.

    A test cannot remove the real device (nor should it), so this fault is
    simulated: DELTAFS_DEV_FUSE names the device deltafs looks for
    (mount.check_fuse; default /dev/fuse) and points it at a missing path.
    """
    src, mnt = dirs
    env = {**os.environ, "DELTAFS_DEV_FUSE": str(tmp_path / "no-such-dev-fuse")}
    bad_mount(src, mnt, 4, "no-such-dev-fuse", "modprobe fuse", env=env)


def test_umount_of_a_path_not_mounted(dirs):
    _, mnt = dirs
    check_failure(run_cli("umount", mnt), 2, "not mounted")
    assert mnt.is_dir()


def test_umount_of_a_missing_path(tmp_path):
    check_failure(run_cli("umount", tmp_path / "nope"), 2, "not mounted")


def test_umount_of_a_mount_that_is_not_deltafs():
    require_fuse()
    check_failure(run_cli("umount", "/proc"), 2, "not a deltafs mount")
    assert os.path.exists("/proc/self/mountinfo")


def test_src_is_mnt(dirs):
    src, _ = dirs
    bad_mount(src, src, 2, "SRC and MNT are the same directory")


@pytest.fixture
def readonly_fs(tmp_path):
    """A real read-only filesystem: a small tmpfs, filled, then remounted ro.

    The test fills it through ``fill(rel)`` before ``freeze()``; the tmpfs
    is always unmounted at teardown."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(ro)], check=True)
    try:
        yield ro, lambda: subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    finally:
        if subprocess.run(["umount", str(ro)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_journal_on_a_read_only_filesystem(dirs, readonly_fs):
    src, mnt = dirs
    ro, freeze = readonly_fs
    freeze()
    line = bad_mount(src, mnt, 3, "read-only", args=("--journal", str(ro / "j")))
    assert str(ro / "j") in line


def test_read_only_src_with_its_journal(dirs, readonly_fs):
    _, mnt = dirs
    ro, freeze = readonly_fs
    src = ro / "src"
    src.mkdir()
    (src / "keep.txt").write_text("precious\n")
    freeze()
    bad_mount(src, mnt, 3, "read-only", "--journal DIR")


def test_read_only_src_with_an_old_journal(dirs, readonly_fs, mount_factory, tmp_path):
    """The journal was made while the filesystem was writable; now it is not."""
    ro, freeze = readonly_fs
    src = ro / "src"
    src.mkdir()
    m = mount_factory(src, mnt=tmp_path / "mnt-rw")
    (m.mnt / "keep.txt").write_text("precious\n")
    m.umount()
    freeze()
    _, mnt = dirs
    bad_mount(src, mnt, 3, "read-only")


def test_read_only_src_with_a_journal_elsewhere_mounts_read_only(readonly_fs, mount_factory, tmp_path):
    """Nothing to refuse: the mount passes reads through, and writes fail as on SRC itself."""
    import errno
    ro, freeze = readonly_fs
    src = ro / "src"
    src.mkdir()
    (src / "keep.txt").write_text("precious\n")
    freeze()
    m = mount_factory(src, journal=tmp_path / "journal")
    assert (m.mnt / "keep.txt").read_text() == "precious\n"
    with pytest.raises(OSError) as e:
        (m.mnt / "new.txt").write_text("x")
    assert e.value.errno == errno.EROFS
    m.umount()
