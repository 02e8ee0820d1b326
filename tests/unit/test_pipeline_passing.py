"""A computed capture of one file may commit ahead of an uncomputed capture
of another file queued before it, while someone waits for a commit
(capture/pipeline.py, "Passing"; issue 19: a 1-byte edit's fsync waited
~1 s behind a 1 GiB capture still being chunked).  It never passes a
namespace record, a capture of its inode or path, or an item it cannot
tell; ``drain`` still waits for everything queued.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from deltafs.capture import Item, Pipeline, capture_chunks
from deltafs.journal import Change, Journal

BIG, SMALL = 100, 200  # FUSE inodes


def write(j: Journal, path: bytes, data: bytes) -> Change:
    """A whole-file content version of path (as the capture layer builds it)."""
    with j.reader() as r:
        res, chunks = capture_chunks(r, lambda o, n: data[o:o + n], len(data), [], [(0, len(data))])
    return Change(op="write", path=path, size=len(data), mode=0o100644, cause="fsync", base_seq=0,
                  edit=res.edit_list([]), chunks=chunks)


def capture(pipe: Pipeline, path: bytes, ino: int, may_pass: bool = True) -> Item:
    """Queue a content capture, not computed yet (what Recorder._capture queues)."""
    it = Item()
    it.path, it.may_pass = path, may_pass
    pipe.push(it)
    pipe.concerns(it, ino)
    return it


def computed(j: Journal, it: Item, data: bytes) -> None:
    it.changes = [write(j, it.path, data)]
    it.ready.set()


def logged(j: Journal) -> list[tuple[str, bytes]]:
    with j.reader() as r:
        return [(rec.op, rec.path) for rec in r.records()]


@pytest.fixture
def journal(tmp_path):
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        j.commit_many([[Change(op="create", path=p, mode=0o100644)] for p in (b"big", b"small", b"other")])
        yield j


async def test_a_computed_small_capture_commits_ahead_of_an_uncomputed_big_one(journal):
    pipe = Pipeline(journal)
    async with trio.open_nursery() as n:
        n.start_soon(pipe.committer)
        big = capture(pipe, b"big", BIG)
        small = capture(pipe, b"small", SMALL)
        computed(journal, small, b"edit")
        with trio.fail_after(30):
            await pipe.sync(SMALL)  # an fsync of the small file: durable while big is computing
        assert small.done.is_set() and not big.done.is_set() and pipe.queue[0] is big
        assert pipe.passed == 1

        drained = trio.Event()

        async def drain():
            await pipe.drain()
            drained.set()
        n.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set()  # drain waits for big too, not only for the last item queued
        computed(journal, big, b"B" * 100_000)
        with trio.fail_after(30):
            await drained.wait()
        n.cancel_scope.cancel()
    assert logged(journal)[3:] == [("write", b"small"), ("write", b"big")]
    with journal.reader() as r:
        seqs = [rec.seq for rec in r.records()]
        hlcs = [rec.hlc for rec in r.records()]
    assert seqs == sorted(seqs) and hlcs == sorted(hlcs)  # stamped in commit order


@pytest.mark.parametrize("between", [
    Change(op="rename", path=b"big", path2=b"big2"),
    Change(op="unlink", path=b"big"),
    Change(op="mkdir", path=b"elsewhere", mode=0o40755),  # any namespace record: the simple rule
    Change(op="setattr", path=b"small", mode=0o100600),
])
async def test_a_namespace_record_queued_between_keeps_the_capture_behind(journal, between):
    pipe = Pipeline(journal)
    async with trio.open_nursery() as n:
        n.start_soon(pipe.committer)
        big = capture(pipe, b"big", BIG)
        pipe.submit(between)
        small = capture(pipe, b"small", SMALL)
        computed(journal, small, b"edit")
        waiting = trio.Event()

        async def fsync():
            await pipe.sync(SMALL)
            waiting.set()
        n.start_soon(fsync)
        await trio.testing.wait_all_tasks_blocked()
        assert not small.done.is_set() and not waiting.is_set()
        computed(journal, big, b"B" * 10_000)
        with trio.fail_after(30):
            await waiting.wait()
            await pipe.drain()
        n.cancel_scope.cancel()
    assert logged(journal)[3:] == [("write", b"big"), (between.op, between.path), ("write", b"small")]
    assert pipe.passed == 0


@pytest.mark.parametrize("case", ["same inode", "same path", "not may_pass", "nobody waits", "item unknown"])
async def test_a_capture_stays_behind_what_it_may_not_pass(journal, case):
    pipe = Pipeline(journal)
    async with trio.open_nursery() as n:
        n.start_soon(pipe.committer)
        if case == "item unknown":
            head = Item()  # no path, no inode: what it is about is unknown
            pipe.push(head)
        else:
            head = capture(pipe, b"small" if case == "same path" else b"big", SMALL if case == "same inode" else BIG)
        small = capture(pipe, b"small", SMALL, may_pass=case != "not may_pass")
        computed(journal, small, b"edit")
        if case == "nobody waits":
            await trio.testing.wait_all_tasks_blocked()
            assert not small.done.is_set()
            with pipe.hurrying():  # someone starts waiting: now it passes
                with trio.fail_after(30):
                    await small.done.wait()
            assert not head.done.is_set()
        else:
            n.start_soon(pipe.committed, small)  # an fsync of it
            await trio.testing.wait_all_tasks_blocked()
            assert not small.done.is_set()
            if case == "item unknown":
                head.changes = [Change(op="mkdir", path=b"d", mode=0o40755)]
                head.ready.set()
            else:
                computed(journal, head, b"first")
            with trio.fail_after(30):
                await pipe.drain()
            order = [p for op, p in logged(journal)[3:]]
            assert order == [head.path or b"d", b"small"]
        n.cancel_scope.cancel()


def test_passers_are_the_computed_may_pass_captures_before_any_namespace_item(journal):
    pipe = Pipeline(journal)
    big = capture(pipe, b"big", BIG)
    deferred = capture(pipe, b"d1", 1)
    deferred.job = lambda: None  # a deferred capture: computed by its commit's worker
    deferred.ready.set()
    a = capture(pipe, b"a", 2)
    b_ = capture(pipe, b"b", 3)
    same = capture(pipe, b"b", 3)  # the next capture of b's inode: behind b's (not computed)
    c = capture(pipe, b"c", 4)
    pipe.submit(Change(op="unlink", path=b"x"))
    e = capture(pipe, b"e", 5)
    for it in (a, same, c, e):
        computed(journal, it, b"x")
    assert pipe._passers() == [a, c]  # not same (b's capture before it), not e (behind the unlink)
    assert pipe._take_passers() == [a, c]
    assert list(pipe.queue)[:4] == [big, deferred, b_, same]


async def test_a_big_lone_capture_is_not_committed_by_its_own_worker(journal):
    """Pipeline.solo: only a capture reading up to SOLO_BYTES is committed by
    the worker that computes it; a bigger one (a 1 GiB fsync) goes through the
    committer, so captures queued while it computes may pass it."""
    from deltafs.capture import pipeline as P
    pipe = Pipeline(journal)
    with pipe.hurrying():  # its fsync waits
        small = Item()
        pipe.push(small, P.SOLO_BYTES)
        assert pipe.solo(small)
        pipe.finish_solo(small, [])
        big = Item()
        pipe.push(big, P.SOLO_BYTES + 1)
        assert not pipe.solo(big)


async def test_the_committer_moves_on_when_a_solo_head_ends_with_nobody_waiting(journal):
    """The committer waits for an uncomputed head; its worker commits it
    (solo) and ends it after its waiter left: the committer must see the
    head gone and take what is queued next (Pipeline._wake)."""
    pipe = Pipeline(journal)
    async with trio.open_nursery() as n:
        n.start_soon(pipe.committer)
        head = capture(pipe, b"small", SMALL)
        with pipe.hurrying():
            assert pipe.solo(head)
        await trio.testing.wait_all_tasks_blocked()
        pipe.finish_solo(head, [])
        nxt = pipe.submit(Change(op="mkdir", path=b"d", mode=0o40755))
        with trio.fail_after(10):
            await nxt.done.wait()
        n.cancel_scope.cancel()
