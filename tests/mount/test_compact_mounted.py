"""`deltafs compact` while mounted: the daemon runs the pass and reports what
it freed, the same output as unmounted; --vacuum still needs the journal
unmounted and says so."""

from __future__ import annotations

import json
import os

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(120)


def save(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # durable in the journal when this returns


def test_compact_runs_through_the_daemon(mounted):
    f = mounted.mnt / "notes.txt"
    versions = [os.urandom(64 << 10) for _ in range(5)]
    for data in versions:
        save(f, data)
    thin = ["--retention", "*:none", "--coalesce", "0"]  # keep only each file's newest version

    res = run_cli("compact", mounted.mnt, *thin, "--dry-run", "--json", check=True)
    dry = json.loads(res.stdout)
    assert dry["dry_run"] and dry["versions_pruned"] == 4 and dry["bytes_freed"] > 4 * (60 << 10)

    res = run_cli("compact", mounted.mnt, *thin, "--json", check=True)
    rep = json.loads(res.stdout)
    assert rep["versions_pruned"] == 4 and rep["bytes_freed"] == dry["bytes_freed"]
    assert rep["data_file_before"] is None
    pruned = [json.loads(x) for x in run_cli("log", "--records", f, "--all", "--json", check=True).stdout.splitlines()
              if b'"pruned": true' in x]
    assert len(pruned) == 4
    assert run_cli("cat", f, check=True).stdout == versions[-1]
    save(f, b"the mount keeps working\n")
    assert run_cli("cat", f, check=True).stdout == b"the mount keeps working\n"

    res = run_cli("compact", mounted.mnt, check=True)  # the text form, as unmounted
    assert res.stdout.decode().startswith("pruned 0 of 2 versions in 1 files, freeing 0 chunks (0 bytes)")

    res = run_cli("compact", mounted.mnt, "--vacuum")
    err = res.stderr.decode()
    assert res.returncode == 3 and err.count("\n") == 1
    assert "compact --vacuum needs the journal unmounted" in err and str(mounted.mnt) in err

    mounted.umount()
    res = run_cli("compact", mounted.src, "--vacuum", "--json", check=True)
    assert json.loads(res.stdout)["data_file_after"] > 0
