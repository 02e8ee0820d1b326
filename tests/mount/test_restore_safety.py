"""The attack from issue 17, for real: in a world-writable directory of SRC
(mounted with -o allow_other), another user replaces a recorded directory
with a symlink to a directory only root may write.  Root's ``restore --at
T`` must bring the directory back and never write through the symlink,
whether it restores through the mount or into SRC unmounted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fusetools import run_cli

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                                 reason="needs root and setpriv to act as another user")]


@pytest.fixture
def public_dir():
    """A directory uid 65534 may traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="deltafs-swap-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(*cmd) -> None:
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *map(str, cmd)],
                         capture_output=True, timeout=30, text=True)
    assert res.returncode == 0, res.stderr


def head_version(mnt: Path) -> int:
    run_cli("flush", mnt, check=True)
    res = run_cli("log", "--records", mnt, "--json", "-n", "1", check=True)
    return json.loads(res.stdout.decode().splitlines()[0])["version"]


@pytest.mark.parametrize("through", ["mount", "src"])
def test_restore_never_writes_through_a_symlink_swapped_in_by_another_user(public_dir, mount_factory, through):
    src, mnt = public_dir / "src", public_dir / "mnt"
    src.mkdir(mode=0o755)
    mnt.mkdir(mode=0o755)
    m = mount_factory(src, "-o", "allow_other", mnt=mnt)
    shared = m.mnt / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    as_nobody("mkdir", shared / "proj")
    as_nobody("sh", "-c", f"printf 'their notes' > {shared}/proj/notes.txt")
    t = head_version(m.mnt)

    secret = public_dir / "secret"  # root's, 0700
    secret.mkdir(mode=0o700)
    (secret / "keep").write_bytes(b"root only")
    as_nobody("rm", "-r", shared / "proj")
    as_nobody("ln", "-s", secret, shared / "proj")
    head_version(m.mnt)
    if through == "src":
        m.umount()
    root = m.mnt if through == "mount" else m.src

    res = run_cli("restore", root / "shared", "--version", t)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(secret)) == ["keep"] and (secret / "keep").read_bytes() == b"root only"
    st = os.stat(secret)
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)  # not handed to the other user either
    proj = root / "shared" / "proj"
    assert not proj.is_symlink() and proj.is_dir()
    assert (proj / "notes.txt").read_bytes() == b"their notes"
    assert os.stat(proj / "notes.txt").st_uid == 65534
    if through == "mount":
        assert not (m.src / "shared" / "proj").is_symlink()
        assert (m.src / "shared" / "proj" / "notes.txt").read_bytes() == b"their notes"
