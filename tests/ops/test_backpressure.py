"""The capture pipeline's bounded queue (capture/pipeline.py): backpressure
instead of an unbounded deque, and nothing lost or reordered by it.

ops.Operations, the Recorder and a real Journal, wired as mount.py wires
them (tests/ops/test_save_rules.py's ``mounted``), with the queue's bounds
made small.  Several producer tasks, as pyfuse3 runs concurrent requests,
create and write files and write them again while another task fsyncs:
the producers must have waited for room, the queue must never have grown
past its bound by more than one request per producer, every version must
be in the journal with its content, and each producer's records must be in
the order its requests ran.  A run that deadlocks fails on the timeout.
"""

from __future__ import annotations

import os

import pytest
import trio

from deltafs.capture import Item, Pipeline
from deltafs.journal import Change, Journal

from test_history_identity import CTX
from test_save_rules import mounted

PRODUCERS = 4
FILES = 30  # per producer
MAX_ITEMS = 8
FILE_BYTES = 24 << 10
MAX_BYTES = 64 << 10


class Peak:
    """Instrumentation (no behaviour changes): the longest queue and the most
    queued bytes any push left behind."""

    def __init__(self, pipe: Pipeline) -> None:
        self.items = self.bytes = 0
        push = pipe.push

        def counting_push(item, nbytes=0, **kw):
            out = push(item, nbytes, **kw)
            self.items = max(self.items, len(pipe.queue))
            self.bytes = max(self.bytes, pipe.queued_bytes)
            return out

        pipe.push = counting_push


def content(k: int, i: int, version: int) -> bytes:
    return (b"%d/%d/v%d " % (k, i, version)) * (FILE_BYTES // 12)


async def producer(ops, k: int) -> None:
    for i in range(FILES):
        name = b"p%d-%03d" % (k, i)
        fi, e = await ops.create(1, name, 0o644, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, content(k, i, 1))
        await ops.release(fi.fh)
        fi = await ops.open(e.st_ino, os.O_WRONLY | os.O_TRUNC, CTX)
        await ops.write(fi.fh, 0, content(k, i, 2))
        await ops.release(fi.fh)


async def fsyncer(ops, stop: trio.Event) -> None:
    """fsync of a file whose capture sits behind a full queue: waits for its
    item, not for room, and so returns while the producers are held back."""
    fi, e = await ops.create(1, b"synced", 0o644, os.O_WRONLY, CTX)
    n = 0
    while not stop.is_set():
        await ops.write(fi.fh, 0, b"%d\n" % n)
        await ops.fsync(fi.fh, False)
        n += 1
        await trio.sleep(0)
    await ops.release(fi.fh)


@pytest.mark.parametrize("bound", ["items", "bytes"])
async def test_producers_wait_for_room_and_nothing_is_lost_or_reordered(tmp_path, bound):
    async with mounted(tmp_path) as s:
        pipe = s.rec.pipe
        if bound == "items":
            pipe.max_items = MAX_ITEMS
        else:
            pipe.max_bytes = MAX_BYTES
        peak = Peak(pipe)
        stop = trio.Event()
        with trio.fail_after(120):  # a deadlock fails here
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fsyncer, s.ops, stop)
                async with trio.open_nursery() as producers:
                    for k in range(PRODUCERS):
                        producers.start_soon(producer, s.ops, k)
                stop.set()
            await s.rec.drain()

        assert pipe.waits > 0, "the producers never waited: no backpressure happened"
        if bound == "items":
            # each producer passes room() with the queue one short of full, then
            # queues at most one request's items (a create record, or a capture)
            assert peak.items <= MAX_ITEMS + PRODUCERS + 1, peak.items
        else:
            assert peak.bytes <= MAX_BYTES + (PRODUCERS + 1) * FILE_BYTES, peak.bytes
        assert pipe.queued_bytes == 0 and not pipe.queue
        assert s.rec.failures == 0

        with s.j.reader() as r:
            records = list(r.records())
            writes: dict[bytes, list] = {}
            for rec in records:
                if rec.op == "write":
                    writes.setdefault(rec.path, []).append(rec.seq)
            for k in range(PRODUCERS):
                last = 0
                for i in range(FILES):
                    name = b"p%d-%03d" % (k, i)
                    creates = [x.seq for x in records if x.op == "create" and x.path == name]
                    assert len(creates) == 1, (name, creates)
                    got = [r.read_content(q) for q in writes.get(name, [])]
                    assert got == [content(k, i, 1), content(k, i, 2)], name  # every version, in order
                    seqs = creates + writes[name]
                    assert seqs == sorted(seqs) and seqs[0] > last, (name, seqs, last)  # request order
                    last = seqs[-1]
            assert r.read_content(writes[b"synced"][-1]) == open(tmp_path / "src" / "synced", "rb").read()


async def test_room_waits_for_the_committer_and_returns_at_once_when_there_is_room(tmp_path):
    """The Pipeline alone: room() does not yield while under the bound, and
    blocks a producer until the committer has taken items off a full queue."""
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        pipe = Pipeline(j, max_items=4)
        await pipe.room()  # empty: returns without a scheduling point
        gate = []
        for _ in range(4):  # four items whose content is not computed yet: the head blocks
            gate.append(pipe.push(Item()))
        assert pipe.full()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe.committer)
            waited = trio.Event()

            async def produce():
                await pipe.room()
                waited.set()

            nursery.start_soon(produce)
            await trio.sleep(0.05)
            assert not waited.is_set(), "room() returned while the queue was full"
            for n, it in enumerate(gate):
                it.changes = [Change(op="mkdir", path=b"d%d" % n, mode=0o40755, uid=0, gid=0, mtime_ns=0)]
                it.ready.set()
            with trio.fail_after(30):
                await waited.wait()
                await pipe.drain()
            nursery.cancel_scope.cancel()
        assert pipe.waits == 1 and not pipe.queue
        with j.reader() as r:
            assert [x.path for x in r.records()] == [b"d0", b"d1", b"d2", b"d3"]
