"""Issue 19: an unlink of a file captured through the mount reads nothing from the journal.

ops.Operations, capture.Recorder and a real Journal without FUSE (the
Driver of test_history_identity).  A file saved through the mount knows
its last committed version (``NodeCapture.base``); unlinking it (rm -rf)
needs that version twice: to know a version of its content is recorded
(the pre-image check) and as the delta base hint of a file created at its
path soon after (``ContentCapture.remember_base``).  Both come from the
node, so no unlink opens a journal read transaction; a file the mount has
not captured (only scanned) still asks the journal, once.  The hint is the
same version either way, and a file created at the path after the unlink
takes it.
"""

from __future__ import annotations

import os

from tests.ops.inprocess import session
from tests.ops.test_history_identity import CTX, Driver

FILES = 12


async def _session(tmp_path, body) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"there before the mount\n")
    async with session(src) as (j, rec, ops):
        await body(j, rec, ops, Driver(ops))


def _count_reads(rec, monkeypatch) -> list:
    calls: list = []
    real = rec.content.latest_content

    def counted(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(rec.content, "latest_content", counted)
    return calls


async def test_unlink_of_a_captured_file_reads_no_journal(tmp_path, monkeypatch):
    async def body(j, rec, ops, d):
        names = [b"f%02d" % i for i in range(FILES)]
        for n in names:
            await d.save(n, b"content of %s\n" % n * 50)
        await rec.drain()
        with j.reader() as r:
            versions = {n: r.file_state(r.file_id_at(n)).content_seq for n in names}
        assert all(versions.values())
        for n in names:  # what the kernel keeps between the save and the rm
            ino = await d.ino(n)
            assert ops.nodes[ino].cap.base == versions[n]
        calls = _count_reads(rec, monkeypatch)
        for n in names:
            await d.unlink(n)
        assert calls == []  # the rm -rf of issue 19: one journal read per unlink before
        # each unlinked file's last version is its path's delta base hint, as a read would give
        assert {n: rec.content.base_hints[n][1] for n in names} == versions
        await rec.drain()
        with j.reader() as r:
            assert all(r.file_id_at(n) is None for n in names)
        # a file created at the path soon after takes the hint for its first capture
        await d.save(names[0], b"new content\n")
        ino = await d.ino(names[0])
        assert names[0] not in rec.content.base_hints
        assert rec.content.ino_hints.get(ino, 0) in (0, versions[names[0]])  # taken, or about to be
    await _session(tmp_path, body)


async def test_unlink_of_a_scanned_file_still_reads_the_journal_once(tmp_path, monkeypatch):
    async def body(j, rec, ops, d):
        with j.reader() as r:
            version = r.file_state(r.file_id_at(b"old")).content_seq
        assert version
        await d.ino(b"old")  # looked up: the node has no capture state of its own
        calls = _count_reads(rec, monkeypatch)
        await d.unlink(b"old")
        assert calls == [b"old"]
        assert rec.content.base_hints[b"old"][1] == version
    await _session(tmp_path, body)


async def test_unlink_while_its_capture_is_queued_waits_for_nothing(tmp_path, monkeypatch):
    """A capture still in flight: the node's base is not the latest version yet,
    so the hint comes from the journal (the unlink does not wait for the capture)."""
    async def body(j, rec, ops, d):
        await d.save(b"g", b"first\n")
        await rec.drain()
        ino = await d.ino(b"g")
        first = ops.nodes[ino].cap.base
        assert first
        await d.save(b"g", b"second\n")  # queued at release; not drained
        calls = _count_reads(rec, monkeypatch)
        await d.unlink(b"g")
        cap = ops.nodes[ino].cap if ino in ops.nodes else None
        if cap is None or cap.last_item is None or cap.last_item.done.is_set():
            return  # committed before the unlink looked: nothing in flight to test
        assert calls == [b"g"]
    await _session(tmp_path, body)


async def test_unlink_of_a_file_with_no_content_captured_through_it_asks_the_journal(tmp_path, monkeypatch):
    """Created and closed empty: its node's base is 0 ("nothing yet"), which a
    capture by path may have overtaken; the journal answers, as before."""
    async def body(j, rec, ops, d):
        p = (await d.parent(b"e"))[0]
        fi, e = await ops.create(p, b"e", 0o644, os.O_WRONLY, CTX)
        await ops.release(fi.fh)
        await rec.drain()
        assert ops.nodes[e.st_ino].cap.base == 0
        calls = _count_reads(rec, monkeypatch)
        await d.unlink(b"e")
        assert calls == [b"e"]
    await _session(tmp_path, body)
