"""Capture's state of one inode: what was written since its last capture,
whether a capture of it is in flight, and which journal version its dirty
ranges apply to.

ops keeps one attribute per node for it (``Node.cap``) and knows it only
through the ``ops.CaptureState`` protocol.  A node nobody opened for
writing holds ops' read-only placeholder (nothing dirty, nothing pending):
the Recorder gives a node its own :class:`NodeCapture` when it may change
(``Recorder.track``: an open for writing, a truncate, a capture), so a
million looked-up inodes cost one pointer each, and the FUSE hot path
(write) does one attribute read and a list update, nothing else.
"""

from __future__ import annotations

import trio

EOF_RANGE_END = 1 << 62  # "to the end of the file, whatever its size"
MAX_RANGES = 4096  # dirty ranges kept per inode before they are coarsened


class _NoRanges(tuple):
    """The dirty ranges of a node not written since its last capture: shared and empty."""

    __slots__ = ()


NO_RANGES = _NoRanges()


class NodeCapture:
    """One inode's capture state (owned by capture/, held by ``ops.Node.cap``).

    ``dirty``: [start, end) ranges written since the last capture (FUSE write,
    fallocate, truncate); ``size_changed``: truncated or extended since then;
    ``pending``: set while a capture of the inode is being computed (a change
    to the file waits for it: ``wait``); ``base``: the journal version the
    dirty ranges apply to (None: capture the whole file); ``last_item``: the
    inode's latest queued capture (the next one takes its base from it);
    ``stale``: its last capture failed or was skipped while capture was
    paused, so SRC may hold bytes no journal version has (the journal's
    latest version is no base for new ranges).
    """

    __slots__ = ("dirty", "pending", "size_changed", "base", "last_item", "hurry", "stale")

    def __init__(self) -> None:
        self.dirty: list[list[int]] | _NoRanges = NO_RANGES
        self.pending: trio.Event | None = None
        self.size_changed = False
        self.base: int | None = None
        self.last_item = None
        self.stale = False
        # set while the pending capture waits for its commit's worker (Pipeline.defer):
        # a context manager that, while a change waits, ends the group window
        self.hurry = None

    @property
    def changed(self) -> bool:
        """Something was written, truncated or extended since the last capture."""
        return bool(self.dirty) or self.size_changed

    async def wait(self) -> None:
        """Return once no capture of the inode is in flight (a change waits for it)."""
        while self.pending is not None:
            if self.hurry is not None:
                with self.hurry():
                    await self.pending.wait()
            else:
                await self.pending.wait()

    def mark(self, start: int, end: int) -> None:
        """Bytes [start, end) were written (the FUSE write path: no syscall, no hashing)."""
        d = self.dirty
        if not d:
            self.dirty = [[start, end]]
            return
        last = d[-1]
        if last[0] <= start <= last[1]:
            if end > last[1]:
                last[1] = end
            return
        d.append([start, end])
        if len(d) > MAX_RANGES:  # random writes: keep memory bounded, coarsen
            self.dirty = coalesce(d, gap=64 << 10)

    def resized(self, before: int, after: int) -> None:
        """The size went from ``before`` to ``after`` (truncate, fallocate growing it)."""
        self.size_changed = True
        if after < before:  # bytes from here on are gone: dirty to EOF
            self.mark(after, EOF_RANGE_END)
        elif after > before:  # the new bytes are zeros
            self.mark(before, after)

    def truncated(self) -> None:
        """Opened with O_TRUNC: everything is new."""
        self.resized(EOF_RANGE_END, 0)

    def take(self) -> list[tuple[int, int]]:
        """The dirty ranges, handed to a capture: the node starts clean again."""
        ranges = [(s, e) for s, e in self.dirty]
        self.dirty = NO_RANGES
        self.size_changed = False
        return ranges


def coalesce(ranges: list[list[int]], gap: int) -> list[list[int]]:
    """Sort ranges and merge those less than ``gap`` bytes apart (a superset: still correct)."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    if len(out) > MAX_RANGES:
        return coalesce(out, gap * 4)
    return out
