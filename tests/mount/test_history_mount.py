"""log, cat, restore against a real mount, from a subprocess, as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from datetime import datetime

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(120)


def write_version(path, data: bytes) -> None:
    """Save like an editor that fsyncs: the version is durable when this returns."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def log_json(*args) -> list[dict]:
    res = run_cli("log", "--records", *args, "--json", check=True)
    return [json.loads(x) for x in res.stdout.decode().splitlines()]


def wait_for(cond, timeout: float = 30.0):
    """Captures at close/rename are asynchronous: wait for them to be committed."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the journal")
        time.sleep(0.05)


def content_versions(path) -> list[dict]:
    return [d for d in log_json(path) if d["op"] == "write"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_log_cat_restore_match_what_was_written(mounted, tmp_path):
    p = mounted.mnt / "notes.txt"
    datas = [b"x", b"", os.urandom(16 * 1024 - 1), os.urandom(16 * 1024 + 1),
             b"".join(b"line %d\n" % i for i in range(100_000))]
    for d in datas:  # (an empty first save of a new file is its create, not a content version)
        write_version(p, d)
    vers = wait_for(lambda: (v := content_versions(p)) and len({x["version"] for x in v}) >= len(datas) and v)
    by_size = {}
    for v in reversed(vers):  # oldest first: the last with a size wins
        by_size[v["size"]] = v
    for d in datas:
        v = by_size[len(d)]
        res = run_cli("cat", p, "--version", v["version"], check=True)
        assert sha(res.stdout) == sha(d)
        dest = tmp_path / f"out-{v['version']}"
        run_cli("restore", p, "--version", v["version"], "--to", dest, check=True)
        assert sha(dest.read_bytes()) == sha(d)
    # the same history from SRC, with and without the mount
    assert [v["version"] for v in content_versions(mounted.src / "notes.txt")] == [v["version"] for v in vers]
    res = run_cli("log", "--records", mounted.mnt, check=True)
    assert b"notes.txt" in res.stdout
    mounted.umount()
    assert [v["version"] for v in content_versions(mounted.src / "notes.txt")] == [v["version"] for v in vers]
    assert run_cli("cat", mounted.src / "notes.txt", check=True).stdout == datas[-1]


def test_restore_in_place_through_the_mount_is_a_new_version(mounted):
    p = mounted.mnt / "todo.md"
    write_version(p, b"first draft\n")
    write_version(p, b"second draft\n")
    vers = wait_for(lambda: (v := content_versions(p)) and len(v) >= 2 and v)
    old, cur = vers[-1]["version"], vers[0]["version"]
    res = run_cli("restore", p, "--version", old, "--json", check=True)
    rep = json.loads(res.stdout)
    assert rep["mode"] == "mount" and rep["files"] == 1 and rep["errors"] == []
    assert p.read_bytes() == b"first draft\n"
    assert (mounted.src / "todo.md").read_bytes() == b"first draft\n"
    newer = wait_for(lambda: [v for v in content_versions(p) if v["version"] > cur])
    assert run_cli("cat", p, "--version", newer[0]["version"], check=True).stdout == b"first draft\n"
    # restoring never destroys newer history
    assert run_cli("cat", p, "--version", cur, check=True).stdout == b"second draft\n"
    assert not [n for n in os.listdir(mounted.mnt) if n.startswith(".deltafs-restore")]
    assert not [d for d in log_json(mounted.mnt) if ".deltafs-restore" in d["path"]]


def test_deleted_tree_comes_back(mounted, tmp_path):
    m = mounted.mnt
    (m / "proj" / "src").mkdir(parents=True)
    write_version(m / "proj" / "README", b"readme\n")
    write_version(m / "proj" / "src" / "main.py", b"print('hi')\n" * 1000)
    os.chmod(m / "proj" / "src" / "main.py", 0o750)
    os.symlink("src/main.py", m / "proj" / "main")
    os.link(m / "proj" / "README", m / "proj" / "README.hard")
    wait_for(lambda: any(d["op"] == "link" for d in log_json(m / "proj")))
    time.sleep(0.05)
    before = datetime.now().isoformat(timespec="milliseconds")
    time.sleep(0.05)
    for name in ("README", "README.hard", "main", "src/main.py"):
        os.unlink(m / "proj" / name)
    os.rmdir(m / "proj" / "src")
    os.rmdir(m / "proj")
    wait_for(lambda: any(d["op"] == "rmdir" and d["path"] == "proj" for d in log_json(m)))
    deleted = log_json(m, "--deleted")
    # a hard-linked file is listed under the last path that named it
    assert {"proj/README.hard", "proj/src/main.py", "proj/main"} <= {d["path"] for d in deleted}

    def check(root):
        assert (root / "README").read_bytes() == b"readme\n"
        assert (root / "src" / "main.py").read_bytes() == b"print('hi')\n" * 1000
        assert stat.S_IMODE(os.stat(root / "src" / "main.py").st_mode) == 0o750
        assert os.readlink(root / "main") == "src/main.py"
        assert os.stat(root / "README").st_ino == os.stat(root / "README.hard").st_ino

    res = run_cli("restore", m / "proj", "--at", before, "--to", tmp_path / "copy")
    assert res.returncode == 0, res.stderr
    check(tmp_path / "copy")
    res = run_cli("restore", m / "proj", "--at", before)  # in place, through the mount
    assert res.returncode == 0, res.stderr
    check(m / "proj")
    check(mounted.src / "proj")
    wait_for(lambda: any(d["path"] == "proj/src/main.py" and d["op"] == "write"
                         and d["version"] > deleted[0]["deleted_version"] for d in log_json(m / "proj")))


def test_bad_input_from_a_subprocess(mounted, tmp_path):
    write_version(mounted.mnt / "a", b"1")
    wait_for(lambda: content_versions(mounted.mnt / "a"))
    for args in (["log", mounted.mnt / "never-seen"],
                 ["cat", mounted.mnt / "a", "--at", "2001-01-01"],
                 ["cat", mounted.mnt / "a", "--at", "2999-01-01"],
                 ["restore", mounted.mnt / "a", "--version", "99999", "--to", tmp_path / "o"],
                 ["restore", mounted.mnt / "a", "--to", tmp_path]):
        res = run_cli(*args)
        err = res.stderr.decode()
        assert res.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, (args, err)
