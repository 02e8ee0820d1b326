"""The history view inside a live mount: ``MNT/.deltafs-history/`` (``--history-dir``).

::

    .deltafs-history/
      at/<WHEN>/           the tree at any moment the CLI accepts (ISO time, v1234,
                           "10 minutes ago", a snapshot name); resolved at lookup,
                           cached by the kernel for at most a second
      snapshots/<name>/    the tree of each named snapshot
      versions/<path>/     one current file's versions: read-only files named
                           <ISO time UTC>_v<id>, so name order is oldest first
      deleted/<path>/      the same for paths whose files no longer exist

The past trees are pastfs's (``load_tree``, ``entry_attributes``,
``FileStream``): the same code serves ``deltafs mount --at``.  Everything
here is read-only (EROFS), never journaled (no request reaches the
recorder), and not listed by the root's readdir (SRC holds no such entry;
the mount refuses to start if it does).

Inodes: the live mount's numbers are SRC's ``st_ino``; the view's are
``ops.VIEW_INODES`` and up (``VIEW_INODES | slot << 32 | n``): slot 0 is
the view's own directories and version files, each other slot one loaded
past tree (its nodes numbered as pastfs numbers them).  A slot is reused
only after the kernel forgot every inode of it.

Permissions: the mount's owner and root see everything.  Another user
(only with ``-o allow_other``) sees a past entry only if they may read
that path now (SRC: search on every directory above it, read on it) and
could read it at that moment (the recorded modes and owners of the same
path then); ``deleted/`` is the owner's alone.  The kernel checks the
modes the view reports (``default_permissions``); lookup, open, readlink
and the xattr calls check the rest per caller.

LMDB work (resolving WHEN, building a tree, chunk lists, chunk reads that
miss the cache) runs in worker threads, never in the FUSE loop.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import pyfuse3
import trio
from pyfuse3 import FUSEError

from deltafs.errors import DeltafsError, UsageError
from deltafs.journal import KIND_DIR, KIND_FILE, KIND_SYMLINK, MemStore, apply_record
from deltafs.maintenance import held_versions
from deltafs.ops import PASS_MASK, PASS_MAX, PASS_SHIFT, ROOT, VIEW_INODES, Operations
from deltafs.pastfs import DEFAULT_CACHE, ChunkCache, FileStream, entry_attributes, load_tree

log = logging.getLogger(__name__)

DEFAULT_NAME = ".deltafs-history"
SLOT_SHIFT = 32
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
MAX_SLOTS = 255  # slots 1..255: VIEW_INODES leaves 2**40 numbers
TREES_KEPT = 4  # past trees kept loaded with no inode of them known to the kernel
SHORT = 1.0  # seconds: names resolved at lookup (at/), listings that change
LONG = 3600.0  # a past tree never changes
LISTINGS_KEPT = 64

# slot 0's fixed nodes
_ROOT, _AT, _SNAPS, _VERSIONS, _DELETED = 1, 2, 3, 4, 5
_FIRST_DYNAMIC = 16
_TOP = {b"at": _AT, b"snapshots": _SNAPS, b"versions": _VERSIONS, b"deleted": _DELETED}


def check_free(src: str, name: str) -> None:
    """The mount refuses a SRC that already holds an entry named like the view."""
    if os.path.lexists(os.path.join(src, name)):
        raise UsageError(f"SRC {src} already holds an entry named {name}: the history view needs that "
                         f"name; choose another with --history-dir NAME (or --no-history-dir)")


def version_name(time_ns: int, seq: int) -> bytes:
    """``2026-12-05T08:43:42.123Z_v1234``: UTC, so name order is time order."""
    secs, rem = divmod(time_ns, 10**9)
    t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{t}.{rem // 10**6:03d}Z_v{seq}".encode()


def parse_version_name(name: bytes) -> int | None:
    _, sep, v = name.rpartition(b"_v")
    return int(v) if sep and v.isdigit() else None


@dataclass(frozen=True)
class VersionInfo:
    """One content version of a path, with the file's metadata right after it."""

    seq: int
    time_ns: int
    size: int
    mode: int | None
    uid: int | None
    gid: int | None
    mtime_ns: int | None
    xattrs: dict = field(default_factory=dict)

    @property
    def name(self) -> bytes:
        return version_name(self.time_ns, self.seq)


