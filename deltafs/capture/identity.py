"""File identity on the capture side: which paths just lost their file.

docs/design.md, "File identity": a file created (or written by an atomic
save) at a path that names nothing continues the identity of the file that
last had that path only if that file is gone and went at most
REUSE_SECONDS ago.  The journal decides the file id at commit time
(``Journal`` resolves it by path); the capture side keeps the paths that
lost their file recently, because a *rename* onto such a path is the
next version of the gone file (write-new-then-delete-old), which only the
capture sees (:mod:`deltafs.capture.saves`).
"""

from __future__ import annotations

import time

REUSE_SECONDS = 120  # as the journal's REUSE_WINDOW_NS
GONE_KEPT = 100_000  # paths remembered for REUSE_SECONDS after they lost their file


class GonePaths:
    """Regular files just deleted or renamed away, by path: a file renamed
    onto one of these paths is the next version of it (write-new-then-delete-old)."""

    def __init__(self) -> None:
        self.paths: dict[bytes, float] = {}  # path -> time.monotonic() it lost its file, oldest first

    def gone(self, path: bytes) -> None:
        """Remember a path that lost its file (a dict in time order: the oldest go first)."""
        now = time.monotonic()
        gone = self.paths
        gone.pop(path, None)
        gone[path] = now
        oldest = next(iter(gone))  # one expiry per call keeps pace with one insertion
        if now - gone[oldest] >= REUSE_SECONDS or len(gone) > GONE_KEPT:
            del gone[oldest]

    def was_gone(self, path: bytes) -> bool:
        t = self.paths.pop(path, None)
        return t is not None and time.monotonic() - t < REUSE_SECONDS

    def back(self, path: bytes) -> None:
        """``path`` has a file again: a rename onto it is no longer a save."""
        self.paths.pop(path, None)
