"""fsync of a written but ignored file, and fsyncdir of a directory with
nothing queued about it, flush SRC and wait for no capture (issue 19: a
sqlite transaction fsyncs its rollback journal twice and the directory
once; each went through the capture path's task nursery).  A written file
that is not ignored, and a directory with a queued record, still wait
until their records are durable."""

from __future__ import annotations

import pytest

from deltafs.ops import ROOT

from test_history_identity import CTX, Driver
from tests.ops.inprocess import session
from test_solo_commit import ops_log, open_write



def count_durable_waits(ops) -> list:
    """Wrap ``Operations._durable`` (an fsync that waits for the journal): the list it
    returns gets one entry per such wait; an fsync on the fast path adds none."""
    calls = []
    real = ops._durable

    async def durable(*a, **kw):
        calls.append(a)
        await real(*a, **kw)
    ops._durable = durable
    return calls

async def test_an_ignored_files_fsync_takes_the_fast_path_and_journals_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"db.sqlite-journal", b"J" * 600)  # ignored (*-journal)
        node = ops.handles[fh].node
        assert node.cap.changed and rec.settled(node)
        calls = count_durable_waits(ops)
        await ops.fsync(fh, True)
        assert not calls  # the flush alone
        await ops.release(fh)
        await rec.drain()
        assert not any(p == b"db.sqlite-journal" for _, p in ops_log(j))

        fh = await open_write(d, b"db.sqlite", b"D" * 600)
        node = ops.handles[fh].node
        assert not rec.settled(node)
        await ops.fsync(fh, True)
        assert len(calls) == 1  # a capture waited for
        with j.reader() as r:
            assert r.read_content(r.file_state(r.file_id_at(b"db.sqlite")).content_seq) == b"D" * 600
        await ops.release(fh)


@pytest.mark.parametrize("inode_handles", [False, True])
async def test_fsyncdir_waits_only_when_something_about_the_directory_is_queued(tmp_path, inode_handles):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        ops.dir_handle_is_inode = inode_handles  # (the patched pyfuse3's way: fh is the inode)
        d = Driver(ops)
        calls = count_durable_waits(ops)
        fi = ROOT if inode_handles else await ops.opendir(ROOT, CTX)
        await ops.fsyncdir(fi, True)
        assert not calls  # nothing queued about the root: the flush alone
        p, name = await d.parent(b"x")
        await ops.mkdir(p, name, 0o755, CTX)  # a record about the root, queued (group window)
        await ops.fsyncdir(fi, True)
        assert len(calls) == 1
        assert (b"mkdir", b"x") in {(op.encode(), path) for op, path in ops_log(j)}
        if not inode_handles:
            await ops.releasedir(fi)