def path_versions(r, rel: bytes) -> list[VersionInfo]:
    """The retained content versions recorded at path ``rel`` (what ``deltafs log
    PATH`` lists), oldest first, each with the metadata its file had then."""
    recs = []
    for s in sorted(r.versions_under(rel)):
        rec = r.record(s)
        if rec.is_content and rec.path == rel and not r.is_pruned(s):
            recs.append(rec)
    out = []
    for fid in {rec.file_id for rec in recs}:
        wanted = {rec.seq: rec for rec in recs if rec.file_id == fid}
        store = MemStore()
        for s in reversed(r.versions_of(fid)):  # the file's own records, oldest first
            if s > max(wanted):
                break
            apply_record(store, r.record(s))
            rec = wanted.get(s)
            st = store.get_file(fid)
            if rec is not None and st is not None:
                out.append(VersionInfo(s, rec.time_ns, rec.size or 0, st.mode, st.uid, st.gid,
                                       st.mtime_ns or rec.time_ns, dict(st.xattrs)))
    out.sort(key=lambda v: v.seq)
    return out


def _grants(mode: int, uid: int, gid: int, who: tuple[int, frozenset], bits: int) -> bool:
    """Would ``mode``/``uid``/``gid`` give ``bits`` (4 r, 2 w, 1 x) to caller ``who``?"""
    cuid, cgids = who
    if cuid == uid:
        shift = 6
    elif gid in cgids:
        shift = 3
    else:
        shift = 0
    return (mode >> shift) & bits == bits


