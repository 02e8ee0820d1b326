"""deltafs rollback through a real mount and on an unmounted SRC: a damaged
corpus comes back byte for byte, mode for mode, name for name; rolling back
the rollback returns the damaged state (docs/guard.md "Rollback")."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from corpus import differences, fingerprint, make_corpus, tag
from fusetools import run_cli

pytestmark = pytest.mark.timeout(240)


def damage(root, seed: int = 7) -> None:
    """Every kind of change a rollback must undo: overwrite, truncate, rename,
    delete, new files and directories, mode and xattr changes, a symlink
    retargeted, a directory removed whole."""
    rng = random.Random(seed)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and ".deltafs" not in p.parts)
    for p in files[::8]:
        p.write_bytes(rng.randbytes(p.stat().st_size))
    for p in files[1::8]:
        p.rename(p.with_name(p.name + ".locked"))
    for p in files[2::8]:
        p.unlink()
    for p in files[3::8]:
        with open(p, "r+b") as f:
            f.truncate(10)
    for p in files[4::8]:
        p.chmod(0o604)
    (root / "dir3" / "new").mkdir()
    (root / "dir3" / "new" / "README.txt").write_bytes(b"pay up\n")
    (root / "dir1" / "extra.bin").write_bytes(rng.randbytes(5000))
    (root / "dir0" / "latest").unlink()
    (root / "dir0" / "latest").symlink_to("elsewhere")
    try:
        os.setxattr(root / "dir0" / "notes0.txt", b"user.tag", b"changed")
    except OSError:
        pass
    shutil.rmtree(root / "dir6")


def snapshot(path, name: str) -> None:
    run_cli("snapshot", name, path, check=True)


def test_rollback_through_the_mount_and_back(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, 120)
    m = mount_factory(src, "--guard", "off")  # the damage here is an attack: tests/mount/test_guard_mount.py
    tag(m.mnt / "dir0" / "notes0.txt")
    before = fingerprint(m.mnt)
    snapshot(m.mnt, "clean")
    damage(m.mnt)
    damaged = fingerprint(m.mnt)
    assert differences(before, damaged)

    dry = run_cli("rollback", m.mnt, "--to", "clean", "--dry-run", check=True).stdout.decode()
    assert "remove\tdir3/new/README.txt" in dry
    assert fingerprint(m.mnt) == damaged  # a dry run changes nothing

    res = run_cli("rollback", m.mnt, "--to", "clean", "--json", check=True)
    rep = json.loads(res.stdout)
    assert rep["removed"] > 0 and not rep["errors"]
    assert differences(before, fingerprint(m.mnt)) == []
    assert differences(before, fingerprint(src)) == []

    # the rollback is itself undone by rolling back to the snapshot it took
    run_cli("rollback", m.mnt, "--to", rep["undo_snapshot"], check=True)
    assert differences(damaged, fingerprint(m.mnt)) == []

    # one directory alone, then one file alone
    run_cli("rollback", m.mnt / "dir1", "--to", "clean", check=True)
    now = fingerprint(m.mnt)
    assert all(now.get(p) == v for p, v in before.items() if p.startswith("dir1/"))
    assert not [p for p in now if p.startswith("dir1/") and p not in before]
    outside = [p for p in damaged if p != "dir1" and not p.startswith("dir1/")]
    assert all(now.get(p) == damaged[p] for p in outside)  # the rest stays damaged
    f = next(p for p in outside if p in before and before[p][0] == "f" and before[p][2] != damaged[p][2])
    run_cli("rollback", m.mnt / f, "--to", "clean", check=True)
    assert fingerprint(m.mnt)[f] == before[f]
    run_cli("rollback", m.mnt, "--to", "clean", check=True)
    assert differences(before, fingerprint(m.mnt)) == []
    m.umount()
    run_cli("verify", "--journal", m.journal, check=True)


def test_rollback_unmounted_is_journaled(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, 40)
    m = mount_factory(src, "--guard", "off")  # the damage here is an attack: tests/mount/test_guard_mount.py
    tag(m.mnt / "dir0" / "notes0.txt")
    before = fingerprint(m.mnt)
    snapshot(m.mnt, "clean")
    damage(m.mnt)
    damaged = fingerprint(m.mnt)
    m.umount()
    res = run_cli("rollback", src, "--to", "clean", "--json", check=True)
    rep = json.loads(res.stdout)
    assert rep["records"] and rep["mode"] == "src"
    assert differences(before, fingerprint(src)) == []
    run_cli("rollback", src, "--to", rep["undo_snapshot"], check=True)
    assert differences(damaged, fingerprint(src)) == []
    # the journal agrees with SRC: a remount scans nothing new
    m2 = mount_factory(src)
    assert differences(damaged, fingerprint(m2.mnt)) == []
    m2.umount()


def test_rollback_bad_input(mounted):
    res = run_cli("rollback", mounted.mnt, "--to", "no-such-snapshot")
    assert res.returncode == 2 and b"Traceback" not in res.stderr
    assert len(res.stderr.decode().strip().splitlines()) == 1
    res = run_cli("rollback", mounted.mnt)
    assert res.returncode == 2
