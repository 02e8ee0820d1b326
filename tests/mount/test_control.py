"""status, flush, pause/resume, snapshot and the control socket, on real mounts."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(120)


def cli_json(*args) -> dict | list:
    res = run_cli(*args, "--json", check=True)
    lines = [json.loads(x) for x in res.stdout.decode().splitlines()]
    return lines[0] if len(lines) == 1 else lines


def log_paths(mnt: Path) -> list[str]:
    res = run_cli("log", "--records", mnt, "--json", check=True)
    return [json.loads(x)["path"] for x in res.stdout.decode().splitlines()]


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_status_after_known_activity(mounted):
    for i in range(3):
        write(mounted.mnt / f"f{i}.txt", b"hello %d\n" % i * 1000)
    run_cli("flush", mounted.mnt, check=True)
    st = cli_json("status", mounted.mnt)
    assert st["mounted"] is True and st["daemon"] == "running"
    assert st["mnt"] == str(mounted.mnt) and st["src"] == str(mounted.src)
    assert st["pid"] == mounted.proc.pid
    assert st["uptime_s"] >= 0
    cap = st["capture"]
    assert cap["versions"] >= 3 and cap["pending"] == 0 and cap["failures"] == 0
    assert cap["last_error"] is None and cap["paused"] is False and cap["last_capture_ns"] > 0
    j = st["journal"]
    assert j["path"] == str(mounted.journal)
    assert j["data_file_bytes"] > 0 and j["records"] >= 6  # 3 creates + 3 versions
    assert j["files"] >= 3 and j["chunks"] >= 1
    assert 0 < j["stored_bytes"] < j["raw_bytes"] == 3 * 8000  # repetitive text compresses
    assert j["ratio"] > 1
    # the text form names the mount and the numbers
    text = run_cli("status", mounted.mnt, check=True).stdout.decode()
    assert str(mounted.mnt) in text and "running" in text
    # no PATH: every mount, this one among them
    every = run_cli("status", "--json", check=True).stdout.decode().splitlines()
    assert any(json.loads(x)["mnt"] == str(mounted.mnt) for x in every)


def test_flush_makes_versions_visible_to_another_process(mounted):
    for i in range(5):
        write(mounted.mnt / "doc.txt", b"version %d\n" % i)
        run_cli("flush", mounted.mnt, check=True)
        entries = [json.loads(x) for x in
                   run_cli("log", "--records", mounted.mnt / "doc.txt", "--json", check=True).stdout.decode().splitlines()]
        writes = [e for e in entries if e.get("op") == "write"]
        assert len(writes) == i + 1


def test_pause_keeps_edits_out_until_resume(mounted):
    write(mounted.mnt / "a.txt", b"before\n")
    run_cli("flush", mounted.mnt, check=True)
    assert cli_json("pause", mounted.mnt)["paused"] is True
    assert cli_json("status", mounted.mnt)["capture"]["paused"] is True
    write(mounted.mnt / "a.txt", b"during the pause\n")
    write(mounted.mnt / "new.txt", b"born while paused\n")
    (mounted.mnt / "tmp.txt").write_bytes(b"x")
    (mounted.mnt / "tmp.txt").unlink()
    assert (mounted.mnt / "a.txt").read_bytes() == b"during the pause\n"  # the mount keeps working
    run_cli("flush", mounted.mnt, check=True)
    assert "new.txt" not in log_paths(mounted.mnt)
    assert run_cli("cat", mounted.mnt / "a.txt", check=True).stdout == b"before\n"

    out = cli_json("resume", mounted.mnt)
    assert out["was_paused"] is True and out["rescan"]["new_or_changed"] == 2
    assert run_cli("cat", mounted.mnt / "a.txt", check=True).stdout == b"during the pause\n"
    assert run_cli("cat", mounted.mnt / "new.txt", check=True).stdout == b"born while paused\n"
    assert "tmp.txt" not in log_paths(mounted.mnt)  # created and gone while paused: no trace
    # after resume, recording is back to normal
    write(mounted.mnt / "a.txt", b"after\n")
    run_cli("flush", mounted.mnt, check=True)
    assert run_cli("cat", mounted.mnt / "a.txt", check=True).stdout == b"after\n"
    st = cli_json("status", mounted.mnt)["capture"]
    assert st["paused"] is False and st["failures"] == 0


def test_snapshot_through_daemon_and_offline(mounted):
    write(mounted.mnt / "s.txt", b"one\n")
    snap = cli_json("snapshot", "release-1", mounted.mnt)
    assert snap["name"] == "release-1" and snap["seq"] >= 2
    write(mounted.mnt / "s.txt", b"two\n")
    run_cli("flush", mounted.mnt, check=True)
    assert run_cli("cat", mounted.mnt / "s.txt", "--at", "release-1", check=True).stdout == b"one\n"
    dup = run_cli("snapshot", "release-1", mounted.mnt)
    assert dup.returncode == 2 and b"already exists" in dup.stderr
    bad = run_cli("snapshot", "123", mounted.mnt)
    assert bad.returncode == 2 and b"version id" in bad.stderr
    assert cli_json("status", mounted.mnt)["snapshots"][0]["name"] == "release-1"

    mounted.umount()
    snap2 = cli_json("snapshot", "offline", mounted.src)
    assert snap2["seq"] > snap["seq"]
    names = [s["name"] for s in map(json.loads, run_cli("snapshots", mounted.src, "--json", check=True)
                                    .stdout.decode().splitlines())]
    assert names == ["release-1", "offline"]
    st = cli_json("status", mounted.src)
    assert st["mounted"] is False and st["capture"] is None and st["journal"]["records"] == snap2["seq"]
    assert "not mounted" in run_cli("status", mounted.src, check=True).stdout.decode()
    assert run_cli("pause", mounted.src).returncode == 2


def test_prometheus_and_check(mounted):
    from prometheus_client.parser import text_string_to_metric_families

    write(mounted.mnt / "p.txt", b"metrics\n")
    run_cli("flush", mounted.mnt, check=True)
    text = run_cli("status", mounted.mnt, "--prometheus", check=True).stdout.decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("deltafs_daemon_up", "deltafs_journal_records", "deltafs_journal_stored_bytes",
                 "deltafs_capture_versions", "deltafs_capture_pending", "deltafs_capture_failures"):
        assert name in fams, name
    up = fams["deltafs_daemon_up"].samples[0]
    assert up.value == 1 and up.labels["mnt"] == str(mounted.mnt)
    assert fams["deltafs_capture_versions"].samples[0].value >= 1
    assert fams["deltafs_capture_pending"].samples[0].value == 0

    ok = run_cli("status", mounted.mnt, "--check")
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.startswith(b"OK")


@pytest.fixture
def public_journal():
    """A journal directory that uid 65534 may traverse (tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="deltafs-ctl-"))
    os.chmod(d, 0o755)
    yield d / "journal"
    shutil.rmtree(d, ignore_errors=True)


CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(b'{"op": "status"}\n')
except BrokenPipeError:
    pass  # the daemon may refuse and close before our request arrives
print(json.dumps(json.loads(s.makefile().readline())))
"""


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run a client as another uid")
def test_socket_mode_and_other_uid_refused(mount_factory, public_journal):
    m = mount_factory(journal=public_journal)
    os.chmod(public_journal, 0o755)
    sock = public_journal / "control.sock"
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()

    def as_nobody() -> str:
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "/usr/bin/python3", "-c", CLIENT, str(sock)],
                             capture_output=True, timeout=30, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert as_nobody() == "EACCES"  # the file mode keeps others out
    os.chmod(sock, 0o666)  # even if it did not, the daemon checks the peer's uid
    resp = json.loads(as_nobody())
    assert resp["ok"] is False and "permission denied" in resp["error"]
    assert run_cli("status", m.mnt, "--check").returncode == 0  # the owner is still served
    m.umount(check=False)
    bad = [line for line in m.log_text().splitlines()
           if (" ERROR " in line or " WARNING " in line or "Traceback" in line)
           and "refused a control connection from uid 65534" not in line]
    assert not bad, bad
    assert not sock.exists()  # removed at unmount


def test_no_capture_mount(mount_factory):
    m = mount_factory(None, "--no-capture")
    write(m.mnt / "x.txt", b"x")
    run_cli("flush", m.mnt, check=True)
    st = cli_json("status", m.mnt)
    assert st["capture"]["enabled"] is False and st["journal"]["records"] == 0
    res = run_cli("pause", m.mnt)
    assert res.returncode == 2 and b"--no-capture" in res.stderr
    assert run_cli("status", m.mnt, "--check").returncode == 0
    m.umount()


def test_not_mounted_errors(tmp_path):
    res = run_cli("flush", tmp_path)
    assert res.returncode == 2 and b"not inside a deltafs mount" in res.stderr
