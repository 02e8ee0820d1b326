"""What deltafs keeps for itself is its owner's alone: journal modes, the
daemon's log and its rotations, the runtime directory and mount records
(docs/design.md, "Against other local users").  No FUSE needed here;
tests/mount/test_other_users.py checks the same on real mounts, as another user."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from deltafs import mounttable
from deltafs.errors import MountError
from deltafs.journal import Journal
from deltafs.mount import PrivateLogFile


@pytest.fixture
def umask0():
    old = os.umask(0)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def assert_private(root: Path) -> None:
    for name, mode in modes(root).items():
        want = 0o700 if (root / name).is_dir() else 0o600
        assert mode == want, f"{name}: {mode:04o}, want {want:04o}"


def test_new_journal_is_private_under_umask_0(tmp_path, umask0):
    j = Journal.open(tmp_path / "j", create=True)
    try:
        with j.reader() as r:
            r.head_seq()
    finally:
        j.close()
    got = modes(tmp_path / "j")
    assert {"data.mdb", "lock.mdb", "lock", "packs"} <= set(got), got
    assert_private(tmp_path / "j")


def test_writer_tightens_an_old_journal(tmp_path):
    jd = tmp_path / "j"
    Journal.open(jd, create=True).close()
    # as journals made before this rule were (umask 022 or umask 0)
    os.chmod(jd, 0o755)
    for name in ("data.mdb", "lock.mdb"):
        os.chmod(jd / name, 0o644)
    os.chmod(jd / "packs", 0o777)
    (jd / "deltafs.log").write_text("old log\n")
    (jd / "deltafs.log.1").write_text("old rotation\n")
    for name in ("deltafs.log", "deltafs.log.1"):
        os.chmod(jd / name, 0o666)
    Journal.open(jd, readonly=True).close()  # a reader changes nothing
    assert stat.S_IMODE(os.stat(jd / "data.mdb").st_mode) == 0o644
    Journal.open(jd).close()
    assert_private(jd)


def test_log_and_its_rotations_are_private(tmp_path, umask0):
    log_file = tmp_path / "deltafs.log"
    log_file.write_text("from before\n")
    os.chmod(log_file, 0o644)
    h = PrivateLogFile(str(log_file), maxBytes=300, backupCount=2)
    logger = logging.getLogger("test_private_rotation")
    logger.propagate = False
    logger.addHandler(h)
    try:
        for i in range(40):
            logger.warning("line %d of a log that names private paths", i)
    finally:
        logger.removeHandler(h)
        h.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["deltafs.log", "deltafs.log.1", "deltafs.log.2"]
    assert_private(tmp_path)


def test_log_is_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "deltafs.log").symlink_to(target)
    with pytest.raises(OSError):
        PrivateLogFile(str(tmp_path / "deltafs.log"), maxBytes=300, backupCount=2)
    assert target.read_text() == ""


@pytest.fixture
def runtime_base(tmp_path, monkeypatch):
    """XDG_RUNTIME_DIR at a fresh directory of ours: the runtime dir is BASE/deltafs."""
    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    return base


def test_records_are_private_and_atomic(runtime_base, umask0):
    p = mounttable.write_record("/some/mnt", {"pid": 123, "src": "/s", "mnt": "/some/mnt"})
    assert p.parent == runtime_base / "deltafs"
    assert stat.S_IMODE(os.stat(p.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert mounttable.read_record("/some/mnt")["pid"] == 123
    mounttable.write_record("/some/mnt", {"pid": 456})
    assert mounttable.read_record("/some/mnt") == {"pid": 456}
    assert sorted(os.listdir(p.parent)) == [p.name]  # no temp file left
    mounttable.remove_record("/some/mnt")
    assert mounttable.read_record("/some/mnt") is None


def test_a_record_that_is_a_symlink_is_not_followed(runtime_base, tmp_path):
    mounttable.write_record("/m", {"pid": 1})
    rec = mounttable.runtime_dir() / next(iter(os.listdir(mounttable.runtime_dir())))
    victim = tmp_path / "victim.json"
    victim.write_text('{"pid": 666}')
    rec.unlink()
    rec.symlink_to(victim)
    assert mounttable.read_record("/m") is None  # never read through the link
    mounttable.write_record("/m", {"pid": 2})  # replaces the link, writes nothing through it
    assert victim.read_text() == '{"pid": 666}' and not rec.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by another user")
def test_runtime_dir_of_another_user_is_refused(runtime_base):
    d = runtime_base / "deltafs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)  # as if another user made it first
    for call in (mounttable.check_runtime_dir, lambda: mounttable.read_record("/m"),
                 lambda: mounttable.write_record("/m", {"pid": 1})):
        with pytest.raises(MountError, match="belongs to uid 65534"):
            call()
    assert os.listdir(d) == []


def test_runtime_dir_symlink_or_open_mode_is_refused(runtime_base, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (runtime_base / "deltafs").symlink_to(elsewhere)
    with pytest.raises(MountError, match="is a symlink"):
        mounttable.write_record("/m", {"pid": 1})
    assert os.listdir(elsewhere) == []
    (runtime_base / "deltafs").unlink()
    (runtime_base / "deltafs").mkdir()
    os.chmod(runtime_base / "deltafs", 0o755)
    with pytest.raises(MountError, match="mode 0755"):
        mounttable.check_runtime_dir()


def test_runtime_dir_base_of_another_user_is_not_used(runtime_base, monkeypatch, tmp_path):
    """An XDG_RUNTIME_DIR that is not ours (sudo -E carrying a user's) is skipped."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    os.chown(runtime_base, 65534, 65534)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    if os.path.isdir(f"/run/user/{os.getuid()}"):
        pytest.skip("/run/user/UID exists here: it would be used instead")
    assert mounttable.runtime_dir() == tmp_path / f"deltafs-{os.getuid()}"
