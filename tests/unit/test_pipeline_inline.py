"""The committer commits namespace-only batches on the trio (FUSE loop) thread
when the journal's write lock is free, and in a worker thread otherwise
(issue 19: py-lmdb's get/put keep the GIL, so a commit in a worker fought the
loop for it through every rm -rf commit).  Order and durability stay the
queue's: every item is done only once its transaction is committed, in queue
order, whichever thread committed it.
"""

from __future__ import annotations

import threading

import trio
import trio.testing

from deltafs.capture import Item, Pipeline
from deltafs.capture import pipeline as P
from deltafs.journal import Change, Journal


class Threads:
    """Instrumentation: which thread ran each journal transaction, and how many groups."""

    def __init__(self, j: Journal) -> None:
        self.calls: list[tuple[int, int]] = []
        inner = j._commit_batch

        def commit_batch(groups, blocking=True):
            res = inner(groups, blocking)
            if res is not None:
                self.calls.append((threading.get_ident(), sum(len(g) for g in groups)))
            return res
        j._commit_batch = commit_batch


def tree_records(n: int) -> list[Change]:
    out = [Change(op="mkdir", path=b"d", mode=0o40755)]
    out += [Change(op="create", path=b"d/f%03d" % i, mode=0o100644) for i in range(n)]
    out += [Change(op="unlink", path=b"d/f%03d" % i) for i in range(n)]
    out.append(Change(op="rmdir", path=b"d"))
    return out


def logged(j: Journal) -> list[tuple[str, bytes]]:
    with j.reader() as r:
        return [(r.record(s).op, r.record(s).path) for s in range(1, r.head_seq() + 1)]


async def test_namespace_batches_commit_on_the_loop_thread_in_bounded_batches(tmp_path):
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        threads = Threads(j)
        pipe = Pipeline(j)
        changes = tree_records(150)
        async with trio.open_nursery() as n:
            n.start_soon(pipe.committer)
            items = [pipe.submit(c) for c in changes]
            with trio.fail_after(30):
                await pipe.drain()
            n.cancel_scope.cancel()
        assert all(it.done.is_set() and not isinstance(it.result, BaseException) for it in items)
        loop = threading.get_ident()
        assert threads.calls and all(t == loop for t, _ in threads.calls), threads.calls
        assert max(k for _, k in threads.calls) <= P.INLINE_RECORDS
        assert pipe.inline_commits == len(threads.calls)
        assert logged(j) == [(c.op, c.path) for c in changes]


async def test_a_held_write_lock_sends_the_batch_to_a_worker_and_keeps_order(tmp_path):
    """While another thread holds the write lock (a compaction, a capture's
    chunks), the loop never waits on it: the batch goes to a worker, the
    fsync-like waiter returns only after the commit, records stay in order."""
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        threads = Threads(j)
        pipe = Pipeline(j)
        loop = threading.get_ident()
        held, release = threading.Event(), threading.Event()

        def holder():
            with j._wlock:
                held.set()
                release.wait(30)
        t = threading.Thread(target=holder)
        first = [Change(op="mkdir", path=b"a", mode=0o40755)]
        second = [Change(op="mkdir", path=b"a/b%d" % i, mode=0o40755) for i in range(5)]
        async with trio.open_nursery() as n:
            n.start_soon(pipe.committer)
            with trio.fail_after(30):
                await pipe.committed(pipe.submit(*first))
                t.start()
                await trio.to_thread.run_sync(held.wait)
                items = [pipe.submit(c) for c in second]
                ticks = 0
                while pipe.queue and pipe.queue[0] is items[0]:
                    await trio.sleep(0.01)  # the committer takes the batch
                    ticks += 1
                    assert ticks < 1000
                for _ in range(20):  # the loop keeps running while the worker waits for the lock
                    await trio.sleep(0.005)
                assert not items[-1].done.is_set()
                release.set()
                await pipe.committed(items[-1])
            n.cancel_scope.cancel()
        t.join()
        assert threads.calls[0][0] == loop
        assert any(tid != loop for tid, _ in threads.calls[1:]), threads.calls
        assert [p for _, p in logged(j)] == [c.path for c in first + second]


def test_take_stops_a_namespace_batch_at_content_and_at_the_bound(tmp_path):
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        pipe = Pipeline(j)
        ns = [Item([Change(op="unlink", path=b"f%d" % i)]) for i in range(P.INLINE_RECORDS + 10)]
        content = Item([Change(op="write", path=b"g")])
        for it in ns[:3] + [content] + ns[3:]:
            pipe.queue.append(it)
        assert pipe._take() == ns[:3]  # namespace-only, up to the first content capture
        assert pipe._take() == [content] + ns[3:]  # a content batch takes what follows (up to 512)
        for it in ns:
            pipe.queue.append(it)
        assert pipe._take() == ns[:P.INLINE_RECORDS]  # bounded
        assert pipe._take() == ns[P.INLINE_RECORDS:]


async def test_a_namespace_head_waits_for_more_records_until_a_full_batch(tmp_path, autojump_clock):
    """Nobody waits: a namespace head gathers what arrives within NAMESPACE_WINDOW
    into one commit (each inline commit costs the loop an fdatasync), and a full
    batch (INLINE_RECORDS queued) ends the window at once.  Virtual time."""
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        threads = Threads(j)
        pipe = Pipeline(j)
        async with trio.open_nursery() as n:
            n.start_soon(pipe.committer)
            pipe.submit(Change(op="mkdir", path=b"a", mode=0o40755))
            await trio.sleep(0.015)  # longer than the content window, within the namespace one
            last = pipe.submit(Change(op="mkdir", path=b"b", mode=0o40755))
            await last.done.wait()  # not pipe.committed: a waiter would end the window
            assert [k for _, k in threads.calls] == [2]
            t0 = trio.current_time()
            for i in range(P.INLINE_RECORDS):
                last = pipe.submit(Change(op="mkdir", path=b"a/%d" % i, mode=0o40755))
            await last.done.wait()
            assert trio.current_time() - t0 < P.NAMESPACE_WINDOW  # the full batch ended the window
            assert [k for _, k in threads.calls] == [2, P.INLINE_RECORDS]
            n.cancel_scope.cancel()


async def test_a_namespace_head_followed_by_a_content_item_commits_without_the_window(tmp_path, mock_clock):
    """The namespace batch at the head of the queue cannot grow past a content
    item (or one still being captured) behind it, so the committer does not
    wait NAMESPACE_WINDOW for more: a file's create commits at once when its
    capture is queued (the guard then scores an attacker's X.crypt and delete
    of X some 25 ms sooner).  Time is frozen (MockClock): the old committer
    sat in its window until the clock moved."""
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        pipe = Pipeline(j)
        async with trio.open_nursery() as n:
            n.start_soon(pipe.committer)
            create = pipe.submit(Change(op="create", path=b"x.crypt", mode=0o100644))
            await trio.testing.wait_all_tasks_blocked()
            assert not create.done.is_set()  # alone: it waits for more namespace records
            pipe.push(Item())  # x.crypt's capture, still running
            await trio.testing.wait_all_tasks_blocked()
            assert create.done.is_set() and trio.current_time() == 0
            n.cancel_scope.cancel()
