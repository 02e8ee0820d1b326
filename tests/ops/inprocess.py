"""The no-kernel tier's mount: ops.Operations, the Recorder and a real
Journal over SRC, wired as mount.py wires them, with no FUSE in between."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import trio

from deltafs.capture import Recorder
from deltafs.journal import Journal
from deltafs.ops import ROOT, Operations


@asynccontextmanager
async def session(src):
    """SRC (already there) mounted in spirit: the scan records what is in it;
    -> (journal, recorder, ops).  Every capture is drained at the end, and
    every descriptor the session opened is closed."""
    jdir = src / ".deltafs"
    with Journal.open(str(jdir), create=True) as j:
        rec = Recorder(j, str(src))
        jst = os.stat(jdir)
        ops = Operations(str(src), hidden=(jst.st_dev, jst.st_ino), recorder=rec, fd_limit=1024)
        async with trio.open_nursery() as nursery:
            await nursery.start(rec.run)
            await rec.scan(ops, jst.st_ino)
            try:
                yield j, rec, ops
                await rec.drain()
            finally:
                nursery.cancel_scope.cancel()
        for h in list(ops.handles):
            os.close(h)
        for node in ops.nodes.values():
            if node.cached_fd >= 0 and node.ino != ROOT:
                os.close(node.cached_fd)
                node.cached_fd = -1
