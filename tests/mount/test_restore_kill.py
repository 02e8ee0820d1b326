"""A restore killed (SIGKILL) in the middle leaves no half-written target (issue 5).

Each file is written to ``.deltafs-restore-PID-N.tmp`` in its directory,
fsynced, then renamed over the target: a kill leaves the target as it was
(absent, or the previous content) and at most that temp file, which the
next restore into the directory removes (its PID is dead, its flock free).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fusetools import DELTAFS, Mount, run_cli

pytestmark = pytest.mark.timeout(600)

BIG = 200 << 20  # large enough that a restore takes a while to write
CURRENT = b"the current, small version\n"
TMP = re.compile(r"\.deltafs-restore-(\d+)-\d+\.tmp\Z")


def sha_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """SRC/big.bin with two versions: 200 MiB of random data, then a small one; unmounted."""
    base = tmp_path_factory.mktemp("restore-kill")
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    m = Mount(src, mnt)
    try:
        m.start()
        h = hashlib.sha256()
        with open(mnt / "big.bin", "wb") as f:
            for _ in range(BIG >> 20):
                block = os.urandom(1 << 20)
                h.update(block)
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        with open(mnt / "big.bin", "wb") as f:
            f.write(CURRENT)
        run_cli("flush", mnt, check=True)
        m.umount()
    finally:
        m.cleanup()
    res = run_cli("log", "--records", src / "big.bin", "--json", check=True)
    writes = [json.loads(x) for x in res.stdout.decode().splitlines()]
    (big,) = [d["version"] for d in writes if d["op"] == "write" and d["size"] == BIG]
    (small,) = [d["version"] for d in writes if d["op"] == "write" and d["size"] == len(CURRENT)]
    return {"src": src, "base": base, "version": str(big), "small": str(small), "sha": h.hexdigest()}


def temp_files(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".deltafs-restore-"))


def kill_mid_restore(args: list, watch_dir, timeout: float = 120.0) -> str:
    """Start `deltafs restore ARGS`, SIGKILL it once its temp file in watch_dir
    has grown; return that temp file's name."""
    proc = subprocess.Popen([*DELTAFS, "restore", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    end = time.monotonic() + timeout
    try:
        while True:  # waiting on another process: poll its directory with a deadline
            grown = None
            for name in temp_files(watch_dir):
                try:
                    if os.stat(os.path.join(watch_dir, name)).st_size >= 4 << 20:
                        grown = name
                except FileNotFoundError:
                    pass  # renamed into place just now: too late, the check below says so
            if grown:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"restore ended ({proc.returncode}) before it could be killed: "
                                     f"{err.decode(errors='replace')}")
            if time.monotonic() > end:
                raise AssertionError(f"no growing temp file in {watch_dir} after {timeout:.0f}s")
            time.sleep(0.002)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    m = TMP.match(grown)
    assert m and int(m.group(1)) == proc.pid, grown  # clearly temporary, named after the dead restore
    return grown


def test_killed_restore_to_dest_leaves_no_dest(history):
    out = history["base"] / "out"
    out.mkdir()
    dest = out / "big.bin"
    stale = kill_mid_restore([history["src"] / "big.bin", "--version", history["version"], "--to", dest], out)
    assert not os.path.lexists(dest)  # nothing under the real name, not even a partial file
    assert temp_files(out) == [stale]
    res = run_cli("restore", history["src"] / "big.bin", "--version", history["version"], "--to", dest,
                  check=True)
    assert f"removed {out / stale}, left by an interrupted restore" in res.stderr.decode()
    assert temp_files(out) == []  # the next restore into the directory swept it
    assert sha_file(dest) == history["sha"]


def test_killed_in_place_restore_leaves_src_as_it_was(history):
    src = history["src"]
    target = src / "big.bin"
    assert target.read_bytes() == CURRENT
    stale = kill_mid_restore([target, "--version", history["version"]], src)
    assert target.read_bytes() == CURRENT  # the old content, whole: the rename never happened
    assert temp_files(src) == [stale]
    # the killed restore held the journal's write lock: it is free again
    res = run_cli("restore", target, "--version", history["version"], "--json", check=True)
    assert f"removed {src / stale}, left by an interrupted restore" in res.stderr.decode()
    rep = json.loads(res.stdout)
    assert rep["mode"] == "src" and rep["files"] == 1 and rep["records"]
    assert temp_files(src) == []
    assert sha_file(target) == history["sha"]
    # and the journal knows the restore: its latest content version is the big one again
    writes = [json.loads(x) for x in run_cli("log", "--records", target, "--json", check=True).stdout.decode().splitlines()]
    assert [d for d in writes if d["op"] == "write"][0]["size"] == BIG


def test_temp_files_of_live_restores_are_left_alone(history):
    out = history["base"] / "live"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          check=True)
    dead_pid = int(dead.stdout)
    alive = out / f".deltafs-restore-{os.getpid()}-1.tmp"  # its process runs (this one)
    locked = out / f".deltafs-restore-{dead_pid}-1.tmp"  # a PID gone here, but its flock is held
    gone = out / f".deltafs-restore-{dead_pid}-2.tmp"  # stale: PID gone, lock free
    other = out / "notes-1.tmp"  # not a restore's name
    for p in (alive, locked, gone, other):
        p.write_bytes(b"partial")
    with open(locked, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        run_cli("restore", history["src"] / "big.bin", "--version", history["small"], "--to",
                out / "small.bin", check=True)
    assert sorted(os.listdir(out)) == sorted([alive.name, locked.name, other.name, "small.bin"])
    assert (out / "small.bin").read_bytes() == CURRENT
