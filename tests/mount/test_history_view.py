"""The history view inside a live mount (MNT/.deltafs-history): at/WHEN equals
restore --to, versions/PATH matches log, deleted/, read-only, hidden, never
journaled, refused when SRC holds the name, other users filtered."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fusetools import Mount, force_unmount, require_fuse, run_cli
from test_mount_at import _save, make_history, snapshot

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

NAME = ".deltafs-history"


def records(path: Path) -> list[dict]:
    res = run_cli("log", path, "--records", "--json", check=True)
    return [json.loads(x) for x in res.stdout.decode().splitlines() if x.strip()]


def head(mnt: Path) -> int:
    return max(d["version"] for d in records(mnt))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A live mount with a generated history of 300 saves, kept mounted."""
    base = tmp_path_factory.mktemp("hv")
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = Mount(src, mnt, "--guard", "off").start()  # random edits that the guard may call damage
    try:
        make_history(mnt, 300)
        run_cli("flush", mnt, check=True)
        yield m
        m.umount()
    finally:
        m.cleanup()


def test_view_equals_restore_at_several_moments(live, tmp_path):
    view = live.mnt / NAME / "at"
    top = head(live.mnt)
    moments = sorted({max(1, top * f // 10) for f in range(1, 11)})
    assert len(moments) == 10
    for k, seq in enumerate(moments):
        dest = tmp_path / f"restored{k}"
        run_cli("restore", live.mnt, "--at", f"v{seq}", "--to", dest, check=True)
        got, want = snapshot(view / f"v{seq}"), snapshot(dest)
        assert got.keys() == want.keys(), f"v{seq}"
        for rel in want:
            assert got[rel] == want[rel], f"v{seq} {rel}"
        assert subprocess.run(["diff", "-r", "--no-dereference", view / f"v{seq}", dest]).returncode == 0
    # a moment by its time (ISO 8601, UTC) is the same tree as by its version id
    rec = next(d for d in records(live.mnt) if d["version"] == moments[1])
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec["time_ns"] / 1e9 + 0.999)) + "Z"
    dest = tmp_path / "by-time"
    run_cli("restore", live.mnt, "--at", iso, "--to", dest, check=True)
    assert snapshot(view / iso) == snapshot(dest)


def test_versions_listing_matches_log_and_cat(live):
    files = sorted(p for p in live.mnt.rglob("*") if p.is_file() and not p.is_symlink()
                   and NAME not in p.parts)
    assert len(files) > 10
    for p in files[:12]:
        rel = p.relative_to(live.mnt)
        names = sorted(os.listdir(live.mnt / NAME / "versions" / rel))
        ids = [int(n.rsplit("_v", 1)[1]) for n in names]
        want = sorted(d["version"] for d in records(p) if "cause" in d and d["path"] == str(rel))
        assert ids == want, rel
        assert ids == sorted(ids)  # name order is version order
        for n, v in zip(names, ids):
            data = run_cli("cat", p, "--version", str(v), check=True).stdout
            assert (live.mnt / NAME / "versions" / rel / n).read_bytes() == data
            assert not os.stat(live.mnt / NAME / "versions" / rel / n).st_mode & 0o222
    # the last version is the file as it is now
    assert (live.mnt / NAME / "versions" / rel / names[-1]).read_bytes() == p.read_bytes()
    assert not (live.mnt / NAME / "versions" / "no-such-file").exists()


def test_deleted_files_have_version_listings(live):
    d = live.mnt / "gone-dir"
    d.mkdir()
    _save(d / "x.txt", b"first\n")
    _save(d / "x.txt", b"second\n")
    (d / "x.txt").unlink()
    run_cli("flush", live.mnt, check=True)
    listing = live.mnt / NAME / "deleted" / "gone-dir" / "x.txt"
    names = sorted(os.listdir(listing))
    assert [(listing / n).read_bytes() for n in names] == [b"first\n", b"second\n"]
    assert not (live.mnt / NAME / "versions" / "gone-dir" / "x.txt").exists()
    assert "gone-dir" in os.listdir(live.mnt / NAME / "deleted")


def test_writes_get_erofs(live):
    h = live.mnt / NAME
    past = h / "at" / "now"
    some = next(p for p in past.rglob("*") if p.is_file() and not p.is_symlink())
    ver = next(iter((h / "versions").rglob("*_v*")))
    live_file = next(p for p in live.mnt.iterdir() if p.is_dir() and p.name != NAME)
    for attempt in (lambda: open(some, "ab"), lambda: open(past / "new", "wb"), lambda: (past / "dd").mkdir(),
                    lambda: some.unlink(), lambda: os.chmod(some, 0o777), lambda: open(ver, "r+b"),
                    lambda: os.setxattr(some, "user.x", b"1"), lambda: (h / "x").mkdir(),
                    lambda: os.rename(live_file, h / "moved"), lambda: os.rename(h, live.mnt / "h2"),
                    lambda: os.symlink("x", h / "at" / "l"), lambda: ver.unlink()):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == 30, attempt  # EROFS
    assert live_file.exists()


def test_hidden_from_root_listing_and_never_journaled(live):
    before = head(live.mnt)
    h = live.mnt / NAME
    assert NAME not in os.listdir(live.mnt)
    assert h.is_dir()
    # the view's inode numbers are apart from the live ones (SRC's st_ino)
    from deltafs.ops import VIEW_INODES

    view_inos = {os.lstat(p).st_ino for p in [h, *(h / "at" / "now").rglob("*"), *(h / "versions").rglob("*")]}
    live_inos = {os.lstat(p).st_ino for p in live.mnt.rglob("*") if NAME not in p.parts}
    assert min(view_inos) >= VIEW_INODES > max(live_inos)
    for p in (h / "at" / "now").rglob("*"):
        if p.is_file():
            p.read_bytes()
    subprocess.run(["ls", "-laR", h / "versions", h / "deleted"], capture_output=True, check=True)
    run_cli("flush", live.mnt, check=True)
    assert head(live.mnt) == before
    assert not any(NAME in (d.get("path") or "") for d in records(live.mnt))
    assert not (live.src / NAME).exists()


def test_snapshots_and_relative_names(live):
    run_cli("snapshot", "view-snap", live.mnt, check=True)
    h = live.mnt / NAME
    assert "view-snap" in os.listdir(h / "snapshots")
    assert snapshot(h / "snapshots" / "view-snap") == snapshot(h / "at" / "view-snap")
    # a relative name is resolved again once the kernel's entry (at most 1 s) expires
    _save(live.mnt / "fresh.txt", b"new\n")
    run_cli("flush", live.mnt, check=True)
    deadline = time.monotonic() + 5
    while not (h / "at" / "now" / "fresh.txt").exists():
        assert time.monotonic() < deadline, "at/now never showed a new file"
        time.sleep(0.1)
    assert (h / "at" / "0 seconds ago" / "fresh.txt").read_bytes() == b"new\n"
    # two names of one version are two directories (one name per directory inode: a
    # shell's cwd in at/now never moves to at/vN)
    top = head(live.mnt)
    a, b = os.stat(h / "at" / "now" / "d1"), os.stat(h / "at" / f"v{top}" / "d1")
    assert a.st_ino != b.st_ino
    assert os.stat(h / "at" / "now").st_ino != os.stat(h / "at" / f"v{top}").st_ino
    assert not (h / "at" / "not a moment").exists()
    assert not (h / "at" / "2999-01-01").exists()


def test_refuses_a_src_holding_the_name(tmp_path, mount_factory):
    require_fuse()
    src, mnt = tmp_path / "s", tmp_path / "m"
    src.mkdir()
    mnt.mkdir()
    (src / NAME).mkdir()
    res = run_cli("mount", src, mnt, timeout=60)
    try:
        err = res.stderr.decode()
        assert res.returncode == 2 and "--history-dir" in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    finally:
        force_unmount(mnt)
    m = mount_factory(src, "--history-dir", ".past")
    assert (m.mnt / NAME).is_dir() and os.listdir(m.mnt / NAME) == []  # SRC's own entry
    assert sorted(os.listdir(m.mnt / ".past")) == ["at", "deleted", "snapshots", "versions"]
    m.umount()
    m2 = mount_factory(src, "--no-history-dir")
    assert not (m2.mnt / ".past").exists()
    m2.umount()


# ---- other users (root only: setpriv) ------------------------------------------------

NOBODY = 65534


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to act as another user")
def test_other_users_see_only_what_they_may_read_now_and_then(mount_factory):
    base = Path(tempfile.mkdtemp(prefix="deltafs-hv-"))
    os.chmod(base, 0o755)
    try:
        src, mnt = base / "src", base / "mnt"
        src.mkdir(mode=0o755)
        mnt.mkdir(mode=0o755)
        m = mount_factory(src, "-o", "allow_other", mnt=mnt)
        os.chmod(m.mnt, 0o755)
        for name, mode in (("public.txt", 0o644), ("secret.txt", 0o600), ("opened.txt", 0o600),
                           ("closed.txt", 0o644)):
            fd = os.open(m.mnt / name, os.O_WRONLY | os.O_CREAT, mode)  # the version has this mode
            os.write(fd, f"{name}\n".encode())
            os.fsync(fd)
            os.close(fd)
            os.chmod(m.mnt / name, mode)
        _save(m.mnt / "deleted.txt", b"was public\n")
        run_cli("flush", m.mnt, check=True)
        then = head(m.mnt)
        os.chmod(m.mnt / "opened.txt", 0o644)  # secret then, public now
        os.chmod(m.mnt / "closed.txt", 0o600)  # public then, secret now
        (m.mnt / "deleted.txt").unlink()
        run_cli("flush", m.mnt, check=True)
        h = m.mnt / NAME
        past = h / "at" / f"v{then}"
        os.listdir(past)  # the owner's walk: nothing the kernel caches lets another user skip a check
        assert (past / "closed.txt").stat().st_size > 0
        res = as_nobody("stat", str(past / "closed.txt"))
        assert res.returncode != 0 and b"Permission denied" in res.stderr, res
        res = as_nobody("cat", str(past / "public.txt"))
        assert res.returncode == 0 and res.stdout == b"public.txt\n", res.stderr
        for name in ("secret.txt", "opened.txt", "closed.txt"):
            res = as_nobody("cat", str(past / name))
            assert res.returncode != 0 and b"Permission denied" in res.stderr, (name, res)
        pub = sorted(os.listdir(h / "versions" / "public.txt"))
        res = as_nobody("cat", str(h / "versions" / "public.txt" / pub[-1]))
        assert res.returncode == 0 and res.stdout == b"public.txt\n", res.stderr
        for name in ("secret.txt", "closed.txt", "opened.txt"):
            v = sorted(os.listdir(h / "versions" / name))[0]
            res = as_nobody("cat", str(h / "versions" / name / v))
            assert res.returncode != 0, (name, res)
        assert as_nobody("ls", str(h / "deleted")).returncode != 0
        gone = sorted(os.listdir(h / "deleted" / "deleted.txt"))  # the owner sees it
        assert as_nobody("cat", str(h / "deleted" / "deleted.txt" / gone[0])).returncode != 0
        # the owner (root) reads everything
        assert (past / "secret.txt").read_bytes() == b"secret.txt\n"
        m.umount()
    finally:
        for p in (base / "mnt",):
            force_unmount(p)
        shutil.rmtree(base, ignore_errors=True)


def test_an_open_version_survives_compaction(mount_factory):
    """A version file open in the view keeps its chunks through a compaction that prunes
    it (maintenance.held_versions); once closed, the next pass prunes it."""
    m = mount_factory()
    old, new = os.urandom(300_000), os.urandom(300_000)  # nothing shared: pruning frees every chunk
    _save(m.mnt / "f.bin", old)
    _save(m.mnt / "f.bin", new)
    run_cli("flush", m.mnt, check=True)
    listing = m.mnt / NAME / "versions" / "f.bin"
    first = sorted(os.listdir(listing))[0]
    prune_all = ["--retention", "1s:all,*:none", "--coalesce", "0"]
    time.sleep(1.1)  # both versions older than the policy's 1 s (ages are journal times)
    _save(m.mnt / "later.txt", b"moves the journal's clock on\n")
    with open(listing / first, "rb") as f:  # nothing read yet: no page is cached
        res = json.loads(run_cli("compact", m.mnt, *prune_all, "--json", check=True).stdout)
        assert res["versions_pruned"] == 0, res  # the open version is held
        assert f.read() == old
    res = json.loads(run_cli("compact", m.mnt, *prune_all, "--json", check=True).stdout)
    assert res["versions_pruned"] >= 1, res
    deadline = time.monotonic() + 5  # the kernel keeps the listing's attributes for up to 1 s
    while first in os.listdir(listing):
        assert time.monotonic() < deadline, "the pruned version stayed listed"
        time.sleep(0.1)
    m.umount()


def test_a_listing_shows_no_name_twice_when_names_appear_during_it(mount_factory, tmp_path):
    """The view's listings change while they are read (versions/ and deleted/
    follow the live tree).  A pass's snapshot is kept under a pass number of
    its own, carried in the offsets, until the call that finds it at its end:
    kept by inode and dropped as soon as its last entry went out, the
    kernel's next call read a fresh listing from the old index, and the
    names created meanwhile pushed names already listed into it again (the
    live mount's issue 23 bug, tests/mount/test_readdir_passes.py)."""
    from collections import Counter

    from test_readdir_passes import _listing_with

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(12):
        (src / "d" / f"m{i:02d}").write_text("x")
    m = mount_factory(src)
    for kind, more in (("versions", "a"), ("deleted", "c")):
        if kind == "deleted":
            for i in range(12):
                (m.mnt / "d" / f"m{i:02d}").unlink()  # deleted/d now lists the twelve
            run_cli("flush", m.mnt, check=True)

        def create_more():
            for i in range(20):
                p = m.mnt / "d" / f"{more}{i:02d}"
                p.write_text("y")
                if kind == "deleted":
                    p.unlink()
            run_cli("flush", m.mnt, check=True)

        names = _listing_with(str(m.mnt / NAME / kind / "d"), create_more)
        twice = [n for n, k in Counter(names).items() if k > 1]
        assert not twice, f"{kind}/d listed twice: {twice}"
        assert {f"m{i:02d}".encode() for i in range(12)} <= set(names)
        assert len(os.listdir(m.mnt / NAME / kind / "d")) == 32  # a new pass shows the new names
