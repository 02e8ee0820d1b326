"""deltafs mount --at WHEN: the past tree, read-only, equal to restore --at --to."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fusetools import force_unmount, run_cli

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]


def _xattrs_ok(d: Path) -> bool:
    try:
        os.setxattr(d, "user.probe", b"1")
        os.removexattr(d, "user.probe")
        return True
    except OSError:
        return False


def _save(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def make_history(mnt: Path, saves: int, seed: int = 7) -> None:
    """Some hundred saves: files edited, created, deleted, renamed, chmod, symlinks, hard links, xattrs."""
    rnd = random.Random(seed)
    (mnt / "d1").mkdir()
    xattrs = _xattrs_ok(mnt / "d1")  # not on the root: see the report (root xattrs hit MDB_BAD_VALSIZE)
    (mnt / "d1" / "sub").mkdir()
    (mnt / "d2").mkdir()
    names = []
    for i in range(saves):
        op = rnd.random()
        if op < 0.45 or not names:
            p = mnt / rnd.choice(["", "d1", "d1/sub", "d2"]) / f"f{i}.txt"
            _save(p, (f"line {i}\n" * rnd.randint(0, 300)).encode() + os.urandom(rnd.randint(0, 3000)))
            names.append(p)
        elif op < 0.65:
            p = rnd.choice(names)
            _save(p, p.read_bytes()[: rnd.randint(0, 2000)] + f"edit {i}\n".encode())
        elif op < 0.72:
            p = names.pop(rnd.randrange(len(names)))
            p.unlink()
        elif op < 0.78:
            p = names.pop(rnd.randrange(len(names)))
            q = p.with_name(f"r{i}.txt")
            p.rename(q)
            names.append(q)
        elif op < 0.84:
            os.chmod(rnd.choice(names), rnd.choice([0o600, 0o644, 0o755, 0o400]))
        elif op < 0.89:
            os.symlink(os.path.basename(rnd.choice(names)), mnt / "d2" / f"s{i}")
        elif op < 0.94:
            src = rnd.choice(names)
            dst = mnt / "d1" / f"h{i}.txt"
            os.link(src, dst)
            names.append(dst)
        elif xattrs:
            os.setxattr(rnd.choice(names), "user.tag", f"t{i}".encode())


def snapshot(root: Path) -> dict:
    """Everything compared: kind, mode, size, content, link target, xattrs, file mtimes, hard links."""
    out = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            item = {"mode": st.st_mode}
            if stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(p)
            else:
                try:
                    item["xattrs"] = {k: os.getxattr(p, k) for k in sorted(os.listxattr(p))}
                except OSError:
                    item["xattrs"] = {}
            if stat.S_ISREG(st.st_mode):
                item["data"] = p.read_bytes()
                item["mtime"] = st.st_mtime_ns
                item["nlink"] = st.st_nlink
                inodes.setdefault(st.st_ino, []).append(rel)
            out[rel] = item
    out["<links>"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return out


def head_seq(src: Path) -> int:
    res = run_cli("log", src, "--records", check=False)
    if res.returncode != 0:
        res = run_cli("log", src, check=True)
    return max(int(line.split()[0]) for line in res.stdout.decode().splitlines() if line[:1].isdigit())


class Past:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.mnts: list[Path] = []

    def mount(self, *args, check: bool = True) -> tuple[Path, subprocess.CompletedProcess]:
        mnt = self.base / f"past{len(self.mnts)}"
        mnt.mkdir()
        self.mnts.append(mnt)
        res = run_cli("mount", *[str(a) for a in args], mnt, timeout=60)
        if check:
            assert res.returncode == 0, res.stderr.decode()
        return mnt, res

    def cleanup(self) -> None:
        for m in self.mnts:
            if os.path.ismount(m):
                run_cli("umount", m, timeout=60)
            force_unmount(m)


@pytest.fixture
def past(tmp_path):
    p = Past(tmp_path)
    yield p
    p.cleanup()


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A generated history of 150 saves, the mount closed again."""
    from fusetools import Mount

    base = tmp_path_factory.mktemp("hist")
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = Mount(src, mnt, "--guard", "off").start()  # random edits that the guard may call damage
    try:
        make_history(mnt, 150)
        m.umount()
    finally:
        m.cleanup()
    return src


