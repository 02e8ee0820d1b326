"""A full journal disk: the mount keeps working, says so, and catches up.

The journal lives on a real, deliberately tiny tmpfs (mounting one needs
root, as CI has); growing the tmpfs is how space "returns".
"""

import json
import os
import subprocess

import pytest

from deltafs.journal import Journal
from fusetools import IN_CI, run_cli

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def tiny_fs(tmp_path):
    d = tmp_path / "jfs"
    d.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(d)], capture_output=True)
    if res.returncode != 0:
        reason = f"cannot mount a tmpfs for the journal: {res.stderr.decode().strip()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_journal_disk_keeps_mount_working_and_recovers(mount_factory, tmp_path, tiny_fs):
    journal = tiny_fs / "journal"
    m = mount_factory(tmp_path / "src", journal=journal)
    (m.mnt / "small.txt").write_text("fits\n")
    big = os.urandom(12 << 20)  # incompressible, twice the journal's disk
    with open(m.mnt / "big.bin", "wb") as f:
        f.write(big)
        f.flush()
        os.fsync(f.fileno())  # succeeds: the data is safe in SRC even if the journal is full
    # The mount keeps serving reads and writes.
    assert (m.mnt / "big.bin").read_bytes() == big
    (m.mnt / "after.txt").write_text("written while the journal is full\n")
    assert (m.src / "after.txt").read_text() == "written while the journal is full\n"
    res = run_cli("flush", m.mnt)
    assert res.returncode == 0, res.stderr
    st = json.loads(run_cli("status", m.mnt, "--json", check=True).stdout)
    capture = st.get("capture", st)
    assert capture["failures"] >= 1 and capture["last_error"], st
    # Space returns; the next successful capture triggers a rescan of SRC.
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_fs)], check=True)
    (m.mnt / "trigger.txt").write_text("space is back\n")
    run_cli("flush", m.mnt, check=True)
    for _ in range(3):  # the rescan itself queues captures: flush until quiet
        run_cli("flush", m.mnt, check=True)
    m.umount(check=False)
    errors = [l for l in m.log_text().splitlines() if " ERROR " in l]
    assert 1 <= len(errors) <= 3, "a full journal is reported once per incident:\n" + "\n".join(errors)
    assert any("rescan" in l for l in m.log_text().splitlines())
    with Journal.open(str(journal), readonly=True) as j, j.reader() as r:
        tree = r.tree_at()
        assert r.read_content(tree[b"big.bin"].content_seq) == big
        assert r.read_content(tree[b"after.txt"].content_seq) == b"written while the journal is full\n"
        assert r.read_content(tree[b"small.txt"].content_seq) == b"fits\n"
        assert (v := j.verify(full=True)).ok, v.problem
