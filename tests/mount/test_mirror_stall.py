"""A mount whose S3 server hangs (a real SeaweedFS stopped with SIGSTOP: it
accepts connections and never answers): status says ``stalled``,
``status --check`` fails, unmount stays quick and releases the journal,
and after SIGCONT the next mount catches up."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from fusetools import run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "mirrors"))
from s3server import BUCKET, s3_env, s3_frozen, s3_server  # noqa: E402,F401 (fixtures)
from test_mirror_mount import tree  # noqa: E402
from test_mirror_outage import await_status, save, umount_expecting_mirror_warnings  # noqa: E402

from deltafs.journal import Journal  # noqa: E402
from deltafs.mirrors.replicate import FINAL_FLUSH_TIMEOUT, STALL_AFTER  # noqa: E402

pytestmark = pytest.mark.timeout(600)

UMOUNT_BOUND = 30.0  # docs/mirrors.md: unmount finishes within 30 s whatever a mirror does


def timed_umount(m) -> float:
    t0 = time.monotonic()
    umount_expecting_mirror_warnings(m)
    return time.monotonic() - t0


def test_hung_s3_server_is_stalled_umount_is_quick_and_the_next_mount_catches_up(
        mount_factory, s3_frozen, tmp_path):
    s3 = s3_frozen
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    extra = ("--mirror", url, "--endpoint-url", s3.endpoint_url)
    m = mount_factory(None, *extra)
    save(m.mnt / "before.txt", b"shipped before the hang\n")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    assert run_cli("status", m.mnt, "--check").returncode == 0

    s3.freeze()
    for i in range(5):  # every write and fsync returns: the mount never waits for a mirror
        save(m.mnt / f"during{i}.txt", os.urandom(2000) + b"written while the server hangs %d\n" % i)
    run_cli("flush", m.mnt, check=True)
    # the product's bound is 60 s (STALL_AFTER after the pass starts); the poll allows for a loaded machine
    mi = await_status(m.mnt, url, lambda mi: mi["state"] == "stalled", "reported stalled", deadline=120)
    assert mi["stalled_s"] >= STALL_AFTER and mi["lag_records"] > 0 and mi["in_flight"], mi

    chk = run_cli("status", m.mnt, "--check")
    out = chk.stdout.decode()
    assert chk.returncode == 1 and "CRITICAL" in out and "stalled" in out and url in out, out
    text = run_cli("status", m.mnt, check=True).stdout.decode()
    assert f"{url}: stalled" in text and "no progress for" in text, text
    prom = run_cli("status", m.mnt, "--prometheus", check=True).stdout.decode()
    assert 'deltafs_mirror_state{' in prom
    stalled_line = [ln for ln in prom.splitlines()
                    if ln.startswith("deltafs_mirror_state{") and 'state="stalled"' in ln]
    assert stalled_line and stalled_line[0].endswith(" 1.0"), stalled_line
    assert "deltafs_mirror_stalled_seconds{" in prom

    expected = tree(m.mnt)
    took = timed_umount(m)
    assert took < UMOUNT_BOUND, f"umount took {took:.1f}s with a hung mirror"
    with Journal.open(m.journal):  # the daemon let go of the journal lock
        pass

    s3.thaw()
    m2 = mount_factory(m.src, *extra, mnt=m.mnt)
    run_cli("flush", m2.mnt, "--mirrors", check=True, timeout=300)
    await_status(m2.mnt, url, lambda mi: mi["state"] == "ok" and mi["lag_records"] == 0, "caught up")
    assert run_cli("status", m2.mnt, "--check").returncode == 0
    umount_expecting_mirror_warnings(m2)
    dest = tmp_path / "clone"
    run_cli("clone", url, dest, "--endpoint-url", s3.endpoint_url, check=True)
    assert tree(dest) == expected


def test_umount_right_after_the_server_hangs_is_quick(mount_factory, s3_frozen):
    """Before the stall is noticed the last pass is tried, within FINAL_FLUSH_TIMEOUT."""
    s3 = s3_frozen
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    m = mount_factory(None, "--mirror", url, "--endpoint-url", s3.endpoint_url)
    save(m.mnt / "a.txt", b"one\n")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    s3.freeze()
    save(m.mnt / "b.txt", b"two\n")
    run_cli("flush", m.mnt, check=True)
    took = timed_umount(m)
    assert took < UMOUNT_BOUND, f"umount took {took:.1f}s with a hung mirror"
    assert FINAL_FLUSH_TIMEOUT < UMOUNT_BOUND
    log = m.log_text()
    assert "unmounted" in log
    st = json.loads(run_cli("status", m.src, "--json", check=True).stdout)
    assert st["mounted"] is False  # the journal is readable, nothing holds it
