"""`deltafs mirror add|remove`: mirrors registered in the journal are used by every mount."""

import json
import os

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(120)


def listed(journal):
    res = run_cli("mirror", "list", "--journal", journal, "--json", check=True)
    return {d["url"]: d for d in map(json.loads, res.stdout.decode().splitlines())}


def test_registered_mirror_is_used_by_every_mount(mount_factory, tmp_path):
    m = mount_factory()
    (m.mnt / "a.txt").write_text("one\n")
    m.umount()
    url = f"file://{tmp_path}/mirror"
    res = run_cli("mirror", "add", url, "--journal", m.journal)
    assert res.returncode == 0, res.stderr
    assert listed(m.journal)[url]["registered"] is True

    m.start()  # no --mirror on the command line: the journal says where to replicate
    (m.mnt / "b.txt").write_text("two\n")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    m.umount()
    assert (tmp_path / "mirror" / "manifest.json").exists()
    dest = tmp_path / "clone"
    run_cli("clone", url, dest, check=True)
    assert (dest / "a.txt").read_text() == "one\n" and (dest / "b.txt").read_text() == "two\n"

    res = run_cli("mirror", "remove", url, "--journal", m.journal)
    assert res.returncode == 0, res.stderr
    assert listed(m.journal).get(url, {}).get("registered") is not True
    res = run_cli("mirror", "remove", url, "--journal", m.journal)
    assert res.returncode == 2 and len(res.stderr.decode().strip().splitlines()) == 1


def test_add_while_mounted_goes_through_the_daemon(mount_factory, tmp_path):
    m = mount_factory()
    url = f"file://{tmp_path}/mirror2"
    res = run_cli("mirror", "add", url, "-m", m.mnt)
    assert res.returncode == 0, res.stderr
    assert "replicates to it now" in res.stdout.decode()
    run_cli("flush", m.mnt, "--mirrors", check=True)  # the daemon started replicating to it at once
    assert (tmp_path / "mirror2" / "manifest.json").exists()
    m.umount()  # the daemon wrote the setting: the journal lock was never taken by the CLI
    m.start()
    (m.mnt / "c.txt").write_text("three\n")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    m.umount()
    assert run_cli("clone", url, tmp_path / "clone", check=True).returncode == 0
    assert (tmp_path / "clone" / "c.txt").read_text() == "three\n"


def test_add_unreachable_mirror_is_a_clear_error(mount_factory):
    m = mount_factory()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    res = run_cli("mirror", "add", "s3://bucket/p", "--endpoint-url", "http://127.0.0.1:1", "-m", m.mnt, env=env)
    assert res.returncode == 5
    err = res.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    m.umount()
