"""`deltafs log` shows an editor's save as one entry; `--records` shows its records."""

from __future__ import annotations

import json
import os
import time

import pytest

from fusetools import run_cli

pytestmark = pytest.mark.timeout(120)


def log_json(*args) -> list[dict]:
    return [json.loads(x) for x in run_cli("log", *args, "--json", check=True).stdout.decode().splitlines()]


def wait_for(cond, timeout: float = 30.0):
    """Captures are asynchronous: wait for them to be committed."""
    end = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the journal")
        time.sleep(0.05)
    return v


def save_atomically(path, data: bytes) -> None:
    """What vim (backupcopy=no) and most editors do: write a temporary file,
    fsync, rename it over the name, then give it the old mode and xattrs."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    os.chmod(path, 0o600)
    os.setxattr(path, "user.comment", b"draft")


def test_an_editor_save_is_one_log_entry_with_its_cause(mounted):
    p = mounted.mnt / "a.txt"
    save_atomically(p, b"hello\n")
    recs = wait_for(lambda: (r := log_json("--records", mounted.mnt))
                    and any(d["op"] == "setxattr" and d["path"] == "a.txt" for d in r) and r)
    # capture journals the temporary file's content at its final name (cause
    # rename-over) and the temporary name not at all; chmod and setxattr follow
    ours = [d for d in recs if "a.txt" in (d["path"], d.get("path2"))]
    assert {"write", "setattr", "setxattr"} <= {d["op"] for d in ours}

    saves = [s for s in log_json(mounted.mnt) if s["path"] == "a.txt"]
    assert len(saves) == 1, saves
    (s,) = saves
    assert s["cause"] == "atomic save" and s["size"] == 6
    assert sorted(d["version"] for d in s["records"]) == sorted(d["version"] for d in ours)
    # the same one entry for the file itself, in the plain (tab-separated) output
    lines = run_cli("log", p, check=True).stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[2] == "atomic save"
    assert len(run_cli("log", "--records", p, check=True).stdout.decode().splitlines()) >= 3
