"""Real programs in the mount: git, sqlite3, cp -a, rsync, tar, parallel writers.

Each test runs the program as a user would and compares the outcome with
what the same program gives on the native filesystem (or with the input
it was given): content, modes, mtimes, symlink targets and hard links.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

STDLIB = Path(json.__file__).parent.parent
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "LC_ALL": "C"}


def run(*args, cwd=None, env=None, input=None) -> str:
    res = subprocess.run([str(a) for a in args], cwd=cwd, env=env, input=input, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr}"
    return res.stdout


def need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


def signature(root: Path, *, dir_mtimes: bool = True, link_mtimes: bool = True) -> dict:
    """Everything cp -a / rsync -aH / tar must preserve, keyed by relative path."""
    out = {}
    groups: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [""] + sorted(dirnames + filenames) if dirpath == str(root) else sorted(dirnames + filenames):
            p = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(p, root)
            s = os.lstat(p)
            mode = stat.filemode(s.st_mode)
            if stat.S_ISLNK(s.st_mode):
                out[rel] = (mode, os.readlink(p), s.st_mtime_ns if link_mtimes else None)
            elif stat.S_ISDIR(s.st_mode):
                out[rel] = (mode, s.st_mtime_ns if dir_mtimes and rel != "." else None)
            else:
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                first = groups.setdefault(s.st_ino, rel) if s.st_nlink > 1 else rel
                out[rel] = (mode, s.st_size, s.st_mtime_ns, digest, s.st_nlink, first)
    return out


@pytest.fixture
def tree(tmp_path) -> Path:
    """A few hundred files of the stdlib with symlinks, hard links and odd modes added."""
    root = tmp_path / "orig"
    root.mkdir()
    for pkg in ("json", "email", "xml", "importlib", "unittest", "asyncio", "http", "urllib"):
        shutil.copytree(STDLIB / pkg, root / pkg, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink("json/decoder.py", root / "decoder-link")
    os.symlink("email", root / "email-dir-link")
    os.symlink("does/not/exist", root / "dangling")
    os.link(root / "json" / "encoder.py", root / "encoder-hardlink.py")
    os.link(root / "json" / "encoder.py", root / "email" / "encoder-hardlink2.py")
    (root / "empty-dir").mkdir()
    (root / "private").write_bytes(os.urandom(100_000))
    os.chmod(root / "private", 0o600)
    os.chmod(root / "json" / "tool.py", 0o755)
    os.utime(root / "private", ns=(1_000_000_000, 1_234_567_891))
    os.utime(root / "email-dir-link", ns=(1, 2_000_000_003), follow_symlinks=False)
    os.utime(root / "empty-dir", ns=(1, 3_000_000_007))
    assert sum(1 for _ in root.rglob("*")) > 150
    return root


@pytest.mark.timeout(300)
def test_git_repository(mounted):
    need("git")
    repo = mounted.mnt / "repo"
    repo.mkdir()
    run("git", "init", "-q", "-b", "main", cwd=repo, env=GIT_ENV)
    for i in range(20):
        (repo / f"f{i}.txt").write_text(f"first version of {i}\n" * (i + 1))
    (repo / "sub").mkdir()
    (repo / "sub" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(repo / "sub" / "script.sh", 0o755)
    os.symlink("f1.txt", repo / "link")
    run("git", "add", "-A", cwd=repo, env=GIT_ENV)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=GIT_ENV)
    first = run("git", "rev-parse", "HEAD", cwd=repo, env=GIT_ENV).strip()
    assert run("git", "status", "--porcelain", cwd=repo, env=GIT_ENV) == ""

    (repo / "f3.txt").write_text("second version\n")
    (repo / "f4.txt").unlink()
    (repo / "new.txt").write_text("new\n")
    run("git", "add", "-A", cwd=repo, env=GIT_ENV)
    run("git", "commit", "-q", "-m", "second", cwd=repo, env=GIT_ENV)
    assert run("git", "status", "--porcelain", cwd=repo, env=GIT_ENV) == ""
    assert run("git", "log", "--format=%s", cwd=repo, env=GIT_ENV).split() == ["second", "first"]

    run("git", "checkout", "-q", first, cwd=repo, env=GIT_ENV)
    assert (repo / "f3.txt").read_text() == "first version of 3\n" * 4
    assert (repo / "f4.txt").read_text() == "first version of 4\n" * 5
    assert not (repo / "new.txt").exists()
    assert os.readlink(repo / "link") == "f1.txt"
    assert os.stat(repo / "sub" / "script.sh").st_mode & 0o111
    assert run("git", "status", "--porcelain", cwd=repo, env=GIT_ENV) == ""
    run("git", "checkout", "-q", "main", cwd=repo, env=GIT_ENV)
    assert (repo / "f3.txt").read_text() == "second version\n"
    assert run("git", "fsck", "--strict", cwd=repo, env=GIT_ENV) == ""
    # What the mount wrote is a valid repository without the mount, too.
    assert run("git", "-C", mounted.src / "repo", "status", "--porcelain", env=GIT_ENV) == ""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_many_transactions(mounted, journal_mode):
    need("sqlite3")
    n = 2000 if journal_mode == "delete" else 1000
    db = mounted.mnt / "db.sqlite"
    script = [f"PRAGMA journal_mode={journal_mode};", "PRAGMA synchronous=FULL;",
              "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"]
    # Each statement outside BEGIN/COMMIT is its own committed transaction.
    script += [f"INSERT INTO t (v) VALUES ('row {i} {'x' * (i % 300)}');" for i in range(n)]
    script += [f"UPDATE t SET v = 'updated' WHERE id % 7 = {k};" for k in range(7)]
    script += ["DELETE FROM t WHERE id % 10 = 0;"]
    run("sqlite3", db, input="\n".join(script) + "\n")
    assert run("sqlite3", db, "PRAGMA integrity_check;").strip() == "ok"
    assert run("sqlite3", db, "SELECT count(*), count(DISTINCT v) FROM t;").strip() == f"{n - n // 10}|1"
    # Readable without the mount, identical to what the mount shows.
    run("sqlite3", db, "PRAGMA wal_checkpoint(TRUNCATE);")
    assert (mounted.src / "db.sqlite").read_bytes() == db.read_bytes()
    assert run("sqlite3", mounted.src / "db.sqlite", "PRAGMA integrity_check;").strip() == "ok"


@pytest.mark.timeout(300)
def test_cp_a_tree(mounted, tree, tmp_path):
    run("cp", "-a", tree, tmp_path / "native")
    run("cp", "-a", tree, mounted.mnt / "copy")
    run("diff", "-r", "--no-dereference", tree, mounted.mnt / "copy")
    want = signature(tmp_path / "native")
    assert signature(mounted.mnt / "copy") == want
    assert signature(mounted.src / "copy") == want
    # And back out again.
    run("cp", "-a", mounted.mnt / "copy", tmp_path / "back")
    run("cp", "-a", tmp_path / "native", tmp_path / "native-back")
    assert signature(tmp_path / "back") == signature(tmp_path / "native-back")


@pytest.mark.timeout(300)
def test_rsync_both_directions(mounted, tree, tmp_path):
    """rsync into the mount and out of it does exactly what it does natively."""
    need("rsync")
    native, mnt = tmp_path / "native", mounted.mnt / "r"

    def sig(root):
        # rsync -H links files into directories after it has set their
        # mtimes, and sets symlink mtimes only sometimes: natively too, the
        # outcome depends on the timing of its processes.
        return signature(root, dir_mtimes=False, link_mtimes=False)

    def rsync(src, dst, *extra):
        return run("rsync", "-aHX", *extra, f"{src}/", f"{dst}/")

    rsync(tree, native)
    rsync(tree, mnt)
    run("diff", "-r", "--no-dereference", tree, mnt)
    assert sig(mnt) == sig(native)
    # A second run does the same (next to nothing) in both places.
    assert sorted(rsync(tree, mnt, "-i").splitlines()) == sorted(rsync(tree, native, "-i").splitlines())
    # A change is picked up by the quick check and sent as a delta.
    with open(tree / "json" / "decoder.py", "a") as f:
        f.write("# changed\n")
    out = rsync(tree, mnt, "-i", "--no-whole-file")
    assert "json/decoder.py" in out
    assert sorted(out.splitlines()) == sorted(rsync(tree, native, "-i", "--no-whole-file").splitlines())
    assert sig(mnt) == sig(native)
    # Out of the mount again.
    rsync(mnt, tmp_path / "back")
    rsync(native, tmp_path / "native-back")
    assert sig(tmp_path / "back") == sig(tmp_path / "native-back")
    assert sorted(rsync(mnt, tmp_path / "back", "-i").splitlines()) == \
        sorted(rsync(native, tmp_path / "native-back", "-i").splitlines())


@pytest.mark.timeout(300)
def test_tar_in_and_out(mounted, tree, tmp_path):
    flags = ["--sort=name", "--numeric-owner", "--format=gnu"]
    run("tar", "cf", tmp_path / "orig.tar", *flags, "-C", tree, ".")
    native, mnt = tmp_path / "native", mounted.mnt / "x"
    for d in (native, mnt):
        d.mkdir()
        run("tar", "xpf", tmp_path / "orig.tar", "-C", d)
    run("diff", "-r", "--no-dereference", tree, mnt)
    assert signature(mnt) == signature(native)
    run("tar", "cf", tmp_path / "back.tar", *flags, "-C", mnt, ".")
    run("tar", "cf", tmp_path / "native.tar", *flags, "-C", native, ".")
    # The same members, bytes, modes, mtimes and hard links, in the same order.
    assert (tmp_path / "back.tar").read_bytes() == (tmp_path / "native.tar").read_bytes()
    assert run("tar", "df", tmp_path / "back.tar", "-C", tree) == ""


WRITER = r"""
import hashlib, os, random, sys
root, k, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(k)
os.makedirs(os.path.join(root, f"w{k}"), exist_ok=True)
for i in range(count):
    size = rng.choice([0, 1, 100, 4096, 4097, 65536, 300_000])
    data = rng.randbytes(size)
    p = os.path.join(root, f"w{k}", f"f{i}")
    with open(p, "wb") as f:
        # several writes of odd sizes, some rewritten
        for off in range(0, size, 7919):
            f.write(data[off:off + 7919])
        if size > 10:
            f.seek(size // 3)
            f.write(data[size // 3:size // 3 + 10])
        if i % 5 == 0:
            f.flush()
            os.fsync(f.fileno())
    print(p, hashlib.sha256(data).hexdigest())
"""


@pytest.mark.timeout(300)
def test_parallel_writers(mounted):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(mounted.mnt), str(k), "40"],
                              stdout=subprocess.PIPE, text=True) for k in range(8)]
    expected = {}
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0
        for line in out.splitlines():
            path, digest = line.split()
            expected[path] = digest
    assert len(expected) == 8 * 40
    for path, digest in expected.items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, path
        src = mounted.src / os.path.relpath(path, mounted.mnt)
        assert hashlib.sha256(src.read_bytes()).hexdigest() == digest, src
