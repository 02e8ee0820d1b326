"""An fsync whose small capture is committed solo runs SRC's flush in that
same worker call, after the commit (deltafs/hops.py ``Flush``,
``Operations._durable(one_hop=True)``; issue 19: one thread hand-off per
sqlite transaction instead of two in parallel).  Durability and errors are
as with the flush in its own hop:

* the flush runs once, in the thread that commits the version, after the
  commit, and the version is in the journal when the fsync returns;
* a flush error fails the fsync with its errno, the version is committed
  all the same, and the next fsync succeeds;
* a capture over ONE_HOP_BYTES, one queued behind another item, and an
  fsync with nothing to capture still flush SRC in a hop of their own, and
  their flush errors still fail the fsync.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading

import pytest
import trio
from pyfuse3 import FUSEError

from deltafs import hops
from deltafs.capture import recorder as recorder_mod

from test_history_identity import Driver
from test_solo_commit import Calls, open_write
from tests.ops.inprocess import session


class Flushes:
    """os.fdatasync/os.fsync wrapped: the thread and order of each call on SRC's
    descriptor ``fd`` (the journal's own syncs pass through), failing with
    ``fail`` (an errno) while it is set."""

    def __init__(self, monkeypatch, calls: Calls) -> None:
        self.fd = -1
        self.fail: int | None = None
        self.threads: list[int] = []
        self.commits_before: list[int] = []  # content commits made before each flush
        self.in_worker = 0  # flushes run by the capture's worker call (Flush.run_here)
        run_here = hops.Flush.run_here

        def counted(flush):
            self.in_worker += 1
            run_here(flush)
        monkeypatch.setattr(hops.Flush, "run_here", counted)
        for name in ("fdatasync", "fsync"):
            real = getattr(os, name)

            def wrapped(fd, real=real):
                if fd == self.fd:
                    self.threads.append(threading.get_ident())
                    self.commits_before.append(len(calls.threads))
                    if self.fail is not None:
                        raise OSError(self.fail, os.strerror(self.fail))
                return real(fd)
            monkeypatch.setattr(os, name, wrapped)


def content(j, path: bytes) -> bytes:
    with j.reader() as r:
        return r.read_content(r.file_state(r.file_id_at(path)).content_seq)


@contextlib.asynccontextmanager
async def db_open(tmp_path, monkeypatch, size: int = 1000, settle: str = "drain"):
    """A session with SRC/db open for writing (``size`` bytes written, then
    ``settle``: "drain" the capture of the close-less write or "fsync" it),
    its flushes watched: -> (journal, recorder, ops, driver, calls, fh, flushes)."""
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        calls = Calls(j)
        fh = await open_write(d, b"db", b"page\n" * 200 if size == 1000 else b"x" * size)
        if settle == "drain":
            await rec.drain()
        else:
            await ops.fsync(fh, True)
        fl = Flushes(monkeypatch, calls)
        fl.fd = ops.handles[fh].fd
        yield j, rec, ops, d, calls, fh, fl
        await ops.release(fh)


async def test_a_small_solo_fsync_flushes_src_in_the_committing_worker(tmp_path, monkeypatch):
    async with db_open(tmp_path, monkeypatch) as (j, rec, ops, d, calls, fh, fl):
        for i in range(3):
            solo = rec.pipe.solo_commits
            await ops.write(fh, 5 * i, b"#")
            await ops.fsync(fh, True)
            assert rec.pipe.solo_commits == solo + 1
            assert content(j, b"db")[5 * i] == ord("#")  # durable on return
            # one flush, in the worker that committed the version, after that commit
            assert len(fl.threads) == i + 1 and fl.threads[-1] == calls.threads[-1]
            assert fl.commits_before[-1] == len(calls.threads)
            assert fl.threads[-1] != threading.get_ident() and fl.in_worker == i + 1


async def test_a_flush_error_in_the_one_hop_path_fails_the_fsync(tmp_path, monkeypatch):
    async with db_open(tmp_path, monkeypatch) as (j, rec, ops, d, calls, fh, fl):
        await ops.write(fh, 0, b"E")
        fl.fail = errno.EIO
        with pytest.raises(FUSEError) as e:
            await ops.fsync(fh, True)
        assert e.value.errno == errno.EIO
        assert fl.in_worker == 1 and fl.threads[-1] == calls.threads[-1]  # it was the one-hop path
        assert content(j, b"db")[:1] == b"E"  # the version is committed all the same
        fl.fail = None
        await ops.write(fh, 1, b"F")
        await ops.fsync(fh, True)
        assert content(j, b"db")[:2] == b"EF"


@pytest.mark.parametrize("case", ["big", "queued", "nothing_to_capture"])
async def test_other_fsyncs_flush_src_in_their_own_hop_and_report_its_error(tmp_path, monkeypatch, case):
    size = recorder_mod.ONE_HOP_BYTES + 4096 if case == "big" else 1000
    async with db_open(tmp_path, monkeypatch, size, settle="fsync") as (j, rec, ops, d, calls, fh, fl):
        if case == "queued":  # a close's capture waits out its group window ahead of ours
            fh2 = await open_write(d, b"other", b"two\n" * 100)
            await ops.release(fh2)
        if case == "nothing_to_capture":  # only a record about the inode is queued
            await ops.setxattr(ops.handles[fh].node.ino, b"user.k", b"v", None)
            assert not ops.handles[fh].node.cap.changed and not rec.settled(ops.handles[fh].node)
        else:
            await ops.write(fh, 0, b"B" * (size if case == "big" else 1))
        fl.fail = errno.ENOSPC
        with pytest.raises(FUSEError) as e:
            with trio.fail_after(30):
                await ops.fsync(fh, True)
        assert e.value.errno == errno.ENOSPC
        assert len(fl.threads) == 1 and fl.in_worker == 0  # its own hop
        if case != "nothing_to_capture":
            assert content(j, b"db")[:1] == b"B"
        fl.fail = None
        await ops.fsync(fh, True)


@pytest.mark.parametrize("flush_fails", [False, True])
async def test_a_failed_one_hop_capture_still_flushes_src(tmp_path, monkeypatch, flush_fails):
    async with db_open(tmp_path, monkeypatch, settle="fsync") as (j, rec, ops, d, calls, fh, fl):

        def failing(*a, **kw):
            raise OSError(errno.EIO, "injected")
        monkeypatch.setattr(rec.content, "compute", failing)
        failures = rec.pipe.failures
        await ops.write(fh, 0, b"Q")
        fl.fail = errno.EIO if flush_fails else None
        with trio.fail_after(30):
            if flush_fails:
                with pytest.raises(FUSEError) as e:
                    await ops.fsync(fh, True)
                assert e.value.errno == errno.EIO
            else:
                await ops.fsync(fh, True)  # a failed capture is counted, not the fsync's error
        assert rec.pipe.failures == failures + 1
        assert len(fl.threads) == 1 and fl.in_worker == 1  # flushed all the same, in the worker
