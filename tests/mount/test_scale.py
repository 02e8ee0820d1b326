"""A big tree under a small descriptor limit: the mount holds up, nothing is lost.

The daemon runs under ``prlimit --nofile=1024:1024`` (many containers and
services have such limits), so it may cache at most 256 inode descriptors
and must keep 256 free, while the kernel knows hundreds of thousands of
inodes.  Through the mount: 100,000 files are created, then ``find``,
``du``, ``git`` (add, commit, status) on a part, ``cp -a`` of the whole
tree, ``rm -rf`` of both.  Zero errors, every file in ``log``, ``status``
answering all along (a thread asks it over the control socket every few
tenths of a second), and the daemon logs no WARNING or ERROR.

Lean on purpose: one mount, and the files are empty but one in a hundred
(a content capture costs far more than a descriptor, and this test is
about descriptors); it still takes minutes.  ``-m 'not slow'`` leaves it
out; ``make test`` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from deltafs import control
from fusetools import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DIRS, PER_DIR = 100, 1000  # 100,000 files
LIMIT = 1024


class StatusPoller(threading.Thread):
    """Asks the daemon for its status over and over; remembers answers and failures."""

    def __init__(self, journal) -> None:
        super().__init__(daemon=True)
        self.journal = str(journal)
        self.answers: list[dict] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.3):
            try:
                self.answers.append(control.request(self.journal, "status", timeout=60)["status"])
            except Exception as e:  # noqa: BLE001 (any failure is what the test reports)
                self.failures.append(f"{time.strftime('%H:%M:%S')}: {e}")


def sh(*args, cwd=None) -> str:
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0 and not res.stderr.strip(), f"{args}: exit {res.returncode}: {res.stderr[-2000:]}"
    return res.stdout


def test_100k_files_under_a_1024_descriptor_limit(mount_factory):
    m = mount_factory(None, prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}"])
    with open(f"/proc/{m.proc.pid}/limits") as f:
        assert any(line.startswith("Max open files") and f" {LIMIT} " in line for line in f)
    poller = StatusPoller(m.journal)
    poller.start()
    try:
        tree = m.mnt / "tree"
        tree.mkdir()
        for d in range(DIRS):
            sub = tree / f"d{d:03}"
            sub.mkdir()
            for i in range(PER_DIR):
                with open(sub / f"f{i:04}.txt", "wb") as f:
                    if i % 100 == 99:
                        f.write(b"%d/%d\n" % (d, i))
        n = DIRS * PER_DIR

        assert int(sh("sh", "-c", f"find {tree} -type f | wc -l")) == n
        assert int(sh("du", "-s", "--apparent-size", "-B1", str(tree)).split()[0]) > n // 100 * 5
        part = tree / "d007"
        sh("git", "init", "-q", cwd=part)
        sh("git", "add", "-A", cwd=part)
        sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "part", cwd=part)
        (part / "f0099.txt").write_bytes(b"changed\n")
        assert sh("git", "status", "--porcelain", cwd=part) == " M f0099.txt\n"

        sh("cp", "-a", str(tree), str(m.mnt / "copy"))
        assert int(sh("sh", "-c", f"find {m.mnt / 'copy'} -type f -name 'f*.txt' | wc -l")) == n
        assert (m.mnt / "copy" / "d099" / "f0999.txt").read_bytes() == b"99/999\n"

        st = control.request(str(m.journal), "status", timeout=60)["status"]
        fds = st["descriptors"]
        assert fds["limit"] == LIMIT and fds["budget"] == LIMIT // 4
        assert fds["inodes"] > fds["budget"] and fds["evictions"] > 0  # it really had to evict
        assert fds["open"] <= LIMIT - fds["reserve"]
        assert fds["shortages"] == 0 and fds["refused"] == 0

        sh("rm", "-rf", str(tree), str(m.mnt / "copy"))
        assert os.listdir(m.mnt) == []
        run_cli("flush", m.mnt, check=True, timeout=600)
    finally:
        poller.stop.set()
        poller.join(timeout=120)

    assert not poller.failures, "status did not answer:\n" + "\n".join(poller.failures[:10])
    assert len(poller.answers) >= 10
    peak = max(a["descriptors"]["open"] for a in poller.answers)
    assert peak <= LIMIT - 256, f"peak {peak} descriptors open: the reserve was used"
    last = control.request(str(m.journal), "status", timeout=60)["status"]
    assert last["capture"]["failures"] == 0 and last["capture"]["gap"] == 0 and last["capture"]["pending"] == 0

    # every file is in the log: created (and saved, when it has content), in the tree and the copy
    res = run_cli("log", "--records", m.mnt, "--json", check=True, timeout=600)
    ops: dict[str, set] = {}
    for line in res.stdout.splitlines():
        rec = json.loads(line)
        ops.setdefault(rec["path"], set()).add(rec["op"])
    for top in ("tree", "copy"):
        missing = []
        for d in range(DIRS):
            for i in range(PER_DIR):
                p = f"{top}/d{d:03}/f{i:04}.txt"
                want = {"create", "unlink"} | ({"write"} if i % 100 == 99 else set())
                if not want <= ops.get(p, set()):
                    missing.append((p, ops.get(p)))
        assert not missing, f"{len(missing)} files of {top} lack records in the log, e.g. {missing[:3]}"
    m.umount()  # the daemon exits 0 and logged no WARNING or ERROR
