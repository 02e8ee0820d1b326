"""A capture alone in the queue that an fsync waits for is computed and
committed by one worker call (capture/pipeline.py ``Pipeline.solo``; issue
19: one thread hand-off per captured fsync instead of two, and no committer
wake-up between them).  On the no-kernel tier (ops.Operations, the Recorder
and a real Journal, wired as tests/ops/test_rm_tree_order.py wires them):

* a lone fsync is a solo commit, made in a worker thread, and its version is
  in the journal when the fsync returns;
* records queued behind a solo capture while it computes are committed
  after it, in queue order, and an fsync of them waits for them;
* a capture that fails in its solo worker still ends its item (the fsync
  returns, the failure is counted), and the file's next capture is whole;
* while anything else is queued (a close's capture in its group window),
  the capture goes through the committer as before.
"""

from __future__ import annotations

import os
import threading

import trio

from deltafs.journal import Journal
from deltafs.ops import ROOT

from test_history_identity import CTX, Driver
from tests.ops.inprocess import session


class Calls:
    """Which thread ran each journal transaction with a content version."""

    def __init__(self, j: Journal) -> None:
        self.threads: list[int] = []
        inner = j._commit_batch

        def commit_batch(groups, blocking=True):
            res = inner(groups, blocking)
            if res is not None and any(c.op == "write" for g in groups for c in g):
                self.threads.append(threading.get_ident())
            return res
        j._commit_batch = commit_batch


def ops_log(j: Journal) -> list[tuple[str, bytes]]:
    with j.reader() as r:
        return [(r.record(s).op, r.record(s).path) for s in range(1, r.head_seq() + 1)]


async def open_write(d: Driver, path: bytes, data: bytes) -> int:
    """Create path, write data; -> the open handle (not released)."""
    p, name = await d.parent(path)
    fi, _ = await d.ops.create(p, name, 0o644, os.O_RDWR, CTX)
    await d.ops.write(fi.fh, 0, data)
    return fi.fh


async def test_a_lone_fsync_is_computed_and_committed_in_one_worker_call(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        calls = Calls(j)
        fh = await open_write(d, b"f", b"hello\n" * 100)
        await rec.drain()  # the create record
        before = rec.pipe.solo_commits
        for i in range(3):
            await ops.write(fh, 7 * i, b"X")
            await ops.fsync(fh, False)
            # durable on return: the version is the journal's latest for the path
            with j.reader() as r:
                fs = r.file_state(r.file_id_at(b"f"))
                assert r.read_content(fs.content_seq)[7 * i:7 * i + 1] == b"X"
        assert rec.pipe.solo_commits == before + 3
        assert calls.threads and threading.get_ident() not in calls.threads  # a worker's commits
        await ops.release(fh)


async def test_records_queued_behind_a_solo_capture_commit_after_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"f", b"data\n" * 100)
        await rec.drain()
        started, go = threading.Event(), threading.Event()
        compute = rec.content.compute

        def slow_compute(*a, **kw):
            started.set()
            assert go.wait(30)
            return compute(*a, **kw)
        rec.content.compute = slow_compute
        await ops.write(fh, 0, b"Z")
        solo_before = rec.pipe.solo_commits
        async with trio.open_nursery() as n:
            n.start_soon(ops.fsync, fh, False)
            with trio.fail_after(30):
                while not started.is_set():
                    await trio.sleep(0.001)
            # queued while the solo worker computes: a mkdir, and an fsyncdir of the root
            await ops.mkdir(ROOT, b"later", 0o755, CTX)
            n.start_soon(ops.fsyncdir, ROOT, False)
            await trio.sleep(0.05)
            assert ("mkdir", b"later") not in ops_log(j)  # not committed before the capture
            go.set()
        rec.content.compute = compute
        assert rec.pipe.solo_commits == solo_before + 1
        log = ops_log(j)
        assert log.index(("write", b"f")) < log.index(("mkdir", b"later"))
        await ops.release(fh)


async def test_a_failed_solo_capture_ends_its_item_and_the_next_one_is_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"f", b"abc\n" * 100)
        await ops.fsync(fh, False)
        compute = rec.content.compute
        seen = []

        def failing(fd, path, cause, dirty, *rest):
            seen.append(dirty)
            if len(seen) == 1:
                raise OSError(5, "injected")
            return compute(fd, path, cause, dirty, *rest)
        rec.content.compute = failing
        failures = rec.pipe.failures
        await ops.write(fh, 0, b"Q")
        with trio.fail_after(30):
            await ops.fsync(fh, False)  # returns: the item ended
        assert rec.pipe.failures == failures + 1
        assert not rec.pipe.queue
        await ops.write(fh, 4, b"R")
        await ops.fsync(fh, False)
        assert seen[1] is None  # FULL: the failed capture left no base
        rec.content.compute = compute
        with j.reader() as r:
            fs = r.file_state(r.file_id_at(b"f"))
            assert r.read_content(fs.content_seq)[:5] == b"Qbc\nR"
        await ops.release(fh)


async def test_a_capture_queued_behind_others_goes_through_the_committer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"f", b"one\n" * 100)
        await ops.fsync(fh, False)
        solo = rec.pipe.solo_commits
        # a close's capture of another file waits out its group window: the
        # fsync's capture is queued behind it, so the committer takes both
        fh2 = await open_write(d, b"g", b"two\n" * 100)
        await ops.release(fh2)
        await ops.write(fh, 0, b"W")
        await ops.fsync(fh, False)
        assert rec.pipe.solo_commits == solo
        log = ops_log(j)
        assert log.index(("write", b"g")) < [i for i, e in enumerate(log) if e == ("write", b"f")][-1]
        await ops.release(fh)
