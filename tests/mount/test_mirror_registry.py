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


def test_registered_mirror_that_never_received_anything_fails_flush_and_check(mount_factory, tmp_path):
    m = mount_factory()
    (m.mnt / "a.txt").write_text("one\n")
    run_cli("flush", m.mnt, check=True)
    assert run_cli("status", m.mnt, "--check").returncode == 0
    live = f"file://{tmp_path}/live"
    run_cli("mirror", "add", live, "-m", m.mnt, check=True)  # the running mount replicates to it at once
    assert run_cli("flush", m.mnt, "--mirrors").returncode == 0
    assert run_cli("status", m.mnt, "--check").returncode == 0
    m.umount()

    # registered while unmounted: nothing can ship it until a mount or a mirror sync does
    url = f"file://{tmp_path}/late"
    run_cli("mirror", "add", url, "--journal", m.journal, check=True)
    res = run_cli("flush", m.src, "--mirrors")
    err = res.stderr.decode().strip().splitlines()
    assert res.returncode == 5 and len(err) == 1 and b"not mounted" in res.stderr and url in err[0], err
    chk = run_cli("status", m.src, "--check")
    out = chk.stdout.decode()
    assert chk.returncode == 1 and url in out and "never received anything" in out, out
    st = json.loads(run_cli("status", m.src, "--json", check=True).stdout)
    mi = next(mi for mi in st["mirrors"] if mi["url"] == url)
    assert mi["seq"] is None and mi["lag_records"] > 0, mi
    run_cli("mirror", "sync", url, "--journal", m.journal, check=True)
    assert run_cli("flush", m.src, "--mirrors").returncode == 0
    assert run_cli("status", m.src, "--check").returncode == 0


def test_mirror_list_shows_the_lag_of_now(mount_factory, tmp_path):
    url = f"file://{tmp_path}/mirror"
    m = mount_factory(None, "--mirror", url)
    (m.mnt / "a.txt").write_text("one\n")
    run_cli("flush", m.mnt, "--mirrors", check=True)
    assert listed(m.journal)[url]["lag_records"] == 0
    run_cli("pause", m.mnt, "--mirror", url, check=True)
    for i in range(3):
        (m.mnt / f"n{i}.txt").write_text(f"new {i}\n")
    run_cli("flush", m.mnt, check=True)
    row = listed(m.journal)[url]
    head = json.loads(run_cli("status", m.mnt, "--json", check=True).stdout)["journal"]["records"]
    assert row["head_seq"] == head and row["lag_records"] == head - row["seq"] >= 6, row
    m.umount()  # paused: no last pass
    row = listed(m.journal)[url]  # from the journal alone: still computed now
    assert row["lag_records"] == head - row["seq"] >= 6 and row["lag_seconds"] > 0, row
