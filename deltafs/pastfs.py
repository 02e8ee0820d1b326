"""``deltafs mount --at WHEN``: a read-only FUSE view of the tree at a past moment.

The tree at WHEN is built once at mount time (``Reader.tree_at``) into an
in-memory inode table; nothing below asks LMDB for metadata again.  Reads
stream the version's chunks: the chunk list of a file is fetched on open,
each read decodes only the chunks it covers, and a bounded LRU of decoded
chunks (``ChunkCache``, ``--cache-size``) serves delta chains and re-reads
without decoding again.  Every chunk is verified against its id
(``Reader.read_chunk``).  Anything that would change the tree fails EROFS.

Directory mtimes: the journal records a directory's mtime when a record
carries one (mkdir, setattr/utimes); otherwise the view shows the mount
time's resolution moment (the time of the record WHEN resolved to).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
from collections import OrderedDict

from deltafs.errors import UsageError
from deltafs.journal import KIND_DIR, KIND_FILE, KIND_SYMLINK, Journal, TreeEntry

log = logging.getLogger(__name__)

FSTYPE = "fuse.deltafs-past"
SUBTYPE = "deltafs-past"
DEFAULT_CACHE = 64 << 20


class ChunkCache:
    """LRU of decoded chunks bounded by total bytes (``get``/``put`` like
    ``chunking.RawCache``, so ``Reader.read_chunk`` can use it)."""

    def __init__(self, limit: int = DEFAULT_CACHE) -> None:
        self.limit = max(0, int(limit))
        self.used = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, cid: bytes) -> bytes | None:
        raw = self._d.get(cid)
        if raw is not None:
            try:
                self._d.move_to_end(cid)
            except KeyError:  # evicted meanwhile by a put in another thread (the history view)
                pass
        return raw

    def put(self, cid: bytes, raw: bytes) -> None:
        if len(raw) > self.limit:
            return
        old = self._d.pop(cid, None)
        if old is not None:
            self.used -= len(old)
        self._d[cid] = raw
        self.used += len(raw)
        while self.used > self.limit:
            _, v = self._d.popitem(last=False)
            self.used -= len(v)

    def __len__(self) -> int:
        return len(self._d)


class _Node:
    __slots__ = ("ino", "entry", "children", "nlink", "mtime_ns")

    def __init__(self, ino: int, entry, mtime_ns: int) -> None:
        self.ino = ino
        self.entry = entry
        self.children: dict[bytes, int] | None = {} if entry.kind == KIND_DIR else None
        self.nlink = 2 if entry.kind == KIND_DIR else 1
        self.mtime_ns = entry.mtime_ns if entry.mtime_ns is not None else mtime_ns


class PastTree:
    """The inode table of the tree at one moment (no FUSE; unit-testable)."""

    def __init__(self, tree: dict, moment_ns: int, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        self.nodes: dict[int, _Node] = {}
        root = tree.get(b"") or TreeEntry(b"", KIND_DIR, 0, 0, 0, None, None, None, None, None,
                                          None, {}, None)
        self.nodes[1] = _Node(1, root, moment_ns)
        by_fid: dict[int, int] = {}
        next_ino = 2
        for path in sorted(tree, key=lambda p: (p.count(b"/"), p)):
            if path == b"":
                continue
            e = tree[path]
            parent = self.lookup_path(os.path.dirname(path))
            if parent is None or parent.children is None:
                continue
            name = os.path.basename(path)
            if e.link_group is not None and e.link_group in by_fid:
                n = self.nodes[by_fid[e.link_group]]
                n.nlink += 1
                parent.children[name] = n.ino
                continue
            n = _Node(next_ino, e, moment_ns)
            self.nodes[next_ino] = n
            if e.link_group is not None:
                by_fid[e.link_group] = next_ino
            parent.children[name] = next_ino
            if e.kind == KIND_DIR:
                parent.nlink += 1
            next_ino += 1

    def lookup_path(self, path: bytes) -> _Node | None:
        n = self.nodes[1]
        for part in path.split(b"/") if path else ():
            if n.children is None or part not in n.children:
                return None
            n = self.nodes[n.children[part]]
        return n

    def mode(self, n: _Node) -> int:
        e = n.entry
        kind_bits = {KIND_DIR: stat.S_IFDIR, KIND_FILE: stat.S_IFREG, KIND_SYMLINK: stat.S_IFLNK}
        if e.kind in kind_bits:
            fmt = kind_bits[e.kind]
        elif e.mode is not None and stat.S_IFMT(e.mode):
            fmt = stat.S_IFMT(e.mode)
        else:
            fmt = stat.S_IFREG
        perm = stat.S_IMODE(e.mode) if e.mode is not None else (0o755 if e.kind == KIND_DIR else 0o644)
        if e.kind == KIND_SYMLINK:
            perm = 0o777
        return fmt | perm

    def size(self, n: _Node) -> int:
        e = n.entry
        if e.kind == KIND_SYMLINK:
            return len(e.target or b"")
        if e.kind == KIND_DIR:
            return 4096
        return e.size or 0


def load_tree(r, seq: int, uid: int, gid: int) -> tuple[PastTree, list]:
    """The tree right after record ``seq`` read through reader ``r`` -> (PastTree,
    thinned): pruned file versions are replaced by the latest retained one at or
    before them (``thinned`` lists them).  Blocking: the daemon runs it in a thread."""
    from deltafs import history

    rec = r.record(seq)
    moment = getattr(rec, "time_ns", None) or 0
    tree = r.tree_at(seq)
    thinned: list = []
    for p, e in list(tree.items()):
        if e.kind == KIND_FILE:
            try:
                tree[p] = history.retained_entry(r, p, e, thinned)
            except Exception:
                tree[p] = e  # no retained version: reads will fail EIO
    return PastTree(tree, moment, uid, gid), thinned


def _open_tree(journal: Journal, when: str, cache_limit: int):
    """-> (PastTree, Point, note or None) for WHEN in ``journal``."""
    from deltafs.when import resolve_when

    with journal.reader() as r:
        point = resolve_when(r, when)
        if point.seq <= 0:
            raise UsageError(f"the journal has no version at or before {when}")
        tree, thinned = load_tree(r, point.seq, os.getuid(), os.getgid())
        note = None
        if thinned:
            note = (f"{len(thinned)} file version(s) at {when} were pruned; the view shows the latest "
                    "retained version at or before it")
    return tree, point, note


def entry_attributes(tree: PastTree, n: _Node, ino: int, timeout: float):
    """pyfuse3 attributes of node ``n`` of ``tree``, numbered ``ino``."""
    import pyfuse3

    a = pyfuse3.EntryAttributes()
    e = n.entry
    a.st_ino = ino
    a.st_mode = tree.mode(n)
    a.st_nlink = n.nlink
    a.st_uid = e.uid if e.uid is not None else tree.uid
    a.st_gid = e.gid if e.gid is not None else tree.gid
    a.st_size = tree.size(n)
    a.st_rdev = e.rdev or 0
    a.st_blksize = 4096
    a.st_blocks = (a.st_size + 511) // 512
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
    a.entry_timeout = a.attr_timeout = timeout
    return a


class FileStream:
    """One open past version: its chunk list, read a range at a time.

    ``read`` decodes only the chunks a range covers; ``cache`` (a
    ChunkCache) serves delta chains and re-reads.  Each chunk is verified
    against its id (``Reader.read_chunk``): a CorruptionError or a chunk
    that is gone raises OSError(EIO)."""

    __slots__ = ("cids", "offs", "size", "path", "seq")

    def __init__(self, journal: Journal, content_seq: int, size: int, path: bytes = b"") -> None:
        self.cids: list[bytes] = []
        self.offs: list[int] = []
        self.size, self.path, self.seq = size, path, content_seq
        if content_seq and size:
            try:
                with journal.reader() as r:
                    refs = r.chunk_list(content_seq)
            except Exception as e:
                log.error("%s: cannot read version %s: %s", path, content_seq, e)
                raise OSError(errno.EIO, "unreadable version") from None
            o = 0
            for cid, ln in refs:
                self.cids.append(cid)
                self.offs.append(o)
                o += ln

    def cached(self, cache: ChunkCache, off: int, size: int) -> bytes | None:
        """The range if every chunk of it is in ``cache`` (no LMDB), else None."""
        cids, offs = self.cids, self.offs
        end = min(off + size, self.size)
        if off >= end or not cids:
            return b""
        out = []
        k = bisect.bisect_right(offs, off) - 1
        while k < len(cids) and offs[k] < end:
            raw = cache.get(cids[k])
            if raw is None:
                return None
            out.append(raw[max(off - offs[k], 0): end - offs[k]])
            k += 1
        return b"".join(out)

    def read(self, journal: Journal, cache: ChunkCache, off: int, size: int) -> bytes:
        cids, offs = self.cids, self.offs
        end = min(off + size, self.size)
        if off >= end or not cids:
            return b""
        out = []
        k = bisect.bisect_right(offs, off) - 1
        r_ctx = None
        try:
            while k < len(cids) and offs[k] < end:
                raw = cache.get(cids[k])
                if raw is None:
                    if r_ctx is None:
                        r_ctx = journal.reader()
                        reader = r_ctx.__enter__()
                    raw = reader.read_chunk(cids[k], cache)
                out.append(raw[max(off - offs[k], 0): end - offs[k]])
                k += 1
        except Exception as e:  # CorruptionError, a chunk compaction freed, LMDB trouble
            log.error("read of %s (version %s) failed: %s", self.path.decode(errors="replace"), self.seq, e)
            raise OSError(errno.EIO, "unreadable version") from None
        finally:
            if r_ctx is not None:
                r_ctx.__exit__(None, None, None)
        return b"".join(out)


def make_operations(journal: Journal, tree: PastTree, cache: ChunkCache):
    import pyfuse3

    class PastOps(pyfuse3.Operations):
        enable_writeback_cache = False

        def __init__(self) -> None:
            super().__init__()
            self.fhs: dict[int, FileStream] = {}
            self.next_fh = 1

        def _attr(self, n: _Node):
            return entry_attributes(tree, n, n.ino, 3600)

        def _node(self, ino: int) -> _Node:
            n = tree.nodes.get(ino)
            if n is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return n

        async def getattr(self, inode, ctx=None):
            return self._attr(self._node(inode))

        async def lookup(self, parent_inode, name, ctx=None):
            p = self._node(parent_inode)
            if p.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if name == b".":
                return self._attr(p)
            ino = p.children.get(name)
            if ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(tree.nodes[ino])

        async def readlink(self, inode, ctx):
            n = self._node(inode)
            if n.entry.kind != KIND_SYMLINK:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return n.entry.target or b""

        async def opendir(self, inode, ctx):
            if self._node(inode).children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            n = self._node(fh)
            names = sorted(n.children)
            for i in range(start_id, len(names)):
                child = tree.nodes[n.children[names[i]]]
                if not pyfuse3.readdir_reply(token, names[i], self._attr(child), i + 1):
                    break

        async def open(self, inode, flags, ctx):
            n = self._node(inode)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            if n.entry.kind != KIND_FILE:
                raise pyfuse3.FUSEError(errno.EINVAL)
            try:
                stream = FileStream(journal, n.entry.content_seq, tree.size(n), n.entry.path)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            fh = self.next_fh
            self.next_fh += 1
            self.fhs[fh] = stream
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

        async def read(self, fh, off, size):
            try:
                return self.fhs[fh].read(journal, cache, off, size)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None

        async def release(self, fh):
            self.fhs.pop(fh, None)

        async def releasedir(self, fh):
            pass

        async def getxattr(self, inode, name, ctx):
            v = self._node(inode).entry.xattrs.get(name)
            if v is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return v

        async def listxattr(self, inode, ctx):
            return list(self._node(inode).entry.xattrs)

        async def access(self, inode, mode, ctx):
            if mode & os.W_OK:
                raise pyfuse3.FUSEError(errno.EROFS)
            return True

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_namemax = 255
            s.f_files = len(tree.nodes)
            return s

        async def _rofs(self, *a, **k):
            raise pyfuse3.FUSEError(errno.EROFS)

        setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _rofs
        write = create = setxattr = removexattr = fallocate = _rofs

    return PastOps()


def serve(journal_dir: str, when: str, mnt: str, *, cache_size: int = DEFAULT_CACHE,
          options: tuple[str, ...] = (), ready_fd: int | None = None) -> int:
    """Mount the tree at WHEN on MNT and serve until unmounted (foreground)."""
    import pyfuse3
    import trio

    from deltafs import mounttable

    journal = Journal.open(journal_dir, readonly=True)
    try:
        tree, point, note = _open_tree(journal, when, cache_size)
    except BaseException as e:
        journal.close()
        if ready_fd is not None:
            code = getattr(e, "exit_code", 1)
            os.write(ready_fd, f"ERROR {code} {e}\n".encode())
            os.close(ready_fd)
        raise
    cache = ChunkCache(cache_size)
    ops = make_operations(journal, tree, cache)
    opts = {"ro", "default_permissions", f"fsname={journal_dir}", f"subtype={SUBTYPE}"}
    for o in options:
        opts.update(x for x in o.split(",") if x)
    pyfuse3.init(ops, mnt, opts)
    info = {"src": journal_dir, "pid": os.getpid(), "journal": journal_dir, "view": "past",
            "at": when, "seq": point.seq}
    if note:
        info["note"] = note
        log.warning("%s", note)
    log.info("serving the tree at %s (version %d) on %s", when, point.seq, mnt)
    try:
        mounttable.write_record(os.path.abspath(mnt), info)
    except Exception:
        log.debug("mount record", exc_info=True)
    if ready_fd is not None:
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
        try:
            mounttable.remove_record(os.path.abspath(mnt))
        except Exception:
            pass
        journal.close()
    return 0


def view_statuses() -> list[dict]:
    """``deltafs status`` entries of the mount --at views in the mount table."""
    from deltafs import mounttable

    out = []
    for e in mounttable.mounts():
        if e.fstype != FSTYPE:
            continue
        rec = mounttable.read_record(e.mnt) or {}
        out.append({"mounted": True, "view": "past", "mnt": e.mnt, "journal": {"path": e.src},
                    "at": rec.get("at"), "version": rec.get("seq"), "pid": rec.get("pid"),
                    "note": rec.get("note")})
    return out


def format_view(st: dict) -> str:
    line = (f"{st['mnt']}: read-only view of {st['journal']['path']} at {st.get('at')} "
            f"(version {st.get('version')}), pid {st.get('pid')}")
    return line + (f"\n  note       {st['note']}" if st.get("note") else "")


def spawn(argv: list[str], log_path: str | None) -> None:
    """Background mount: run ``deltafs mount --at ... --foreground`` detached, wait for READY."""
    import subprocess
    import sys

    from deltafs.errors import MountError

    r, w = os.pipe()
    out = subprocess.DEVNULL
    if log_path:
        try:  # owner-only, never through a symlink
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            log_path, out = None, subprocess.DEVNULL
    try:
        subprocess.Popen([sys.executable, "-m", "deltafs", *argv, "--foreground", "--ready-fd", str(w)],
                         pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True)
    finally:
        os.close(w)
        if log_path:
            os.close(out)
    with os.fdopen(r, "rb") as f:
        msg = f.readline()
    if msg == b"READY\n":
        return
    text = msg.decode(errors="replace").strip()
    if text.startswith("ERROR "):
        _, code, rest = text.split(" ", 2)
        err = MountError(rest)
        err.exit_code = int(code)
        raise err
    raise MountError(f"the mount daemon exited before it was ready: {text or 'no message'}")
