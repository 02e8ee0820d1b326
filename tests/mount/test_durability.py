"""fsync is a durability point through every descriptor and pattern (issue 17).

Each round mounts SRC, saves a new version one way, and the moment the
durability call returns (fsync, fsyncdir, `sync FILE`, an O_SYNC write,
msync) kills the daemon with SIGKILL and lazily unmounts.  The journal
alone, read unmounted the way `deltafs cat` reads it, must then hold that
version.
SRC and the journal carry over from round to round: each remount recovers
from the kill before the next save.

The saved file is 2 MiB of fresh random bytes, so capturing it takes
longer than the kill after an early return: a durability call that returns
before the version is committed fails most rounds.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess

import pytest

from deltafs.journal import Journal
from fusetools import Mount, run_cli

pytestmark = pytest.mark.timeout(600)

ROUNDS = 20  # per pattern, in CI too
SIZE = 2 << 20


def journal_content(journal, rel: str) -> bytes | None:
    """What the journal alone says rel holds now (None: no such file)."""
    with Journal.open(str(journal), readonly=True) as j, j.reader() as r:
        fid = r.file_id_at(rel.encode())
        fs = r.file_state(fid) if fid else None
        if fs is None or fs.deleted:
            return None
        return r.read_content(fs.content_seq) if fs.content_seq else b""


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)  # the mount is gone: the close may report ENOTCONN
    except OSError:
        pass


# Each pattern saves `data` as `rel` under mnt and calls crash() the moment
# its durability call returned, before closing anything.

def writing_descriptor(mnt, rel, data, i, crash):
    fd = os.open(mnt / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd) if i % 2 else os.fdatasync(fd)
    crash()
    close_quietly(fd)


def readonly_after_close(mnt, rel, data, i, crash):
    write_file(mnt / rel, data)
    fd = os.open(mnt / rel, os.O_RDONLY)
    os.fsync(fd) if i % 2 else os.fdatasync(fd)
    crash()
    close_quietly(fd)


def sync_file_command(mnt, rel, data, i, crash):
    write_file(mnt / rel, data)
    subprocess.run(["sync", str(mnt / rel)], check=True, timeout=120)  # coreutils: O_RDONLY + fsync
    crash()


def atomic_save(mnt, rel, data, i, crash):
    """write tmp; fsync(tmp); rename(tmp, f); fsync(dir).  Odd rounds use an
    ignored temp name (never journaled), even rounds one that is journaled
    (a new name each round: reusing one within two minutes is issue 18's
    identity rule, not a durability question).  One round in four writes
    the temp file in another directory and fsyncs that one, the rename's
    source: either directory's fsync makes a rename durable."""
    target = mnt / rel
    tmp = target.with_name(f".{target.name}.tmp" if i % 2 else f"{target.name}.{i}.new")
    if i % 4 == 3:
        tmp = mnt / "staging" / tmp.name
        tmp.parent.mkdir(exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, target)
    dfd = os.open(tmp.parent, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    crash()
    close_quietly(dfd)


def sync_writes(mnt, rel, data, i, crash):
    """O_SYNC (even rounds) or O_DSYNC (odd) writes: durable when write(2) returns."""
    flag = os.O_DSYNC if i % 2 else os.O_SYNC
    fd = os.open(mnt / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    half = len(data) // 2
    os.write(fd, data[:half])
    os.write(fd, data[half:])
    crash()
    close_quietly(fd)


def mmap_msync(mnt, rel, data, i, crash):
    """Stores through a shared mapping, then msync(MS_SYNC) (the kernel calls fsync)."""
    write_file(mnt / rel, bytes(len(data)))
    fd = os.open(mnt / rel, os.O_RDWR)
    with mmap.mmap(fd, len(data)) as m:
        m[:] = data
        m.flush()  # msync(MS_SYNC)
        crash()
    close_quietly(fd)


PATTERNS = {
    "writing_descriptor": writing_descriptor,
    "readonly_after_close": readonly_after_close,
    "sync_file_command": sync_file_command,
    "atomic_save": atomic_save,
    "sync_writes": sync_writes,
    "mmap_msync": mmap_msync,
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_durable_when_the_call_returns(tmp_path, name):
    pattern = PATTERNS[name]
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "docs").mkdir()
    rel = "docs/f.bin"
    lost = []
    for i in range(ROUNDS):
        data = os.urandom(SIZE)
        m = Mount(src, mnt)
        try:
            m.start()
            pattern(mnt, rel, data, i, m.kill)
        finally:
            m.cleanup()
        got = journal_content(tmp_path / "src" / ".deltafs", rel)
        if got != data:
            lost.append((i, "absent" if got is None else
                         f"{len(got)} bytes, sha256 {hashlib.sha256(got).hexdigest()[:12]}"))
    assert not lost, f"{name}: {len(lost)} of {ROUNDS} saved versions lost after kill -9: {lost}"
    # the journal still mounts and unmounts cleanly, and no round logged a problem
    m = Mount(src, mnt)
    try:
        m.start()
        m.umount()
    finally:
        m.cleanup()


def journal_removals(journal) -> tuple[list[tuple[str, bytes]], set[bytes]]:
    """(every unlink/rmdir record, in order), and the paths the journal's tree holds now."""
    with Journal.open(str(journal), readonly=True) as j, j.reader() as r:
        recs = [r.record(s) for s in range(1, r.head_seq() + 1)]
        return [(x.op, x.path) for x in recs if x.op in ("unlink", "rmdir")], {p for p, _, _ in r.current_tree()}


def test_rm_rf_then_flush_survives_kill(tmp_path):
    """rm -rf of a tree through the mount (behind a large capture), `deltafs
    flush`, kill -9: the journal alone holds every unlink and rmdir (namespace
    records are committed on the FUSE loop's thread when they can be, issue 19:
    flush still waits for them), and the next mount's scan finds nothing left
    to record.  Without the flush, this kill loses unlinks."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    mnt.mkdir()
    files = []
    for k in range(3):
        for sub in ("", "/objects/ab"):
            d = f"t/d{k}{sub}"
            (src / d).mkdir(parents=True, exist_ok=True)
            for i in range(20):
                (src / d / f"f{i}").write_bytes(b"%d %s\n" % (i, d.encode()))
                files.append(f"{d}/f{i}".encode())
    dirs = {p.relative_to(src).as_posix().encode() for p in (src / "t").rglob("*") if p.is_dir()} | {b"t"}
    m = Mount(src, mnt)
    try:
        m.start()
        # a capture of fresh data queued just before: the unlinks queue behind it,
        # so a flush that returned early, or a kill without one, would lose them
        write_file(mnt / "big.bin", os.urandom(48 << 20))
        subprocess.run(["rm", "-rf", str(mnt / "t")], check=True, timeout=120)
        run_cli("flush", mnt, check=True)
        m.kill()
    finally:
        m.cleanup()
    removed, tree = journal_removals(src / ".deltafs")
    unlinked = [p for op, p in removed if op == "unlink"]
    rmdirs = [p for op, p in removed if op == "rmdir"]
    assert sorted(unlinked) == sorted(files)  # every file, once
    assert sorted(rmdirs) == sorted(dirs)
    assert not {p for p in tree if p == b"t" or p.startswith(b"t/")}
    m = Mount(src, mnt)
    try:
        m.start()
        m.umount()
    finally:
        m.cleanup()
    assert journal_removals(src / ".deltafs")[0] == removed  # the scan had nothing to add
