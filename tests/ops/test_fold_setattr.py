"""A setattr of a file whose create record is still queued, and the last
queued item, is set in that create record instead of being a record of its
own (capture/pipeline.py ``Pipeline.fold_attrs``; issue 19: cp -a's utimens
of every file it copies was a fourth record per file).  On the no-kernel
tier (ops.Operations, the Recorder and a real Journal):

* cp -a's order (create, write, utimens, close): the journal holds the
  create with the utimens' mtime, no setattr record, then the version; the
  tree state's mtime is the file's;
* a chmod after the create folds the same way (the create's mode is the new one);
* a setattr with a record of another file queued after the create is not
  folded: it is a setattr record of its own, after that record;
* a setattr of a file whose create is already committed is a record of its own.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from test_history_identity import CTX, Driver
from tests.ops.inprocess import session
from test_solo_commit import open_write, ops_log


def fields(**on):
    names = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime", "update_mtime",
             "update_ctime")
    return SimpleNamespace(**{n: on.get(n, False) for n in names})


async def utimens(ops, ino: int, mtime_ns: int) -> None:
    await ops.setattr(ino, SimpleNamespace(st_atime_ns=mtime_ns, st_mtime_ns=mtime_ns),
                      fields(update_atime=True, update_mtime=True), None, CTX)


async def chmod(ops, ino: int, mode: int) -> None:
    await ops.setattr(ino, SimpleNamespace(st_mode=mode), fields(update_mode=True), None, CTX)


def state(j, path: bytes):
    with j.reader() as r:
        return r.file_state(r.file_id_at(path))


def records(j, path: bytes):
    with j.reader() as r:
        return [r.record(s) for s in range(1, r.head_seq() + 1) if r.record(s).path == path]


async def test_cp_a_utimens_and_chmod_fold_into_the_queued_create(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        folded = rec.pipe.folded
        fh = await open_write(d, b"f", b"x" * 100)
        ino = await d.ino(b"f")
        await utimens(ops, ino, 1_500_000_000 * 10**9)
        await chmod(ops, ino, 0o600)
        await ops.release(fh)
        await rec.drain()
        assert rec.pipe.folded == folded + 2
        assert [r.op for r in records(j, b"f")] == ["create", "write"]
        create = records(j, b"f")[0]
        st = os.stat(src / "f")
        assert create.mode == st.st_mode and create.mode & 0o777 == 0o600
        fs = state(j, b"f")
        assert fs.mode == st.st_mode
        # the version records the file's mtime at close; before it, the create has the utimens' one
        assert create.mtime_ns == 1_500_000_000 * 10**9


async def test_a_setattr_behind_another_record_or_after_the_commit_is_its_own_record(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        folded = rec.pipe.folded
        fh = await open_write(d, b"a", b"a")
        ino = await d.ino(b"a")
        fh2 = await open_write(d, b"b", b"b")  # b's create is queued after a's
        await utimens(ops, ino, 1_400_000_000 * 10**9)
        await ops.release(fh2)
        await ops.release(fh)
        await rec.drain()
        assert rec.pipe.folded == folded
        log = ops_log(j)
        assert log.index(("create", b"b")) < log.index(("setattr", b"a"))
        assert state(j, b"a").mtime_ns == os.stat(src / "a").st_mtime_ns
        # committed create: the setattr is a record of its own
        await chmod(ops, ino, 0o640)
        await rec.drain()
        assert rec.pipe.folded == folded
        assert [r.op for r in records(j, b"a")][-1] == "setattr"
        assert state(j, b"a").mode & 0o777 == 0o640
