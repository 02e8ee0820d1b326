"""A real mount with --mirror: edits reach the mirror; a clone rebuilds the tree."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from fusetools import run_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "mirrors"))
from s3server import BUCKET, s3_env, s3_server  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.timeout(180)


def tree(root: Path) -> dict[str, bytes | None]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".deltafs"]
        rel = os.path.relpath(dirpath, root)
        for d in dirs:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            out[os.path.normpath(os.path.join(rel, f))] = Path(dirpath, f).read_bytes()
    return out


def edit(mnt: Path) -> None:
    (mnt / "docs").mkdir()
    (mnt / "docs" / "a.txt").write_bytes(b"hello\n" * 1000)
    with open(mnt / "docs" / "a.txt", "r+b") as f:
        f.seek(100)
        f.write(b"EDITED")
    (mnt / "big.bin").write_bytes(os.urandom(300_000))
    (mnt / "gone.txt").write_bytes(b"temporary")
    os.unlink(mnt / "gone.txt")
    (mnt / "docs" / "a.txt").rename(mnt / "docs" / "b.txt")


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_mount_with_mirror_then_clone(mount_factory, tmp_path, request, kind):
    env = None
    if kind == "file":
        url, extra = f"file://{tmp_path}/mirror", []
    else:
        s3 = request.getfixturevalue("s3_env")
        url, extra = f"s3://{BUCKET}/{uuid.uuid4().hex}", ["--endpoint-url", s3.endpoint_url]
        env = {**os.environ}
    m = mount_factory(None, "--mirror", url, *extra)
    edit(m.mnt)
    expected = tree(m.mnt)
    if kind == "file":  # while mounted: a read-only pass into a second mirror; list shows both
        other = f"file://{tmp_path}/other"
        res = run_cli("mirror", "sync", other, "-m", m.mnt, "--json", check=True)
        assert json.loads(res.stdout)["lag_records"] == 0
        rows = [json.loads(x) for x in run_cli("mirror", "list", "-m", m.mnt, "--json", check=True).stdout.splitlines()]
        assert any(r["url"] == url and r["configured"] for r in rows)
    m.umount()  # the service's final pass ships what was journaled last
    shutil.rmtree(m.src)
    dest = tmp_path / "clone"
    run_cli("clone", url, dest, *extra, check=True, env=env)
    assert tree(dest) == expected
    run_cli("verify", "--mirror", url, "--full", *extra, check=True, env=env)
    log = run_cli("log", "--records", "--journal", dest / ".deltafs", "--json", check=True, env=env)
    assert b"b.txt" in log.stdout and b"gone.txt" in log.stdout
