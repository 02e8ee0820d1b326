"""Restores that cannot be redirected: symlinks where directories were are
replaced, never followed, and a tree that changes while a restore runs is
refused with a clear message (tests/mount/test_restore_safety.py runs the
attack itself, as root against another user, through a real mount)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from deltafs import cli, history
from deltafs.errors import EXIT_PARTIAL, EXIT_USAGE

from test_history import Builder, rcli


@pytest.fixture
def tree(tmp_path):
    """SRC/.deltafs holding d/ with three files; -> (src, version of that tree)."""
    src = tmp_path / "src"
    src.mkdir()
    b = Builder(src / ".deltafs")
    b.mkdir(b"d", mode=0o40755)
    for i in range(3):
        b.write(b"d/f%d" % i, b"file %d\n" % i * 1000)
    with b.j.reader() as r:
        at = r.head_seq()
    b.close()
    return src, at


@pytest.fixture
def secret(tmp_path):
    """A directory the restore must never write into."""
    d = tmp_path / "secret"
    d.mkdir(mode=0o700)
    (d / "keep").write_bytes(b"keep")
    yield d
    assert sorted(os.listdir(d)) == ["keep"] and (d / "keep").read_bytes() == b"keep"
    assert os.stat(d).st_mode & 0o7777 == 0o700


def test_a_symlink_swapped_in_for_a_directory_is_replaced_not_followed(tree, secret, tmp_path, capsys):
    src, at = tree
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(secret, dest / "d")  # the recorded directory is a symlink now
    rc, out, err = rcli(capsys, "restore", "--journal", src / ".deltafs", "/", "--version", at, "--to", dest,
                        "--force")
    assert rc == 0, err
    assert not (dest / "d").is_symlink() and (dest / "d" / "f1").read_bytes() == b"file 1\n" * 1000
    # in place (not mounted): the same
    os.symlink(secret, src / "d")
    rc, out, err = rcli(capsys, "restore", src, "--version", at)
    assert rc == 0, err
    assert not (src / "d").is_symlink() and (src / "d" / "f2").read_bytes() == b"file 2\n" * 1000


def test_restoring_a_file_below_a_symlinked_directory_is_refused(tree, secret, tmp_path, capsys):
    src, at = tree
    os.symlink(secret, src / "d")
    rc, out, err = rcli(capsys, "restore", "--journal", src / ".deltafs", "d/f0", "--version", at)
    assert rc == EXIT_PARTIAL and err.count("\n") == 1, err
    assert "is a symlink now, not a directory" in err and "nothing restored" in err
    # DEST itself a symlink: a directory is never merged into its target
    os.symlink(secret, tmp_path / "dest")
    rc, out, err = rcli(capsys, "restore", "--journal", src / ".deltafs", "d", "--version", at, "--to",
                        tmp_path / "dest", "--force")
    assert rc == EXIT_USAGE and "is a symlink (not followed)" in err, err


def test_a_tree_changed_under_the_restore_is_refused_with_a_clear_message(tree, secret, tmp_path):
    """Another user moves a directory the restore just made and puts a symlink
    in its place while files are being written into it."""
    src, at = tree
    dest = tmp_path / "dest"
    swapped = []

    def progress(files_done, files_total, bytes_done, bytes_total):
        if not swapped:  # while the first file is written
            os.rename(dest / "d", tmp_path / "moved")
            os.symlink(secret, dest / "d")
            swapped.append(1)

    rep = history.restore(str(src / ".deltafs"), b"", version=str(at), dest=str(dest), progress=progress)
    assert swapped
    assert history.restore_exit_code(rep) == EXIT_PARTIAL
    assert [f["path"] for f in rep.failed] == ["d"]
    assert "was moved or replaced while the restore ran (the tree changed under it)" in rep.errors[0]
    # what was written went into the directory the restore made, wherever it is now
    assert sorted(os.listdir(tmp_path / "moved")) == ["f0", "f1", "f2"]


def test_json_lists_every_path_that_failed(tree, secret, tmp_path, capsys):
    src, at = tree
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "d").mkdir()
    (dest / "d" / "f1").mkdir()  # a directory in the way of a file
    rc = cli.main(["restore", "--journal", str(src / ".deltafs"), "/", "--version", str(at), "--to", str(dest),
                   "--force", "--json"])
    out, err = capsys.readouterr()
    assert rc == EXIT_PARTIAL
    rep = json.loads(out)
    assert rep["failed"] == [{"path": "d/f1", "version": None, "error": "a directory is in the way",
                              "corrupt": False}]
    assert err == "deltafs: error: d/f1: a directory is in the way\n"
    assert (dest / "d" / "f0").read_bytes() == b"file 0\n" * 1000


def test_a_tree_with_more_directories_than_descriptors_kept(tmp_path, capsys):
    """The restore keeps at most 64 directory descriptors open: a deeper and
    wider tree still restores whole, and none is left open afterwards."""
    b = Builder(tmp_path / "j")
    paths = []
    for i in range(12):
        d = b"w%02d" % i
        b.mkdir(d)
        for k in range(8):
            b.mkdir(d + b"/s%d" % k)
            paths.append(d + b"/s%d/f" % k)
            b.write(paths[-1], paths[-1])
    deep = b"/".join(b"n%d" % i for i in range(80))  # deeper than the budget
    for i in range(1, 81):
        b.mkdir(b"/".join(deep.split(b"/")[:i]))
    b.write(deep + b"/leaf", b"deep")
    b.close()
    before = len(os.listdir("/proc/self/fd"))
    rc, out, err = rcli(capsys, "restore", "--journal", tmp_path / "j", "/", "--to", tmp_path / "out")
    assert rc == 0, err
    assert len(os.listdir("/proc/self/fd")) == before
    for p in paths:
        assert (tmp_path / "out" / os.fsdecode(p)).read_bytes() == p
    assert (tmp_path / "out" / os.fsdecode(deep) / "leaf").read_bytes() == b"deep"
    assert "restored / at version" in out and "189 dirs" in out  # 12 + 96 + 80 and the root


def test_files_in_a_directory_the_restore_made_never_get_a_temp_name(tree, tmp_path, capsys, monkeypatch):
    """restore --to writes each file of a new directory unnamed (O_TMPFILE) and
    links it into place whole: no temp name is created, renamed or removed
    (each a scan of the directory where it has no index); where the filesystem
    refuses O_TMPFILE it falls back to temp + rename, with the same result."""
    src, at = tree
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda *a, **k: (renames.append(a), real_rename(*a, **k))[1])
    rc, out, err = rcli(capsys, "restore", "--journal", src / ".deltafs", "d", "--version", at, "--to",
                        tmp_path / "dest")
    assert rc == 0, err
    assert renames == []
    for i in range(3):
        p = tmp_path / "dest" / f"f{i}"
        assert p.read_bytes() == b"file %d\n" % i * 1000 and os.stat(p).st_nlink == 1
    assert sorted(os.listdir(tmp_path / "dest")) == ["f0", "f1", "f2"]

    real_open = os.open

    def no_tmpfile(path, flags, *a, **k):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_tmpfile)
    rc, out, err = rcli(capsys, "restore", "--journal", src / ".deltafs", "d", "--version", at, "--to",
                        tmp_path / "dest2")
    assert rc == 0, err
    assert len(renames) == 3
    assert sorted(os.listdir(tmp_path / "dest2")) == ["f0", "f1", "f2"]
    assert (tmp_path / "dest2" / "f1").read_bytes() == b"file 1\n" * 1000


def test_files_replaced_by_a_restore_are_synced_together_then_renamed(tree, tmp_path, capsys, monkeypatch):
    """restore --to DEST --force over files DEST already has: no fsync per file.
    Each replacement is written whole under a temp name, one syncfs makes
    them all durable, and only then is each renamed over the old file (so a
    crash leaves either version, never neither); nothing else is left."""
    import importlib

    restore_mod = importlib.import_module("deltafs.history.restore")
    src, at = tree
    dest = tmp_path / "dest"
    rc, out, err = rcli(capsys, "restore", "--journal", src / ".deltafs", "d", "--version", at, "--to", dest)
    assert rc == 0, err
    for i in range(3):
        (dest / f"f{i}").write_bytes(b"changed %d\n" % i)
    inodes = {i: os.stat(dest / f"f{i}").st_ino for i in range(3)}
    events = []
    real_rename, real_fsync, real_syncfs = os.rename, os.fsync, restore_mod.syncfs
    threads = []
    monkeypatch.setattr(os, "rename", lambda *a, **k: (events.append("rename"), threads.append(
        threading.current_thread()), real_rename(*a, **k))[2])
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(restore_mod, "syncfs", lambda fd: (events.append("syncfs"), real_syncfs(fd))[1])
    rc, out, err = rcli(capsys, "restore", "--journal", src / ".deltafs", "d", "--version", at, "--to", dest,
                        "--force")
    assert rc == 0, err
    assert "fsync" not in events
    assert events.count("rename") == 3 and events.index("syncfs") < events.index("rename")
    # by the writer threads: a rename over a file may wait for the disk (discard of its blocks)
    assert threading.main_thread() not in threads
    for i in range(3):
        p = dest / f"f{i}"
        assert p.read_bytes() == b"file %d\n" % i * 1000
        assert os.stat(p).st_ino != inodes[i]  # replaced by rename, not rewritten in place
    assert sorted(os.listdir(dest)) == ["f0", "f1", "f2"]


def test_a_file_that_already_holds_the_version_is_kept_not_replaced(tree, tmp_path, capsys):
    """restore --to DEST --force over a copy: a file whose bytes are already the
    version's (checked against its chunk ids) keeps its inode and gets its mode
    and mtime back in place; a file with other bytes, and one that shares its
    inode with another path (hard link), are replaced by new files as before."""
    src, at = tree
    dest = tmp_path / "dest"
    args = ["restore", "--journal", src / ".deltafs", "d", "--version", at, "--to", dest]
    rc, out, err = rcli(capsys, *args)
    assert rc == 0, err
    st = {i: os.stat(dest / f"f{i}") for i in range(3)}
    os.chmod(dest / "f0", 0o600)
    os.utime(dest / "f0", ns=(1, 1))
    (dest / "f1").write_bytes(b"file 1\n" * 999 + b"file X\n")  # same size, other bytes, same inode
    os.link(dest / "f2", tmp_path / "other")
    rc, out, err = rcli(capsys, *args, "--force")
    assert rc == 0, err
    f0 = os.stat(dest / "f0")
    assert f0.st_ino == st[0].st_ino
    assert f0.st_mode == st[0].st_mode and f0.st_mtime_ns >= st[0].st_mtime_ns  # (the version has no mtime)
    assert os.stat(dest / "f1").st_ino != st[1].st_ino
    assert os.stat(dest / "f2").st_ino != st[2].st_ino and os.stat(tmp_path / "other").st_nlink == 1
    for i in range(3):
        assert (dest / f"f{i}").read_bytes() == b"file %d\n" % i * 1000
    assert sorted(os.listdir(dest)) == ["f0", "f1", "f2"]
