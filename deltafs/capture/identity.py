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

import secrets
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


def new_file_id() -> int:
    """A random 63-bit file id (never 0: 0 asks the journal's writer to resolve one)."""
    return secrets.randbits(63) or 1


def restored_file_id(old_id: int | None, old_alive: bool, used: set[int]) -> int:
    """The file id of a file a journaled restore writes at a path that has no
    file of its kind (a restore names its ids; the writer resolves none).

    The file takes back the identity it had (``old_id``, the restored
    version's file: its history continues) unless that file is still alive
    under another name (``old_alive``) or this restore already gave that
    identity to another path (in ``used``): an identity never passes to a
    second living file (docs/design.md, "File identity").  Else, or with no
    ``old_id`` (content found in SRC that the journal never saw), a new one.
    The id given is added to ``used``."""
    fid = old_id
    if not fid or old_alive or fid in used:
        fid = new_file_id()
    used.add(fid)
    return fid