def test_mount_at_equals_restore_at_several_moments(history, past, tmp_path):
    head = head_seq(history)
    for k, seq in enumerate(sorted({max(1, head * f // 10) for f in (1, 3, 5, 7, 10)})):
        mnt, _ = past.mount("--at", f"v{seq}", history)
        dest = tmp_path / f"restored{k}"
        run_cli("restore", history, "--at", f"v{seq}", "--to", dest, check=True)
        got, want = snapshot(mnt), snapshot(dest)
        assert got.keys() == want.keys(), f"v{seq}"
        for rel in want:
            assert got[rel] == want[rel], f"v{seq} {rel}"
        assert subprocess.run(["diff", "-r", "--no-dereference", mnt, dest]).returncode == 0
        run_cli("umount", mnt, check=True)


def test_writes_get_erofs(history, past):
    mnt, _ = past.mount("--at", "v20", history)
    some = next(p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink())
    for attempt in (lambda: open(some, "ab"), lambda: open(mnt / "new", "wb"), lambda: (mnt / "dd").mkdir(),
                    lambda: some.unlink(), lambda: os.chmod(some, 0o777),
                    lambda: os.setxattr(some, "user.x", b"1")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == 30  # EROFS


def test_programs_run_inside(history, past, tmp_path):
    mnt, _ = past.mount("--at", f"v{head_seq(history)}", "--journal", history / ".deltafs", "--cache-size", "1M")
    found = subprocess.run(["find", mnt], capture_output=True, check=True).stdout.splitlines()
    assert len(found) > 10
    g = subprocess.run(["grep", "-r", "-l", "line", mnt], capture_output=True)
    assert g.returncode == 0 and g.stdout
    t = subprocess.run(["tar", "cf", tmp_path / "t.tar", "-C", mnt, "."], capture_output=True)
    assert t.returncode == 0, t.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_status_on_a_past_work_tree(mount_factory, past, tmp_path):
    """A git work tree replayed into a mount file by file (saved and fsynced), then viewed."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True, env=env)
    for i in range(5):
        (repo / f"g{i}.txt").write_text(f"v{i}\n")
        subprocess.run([*git, "add", "-A"], check=True, env=env)
        subprocess.run([*git, "commit", "-qm", f"c{i}"], check=True, env=env)
    (repo / "g0.txt").write_text("changed\n")
    m = mount_factory()
    for dirpath, dirs, files in os.walk(repo):
        rel = Path(dirpath).relative_to(repo)
        for d in dirs:
            (m.mnt / rel / d).mkdir()
        for f in files:
            _save(m.mnt / rel / f, (Path(dirpath) / f).read_bytes())
            os.chmod(m.mnt / rel / f, os.stat(Path(dirpath) / f).st_mode & 0o7777)
    m.umount()
    view, _ = past.mount("--at", f"v{head_seq(m.src)}", m.src)
    st = subprocess.run(["git", "-C", str(view), "--no-optional-locks", "status", "--porcelain"],
                        capture_output=True, env=env)
    assert st.returncode == 0, st.stderr
    assert st.stdout.strip() == b"M g0.txt"


def test_bad_input_gives_one_clear_line(history, past):
    for when, words in (("no-such-snapshot", "not a time"), ("v99999999", "unknown version"),
                        ("2999-01-01", "future"), ("1990-01-01", "")):
        _, res = past.mount("--at", when, history, check=False)
        err = res.stderr.decode()
        assert res.returncode != 0, when
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert words in err, err
    res = run_cli("mount", "--at", "v1", history, check=False)  # no MNT, no --journal
    assert res.returncode == 2 and "Traceback" not in res.stderr.decode()


def test_status_shows_the_view(history, past):
    import json

    mnt, _ = past.mount("--at", "v10", history)
    res = run_cli("status", "--json", check=True)
    views = [json.loads(x) for x in res.stdout.decode().splitlines() if x.strip()]
    mine = [v for v in views if v.get("mnt") == str(mnt)]
    assert mine and mine[0]["view"] == "past" and mine[0]["version"] == 10
    text = run_cli("status", check=True).stdout.decode()
    assert f"{mnt}: read-only view" in text


def test_view_beside_a_live_mount_of_the_same_src(mount_factory, past):
    m = mount_factory()
    _save(m.mnt / "a.txt", b"first\n")
    (m.mnt / "d").mkdir()
    os.symlink("a.txt", m.mnt / "d" / "s")
    _save(m.mnt / "a.txt", b"second, longer\n")
    head = head_seq(m.src)
    view, _ = past.mount("--at", "v2", m.src)
    assert (view / "a.txt").read_bytes() == b"first\n"
    assert not (view / "d").exists()
    now, _ = past.mount("--at", f"v{head}", m.src)
    assert (now / "a.txt").read_bytes() == b"second, longer\n"
    assert os.readlink(now / "d" / "s") == "a.txt"
    _save(m.mnt / "a.txt", b"the live mount keeps working\n")
    assert (now / "a.txt").read_bytes() == b"second, longer\n"
    run_cli("umount", view, check=True)
    run_cli("umount", now, check=True)
    m.umount()


def test_find_lists_plainly_and_ls_l_still_sees_every_entry(mount_factory, past, tmp_path):
    """A `find` over the view gets most entries through plain READDIR (name,
    inode, type: no inode made in the kernel per entry, what made the first
    find of a fresh view slow), READDIRPLUS only where a listing starts;
    `ls -l` and `find -ls` afterwards still see every entry right (their
    stats are looked up one by one).  Needs deltafs's pyfuse3 build
    (readdirplus_auto, tools/pyfuse3/patch.py; `make` installs it)."""
    import pyfuse3

    assert "readdirplus_auto" in getattr(pyfuse3, "DELTAFS_PATCHES", ()), "not deltafs's pyfuse3 build"
    m = mount_factory()
    (m.mnt / "big").mkdir()
    for i in range(2000):
        (m.mnt / "big" / f"f{i:04d}").write_bytes(b"x" * (i % 97))
    for d in range(3):
        (m.mnt / f"d{d}").mkdir()
        for i in range(300):
            (m.mnt / f"d{d}" / f"g{i}").write_bytes(b"%d" % i)
    os.symlink("big/f0001", m.mnt / "link")
    m.umount()
    view, _ = past.mount("--at", "now", m.src)
    found = subprocess.run(["find", view], capture_output=True, check=True).stdout.splitlines()
    want = subprocess.run(["find", m.src, "-path", str(m.src / ".deltafs"), "-prune", "-o", "-print"],
                          capture_output=True, check=True).stdout.splitlines()
    assert sorted(os.path.relpath(p, bytes(view)) for p in found) == sorted(os.path.relpath(p, bytes(m.src)) for p in want)

    def long_listing(root: Path) -> list[tuple]:
        out = []
        for line in subprocess.run(["ls", "-ln", "--time-style=+%s", root / "big"], capture_output=True,
                                   check=True, text=True).stdout.splitlines()[1:]:
            f = line.split()
            out.append((f[0][:10], f[4], f[5], f[6]))  # mode, size, mtime, name
        return out

    got = long_listing(view)
    assert len(got) == 2000 and got == long_listing(m.src)
    assert os.readlink(view / "link") == "big/f0001"
    run_cli("umount", view, check=True)
    log = (m.src / ".deltafs" / "past-view.log").read_text()
    line = [x for x in log.splitlines() if "listings served" in x][-1]
    plain, plus = (int(w) for w in line.split() if w.isdigit())
    assert plain > 2000 and plain > 2 * plus, line  # find read most entries plainly
