"""Other local users (docs/design.md, "Against other local users"), on real
mounts: they cannot read the journal, the daemon's log or the mount record,
cannot forge the record, cannot ask the daemon anything; new entries get
exactly the caller's mode although the daemon never sets umask 0."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from fusetools import force_unmount, require_fuse, run_cli

from deltafs import control, mounttable

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="needs root and setpriv to act as another user")]

NOBODY = 65534


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          capture_output=True, timeout=30)


def denied(res: subprocess.CompletedProcess) -> bool:
    return res.returncode != 0 and b"Permission denied" in res.stderr


@pytest.fixture
def public_dir():
    """A directory other users may traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="deltafs-private-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def record_of(mnt: Path) -> Path:
    d = mounttable.runtime_dir()
    for name in os.listdir(d):
        p = d / name
        try:
            if json.loads(p.read_text()).get("mnt") == str(mnt):
                return p
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no mount record for {mnt} in {d}")


def test_other_users_cannot_read_history_or_forge_the_record(public_dir, umask):
    require_fuse()
    src, mnt = public_dir / "src", public_dir / "mnt"
    src.mkdir(mode=0o755)
    mnt.mkdir(mode=0o755)
    umask(0)  # the daemon inherits it: nothing it makes may depend on it
    try:
        res = run_cli("mount", src, mnt, "-o", "allow_other")
        assert res.returncode == 0, res.stderr
        umask(0o022)
        (mnt / "public.txt").write_text("anyone may read this\n")
        fd = os.open(mnt / "secret.txt", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"root's secret\n" * 100)
        os.close(fd)
        run_cli("flush", mnt, check=True)
        journal = src / ".deltafs"
        rec = record_of(mnt)

        # modes: the journal directory 0700, everything in it 0600 (directories 0700)
        entries = [journal, *journal.rglob("*")]
        assert {"data.mdb", "lock.mdb", "lock", "packs", "control.sock", "deltafs.log"} <= \
            {p.name for p in entries}
        assert any(p.suffix == ".pack" for p in entries)
        for p in entries:
            want = 0o700 if p.is_dir() else 0o600
            assert stat.S_IMODE(os.lstat(p).st_mode) == want, (p, oct(os.lstat(p).st_mode))
        assert stat.S_IMODE(os.stat(rec).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(rec.parent).st_mode) == 0o700 and os.stat(rec.parent).st_uid == 0

        # another user: the mount works for them as for any filesystem (allow_other) ...
        res = as_nobody("cat", str(mnt / "public.txt"))
        assert res.returncode == 0 and res.stdout == b"anyone may read this\n", res.stderr
        assert denied(as_nobody("cat", str(mnt / "secret.txt")))
        assert as_nobody("ls", str(mnt / ".deltafs")).returncode != 0  # hidden from the mount
        # ... but nothing of the history, the log or the record
        pack = next(p for p in entries if p.suffix == ".pack")
        for p in (journal / "data.mdb", pack, journal / "deltafs.log", rec):
            assert denied(as_nobody("cat", str(p))), p
        assert denied(as_nobody("ls", str(journal)))
        # and cannot forge the record that status, umount and the history tools trust
        forged = json.dumps({"pid": 1, "src": str(src), "mnt": str(mnt), "journal": "/tmp/evil"})
        res = as_nobody("sh", "-c", f"echo '{forged}' > '{rec}'")
        assert res.returncode != 0
        res = as_nobody("sh", "-c", f"echo '{forged}' > '{rec.parent}/new.json'")
        assert res.returncode != 0
        assert json.loads(rec.read_text())["journal"] == str(journal)
    finally:
        umask(0o022)
        run_cli("umount", mnt, timeout=60)
        force_unmount(mnt)
    assert "WARNING" not in (src / ".deltafs" / "deltafs.log").read_text()


