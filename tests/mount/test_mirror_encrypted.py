"""A real mount with an encrypted mirror: it replicates, a clone brings the
tree back; later mounts need no passphrase; `mirror add --encrypt` while
mounted hands the key to the daemon and replication starts at once;
nothing secret reaches argv, the log, the mount table or the mirror."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from fusetools import run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "mirrors"))
from s3server import BUCKET, s3_env, s3_server  # noqa: E402,F401 (fixtures)
from test_mirror_mount import edit, tree  # noqa: E402

pytestmark = pytest.mark.timeout(240)
PASS = "mount-side passphrase 7q"


@pytest.fixture(autouse=True)
def cheap_kdf(monkeypatch):
    monkeypatch.setenv("DELTAFS_KDF_PARAMS", "1,64,1")
    monkeypatch.delenv("DELTAFS_PASSPHRASE", raising=False)


def secret_free(paths, needles) -> None:
    for p in paths:
        data = Path(p).read_bytes()
        for n in needles:
            assert n not in data, f"{n!r} found in {p}"


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_mount_with_encrypted_mirror_then_clone(mount_factory, tmp_path, request, monkeypatch, kind):
    if kind == "file":
        url, extra = f"file://{tmp_path}/mirror", []
    else:
        s3 = request.getfixturevalue("s3_env")
        url, extra = f"s3://{BUCKET}/{uuid.uuid4().hex}", ["--endpoint-url", s3.endpoint_url]
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASS + "\n")
    m = mount_factory(None, "--mirror", url, "--encrypt", "--passphrase-file", str(pwfile), *extra)
    edit(m.mnt)
    run_cli("flush", m.mnt, "--mirrors", check=True)
    st = run_cli("status", m.mnt, "--json", check=True).stdout.decode()
    assert '"encrypted": true' in st and PASS not in st
    expected = tree(m.mnt)
    m.umount()
    # a clone elsewhere asks for the passphrase
    res = run_cli("clone", url, tmp_path / "nope", *extra)
    assert res.returncode == 2 and b"no passphrase" in res.stderr
    res = run_cli("clone", url, tmp_path / "clone", "--passphrase-file", pwfile, *extra)
    assert res.returncode == 0, res.stderr
    assert tree(tmp_path / "clone") == expected

    # the next mount needs no passphrase: the journal keeps the key
    m.extra = ["--mirror", url, *extra]
    m.start()
    (m.mnt / "later.txt").write_text("after a remount\n")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    m.umount()
    env = {**os.environ, "DELTAFS_PASSPHRASE": PASS}
    res = run_cli("clone", url, tmp_path / "clone2", *extra, env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "clone2" / "later.txt").read_text() == "after a remount\n"
    # nothing secret in the journal's log, settings or data; the key only in JOURNAL/keys (0600)
    journal_files = [p for p in Path(m.journal).rglob("*") if p.is_file() and "keys" not in p.parts
                     and not p.name.endswith(".sock")]
    secret_free(journal_files + [m.stderr_path], [PASS.encode()])
    if kind == "file":
        secret_free([p for p in (tmp_path / "mirror").rglob("*") if p.is_file()], [PASS.encode(), b"later.txt"])


def test_mirror_add_encrypt_while_mounted_starts_at_once(mount_factory, tmp_path, monkeypatch):
    m = mount_factory()
    (m.mnt / "a.txt").write_text("before the mirror\n")
    url = f"file://{tmp_path}/mirror"
    env = {**os.environ, "DELTAFS_PASSPHRASE": PASS}
    res = run_cli("mirror", "add", url, "--encrypt", "-m", m.mnt, env=env)
    assert res.returncode == 0 and b"replicates to it now" in res.stdout, res.stderr
    run_cli("flush", m.mnt, "--mirrors", check=True)  # the daemon got the key: no remount
    ps = Path(f"/proc/{m.proc.pid}/cmdline").read_bytes()
    assert PASS.encode() not in ps and b"--passphrase" not in ps
    from deltafs import mounttable
    assert PASS not in json.dumps(mounttable.read_record(str(m.mnt)))  # the mount table neither
    res = run_cli("clone", url, tmp_path / "clone", env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "clone" / "a.txt").read_text() == "before the mirror\n"
    m.umount()
    m.start()  # registered with its key: the next mount replicates without a passphrase
    (m.mnt / "b.txt").write_text("second mount\n")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    m.umount()
    res = run_cli("verify", "--mirror", url, "--full", "--journal", m.journal)
    assert res.returncode == 0 and b"encrypted" in res.stdout, res.stderr
