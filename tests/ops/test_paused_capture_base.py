"""A file written while capture is paused (``deltafs pause``) has no version
of that write in the journal: its next capture must not take the journal's
latest version as the base of its dirty ranges (capture/recorder.py: a
skipped capture leaves the inode ``stale``, so its next version is read
whole).  On the no-kernel tier, as tests/ops/test_deferred_capture.py.

The resume's rescan records such files too, but a save can come between the
resume and the rescan reaching the file: without the rule, that save recorded
a version mixing the journal's old bytes with the new dirty ranges, a version
SRC never held (and the rescan, seeing that version's size and mtime, kept
it).  Also when the kernel forgot the inode meanwhile: until the rescan ends
(``Recorder.resume``), a file opened for writing is recorded whole first.
"""

from __future__ import annotations

import os
import random
from contextlib import asynccontextmanager

import trio
import trio.testing

from test_deferred_capture import content_of
from test_history_identity import CTX, Driver
from tests.ops.inprocess import session
from test_solo_commit import open_write


@asynccontextmanager
async def captured_file(tmp_path, seed: int):
    """A session with a file f of 200 KB random bytes (several chunks), captured."""
    src = tmp_path / "src"
    src.mkdir()
    body = random.Random(seed).randbytes(200_000)
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"f", body)
        await ops.release(fh)
        await rec.drain()
        p, name = await d.parent(b"f")
        yield src, j, rec, ops, p, name, body


async def _rewrite(ops, node, offset: int, data: bytes) -> None:
    fi = await ops.open(node.ino, os.O_WRONLY, CTX)
    await ops.write(fi.fh, offset, data)
    await ops.release(fi.fh)


async def test_a_save_after_resume_records_what_was_written_while_paused(tmp_path):
    async with captured_file(tmp_path, seed=7) as (src, j, rec, ops, p, name, body):
        node = ops.nodes[(await ops.lookup(p, name, CTX)).st_ino]
        rec.paused = True
        await _rewrite(ops, node, 0, b"Q")  # not recorded: capture is paused
        with trio.fail_after(30):
            await rec.drain()
        assert content_of(j, b"f") == body
        rec.paused = False  # resumed; the rescan has not reached the file yet
        await _rewrite(ops, node, len(body) - 1, b"Z")  # a chunk far from the "Q"
        with trio.fail_after(30):
            await rec.drain()
        assert (src / "f").read_bytes() == b"Q" + body[1:-1] + b"Z"
        assert content_of(j, b"f") == (src / "f").read_bytes()


async def test_a_save_after_resume_of_a_file_still_open_since_the_pause(tmp_path):
    async with captured_file(tmp_path, seed=8) as (src, j, rec, ops, p, name, body):
        node = ops.nodes[(await ops.lookup(p, name, CTX)).st_ino]
        keep = await ops.open(node.ino, os.O_RDONLY, CTX)  # keeps the inode's state alive
        rec.paused = True
        await _rewrite(ops, node, 0, b"Q")
        await _rewrite(ops, node, 1000, b"R")
        rec.paused = False
        await _rewrite(ops, node, len(body) - 1, b"Z")
        with trio.fail_after(30):
            await rec.drain()
        await ops.release(keep.fh)
        expect = bytearray(body)
        expect[0:1], expect[1000:1001], expect[-1:] = b"Q", b"R", b"Z"
        assert (src / "f").read_bytes() == bytes(expect)
        assert content_of(j, b"f") == bytes(expect)


async def test_a_forgotten_inode_saved_during_the_resume_rescan_is_recorded_whole(tmp_path):
    """The kernel may forget the inode written while paused (no handle, no
    lookup left): its state, stale flag included, goes with it.  A save of the
    file while the resume's rescan has not reached it still records what SRC
    holds (``Recorder.resume``: until the rescan ends, an open for writing
    records the file whole first)."""
    async with captured_file(tmp_path, seed=9) as (src, j, rec, ops, p, name, body):
        ino = (await ops.lookup(p, name, CTX)).st_ino
        rec.paused = True
        await _rewrite(ops, ops.nodes[ino], 0, b"Q")
        with trio.fail_after(30):
            await rec.drain()
        await ops.forget([(ino, ops.nodes[ino].lookups)])
        assert ino not in ops.nodes  # its capture state is gone with it
        scan, reached = rec.scan, trio.Event()

        async def slow_scan(*a, **kw):  # the rescan of a large tree: not at this file yet
            await reached.wait()
            return await scan(*a, **kw)
        rec.scan = slow_scan
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.resume, ops, ops.hidden_ino)
            await trio.testing.wait_all_tasks_blocked()
            assert rec.catching_up and not rec.paused
            node = ops.nodes[(await ops.lookup(p, name, CTX)).st_ino]
            await _rewrite(ops, node, len(body) - 1, b"Z")
            with trio.fail_after(30):
                await rec.drain()
            assert content_of(j, b"f") == (src / "f").read_bytes() == b"Q" + body[1:-1] + b"Z"
            reached.set()
        assert not rec.catching_up
        assert content_of(j, b"f") == b"Q" + body[1:-1] + b"Z"
