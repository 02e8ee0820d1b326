"""A mount whose S3 mirror goes away (a real SeaweedFS server, stopped and
started again), and a daemon killed while it uploads."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from fusetools import run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "mirrors"))
from s3server import BUCKET, s3_env, s3_outage, s3_server  # noqa: E402,F401 (fixtures)
from test_mirror_mount import tree  # noqa: E402

from deltafs.journal import Journal  # noqa: E402
from deltafs.mirrors import format as F  # noqa: E402
from deltafs.mirrors import open_mirror  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def mirror_status(mnt: Path, url: str) -> dict:
    res = run_cli("status", mnt, "--json", check=True)
    st = json.loads(res.stdout)
    return next(mi for mi in st["mirrors"] if mi["url"] == url)


def await_status(mnt: Path, url: str, cond, what: str, deadline: float = 120.0) -> dict:
    """Poll ``deltafs status --json`` until ``cond(mirror)``: the mirror's
    progress is an external event (an S3 server), no callback to await."""
    end = time.monotonic() + deadline
    while True:
        mi = mirror_status(mnt, url)
        if cond(mi):
            return mi
        if time.monotonic() > end:
            raise AssertionError(f"mirror never {what}: {mi}")
        time.sleep(0.2)


def save(path: Path, data: bytes) -> None:
    """Write and fsync: both must return (the mirror never blocks the mount)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def umount_expecting_mirror_warnings(m) -> None:
    res = run_cli("umount", m.mnt, timeout=180)
    rc = m.proc.wait(timeout=180)
    m.proc = None
    m._stderr.close()
    assert res.returncode == 0 and rc == 0, res.stderr.decode() + m.log_text()
    bad = [line for line in m.log_text().splitlines()
           if (" ERROR " in line or " WARNING " in line or "Traceback" in line) and "deltafs.mirrors" not in line]
    assert not bad, "daemon logged problems:\n" + "\n".join(bad)


def test_s3_outage_mount_keeps_working_then_catches_up(mount_factory, s3_outage, tmp_path):
    s3 = s3_outage
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    m = mount_factory(None, "--mirror", url, "--endpoint-url", s3.endpoint_url)
    (m.mnt / "docs").mkdir()
    for i in range(5):
        save(m.mnt / "docs" / f"f{i}.txt", b"before %d\n" % i * 500)
    run_cli("flush", m.mnt, "--mirrors", check=True)
    assert mirror_status(m.mnt, url)["lag_records"] == 0

    s3.stop()
    for i in range(30):  # keep editing: every write and fsync returns
        save(m.mnt / "docs" / f"f{i % 7}.txt", b"edit %d, " % i * (100 + i) + b"during %d\n" % i)
    (m.mnt / "docs" / "f1.txt").rename(m.mnt / "docs" / "renamed.txt")
    run_cli("flush", m.mnt, check=True)
    mi = await_status(m.mnt, url, lambda mi: mi["state"] in ("retrying", "circuit open") and mi["last_error"],
                      "reported the outage")
    assert mi["lag_records"] > 0 and mi["lag_bytes"] > 0 and mi["failures"] >= 1
    assert "secret" not in json.dumps(mi).lower() and s3.secret_key not in json.dumps(mi)
    text = run_cli("status", m.mnt, check=True).stdout.decode()
    assert url in text and mi["state"] in text
    res = run_cli("flush", m.mnt, "--mirrors")
    assert res.returncode == 5 and b"Traceback" not in res.stderr  # cannot ship now: says so
    chk = run_cli("status", m.mnt, "--check", "--max-lag", "0")
    assert chk.returncode == 1 and url.encode() in chk.stdout

    s3.start()
    await_status(m.mnt, url, lambda mi: mi["lag_records"] == 0 and mi["state"] == "ok", "caught up",
                 deadline=400)  # up to one probe interval when the circuit had opened
    assert run_cli("status", m.mnt, "--check").returncode == 0
    expected = tree(m.mnt)
    umount_expecting_mirror_warnings(m)
    run_cli("verify", "--mirror", url, "--endpoint-url", s3.endpoint_url, "--full", check=True)
    dest = tmp_path / "clone"
    run_cli("clone", url, dest, "--endpoint-url", s3.endpoint_url, check=True)
    assert tree(dest) == expected


