"""A small file's capture at close is computed by the worker that commits it
(capture/pipeline.py ``Pipeline.defer``; issue 19: cp -a and git add paid a
task, a thread hand-off and a loop wake-up per file for the computation,
then another hand-off for the commit).  On the no-kernel tier (ops.Operations,
the Recorder and a real Journal, wired as tests/ops/test_rm_tree_order.py
wires them):

* closed small files are computed in the commit's worker, never by a
  capture task of their own (``Recorder._compute``), several per transaction,
  each version with its content, in queue order with the records around it,
  and the creates queued before them go in the same transactions (no
  namespace-only commit on the loop thread);
* a large file's capture is still computed by its own task;
* a computation that fails ends its item (counted, logged), commits nothing
  for it, leaves the records queued with it committed, and leaves the file
  with no base: its next capture is whole, also after a reopen for writing,
  and after the kernel forgot the inode (until the rescan ends)
  (the failure is injected: a read error of SRC cannot be caused for real);
* a change to the file waiting for its deferred capture (a write after a
  reopen) ends the group window instead of waiting it out;
* an unlink of a file whose capture is deferred does not wait for it, and
  its version is committed before the unlink record.
"""

from __future__ import annotations

import os
import random
import threading

import pytest
import trio

from deltafs.capture import pipeline as pl
from deltafs.journal import Journal

from test_history_identity import CTX, Driver
from tests.ops.inprocess import session
from test_solo_commit import open_write, ops_log


def content_of(j: Journal, path: bytes) -> bytes:
    with j.reader() as r:
        fs = r.file_state(r.file_id_at(path))
        return r.read_content(fs.content_seq)


class Transactions:
    """Journal transactions with a content version: their thread and group count."""

    def __init__(self, j: Journal) -> None:
        self.calls: list[tuple[int, int]] = []
        inner = j._commit_batch

        def commit_batch(groups, blocking=True):
            res = inner(groups, blocking)
            n = sum(1 for g in groups for c in g if c.op == "write")
            if res is not None and n:
                self.calls.append((threading.get_ident(), n))
            return res
        j._commit_batch = commit_batch


def count_compute_tasks(rec) -> list:
    """Wrap the recorder's own capture task (``Recorder._compute``) for the session: the list it
    returns gets one entry per capture computed in a task of its own, not in a commit's worker."""
    tasks = []
    compute = rec._compute

    async def counted(*a):
        tasks.append(a)
        await compute(*a)
    rec._compute = counted
    return tasks


