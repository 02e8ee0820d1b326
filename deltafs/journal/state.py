"""The current-tree indexes (``paths``, ``files``) and how records change them.

One function, :func:`apply_record`, decides what every op does to the
tree.  The writer runs it against LMDB inside the commit transaction and
``Reader.tree_at`` runs it against plain dicts while replaying records, so
the live index and a replayed past tree can never disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import msgpack

from .records import RENAME_EXCHANGE, Record

log = logging.getLogger(__name__)

KIND_FILE = "f"
KIND_DIR = "d"
KIND_SYMLINK = "l"
KIND_SPECIAL = "n"
_CREATE_KIND = {"create": KIND_FILE, "mkdir": KIND_DIR, "symlink": KIND_SYMLINK, "mknod": KIND_SPECIAL}


@dataclass(slots=True)
class FileState:
    """``files`` db value: a file id's current state (also after deletion)."""

    path: bytes
    kind: str = KIND_FILE
    links: list[bytes] = field(default_factory=list)  # every path naming it (hard links)
    content_seq: int = 0  # latest content version (0: none yet)
    size: int = 0
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    rdev: int | None = None
    target: bytes | None = None  # symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    deleted: bool = False
    last_seq: int = 0  # latest record touching this file

    def pack(self) -> bytes:
        """msgpack array (docs/format.md, "files"; format 13): ``[k, n, c, s,
        m, u, g, t, h, p, rd, tg, x, d]``, ``h`` nil when it equals ``c``,
        ``p`` nil when it is the first link, and the trailing items left out
        from the last one that is not at its default (nil, nil, nil, nil,
        {}, false).  Formats 10-12 wrote a map of the same fields, which
        :meth:`unpack` still reads: the keys took 2 bytes a field."""
        tail = [None if self.links and self.links[0] == self.path else self.path, self.rdev, self.target,
                self.xattrs or None, True if self.deleted else None]
        while tail and tail[-1] is None:
            tail.pop()
        h = None if self.last_seq == self.content_seq else self.last_seq
        if h is None and not tail:
            return msgpack.packb([self.kind, self.links, self.content_seq, self.size, self.mode, self.uid,
                                  self.gid, self.mtime_ns], use_bin_type=True)
        return msgpack.packb([self.kind, self.links, self.content_seq, self.size, self.mode, self.uid, self.gid,
                              self.mtime_ns, h, *tail], use_bin_type=True)

    @classmethod
    def unpack(cls, b: bytes) -> "FileState":
        d = msgpack.unpackb(b, raw=False, strict_map_key=False)
        if isinstance(d, list):  # format 13
            if not 8 <= len(d) <= 14:
                raise ValueError(f"files value of {len(d)} items")
            kind, links, c, size, mode, uid, gid, mtime, h, p, rd, tg, x, dl = d + [None] * (14 - len(d))
            links = list(links)
            return cls(path=p if p is not None else links[0], kind=kind, links=links, content_seq=c, size=size,
                       mode=mode, uid=uid, gid=gid, mtime_ns=mtime, rdev=rd, target=tg, xattrs=dict(x or {}),
                       deleted=bool(dl), last_seq=c if h is None else h)
        links = list(d["n"])
        return cls(
            path=d["p"] if "p" in d else links[0], kind=d["k"], links=links, content_seq=d["c"], size=d["s"],
            mode=d["m"], uid=d["u"], gid=d["g"], mtime_ns=d["t"], rdev=d.get("rd"),
            target=d.get("tg"), xattrs=dict(d.get("x") or {}), deleted=d.get("d", False), last_seq=d["h"],
        )

    def copy(self) -> "FileState":
        return FileState.unpack(self.pack())


@dataclass(slots=True)
class TreeEntry:
    """One path of a tree (``Reader.tree_at``).  Treat it as immutable
    (``dataclasses.replace`` for a changed copy); not frozen only because a
    frozen dataclass takes 4x longer to build, and a tree builds one per path."""

    path: bytes
    kind: str
    file_id: int
    content_seq: int
    size: int
    mode: int | None
    uid: int | None
    gid: int | None
    mtime_ns: int | None
    rdev: int | None
    target: bytes | None
    xattrs: dict
    link_group: int | None  # the file id when it has several paths (hard links)