@pytest.mark.parametrize("caller_umask", [0o000, 0o077, 0o022])
def test_new_entries_get_the_callers_mode(mount_factory, umask, caller_umask):
    umask(0o022)  # the daemon's umask: it must not show through
    m = mount_factory()
    d = m.mnt / "d"
    d.mkdir()
    os.chmod(d, 0o2777)  # setgid: new directories inherit it, on top of their mode
    script = (f"umask {caller_umask:03o} && cd '{d}' && touch file && mkdir dir && mkfifo fifo && "
              "python3 -c \"import os; os.close(os.open('opened', os.O_CREAT | os.O_WRONLY, 0o666))\"")
    subprocess.run(["sh", "-c", script], check=True, timeout=30)
    want = {"file": 0o666, "dir": 0o777, "fifo": 0o666, "opened": 0o666}
    for name, mode in want.items():
        expect = mode & ~caller_umask | (stat.S_ISGID if name == "dir" else 0)
        for root in (m.mnt, m.src):  # what the caller sees, and what SRC holds
            got = stat.S_IMODE(os.lstat(root / "d" / name).st_mode)
            assert got == expect, f"{root}/{name}: {got:04o}, want {expect:04o} (umask {caller_umask:03o})"
    m.umount()


CLIENT = r"""
import json, socket, sys
out = []
for op in sys.argv[2:]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    try:
        s.sendall(json.dumps({"op": op, "name": "forged", "url": "file:///tmp/x", "mirror": "file:///tmp/x"}).encode() + b"\n")
    except BrokenPipeError:
        pass  # refused and closed before the request arrived
    out.append(json.loads(s.makefile().readline()))
    s.close()
print(json.dumps(out))
"""


def test_control_socket_refuses_every_operation_to_another_uid(mount_factory, public_dir):
    m = mount_factory(public_dir / "src", mnt=public_dir / "mnt")
    (m.mnt / "a.txt").write_text("a\n")
    run_cli("flush", m.mnt, check=True)
    # even with the journal and the socket opened up by mistake, the daemon checks the peer's uid
    os.chmod(m.journal, 0o755)
    sock = m.journal / control.SOCKET_NAME
    os.chmod(sock, 0o666)
    ops = sorted(control._OPS)
    assert {"status", "flush", "pause", "resume", "snapshot", "snapshots", "mirror_register"} <= set(ops)
    res = as_nobody("/usr/bin/python3", "-c", CLIENT, str(sock), *ops)
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout)
    assert len(answers) == len(ops)
    for op, a in zip(ops, answers):
        assert a["ok"] is False and "permission denied" in a["error"] and a["code"] == 6, (op, a)
    st = json.loads(run_cli("status", m.mnt, "--json", check=True).stdout)
    assert st["capture"]["paused"] is False and st["snapshots"] == [] and st["mirrors"] == []
    # the owner is served on the same socket
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b'{"op": "snapshots"}\n')
        assert json.loads(s.makefile().readline())["ok"] is True
    m.umount(check=False)
    bad = [ln for ln in m.log_text().splitlines()
           if (" ERROR " in ln or " WARNING " in ln or "Traceback" in ln) and "refused a control connection" not in ln]
    assert not bad, bad


def test_hijacked_runtime_dir_refuses_the_mount(public_dir):
    """Another user pre-creates /tmp/deltafs-UID (here under a TMPDIR of the
    same kind: sticky, world-writable), or a symlink there: the mount is
    refused with one line and writes nothing through it."""
    require_fuse()
    if os.path.isdir(f"/run/user/{os.getuid()}"):
        pytest.skip("/run/user/UID exists: the runtime directory is not under TMPDIR here")
    tmp_path = public_dir
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(shared)
    hijacked = shared / f"deltafs-{os.getuid()}"
    victim = tmp_path / "victim"
    victim.mkdir()
    os.chmod(victim, 0o777)
    for plant, words in ((["mkdir", "-m", "0777", str(hijacked)], "belongs to uid 65534"),
                         (["ln", "-s", str(victim), str(hijacked)], "is a symlink")):
        res = as_nobody(*plant)
        assert res.returncode == 0, res.stderr
        try:
            res = run_cli("mount", src, mnt, env=env, timeout=60)
            err = res.stderr.decode()
            assert res.returncode == 4, err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err and words in lines[0], err
            assert str(hijacked) in lines[0]
        finally:
            force_unmount(mnt)
        assert os.listdir(victim) == []  # nothing written through the planted link
        subprocess.run(["rm", "-rf", str(hijacked)], check=True)