async def test_closed_small_files_are_computed_in_their_commits_worker(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        tx = Transactions(j)
        tasks = count_compute_tasks(rec)
        inline = rec.pipe.inline_commits
        for i in range(10):
            fh = await open_write(d, b"f%d" % i, b"line %d\n" % i * (100 + i))
            await ops.release(fh)
        await rec.drain()
        assert not tasks  # no capture task of their own
        assert rec.pipe.deferred == 0
        for i in range(10):
            assert content_of(j, b"f%d" % i) == b"line %d\n" % i * (100 + i)
        assert sum(n for _, n in tx.calls) == 10
        assert len(tx.calls) < 10  # grouped: several versions per transaction
        # the creates went with them: no namespace-only commit on the loop thread
        assert rec.pipe.inline_commits == inline
        assert threading.get_ident() not in {t for t, _ in tx.calls}  # in a worker
        log = ops_log(j)
        for i in range(10):  # each file's create before its version, the files in order
            assert log.index(("create", b"f%d" % i)) < log.index(("write", b"f%d" % i))
            if i:
                assert log.index(("write", b"f%d" % (i - 1))) < log.index(("write", b"f%d" % i))


async def test_a_large_file_is_still_computed_by_its_own_task(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        tasks = count_compute_tasks(rec)
        big = os.urandom(pl.DEFER_BYTES + 1)
        fh = await open_write(d, b"big", big)
        await ops.release(fh)
        await rec.drain()
        assert len(tasks) == 1
        assert content_of(j, b"big") == big


@pytest.mark.parametrize("forgotten", [False, True], ids=["inode-kept", "inode-forgotten"])
async def test_a_failed_deferred_capture_ends_its_item_and_leaves_no_base(tmp_path, forgotten):
    src = tmp_path / "src"
    src.mkdir()
    body = random.Random(5).randbytes(200_000)  # several chunks, a deferred capture still
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"f", body)
        await ops.release(fh)
        await rec.drain()
        compute = rec.content.compute
        seen = []

        def failing(fd, path, cause, dirty, *rest):
            seen.append((path, dirty))
            if path == b"f" and len(seen) == 1:
                raise OSError(5, "injected")
            return compute(fd, path, cause, dirty, *rest)
        rec.content.compute = failing
        failures = rec.pipe.failures
        rescan, later = rec._rescan, trio.Event()

        async def rescan_later():  # the rescan the failure asks for runs at the end
            await later.wait()
            await rescan()
        rec._rescan = rescan_later
        p, name = await d.parent(b"f")
        node = ops.nodes[(await ops.lookup(p, name, CTX)).st_ino]
        fi = await ops.open(node.ino, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, b"Q")
        await ops.release(fi.fh)
        fh2 = await open_write(d, b"g", b"other\n")  # queued behind it: committed all the same
        await ops.release(fh2)
        with trio.fail_after(30):
            await rec.drain()
        assert rec.pipe.failures == failures + 1
        assert rec.pipe.deferred == 0 and node.cap.pending is None
        assert content_of(j, b"g") == b"other\n"
        assert content_of(j, b"f") == body  # the failed version is not there
        assert node.cap.base is None  # the file's next capture is whole
        rec.content.compute = compute
        if forgotten:  # the kernel forgets the inode: its stale flag goes with it
            ino = node.ino
            await ops.forget([(ino, node.lookups)])
            assert ino not in ops.nodes
            node = ops.nodes[(await ops.lookup(p, name, CTX)).st_ino]
        # a reopen for writing must not take the journal's last version as the
        # base of its dirty ranges: SRC holds the failed capture's "Q" too (the
        # rescan after the failure would record it, but may come later)
        fi = await ops.open(node.ino, os.O_WRONLY, CTX)
        await ops.write(fi.fh, len(body) - 1, b"Z")  # a chunk far from the "Q"
        await ops.release(fi.fh)
        with trio.fail_after(30):
            await rec.drain()
        assert (src / "f").read_bytes() == b"Q" + body[1:-1] + b"Z"
        assert content_of(j, b"f") == (src / "f").read_bytes()
        later.set()


async def test_a_write_waiting_for_a_deferred_capture_ends_the_group_window(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "GROUP_WINDOW", 30.0)  # a window nobody should wait out
    monkeypatch.setattr(pl, "DEFER_WINDOW", 30.0)
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"f", b"one\n" * 50)
        await ops.release(fh)
        p, name = await d.parent(b"f")
        node = ops.nodes[(await ops.lookup(p, name, CTX)).st_ino]
        assert node.cap.pending is not None  # deferred, not committed yet
        with trio.fail_after(10):
            fi = await ops.open(node.ino, os.O_WRONLY, CTX)  # waits for the capture
            await ops.write(fi.fh, 0, b"TWO\n")
            await ops.fsync(fi.fh, False)
        await ops.release(fi.fh)
        with j.reader() as r:
            fid = r.file_id_at(b"f")
            versions = [r.record(s) for s in range(1, r.head_seq() + 1)]
        contents = [v for v in versions if v.op == "write" and v.file_id == fid]
        assert len(contents) == 2
        assert content_of(j, b"f") == b"TWO\n" + b"one\n" * 49