def tree_entry(path: bytes, file_id: int, st: FileState) -> TreeEntry:
    return TreeEntry(
        path, st.kind, file_id, st.content_seq, st.size, st.mode, st.uid, st.gid,
        st.mtime_ns, st.rdev, st.target, dict(st.xattrs), file_id if len(st.links) > 1 else None,
    )


class Store(Protocol):
    def get_path(self, path: bytes) -> tuple[int, str] | None: ...
    def put_path(self, path: bytes, file_id: int, kind: str) -> None: ...
    def del_path(self, path: bytes) -> None: ...
    def paths_under(self, dir_path: bytes) -> list[bytes]: ...
    def get_file(self, file_id: int) -> FileState | None: ...
    def put_file(self, file_id: int, st: FileState) -> None: ...


def children_prefix(dir_path: bytes) -> bytes:
    return dir_path + b"/" if dir_path else b""


SCANS_BEFORE_COUNTS = 8  # MemStore.paths_under: scans of every path before it counts per directory


def _dirs_above(path: bytes):
    """Every directory ``path`` lies under (b"": the root), the root first."""
    if path:
        yield b""
    i = path.find(b"/")
    while i >= 0:
        yield path[:i]
        i = path.find(b"/", i + 1)


class MemStore:
    """Dict-backed Store for replaying records (tree_at).

    ``paths_under`` of a directory with nothing under it (every rmdir: rm -rf
    removes the entries first) answers from a count of the paths under each
    directory instead of a scan of every path: a replay of rm -rf's records
    was O(directories x paths) (issue 19: the tree checkpoint of a 4,000-file
    tree's rm -rf).  The counts are built once SCANS_BEFORE_COUNTS calls
    have scanned (building them costs about that many scans: a replay with
    one rmdir keeps its one scan) and kept by put_path/del_path from then
    on; ``paths`` replaced or resized any other way is noticed and counted
    again."""

    def __init__(self) -> None:
        self.paths: dict[bytes, tuple[int, str]] = {}
        self.files: dict[int, FileState] = {}
        self._under: dict[bytes, int] | None = None  # directory -> paths under it (None: not built)
        self._under_of: tuple[int, int] = (0, 0)  # (id, len) of the paths dict it counts
        self._scans = 0  # paths_under answered by a scan before the counts were built

    def get_path(self, path):
        return self.paths.get(path)

    def put_path(self, path, file_id, kind):
        new = path not in self.paths
        self.paths[path] = (file_id, kind)
        if new and self._under is not None:
            self._count(path, 1)

    def del_path(self, path):
        if self.paths.pop(path, None) is not None and self._under is not None:
            self._count(path, -1)

    def _count(self, path: bytes, n: int) -> None:
        """``path`` was added (n=1) to or removed (n=-1) from ``paths`` just now."""
        now = (id(self.paths), len(self.paths))
        if self._under_of != (now[0], now[1] - n):  # changed behind our back: count again when asked
            self._under = None
            return
        under = self._under
        for d in _dirs_above(path):
            under[d] = under.get(d, 0) + n
        self._under_of = now

    def _counts(self) -> dict[bytes, int]:
        if self._under is None or self._under_of != (id(self.paths), len(self.paths)):
            under: dict[bytes, int] = {}
            for p in self.paths:
                for d in _dirs_above(p):
                    under[d] = under.get(d, 0) + 1
            self._under, self._under_of = under, (id(self.paths), len(self.paths))
        return self._under

    def paths_under(self, dir_path):
        if self._under is not None or self._scans >= SCANS_BEFORE_COUNTS:
            if not self._counts().get(dir_path):
                return []
        else:
            self._scans += 1
        pre = children_prefix(dir_path)
        return sorted(p for p in self.paths if p.startswith(pre) and p != dir_path)

    def get_file(self, file_id):
        st = self.files.get(file_id)
        return st.copy() if st is not None else None

    def put_file(self, file_id, st):
        self.files[file_id] = st


def _set_attrs(st: FileState, rec: Record) -> None:
    for a in ("mode", "uid", "gid", "mtime_ns", "rdev"):
        v = getattr(rec, a)
        if v is not None:
            setattr(st, a, v)


