"""A rename that succeeded in SRC is recorded as a rename even when the
daemon cannot open another descriptor right after it (issue 18, the risk
"gap + rescan makes content right but the file loses its history across
that rename").

ops.Operations, capture.Recorder and a real Journal without FUSE (as in
test_history_identity.py).  The fault is injected: every descriptor open
fails with EMFILE from the moment the rename(2) has happened, and the
destination directory's cached descriptor is closed then.  A real
shortage at exactly that instant cannot be caused on demand (lowering the
daemon's limit also fails the opens the rename itself needs first)."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

from deltafs.ops import ROOT

from tests.ops.inprocess import session

CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), umask=0o022, pid=os.getpid())


async def test_rename_recorded_when_no_descriptor_can_be_opened(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        d = (await ops.mkdir(ROOT, b"d", 0o755, CTX)).st_ino
        fi, _ = await ops.create(ROOT, b"a.txt", 0o644, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, b"A")
        await ops.release(fi.fh)
        await rec.drain()
        with j.reader() as r:
            fid = r.file_id_at(b"a.txt")
        assert fid

        dnode = ops.nodes[d]
        real_unhold = ops._unhold

        def unhold_then_short(held):  # right after rename(2) succeeded in SRC
            real_unhold(held)
            ops.fc.drop(dnode)

            def no_descriptor(*a, **k):
                raise OSError(errno.EMFILE, "Too many open files (injected)")

            monkeypatch.setattr(ops.fc, "reopen", no_descriptor)
            monkeypatch.setattr(os, "open", no_descriptor)

        monkeypatch.setattr(ops, "_unhold", unhold_then_short)
        await ops.rename(ROOT, b"a.txt", d, b"c.txt", 0, CTX)
        monkeypatch.undo()
        assert (src / "d" / "c.txt").read_bytes() == b"A"
        await rec.drain()
        assert rec.failures == 0 and not rec.needs_rescan  # recorded, no gap
        with j.reader() as r:
            assert r.file_id_at(b"d/c.txt") == fid  # the same file: its history follows it
            assert r.file_id_at(b"a.txt") is None
            ops_seen = [x.op for x in (r.record(q) for q in r.versions_of(fid))]
        assert "rename" in ops_seen