def _caller(ctx) -> tuple[int, frozenset]:
    """(uid, groups) of the process behind a request (its supplementary groups from /proc)."""
    gids = {ctx.gid}
    try:
        with open(f"/proc/{ctx.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    gids.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return ctx.uid, frozenset(gids)


def _answer(fn):
    """A request of the view: OSError -> its errno, anything unexpected -> logged, EIO
    (pyfuse3 catches only FUSEError: anything else would end the live mount's loop)."""
    import functools

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("history view: internal error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


class _Dyn:
    """A node of slot 0: the view's own directories, version listings, version files."""

    __slots__ = ("ino", "kind", "path", "info", "lookups", "key", "stamp")

    def __init__(self, ino: int, kind: str, path: bytes, info=None, key=None) -> None:
        self.ino, self.kind, self.path, self.info, self.key = ino, kind, path, info, key
        self.lookups = 0
        self.stamp: int | None = None  # mtime of a listing that changes (see _stamp)


def _stamp(base_ns: int, names) -> int:
    """An mtime for a generated listing: ``base_ns`` to the millisecond, a
    fingerprint of the names below it.  The kernel keeps a directory's listing
    until its mtime changes, so a listing that lost or gained a name must show
    another mtime; journal times have millisecond precision, so the shown time
    stays the base time."""
    return base_ns // 10**6 * 10**6 + zlib.crc32(b"\0".join(names)) % 10**6


class _Slot:
    """The inode numbers of one past tree under one name (``key``: its proxy's)."""

    __slots__ = ("n", "key", "tree", "lookups")

    def __init__(self, n: int, key: tuple, tree) -> None:
        self.n, self.key, self.tree = n, key, tree
        self.lookups = 0


class HistoryView:
    """The view's inode space and requests (HistoryOperations routes them here)."""

    def __init__(self, journal, src: str, name: bytes, *, owner: tuple[int, int] | None = None,
                 cache_size: int = DEFAULT_CACHE, dir_handle_is_inode: bool = False,
                 shared: bool = False) -> None:
        self.journal = journal
        # shared (-o allow_other): no entry is cached by the kernel, so every path walk
        # by every user comes through lookup and its checks (a dentry cached for the
        # owner would let another user skip them)
        self.shared = shared
        self.src = src
        self.name = name
        self.uid, self.gid = owner if owner is not None else (os.getuid(), os.getgid())
        self.cache = ChunkCache(cache_size)
        self.dir_handle_is_inode = dir_handle_is_inode
        self.started_ns = time.time_ns()
        self.limiter = trio.CapacityLimiter(1)  # LMDB and decoding: one thread at a time
        self.dyn: dict[int, _Dyn] = {}
        self.dyn_by_key: dict[tuple, int] = {}
        self._next_local = _FIRST_DYNAMIC
        for ino, kind in ((_ROOT, "root"), (_AT, "at"), (_SNAPS, "snaps"), (_VERSIONS, "vdir"),
                          (_DELETED, "ddir")):
            self.dyn[ino] = _Dyn(ino, kind, b"")
            self.dyn[ino].lookups = 1 << 62  # never forgotten
        self.slots: dict[int, _Slot] = {}
        self.slot_of_key: dict[tuple, int] = {}
        self.trees: OrderedDict[int, object] = OrderedDict()  # seq -> PastTree, recently used
        self.idle: OrderedDict[int, None] = OrderedDict()  # loaded slots the kernel holds nothing of
        self.files: dict[int, FileStream] = {}
        self._next_fh = VIEW_INODES
        # pass -> (directory inode, snapshot), or (inode, None, its length) once at its end (readdir)
        self._listings: OrderedDict[int, tuple] = OrderedDict()
        self._pass = 0  # the last readdir pass number handed out
        self._content_paths: dict[bytes, set[int]] = {}  # deleted/: every path that held a version
        self.held = held_versions(journal)  # versions open here: compaction keeps them
        self._scanned = 0

    # ---- numbers -------------------------------------------------------------

    @staticmethod
    def split(ino: int) -> tuple[int, int]:
        return (ino - VIEW_INODES) >> SLOT_SHIFT, ino & LOCAL_MASK

    def _tree_ino(self, slot: _Slot, local: int) -> int:
        return VIEW_INODES | slot.n << SLOT_SHIFT | local

    def _dyn_node(self, kind: str, path: bytes, info=None, key=None) -> _Dyn:
        key = key or (kind, path)
        ino = self.dyn_by_key.get(key)
        if ino is not None:
            d = self.dyn[ino]
            if info is not None:
                d.info = info
            return d
        ino = self._next_local
        self._next_local += 1
        d = self.dyn[ino] = _Dyn(ino, kind, path, info, key)
        self.dyn_by_key[key] = ino
        return d

    def _get(self, ino: int):
        """-> (_Dyn, None, None) or (None, _Slot, pastfs node); ESTALE if unknown."""
        slot_n, local = self.split(ino)
        if slot_n == 0:
            d = self.dyn.get(local)
            if d is not None:
                return d, None, None
        else:
            slot = self.slots.get(slot_n)
            if slot is not None:
                n = slot.tree.nodes.get(local)
                if n is not None:
                    return None, slot, n
        raise FUSEError(errno.ESTALE)

    def forget(self, ino: int, n: int) -> None:
        slot_n, local = self.split(ino)
        if slot_n == 0:
            d = self.dyn.get(local)
            if d is not None and local >= _FIRST_DYNAMIC:
                d.lookups -= n
                if d.lookups <= 0:
                    del self.dyn[local]
                    self.dyn_by_key.pop(d.key, None)
            return
        slot = self.slots.get(slot_n)
        if slot is not None:
            slot.lookups -= n
            if slot.lookups <= 0:
                self._idle(slot)

    def _idle(self, slot: _Slot) -> None:
        self.idle[slot.n] = None
        self.idle.move_to_end(slot.n)
        while len(self.idle) > TREES_KEPT:
            n, _ = self.idle.popitem(last=False)
            s = self.slots.pop(n)
            if self.slot_of_key.get(s.key) == n:
                del self.slot_of_key[s.key]

    # ---- blocking work, in a thread -------------------------------------------

    async def _run(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except DeltafsError:
            raise
        except OSError:
            raise
        except Exception:
            log.exception("history view: %s failed", getattr(fn, "__name__", fn))
            raise FUSEError(errno.EIO) from None

    async def _tree(self, seq: int):
        """The PastTree right after record ``seq``, built in a thread unless cached."""
        tree = self.trees.get(seq)
        if tree is not None:
            self.trees.move_to_end(seq)
            return tree

        def build():
            with self.journal.reader() as r:
                tree, thinned = load_tree(r, seq, self.uid, self.gid)
            if thinned:
                log.info("history view of version %d: %d file version(s) were pruned; it shows the "
                         "latest retained version before each", seq, len(thinned))
            return tree

        tree = await self._run(build)
        self.trees[seq] = tree
        while len(self.trees) > TREES_KEPT:
            self.trees.popitem(last=False)
        return tree

    async def _slot(self, proxy: _Dyn) -> _Slot:
        """The inode slot of the past tree under ``proxy`` (at/<WHEN>, snapshots/<name>).

        Each name has a slot of its own, also when two names stand for the same
        version (their trees are one object): a directory inode must have one
        name, or the kernel moves dentries (and a shell's cwd) between them."""
        n = self.slot_of_key.get(proxy.key)
        if n is not None:
            return self.slots[n]
        tree = await self._tree(proxy.info)
        n = self.slot_of_key.get(proxy.key)  # made meanwhile by another request
        if n is not None:
            return self.slots[n]
        free = next((i for i in range(1, MAX_SLOTS + 1) if i not in self.slots), None)
        if free is None and self.idle:
            free, _ = self.idle.popitem(last=False)
            self.slot_of_key.pop(self.slots.pop(free).key, None)
        if free is None:
            log.warning("history view: %d past trees are in use; close some before opening more", MAX_SLOTS)
            raise FUSEError(errno.ENFILE)
        slot = self.slots[free] = _Slot(free, proxy.key, tree)
        self.slot_of_key[proxy.key] = free
        self._idle(slot)
        return slot

    def _resolve(self, text: str) -> int:
        from deltafs.when import resolve_when

        with self.journal.reader() as r:
            point = resolve_when(r, text)
        if point.seq <= 0:
            raise UsageError(f"no version at or before {text}")
        return point.seq

    def _snapshots(self) -> list[tuple[str, int]]:
        from deltafs import snapshots

        with self.journal.reader() as r:
            head = r.head_seq()
            return [(s["name"], min(s["seq"], head)) for s in snapshots.listing(r) if s["seq"] > 0]

    def _current(self, rel: bytes) -> str | None:
        """The journal's kind of the entry at ``rel`` now (None: nothing there)."""
        with self.journal.reader() as r:
            fid = r.file_id_at(rel)
            st = r.file_state(fid) if fid is not None else None
        return None if st is None or st.deleted else st.kind

    def _children_now(self, rel: bytes) -> list[tuple[bytes, str]]:
        """(name, kind) of the current directory ``rel``'s entries (the journal's current tree)."""
        out = {}
        plen = len(rel) + 1 if rel else 0
        with self.journal.reader() as r:
            for p, _, kind in r.current_tree(rel + b"/" if rel else b""):
                rest = p[plen:]
                if rest and b"/" not in rest:
                    out[rest] = kind
        return sorted(out.items())

    def _versions(self, rel: bytes) -> list[VersionInfo]:
        with self.journal.reader() as r:
            return path_versions(r, rel)

    def _deleted(self) -> dict[bytes, bool]:
        """Paths under deleted/: each deleted path -> True, each directory above one -> False."""
        with self.journal.reader() as r:
            head = r.head_seq()
            if head > self._scanned:
                for rec in r.records(self._scanned + 1, head):
                    if rec.is_content:
                        self._content_paths.setdefault(rec.path, set()).add(rec.file_id)
                self._scanned = head
            out: dict[bytes, bool] = {}
            for p, fids in self._content_paths.items():
                if r.file_id_at(p) is not None:
                    continue
                if not any((st := r.file_state(f)) is None or st.deleted for f in fids):
                    continue
                out[p] = True
                d = os.path.dirname(p)
                while d and d not in out:
                    out[d] = False
                    d = os.path.dirname(d)
        return out

    # ---- attributes ------------------------------------------------------------

    def _dir_attr(self, ino: int, mode: int, uid: int, gid: int, mtime_ns: int, timeout: float):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFDIR | mode
        a.st_nlink = 2
        a.st_uid, a.st_gid = uid, gid
        a.st_size = 4096
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
        a.entry_timeout = a.attr_timeout = timeout
        return a

    def _src_stat(self, rel: bytes) -> os.stat_result | None:
        """lstat of SRC/rel, never through a symlink; None if it is not there."""
        parts = [p for p in rel.split(b"/") if p] if rel else []
        fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
            if not parts:
                return os.fstat(fd)
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _dyn_attr(self, d: _Dyn):
        owner = (self.uid, self.gid)
        if d.ino == _ROOT or d.ino in (_AT, _SNAPS):
            return self._dir_attr(self._ino0(d.ino), 0o555, *owner, d.stamp or self.started_ns, SHORT)
        if d.kind == "ddir":
            return self._dir_attr(self._ino0(d.ino), 0o500, *owner, d.stamp or self.started_ns, SHORT)
        if d.kind == "vdir":  # a current directory: its mode and owner now, read-only
            st = self._src_stat(d.path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                return self._dir_attr(self._ino0(d.ino), 0o555, *owner, self.started_ns, SHORT)
            return self._dir_attr(self._ino0(d.ino), stat.S_IMODE(st.st_mode) & 0o555, st.st_uid,
                                  st.st_gid, st.st_mtime_ns, SHORT)
        if d.kind == "vfile":  # a file's versions: listable by whoever may read it now
            st = self._src_stat(d.path)
            perm = 0
            if st is not None:
                for shift in (6, 3, 0):
                    if st.st_mode >> shift & 4:
                        perm |= 5 << shift
            newest = _stamp(d.info[-1].time_ns, [v.name for v in d.info]) if d.info else self.started_ns
            return self._dir_attr(self._ino0(d.ino), perm, st.st_uid if st else self.uid,
                                  st.st_gid if st else self.gid, newest, SHORT)
        if d.kind == "tree":  # the root of a past tree (at/<WHEN>, snapshots/<name>)
            slot = self.slots.get(self.slot_of_key.get(d.key, 0))
            if slot is not None:
                a = entry_attributes(slot.tree, slot.tree.nodes[1], self._ino0(d.ino), SHORT)
                a.st_mode &= ~0o222
                return a
            return self._dir_attr(self._ino0(d.ino), 0o555, *owner, self.started_ns, SHORT)
        # a version file
        v: VersionInfo = d.info
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino0(d.ino)
        a.st_mode = stat.S_IFREG | (stat.S_IMODE(v.mode) if v.mode is not None else 0o644) & ~0o222
        a.st_nlink = 1
        a.st_uid = v.uid if v.uid is not None else self.uid
        a.st_gid = v.gid if v.gid is not None else self.gid
        a.st_size = v.size
        a.st_blksize = 4096
        a.st_blocks = (v.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = v.mtime_ns
        a.entry_timeout = a.attr_timeout = LONG
        return a

    @staticmethod
    def _ino0(local: int) -> int:
        """The inode number of slot 0's node ``local``."""
        return VIEW_INODES | local

    def _tree_attr(self, slot: _Slot, n):
        return entry_attributes(slot.tree, n, self._tree_ino(slot, n.ino), LONG)

    def _counted(self, d: _Dyn | None, slot: _Slot | None, attr):
        """attr, with one more kernel lookup counted on its inode."""
        if self.shared:
            attr.entry_timeout = 0
        if d is not None:
            d.lookups += 1
        else:
            slot.lookups += 1
            self.idle.pop(slot.n, None)
        return attr

    # ---- permissions (another user, with allow_other) ----------------------------

    def _privileged(self, ctx) -> bool:
        return ctx is None or ctx.uid in (0, self.uid)

    def _may_now(self, rel: bytes, who, bits: int) -> bool:
        """May ``who`` reach SRC/rel (search on every directory above) and get ``bits`` on it?"""
        parts = [p for p in rel.split(b"/") if p]
        fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            for i, part in enumerate(parts):
                if not _grants(st.st_mode, st.st_uid, st.st_gid, who, 1):
                    return False
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if i < len(parts) - 1:
                    if not stat.S_ISDIR(st.st_mode):
                        return False
                    nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
            return stat.S_ISLNK(st.st_mode) or _grants(st.st_mode, st.st_uid, st.st_gid, who, bits)
        except OSError:
            return False
        finally:
            os.close(fd)

    def _could_then(self, slot: _Slot, n, who, bits: int) -> bool:
        """Could ``who`` reach node ``n`` of a past tree and get ``bits`` on it then?"""
        tree = slot.tree
        path = n.entry.path
        parts = [p for p in path.split(b"/") if p]
        for i in range(len(parts)):
            d = tree.lookup_path(b"/".join(parts[:i]))
            if d is None or not self._tree_grants(tree, d, who, 1):
                return False
        return n.entry.kind == KIND_SYMLINK or self._tree_grants(tree, n, who, bits)

    @staticmethod
    def _tree_grants(tree, n, who, bits: int) -> bool:
        e = n.entry
        return _grants(tree.mode(n), e.uid if e.uid is not None else tree.uid,
                       e.gid if e.gid is not None else tree.gid, who, bits)

    def _check_tree(self, ctx, slot: _Slot, n, bits: int) -> None:
        if self._privileged(ctx):
            return
        who = _caller(ctx)
        if not (self._could_then(slot, n, who, bits) and self._may_now(n.entry.path, who, bits)):
            raise FUSEError(errno.EACCES)

    def _check_dyn(self, ctx, d: _Dyn) -> None:
        """Another user: deleted/ never; versions/ only of what they may read now (and, for a
        version file, could read then)."""
        if self._privileged(ctx):
            return
        if d.kind == "ddir" or (d.kind == "ver" and d.key[0] == "dver"):
            raise FUSEError(errno.EACCES)
        who = _caller(ctx)
        if d.kind in ("vdir", "vfile", "ver") and d.path:
            if not self._may_now(d.path, who, 4):
                raise FUSEError(errno.EACCES)
        if d.kind == "ver":
            v: VersionInfo = d.info
            mode = v.mode if v.mode is not None else 0o644
            if not _grants(mode, v.uid if v.uid is not None else self.uid,
                           v.gid if v.gid is not None else self.gid, who, 4):
                raise FUSEError(errno.EACCES)

    # ---- requests ---------------------------------------------------------------

    @_answer
    async def lookup(self, parent_inode: int, name: bytes, ctx):
        if parent_inode == ROOT:
            d = self.dyn[_ROOT]
            return self._counted(d, None, self._dyn_attr(d))
        pd, pslot, pn = self._get(parent_inode)
        if pslot is not None:
            if pn.children is None:
                raise FUSEError(errno.ENOTDIR)
            local = pn.children.get(name)
            if local is None:
                raise FUSEError(errno.ENOENT)
            n = pslot.tree.nodes[local]
            self._check_tree(ctx, pslot, n, 4 if n.children is None else 1)
            return self._counted(None, pslot, self._tree_attr(pslot, n))
        d = await self._child(pd, name)
        if d is None:
            raise FUSEError(errno.ENOENT)
        if isinstance(d, tuple):  # a child of a past tree's root
            slot, n = d
            self._check_tree(ctx, slot, n, 4 if n.children is None else 1)
            return self._counted(None, slot, self._tree_attr(slot, n))
        self._check_dyn(ctx, d)
        return self._counted(d, None, self._dyn_attr(d))

    async def _child(self, pd: _Dyn, name: bytes):
        """The entry ``name`` of slot-0 directory ``pd``: a _Dyn, (slot, node), or None."""
        kind = pd.kind
        if pd.ino == _ROOT:
            ino = _TOP.get(name)
            return self.dyn[ino] if ino is not None else None
        if kind == "at" or kind == "snaps":
            text = os.fsdecode(name)
            try:
                if kind == "at":
                    seq = await self._run(self._resolve, text)
                else:
                    seq = dict(await self._run(self._snapshots)).get(text)
                    if seq is None:
                        return None
            except DeltafsError:
                return None
            proxy = self._dyn_node("tree", b"", info=seq, key=("tree", kind, name, seq))
            await self._slot(proxy)  # built now: its root's attributes are the tree's
            return proxy
        if kind == "tree":
            slot = await self._slot(pd)
            local = slot.tree.nodes[1].children.get(name)
            return (slot, slot.tree.nodes[local]) if local is not None else None
        if kind == "vdir":
            rel = pd.path + b"/" + name if pd.path else name
            what = await self._run(self._current, rel)
            if what == KIND_DIR:
                return self._dyn_node("vdir", rel)
            if what == KIND_FILE:
                return self._dyn_node("vfile", rel, info=await self._run(self._versions, rel))
            return None
        if kind == "vfile" or kind == "ddir":
            seq = parse_version_name(name)
            if seq is not None:
                infos = await self._run(self._versions, pd.path)
                if kind == "vfile":
                    pd.info = infos
                v = next((v for v in infos or () if v.seq == seq and v.name == name), None)
                if v is not None:
                    return self._dyn_node("ver", pd.path, info=v,
                                          key=("ver" if kind == "vfile" else "dver", seq))
            if kind == "ddir":
                rel = pd.path + b"/" + name if pd.path else name
                if rel in await self._run(self._deleted):
                    return self._dyn_node("ddir", rel)
            return None
        return None

    @_answer
    async def getattr(self, inode: int, ctx):
        d, slot, n = self._get(inode)
        if slot is not None:
            return self._tree_attr(slot, n)
        if d.kind == "vfile":
            d.info = await self._run(self._versions, d.path)
        elif d.kind == "ddir" or d.ino == _SNAPS:
            await self._entries(inode)  # its listing's stamp is its mtime
        return self._dyn_attr(d)

    @_answer
    async def readlink(self, inode: int, ctx):
        d, slot, n = self._get(inode)
        if slot is None or n.entry.kind != KIND_SYMLINK:
            raise FUSEError(errno.EINVAL)
        self._check_tree(ctx, slot, n, 4)
        return n.entry.target or b""

    @_answer
    async def opendir(self, inode: int, ctx):
        d, slot, n = self._get(inode)
        if slot is not None and n.children is None:
            raise FUSEError(errno.ENOTDIR)
        if d is not None and d.kind == "ver":
            raise FUSEError(errno.ENOTDIR)
        if self.dir_handle_is_inode:
            raise FUSEError(errno.ENOSYS)  # as the live mount answers: no handles at all
        return inode

    async def _entries(self, inode: int) -> list:
        """[(name, _Dyn | (slot, node))] of a directory of the view, in a stable order."""
        d, slot, n = self._get(inode)
        if slot is not None:
            return [(k, (slot, slot.tree.nodes[n.children[k]])) for k in sorted(n.children)]
        if d.ino == _ROOT:
            return [(k, self.dyn[v]) for k, v in sorted(_TOP.items())]
        if d.kind == "at":
            return []  # any WHEN: names are resolved when looked up
        if d.kind == "snaps":
            out = []
            for name, seq in sorted(await self._run(self._snapshots)):
                k = os.fsencode(name)
                out.append((k, self._dyn_node("tree", b"", info=seq, key=("tree", "snaps", k, seq))))
            d.stamp = _stamp(self.started_ns, [k for k, _ in out])
            return out
        if d.kind == "tree":
            slot = await self._slot(d)
            root = slot.tree.nodes[1]
            return [(k, (slot, slot.tree.nodes[root.children[k]])) for k in sorted(root.children)]
        if d.kind == "vdir":
            out = []
            for name, kind in await self._run(self._children_now, d.path):
                rel = d.path + b"/" + name if d.path else name
                if kind == KIND_DIR:
                    out.append((name, self._dyn_node("vdir", rel)))
                elif kind == KIND_FILE:
                    out.append((name, self._dyn_node("vfile", rel)))
            return out
        if d.kind == "vfile":
            d.info = await self._run(self._versions, d.path)
            return [(v.name, self._dyn_node("ver", d.path, info=v, key=("ver", v.seq))) for v in d.info]
        if d.kind == "ddir":
            deleted = await self._run(self._deleted)
            out = []
            if deleted.get(d.path):
                for v in await self._run(self._versions, d.path):
                    out.append((v.name, self._dyn_node("ver", d.path, info=v, key=("dver", v.seq))))
            prefix = d.path + b"/" if d.path else b""
            kids = sorted(p[len(prefix):] for p in deleted
                          if p.startswith(prefix) and p != d.path and b"/" not in p[len(prefix):])
            out += [(k, self._dyn_node("ddir", prefix + k)) for k in kids]
            d.stamp = _stamp(self.started_ns, [k for k, _ in out])
            return out
        raise FUSEError(errno.ENOTDIR)

    @_answer
    async def readdir(self, fh: int, start_id: int, token) -> None:
        """One readdir call of a pass over directory ``fh`` (its inode: the view
        hands out no directory handles of its own).

        A pass starts at offset 0 and lists a snapshot of the directory taken
        then; versions/ and deleted/ follow the live tree, so names may appear
        during a pass.  As in the live mount (ops._listing), each pass gets a
        number of its own, carried in the high bits of its offsets, and its
        snapshot is kept under that number until the call that finds it at
        its end.  Kept by inode and dropped once its last entry went out, the
        kernel's next call read a fresh listing from the old index, and names
        created meanwhile pushed names already listed into it again."""
        pid, i = start_id >> PASS_SHIFT, start_id & PASS_MASK
        got = self._listings.get(pid) if start_id else None
        if got is not None and got[1] is None:  # a finished pass: only its end is left
            if i >= got[2] and got[0] == fh:
                return
            got = None
        if got is None or got[0] != fh:
            if start_id == 0 or got is not None:
                self._pass = self._pass % PASS_MAX + 1
                pid = self._pass
            # else: a pass whose snapshot was evicted goes on (best effort) from a new one
            got = (fh, await self._entries(fh))
            self._listings[pid] = got
            while len(self._listings) > LISTINGS_KEPT:
                self._listings.popitem(last=False)
        entries, base = got[1], pid << PASS_SHIFT
        if i >= len(entries):  # the pass is at its end: keep only that
            if self._listings.get(pid) is got:
                self._listings[pid] = (fh, None, len(entries))
            return
        for i in range(i, len(entries)):
            name, what = entries[i]
            if isinstance(what, tuple):
                slot, n = what
                attr, d = self._tree_attr(slot, n), None
            else:
                slot, d = None, what
                if d.kind == "vfile" and d.info is None:
                    d.info = []  # its attributes only; a lookup reads its versions
                attr = self._dyn_attr(d)
                if d.ino >= _FIRST_DYNAMIC and self.dyn.get(d.ino) is not d:
                    self.dyn[d.ino] = d  # forgotten while the pass ran: known again
                    self.dyn_by_key[d.key] = d.ino
            if self.shared:
                attr.entry_timeout = 0
            if not pyfuse3.readdir_reply(token, name, attr, base | (i + 1)):
                return
            self._counted(d, slot, attr)

    @_answer
    async def open(self, inode: int, flags: int, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FUSEError(errno.EROFS)
        d, slot, n = self._get(inode)
        entry = None
        if slot is not None:
            if n.entry.kind != KIND_FILE:
                raise FUSEError(errno.EINVAL)
            self._check_tree(ctx, slot, n, 4)
            entry, seq, size, path = n.entry, n.entry.content_seq, slot.tree.size(n), n.entry.path
        elif d.kind == "ver":
            self._check_dyn(ctx, d)
            seq, size, path = d.info.seq, d.info.size, d.path
        else:
            raise FUSEError(errno.EISDIR)
        # Compaction keeps a version while a view has it open (maintenance.held_versions):
        # held before its chunk list is read, so a pass planned from now on cannot free it.
        self._hold(seq, 1)
        try:
            stream = await self._run(self._open_version, entry, seq, size, path)
        finally:
            self._hold(seq, -1)
        self._hold(stream.seq, 1)
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = stream
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _hold(self, seq: int, n: int) -> None:
        if not seq:
            return
        held = self.held
        held[seq] += n
        if held[seq] <= 0:
            del held[seq]

    def _open_version(self, entry, seq: int, size: int, path: bytes) -> FileStream:
        """The stream of version ``seq``.  A past tree's file whose version compaction
        pruned since the tree was built gets the latest retained version at or before
        it, as a new tree would show (a version file names its version: EIO instead)."""
        if entry is not None and seq:
            with self.journal.reader() as r:
                if r.is_pruned(seq):
                    from deltafs import history

                    try:
                        e = history.retained_entry(r, path, entry)
                    except DeltafsError as err:
                        log.error("history view: %s", err)
                        raise OSError(errno.EIO, "pruned") from None
                    log.info("history view: %s version %d was pruned since its tree was built; "
                             "reading version %d", path.decode(errors="replace"), seq, e.content_seq)
                    seq, size = e.content_seq, e.size
        return FileStream(self.journal, seq, size, path)

    @_answer
    async def read(self, fh: int, off: int, size: int) -> bytes:
        stream = self.files.get(fh)
        if stream is None:
            raise FUSEError(errno.EBADF)
        data = stream.cached(self.cache, off, size)
        if data is None:
            data = await self._run(stream.read, self.journal, self.cache, off, size)
        return data

    def release(self, fh: int) -> None:
        stream = self.files.pop(fh, None)
        if stream is not None:
            self._hold(stream.seq, -1)

    def releasedir(self, fh: int) -> None:
        pass  # passes are not tied to a handle (readdir): their snapshots are bounded by LISTINGS_KEPT

    def _xattrs(self, inode: int, ctx) -> dict:
        d, slot, n = self._get(inode)
        if slot is not None:
            self._check_tree(ctx, slot, n, 4)
            return n.entry.xattrs
        if d.kind == "ver":
            self._check_dyn(ctx, d)
            return d.info.xattrs
        return {}

    @_answer
    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        v = self._xattrs(inode, ctx).get(name)
        if v is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return v

    @_answer
    async def listxattr(self, inode: int, ctx) -> list:
        return list(self._xattrs(inode, ctx))


class HistoryOperations(Operations):
    """The live mount's Operations with the history view at ``SRC-root/NAME``.

    The live hot path is ops.py's own: lookup checks its parent inode once,
    getattr and read reach the view only for numbers they do not know.  The
    handlers below only route the view's inodes and handles
    (``>= VIEW_INODES``) here and everything else to the live mount."""

    def attach_view(self, journal, name: str, *, shared: bool = False,
                    cache_size: int = DEFAULT_CACHE) -> HistoryView:
        """Show the history view as ``name`` in the root (shared: -o allow_other)."""
        self.view = HistoryView(journal, self.src, os.fsencode(name), cache_size=cache_size,
                                dir_handle_is_inode=self.dir_handle_is_inode, shared=shared)
        self.view_name = self.view.name
        return self.view

    async def readlink(self, inode, ctx):
        if inode >= VIEW_INODES:
            return await self.view.readlink(inode, ctx)
        return await super().readlink(inode, ctx)

    async def opendir(self, inode, ctx):
        if inode >= VIEW_INODES:
            return await self.view.opendir(inode, ctx)
        return await super().opendir(inode, ctx)

    async def readdir(self, fh, start_id, token):
        if fh >= VIEW_INODES:
            return await self.view.readdir(fh, start_id, token)
        return await super().readdir(fh, start_id, token)

    async def releasedir(self, fh):
        if fh >= VIEW_INODES:
            return self.view.releasedir(fh)
        return await super().releasedir(fh)

    async def fsyncdir(self, fh, datasync):
        if fh >= VIEW_INODES:
            return None  # nothing of the view is ever written
        return await super().fsyncdir(fh, datasync)

    async def open(self, inode, flags, ctx):
        if inode >= VIEW_INODES:
            return await self.view.open(inode, flags, ctx)
        return await super().open(inode, flags, ctx)

    async def release(self, fh):
        if fh >= VIEW_INODES:
            return self.view.release(fh)
        return await super().release(fh)

    async def fsync(self, fh, datasync):
        if fh >= VIEW_INODES:
            return None
        return await super().fsync(fh, datasync)

    async def getxattr(self, inode, name, ctx):
        if inode >= VIEW_INODES:
            return await self.view.getxattr(inode, name, ctx)
        return await super().getxattr(inode, name, ctx)

    async def listxattr(self, inode, ctx):
        if inode >= VIEW_INODES:
            return await self.view.listxattr(inode, ctx)
        return await super().listxattr(inode, ctx)

    async def access(self, inode, mode, ctx):
        if inode >= VIEW_INODES:
            if mode & os.W_OK:
                raise FUSEError(errno.EROFS)
            return True
        return await super().access(inode, mode, ctx)

    async def forget(self, inode_list):
        live = []
        for ino, n in inode_list:
            if ino >= VIEW_INODES:
                try:
                    self.view.forget(ino, n)
                except Exception:  # no reply to send: never end the loop
                    log.exception("history view: forget %d", ino)
            else:
                live.append((ino, n))
        if live:
            await super().forget(live)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if ((parent_inode_new == ROOT and name_new == self.view_name)
                or (parent_inode_old == ROOT and name_old == self.view_name)):
            raise FUSEError(errno.EROFS)
        return await super().rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)
