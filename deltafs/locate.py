"""Find the journal a user's PATH belongs to, and PATH relative to SRC.

A PATH may be inside a running mount's MNT or SRC (the mount table and the
daemon's runtime record name its journal), inside a SRC that is not mounted
(the nearest ancestor holding ``.deltafs/data.mdb``), or, with ``--journal
DIR``, a path in the journal's tree (``a/b.txt``; a leading ``/`` is
ignored; an absolute path inside a mount or SRC of that journal also works).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from deltafs import mounttable
from deltafs.errors import UsageError
from deltafs.mounttable import MountEntry

JOURNAL_NAME = ".deltafs"


@dataclass(frozen=True)
class Location:
    journal: str  # journal directory
    rel: bytes  # path relative to SRC, b"" = the root
    mount: MountEntry | None  # the running mount of this journal, if any
    src: str | None  # SRC root when known (None: a bare --journal)

    @property
    def mnt(self) -> str | None:
        return self.mount.mnt if self.mount else None


def _abspath(path: str) -> str:
    """Absolute, with the parent's symlinks resolved, but not the last
    component (a symlink or a deleted file is named as given)."""
    p = os.path.abspath(path)
    if p == "/":
        return p
    head, tail = os.path.split(p)
    return os.path.join(os.path.realpath(head), tail)


def _inside(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip("/") + "/")


def _rel(p: str, root: str) -> bytes:
    r = os.path.relpath(p, root)
    return b"" if r == "." else os.fsencode(r)


def mount_journal(e: MountEntry) -> str:
    rec = mounttable.read_record(e.mnt)
    # a record left by an earlier mount at the same MNT names another SRC: not this mount's
    if rec and rec.get("journal") and rec.get("src") == e.src:
        return rec["journal"]
    return os.path.join(e.src, JOURNAL_NAME)


def _check_rel(rel: bytes, src: str | None, journal: str) -> bytes:
    if src is not None and os.path.join(src, JOURNAL_NAME) == journal:
        if rel == JOURNAL_NAME.encode() or rel.startswith(JOURNAL_NAME.encode() + b"/"):
            raise UsageError(f"{os.fsdecode(rel)} is inside the journal, which has no history of its own")
    return rel


def locate(path: str | None, journal: str | None = None) -> Location:
    """Resolve PATH (None: the current directory) to its journal and relative path."""
    if journal is not None:
        jdir = os.path.abspath(journal)
        if not os.path.exists(os.path.join(jdir, "data.mdb")):
            raise UsageError(f"no deltafs journal at {journal}")
        mount = next((e for e in mounttable.deltafs_mounts()
                      if os.path.abspath(mount_journal(e)) == jdir), None)
        src = mount.src if mount else (os.path.dirname(jdir) if os.path.basename(jdir) == JOURNAL_NAME else None)
        if path is None:
            return Location(jdir, b"", mount, src)
        if os.path.isabs(path):
            ap = _abspath(path)
            for root in ([mount.mnt, mount.src] if mount else []) + ([src] if src else []):
                if _inside(ap, root):
                    return Location(jdir, _check_rel(_rel(ap, root), src, jdir), mount, src)
        rel = os.path.normpath("/" + path).lstrip("/")
        return Location(jdir, _check_rel(os.fsencode(rel), src, jdir), mount, src)

    ap = _abspath(path if path is not None else os.getcwd())
    e = mounttable.find_mount_for(ap)
    if e is not None:
        root = max((r for r in (e.mnt, e.src) if _inside(ap, r)), key=len)
        jdir = mount_journal(e)
        return Location(jdir, _check_rel(_rel(ap, root), e.src, jdir), e, e.src)
    d = ap
    while True:
        if os.path.exists(os.path.join(d, JOURNAL_NAME, "data.mdb")):
            jdir = os.path.join(d, JOURNAL_NAME)
            return Location(jdir, _check_rel(_rel(ap, d), d, jdir), None, d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    raise UsageError(f"{path if path is not None else os.getcwd()} is not inside a deltafs mount or "
                     "a directory with a journal (give --journal DIR)")