def test_pause_mirror(mount_factory, tmp_path):
    url = f"file://{tmp_path}/mirror"
    m = mount_factory(None, "--mirror", url)
    save(m.mnt / "a.txt", b"one")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    run_cli("pause", m.mnt, "--mirror", url, check=True)
    assert mirror_status(m.mnt, url)["state"] == "paused"
    save(m.mnt / "a.txt", b"two")
    run_cli("flush", m.mnt, check=True)
    time.sleep(2)  # two poll intervals: a running mirror would have shipped it by now
    mi = mirror_status(m.mnt, url)
    assert mi["state"] == "paused" and mi["lag_records"] > 0
    assert run_cli("resume", m.mnt, "--mirror", "file:///nope").returncode == 2
    run_cli("resume", m.mnt, "--mirror", url, check=True)
    run_cli("flush", m.mnt, "--mirrors", check=True)
    assert mirror_status(m.mnt, url)["lag_records"] == 0
    m.umount()


def test_kill_during_upload_then_resume(mount_factory, s3_env, tmp_path):
    s3 = s3_env
    url = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    extra = ("--mirror", url, "--endpoint-url", s3.endpoint_url)
    m = mount_factory(None, *extra)
    save(m.mnt / "small.txt", b"first\n")
    with open(m.mnt / "big.bin", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    run_cli("flush", m.mnt, check=True)  # journaled; the mirror starts uploading ~64 MiB
    m.kill()  # kill -9 while it uploads
    with open_mirror(url, endpoint_url=s3.endpoint_url) as mirror:
        man = mirror.get(F.MANIFEST) if mirror.exists(F.MANIFEST) else None
    m2 = mount_factory(m.src, *extra, mnt=m.mnt)
    save(m2.mnt / "after.txt", b"after the crash\n")
    run_cli("flush", m2.mnt, "--mirrors", check=True, timeout=300)
    assert mirror_status(m2.mnt, url)["lag_records"] == 0
    expected = tree(m2.mnt)
    m2.umount()
    run_cli("verify", "--mirror", url, "--endpoint-url", s3.endpoint_url, "--full", check=True)
    dest = tmp_path / "clone"
    run_cli("clone", url, dest, "--endpoint-url", s3.endpoint_url, check=True)
    assert tree(dest) == expected
    with Journal.open(m.journal, readonly=True) as a, Journal.open(dest / ".deltafs", readonly=True) as c:
        with a.reader() as ra, c.reader() as rc:
            assert list(rc.raw_records()) == list(ra.raw_records())  # complete, no record twice
    with open_mirror(url, endpoint_url=s3.endpoint_url) as mirror:
        segs = F.Manifest.decode(mirror.get(F.MANIFEST), url).segments
    assert [s["first"] for s in segs] == [1] + [s["last"] + 1 for s in segs[:-1]]
    if man is not None:  # the killed pass had named some records already: kept, never shipped twice
        assert F.Manifest.decode(man, url).last_seq <= segs[-1]["last"]


def test_a_registered_mirror_on_an_unplugged_drive_never_stops_the_mount(mount_factory, tmp_path):
    """A USB drive not plugged in at mount time: the mount comes up, the mirror
    is `retrying` with the reason, and once the drive is back it catches up."""
    first = mount_factory()
    first.umount()
    usb = tmp_path / "usb"
    usb.mkdir()
    url = f"file://{usb}/m"
    run_cli("mirror", "add", url, "--journal", first.journal, check=True)
    shutil.rmtree(usb)  # unplugged (mirror add wrote its first objects there)
    m = mount_factory(first.src)
    save(m.mnt / "a.txt", b"while the drive is away\n")
    run_cli("flush", m.mnt, check=True)
    mi = await_status(m.mnt, url, lambda mi: mi["last_error"], "reported its error")
    assert "does not exist" in mi["last_error"] and mi["seq"] is None, mi
    usb.mkdir()  # plugged in again
    run_cli("flush", m.mnt, "--mirrors", check=True)
    assert mirror_status(m.mnt, url)["lag_records"] == 0
    umount_expecting_mirror_warnings(m)
    clone = tmp_path / "clone"
    run_cli("clone", url, clone, check=True)
    assert (clone / "a.txt").read_bytes() == b"while the drive is away\n"