def _drop_link(store: Store, path: bytes, seq: int) -> None:
    e = store.get_path(path)
    if e is None:
        return
    fid, kind = e
    if kind == KIND_DIR:
        for p in store.paths_under(path):  # should be empty; keep the index sane
            _drop_link(store, p, seq)
    store.del_path(path)
    st = store.get_file(fid)
    if st is None:
        return
    if path in st.links:
        st.links.remove(path)
    if not st.links:
        st.deleted = True
    elif st.path == path:
        st.path = st.links[0]
    st.last_seq = seq
    store.put_file(fid, st)


def _subtree(store: Store, path: bytes) -> list[tuple[bytes, int, str]]:
    e = store.get_path(path)
    if e is None:
        return []
    out = [(path, e[0], e[1])]
    if e[1] == KIND_DIR:
        for p in store.paths_under(path):
            c = store.get_path(p)
            if c is not None:
                out.append((p, c[0], c[1]))
    return out


def _move(store: Store, entries, src: bytes, dst: bytes, seq: int) -> None:
    for p, fid, kind in entries:
        newp = dst + p[len(src):]
        store.put_path(newp, fid, kind)
        st = store.get_file(fid)
        if st is None:
            continue
        st.links = [newp if x == p else x for x in st.links]
        if st.path == p:
            st.path = newp
        st.last_seq = seq
        store.put_file(fid, st)


def _ensure_file(store: Store, rec: Record, kind: str) -> FileState:
    st = store.get_file(rec.file_id)
    if st is None or st.deleted and rec.op != "write":
        st = FileState(path=rec.path, kind=kind, links=[rec.path])
        if store.get_path(rec.path) is None:
            store.put_path(rec.path, rec.file_id, kind)
    return st


def apply_record(store: Store, rec: Record) -> None:
    """Change the current tree as ``rec`` says (no validation: the capture
    layer saw the real filesystem accept the operation)."""
    op, seq = rec.op, rec.seq
    if op in _CREATE_KIND:
        kind = _CREATE_KIND[op]
        old = store.get_path(rec.path)
        if old is not None and old[0] != rec.file_id:
            _drop_link(store, rec.path, seq)
        st = FileState(path=rec.path, kind=kind, links=[rec.path], target=rec.target)
        if kind == KIND_SYMLINK and rec.target is not None:
            st.size = len(rec.target)
        _set_attrs(st, rec)
        st.last_seq = seq
        store.put_path(rec.path, rec.file_id, kind)
        store.put_file(rec.file_id, st)
    elif op == "link":
        e = store.get_path(rec.path)
        fid = e[0] if e else rec.file_id
        st = store.get_file(fid) or FileState(path=rec.path, links=[rec.path])
        if store.get_path(rec.path2) is not None:
            _drop_link(store, rec.path2, seq)
        st.links.append(rec.path2)
        st.deleted = False
        st.last_seq = seq
        store.put_path(rec.path2, fid, st.kind)
        store.put_file(fid, st)
    elif op in ("unlink", "rmdir"):
        _drop_link(store, rec.path, seq)
    elif op == "rename":
        src, dst = rec.path, rec.path2
        if src == dst:
            return
        moving = _subtree(store, src)
        if rec.flags and rec.flags & RENAME_EXCHANGE:
            other = _subtree(store, dst)
            for p, _, _ in moving + other:
                store.del_path(p)
            _move(store, moving, src, dst, seq)
            _move(store, other, dst, src, seq)
        else:
            if store.get_path(dst) is not None:
                _drop_link(store, dst, seq)
            for p, _, _ in moving:
                store.del_path(p)
            _move(store, moving, src, dst, seq)
    elif op in ("setattr", "setxattr", "removexattr", "write"):
        kind = KIND_DIR if rec.path == b"" and op != "write" else KIND_FILE
        st = _ensure_file(store, rec, kind)
        _set_attrs(st, rec)
        if op == "setattr" and rec.size is not None:
            st.size = rec.size
        elif op == "setxattr":
            st.xattrs[rec.xattr_name] = rec.xattr_value or b""
        elif op == "removexattr":
            st.xattrs.pop(rec.xattr_name, None)
        elif op == "write":
            st.content_seq = seq
            st.size = rec.size or 0
        st.last_seq = seq
        store.put_file(rec.file_id, st)
    else:
        raise ValueError(f"unknown op {op!r} in record {seq}")
