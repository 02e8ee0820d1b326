"""rm -rf of a tree, interleaved with writes, on the no-kernel tier (issue 19).

Namespace-only batches (unlinks, rmdirs, mkdirs) are committed on the loop
thread when the journal's write lock is free, content captures in worker
threads (capture/pipeline.py).  ops.Operations, the Recorder and a real
Journal, wired as mount.py wires them (tests/ops/inprocess.py's
``session``), over a SRC whose tree was there before the mount (the scan
records it), so each unlink reads the file's last version from the journal.
One task removes the tree depth first, as rm -rf does, while another saves
files elsewhere and fsyncs some of them: the journal's log must hold each
task's records in the order its requests ran, every version with its
content, and the tree at each pause (``Reader.tree_at``) must equal SRC as
it was then.
"""

from __future__ import annotations

import os

import trio

from tests.ops.inprocess import session
from tests.ops.test_history_identity import CTX, Driver, journal_tree, snapshot

DIRS = 4
FILES = 40  # per directory


def make_tree(src) -> list[bytes]:
    """t/dK/fN (with content) and t/dK/sub/: -> what rm -rf removes, in its order."""
    order = []
    for k in range(DIRS):
        d = src / "t" / f"d{k}"
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "deep").write_bytes(b"deep %d\n" % k)
        for i in range(FILES):
            (d / f"f{i:03d}").write_bytes(b"file %d/%d\n" % (k, i) * (i + 1))
    for k in range(DIRS):
        base = b"t/d%d" % k
        order += [b"U " + base + b"/sub/deep", b"R " + base + b"/sub"]
        order += [b"U " + base + b"/f%03d" % i for i in range(FILES)]
        order.append(b"R " + base)
    order.append(b"R t")
    return order


async def remove(d: Driver, order: list[bytes], turn: trio.Lock, pause) -> list[tuple[str, bytes]]:
    done = []
    for n, step in enumerate(order):
        kind, path = step.split(b" ", 1)
        async with turn:
            p, name = await d.parent(path)
            if kind == b"U":
                await d.ops.unlink(p, name, CTX)
                done.append(("unlink", path))
            else:
                await d.ops.rmdir(p, name, CTX)
                done.append(("rmdir", path))
        if n % 40 == 39:
            await pause()
        await trio.sleep(0)
    return done


async def write(d: Driver, turn: trio.Lock, stop: trio.Event, saved: dict) -> None:
    n = 0
    while not stop.is_set():
        path = b"w/f%d" % (n % 5)
        data = b"version %d of %s\n" % (n, path) * 50
        async with turn:
            await d.save(path, data)
            if n % 3 == 0:  # and fsync it: the committer hurries, a content batch
                fi = await d.ops.open(await d.ino(path), os.O_RDONLY, CTX)
                await d.ops.fsync(fi.fh, False)
                await d.ops.release(fi.fh)
        saved.setdefault(path, []).append(data)
        n += 1
        await trio.sleep(0)


async def test_rm_rf_interleaved_with_writes_keeps_every_record_in_order(tmp_path):
    src = tmp_path / "src"
    (src / "w").mkdir(parents=True)
    order = make_tree(src)
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        with j.reader() as r:
            start = r.head_seq()
        turn = trio.Lock()  # one request at a time per task, and pauses see a still SRC
        moments = []

        async def pause():
            async with turn:
                await rec.drain()
                with j.reader() as r:
                    moments.append((r.head_seq(), snapshot(str(src))))

        stop = trio.Event()
        saved: dict = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(write, d, turn, stop, saved)
                done = await remove(d, order, turn, pause)
                stop.set()
            await pause()
        with j.reader() as r:
            log = [r.record(s) for s in range(start + 1, r.head_seq() + 1)]
            # rm -rf's records: each once, in the order its requests ran
            assert [(rc.op, rc.path) for rc in log if rc.path.startswith(b"t/") or rc.path == b"t"] == done
            # the writer's versions, in order, with their content
            for path, versions in saved.items():
                fid = r.file_id_at(path)
                got = [r.read_content(s) for s in sorted(r.versions_of(fid)) if r.record(s).is_content]
                assert got == versions, path
            # and the two really interleaved: writes landed between the first and the last unlink
            rm_seqs = [start + 1 + i for i, rc in enumerate(log) if rc.path.startswith(b"t/")]
            assert any(rc.path.startswith(b"w/") and rm_seqs[0] < start + 1 + i < rm_seqs[-1]
                       for i, rc in enumerate(log))
            for seq, snap in moments:  # restore: the tree at each pause is SRC as it was
                assert journal_tree(r, seq) == snap, seq
        # (namespace batches take the loop-thread path, or, when the writer's save
        # closed behind them, go with its deferred capture to its worker: either
        # keeps the order checked above; pipeline.Pipeline._take)
        assert rec.pipe.failures == 0


async def test_one_journal_read_per_unlink_and_the_base_hint_kept(tmp_path):
    """before_change reads the file's last version for the unlink; remember_base
    (the delta-base hint of a file re-created there) reuses it: one journal
    read per unlink, not two (issue 19)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(b"content %d\n" % i)
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        await rec.drain()
        with j.reader() as r:
            latest = {b"f%d" % i: r.file_state(r.file_id_at(b"f%d" % i)).content_seq for i in range(20)}
        reads = []
        inner = rec.content.latest_content

        def counting(path):
            reads.append(path)
            return inner(path)
        rec.content.latest_content = counting
        for i in range(20):
            await d.unlink(b"f%d" % i)
        assert len(reads) == 20, reads
        for path, seq in latest.items():  # the hint a file created there gets
            assert rec.content.base_hints[path][1] == seq
        assert rec.pipe.failures == 0