async def test_an_unlink_does_not_wait_for_a_deferred_capture(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "GROUP_WINDOW", 30.0)
    monkeypatch.setattr(pl, "DEFER_WINDOW", 30.0)
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        fh = await open_write(d, b"tmp", b"object\n" * 20)
        await ops.release(fh)
        p, name = await d.parent(b"tmp")
        with trio.fail_after(10):
            await ops.unlink(p, name, CTX)  # returns inside the 30 s window
        # it did not wait for the capture (waiting would have committed it: a waiter hurries)
        assert ("write", b"tmp") not in ops_log(j) and ("unlink", b"tmp") not in ops_log(j)
        await rec.drain()
        log = ops_log(j)
        assert log.index(("write", b"tmp")) < log.index(("unlink", b"tmp"))
        with j.reader() as r:
            seq = [s for s in range(1, r.head_seq() + 1) if r.record(s).op == "write"][-1]
            assert r.read_content(seq) == b"object\n" * 20


async def test_closes_further_apart_than_the_group_window_share_a_transaction(tmp_path, monkeypatch):
    """A deferred capture's window is DEFER_WINDOW, not GROUP_WINDOW (issue 19: cp -a
    closed a file every ~1.5 ms, and a 5-ms window made ~8 files a transaction)."""
    monkeypatch.setattr(pl, "GROUP_WINDOW", 0.0)  # would commit each file on its own
    monkeypatch.setattr(pl, "NAMESPACE_WINDOW", 0.0)  # (a create at the head, its capture not queued yet)
    monkeypatch.setattr(pl, "DEFER_WINDOW", 30.0)  # a window the closes below stay inside
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        tx = Transactions(j)
        for i in range(8):
            fh = await open_write(d, b"f%d" % i, b"line %d\n" % i * 40)
            await ops.release(fh)
            await trio.sleep(0.02)
        # nobody waited: no version is committed yet
        assert sum(n for _, n in tx.calls) == 0
        with trio.fail_after(10):
            await rec.drain()  # a waiter ends the window at once
        assert tx.calls and sum(n for _, n in tx.calls) == 8
        assert len(tx.calls) == 1
        for i in range(8):
            assert content_of(j, b"f%d" % i) == b"line %d\n" % i * 40


async def test_a_full_batch_of_deferred_captures_ends_the_window(tmp_path, monkeypatch):
    for name in ("DEFER_WINDOW", "GROUP_WINDOW", "NAMESPACE_WINDOW"):
        monkeypatch.setattr(pl, name, 30.0)
    monkeypatch.setattr(pl, "DEFER_MAX", 4)
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        tx = Transactions(j)
        for i in range(4):
            fh = await open_write(d, b"f%d" % i, b"line %d\n" % i * 40)
            await ops.release(fh)
        item = rec.pipe.last_item
        with trio.fail_after(10):
            await item.done.wait()  # not a waiter (no hurry): DEFER_MAX ends the window
        assert [n for _, n in tx.calls] == [4]


async def test_with_a_guard_a_close_waits_only_the_short_window(tmp_path, monkeypatch):
    """The guard scores a capture at its commit: under a guard a close's commit
    does not wait DEFER_WINDOW (an attack's first files would be seen that much
    later), only GROUP_WINDOW."""
    from deltafs.guard import Detector, Guard

    monkeypatch.setattr(pl, "GROUP_WINDOW", 0.0)
    monkeypatch.setattr(pl, "NAMESPACE_WINDOW", 0.0)
    monkeypatch.setattr(pl, "DEFER_WINDOW", 30.0)  # a window nobody should wait out
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        rec.guard = Guard(Detector("normal"), j, None, action="block")
        d = Driver(ops)
        tx = Transactions(j)
        fh = await open_write(d, b"f", b"line\n" * 40)
        await ops.release(fh)
        item = rec.pipe.last_item
        with trio.fail_after(10):
            await item.done.wait()  # nobody waits for it: the short window ends it
        assert sum(n for _, n in tx.calls) == 1
        rec.guard = None
        assert content_of(j, b"f") == b"line\n" * 40
