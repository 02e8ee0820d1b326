"""``deltafs mount --at WHEN``: a read-only FUSE view of the tree at a past moment.

The tree at WHEN is built once at mount time (``Reader.tree_at``) into an
in-memory inode table; nothing below asks LMDB for metadata again.  Reads
stream the version's chunks: the chunk list of a file is fetched on open,
each read decodes only the chunks it covers, and a bounded LRU of decoded
chunks (``ChunkCache``, ``--cache-size``) serves delta chains and re-reads
without decoding again.  Every chunk is verified against its id
(``Reader.read_chunk``).  Anything that would change the tree fails EROFS.

The pieces are shared with the history view inside every live mount
(historyview.py): ``load_tree`` builds a PastTree from a reader,
``entry_attributes`` gives a node's attributes under any inode number,
``FileStream`` is one open version read a range at a time.  ``serve``
mounts them standalone; the view embeds them in the live mount's inode space.

Directory mtimes: the journal records a directory's mtime when a record
carries one (mkdir, setattr/utimes); otherwise the view shows the mount
time's resolution moment (the time of the record WHEN resolved to).
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import logging
import os
import stat
from collections import OrderedDict

from deltafs._syscalls import set_bdi_readahead
from deltafs.errors import UsageError
from deltafs.journal import KIND_DIR, KIND_FILE, KIND_SYMLINK, RAW_VALUE_EXTRA, Journal, TreeEntry, gc_paused

log = logging.getLogger(__name__)

FSTYPE = "fuse.deltafs-past"
SUBTYPE = "deltafs-past"
DEFAULT_CACHE = 64 << 20
TIMEOUT = 86400.0  # entry and attribute timeout: the past does not change
READ_AHEAD = 4 << 20  # bytes of pack file the kernel reads ahead of a read's last chunk


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


_KIND_BITS = {KIND_DIR: stat.S_IFDIR, KIND_FILE: stat.S_IFREG, KIND_SYMLINK: stat.S_IFLNK}


class _Node:
    # ``attr``: its pyfuse3 attributes once asked for (the past never changes, so
    # a readdir of the whole tree builds each node's once); ``names``: a
    # directory's child names, sorted once, for readdir offsets
    __slots__ = ("ino", "entry", "children", "nlink", "mtime_ns", "attr", "names")

    def __init__(self, ino: int, entry, mtime_ns: int) -> None:
        self.ino = ino
        self.entry = entry
        self.children: dict[bytes, int] | None = {} if entry.kind == KIND_DIR else None
        self.nlink = 2 if entry.kind == KIND_DIR else 1
        self.mtime_ns = entry.mtime_ns if entry.mtime_ns is not None else mtime_ns
        self.attr = None
        self.names: list[bytes] | None = None

    def sorted_names(self) -> list[bytes]:
        if self.names is None:
            self.names = sorted(self.children)
        return self.names


def _is_sorted(tree: dict) -> bool:
    prev = None
    for p in tree:
        if prev is not None and p < prev:
            return False
        prev = p
    return True


class PastTree:
    """The inode table of the tree at one moment (no FUSE; unit-testable)."""

    def __init__(self, tree: dict, moment_ns: int, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        self.nodes: dict[int, _Node] = {}
        root = tree.get(b"") or TreeEntry(b"", KIND_DIR, 0, 0, 0, None, None, None, None, None,
                                          None, {}, None)
        self.nodes[1] = _Node(1, root, moment_ns)
        dirs: dict[bytes, _Node] = {b"": self.nodes[1]}
        by_fid: dict[int, int] = {}
        next_ino = 2
        # a parent's path is a prefix of its children's, so it sorts before them
        for path in tree if _is_sorted(tree) else sorted(tree):
            if path == b"":
                continue
            e = tree[path]
            head, _, name = path.rpartition(b"/")
            parent = dirs.get(head)
            if parent is None:
                continue
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
                dirs[path] = n
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
        fmt = _KIND_BITS.get(e.kind)
        if fmt is None:
            fmt = stat.S_IFMT(e.mode) if e.mode is not None and stat.S_IFMT(e.mode) else stat.S_IFREG
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
    with gc_paused():
        rec = r.record(seq)
        moment = getattr(rec, "time_ns", None) or 0
        tree = r.tree_at(seq)
        pruned = r.pruned_seqs()
        thinned: list = []
        if pruned:  # only the entries at a pruned version need a look (one set, no query per file)
            for p, e in tree.items():
                if e.kind == KIND_FILE and e.content_seq in pruned:
                    tree[p] = _retained(r, e, pruned, thinned)
        return PastTree(tree, moment, uid, gid), thinned


def _retained(r, e: TreeEntry, pruned: set[int], thinned: list) -> TreeEntry:
    """``e`` at the latest retained version at or before its pruned one (and
    that noted in ``thinned``); ``e`` itself if none is: reads fail EIO."""
    from deltafs.history import Thinned

    for s in r.versions_of(e.file_id):  # newest first
        if s < e.content_seq and s not in pruned:
            rec = r.record(s)
            if rec.is_content:
                thinned.append(Thinned(e.path, e.content_seq, s, None))
                return dataclasses.replace(e, content_seq=s, size=rec.size or 0)
    return e


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
    """pyfuse3 attributes of node ``n`` of ``tree``, numbered ``ino``.  (Per
    entry of a listing: only what differs from pyfuse3's defaults is set,
    nlink 1, uid/gid/rdev 0, blksize 4096.)"""
    a = _entry_attributes_class()()
    e = n.entry
    a.st_ino = ino
    a.st_mode = tree.mode(n)
    if n.nlink != 1:
        a.st_nlink = n.nlink
    uid = tree.uid if e.uid is None else e.uid
    if uid:
        a.st_uid = uid
    gid = tree.gid if e.gid is None else e.gid
    if gid:
        a.st_gid = gid
    size = tree.size(n)
    if size:
        a.st_size = size
        a.st_blocks = (size + 511) // 512
    if e.rdev:
        a.st_rdev = e.rdev
    t = n.mtime_ns
    if t:
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
    a.entry_timeout = a.attr_timeout = timeout
    return a


_EA = None


def _entry_attributes_class():
    global _EA
    if _EA is None:
        import pyfuse3

        _EA = pyfuse3.EntryAttributes
    return _EA


class FileStream:
    """One open past version: its chunk list, read a range at a time.

    ``read`` decodes only the chunks a range covers; ``cache`` (a
    ChunkCache) serves delta chains and re-reads.  Each chunk is verified
    against its id (``Reader.read_chunk``): a CorruptionError or a chunk
    that is gone raises OSError(EIO)."""

    __slots__ = ("cids", "offs", "lens", "size", "path", "seq", "where")

    def __init__(self, journal: Journal, content_seq: int, size: int, path: bytes = b"") -> None:
        self.cids: list[bytes] = []
        self.offs: list[int] = []
        self.lens: list[int] = []
        # (k, pack, offset): where chunk k's value probably starts, k the chunk after
        # the last read (Reader.read_chunks_from): a sequential read looks nothing up
        self.where: tuple[int, int, int] | None = None
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
                self.lens.append(ln)
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
        """The range: the chunks it covers read in one go (``Reader.read_chunks_from``:
        one pread per run of values stored back to back, the kernel reading
        READ_AHEAD bytes further meanwhile; where the previous read ended on a
        raw chunk and this one goes on from there, no index lookups)."""
        cids, offs = self.cids, self.offs
        end = min(off + size, self.size)
        if off >= end or not cids:
            return b""
        k = bisect.bisect_right(offs, off) - 1
        m = bisect.bisect_left(offs, end, k + 1)
        w = self.where
        try:
            with journal.reader() as r:
                raws, after = r.read_chunks_from(cids[k:m], self.lens[k:m],
                                                 w[1:] if w is not None and w[0] == k else None,
                                                 cache, READ_AHEAD)
            if after is None:
                self.where = None
            elif offs[m - 1] + self.lens[m - 1] <= end:
                self.where = (m, *after)
            else:  # the read ends inside its last chunk: the next one starts with that chunk
                self.where = (m - 1, after[0], after[1] - RAW_VALUE_EXTRA - self.lens[m - 1])
        except Exception as e:  # CorruptionError, a chunk compaction freed, LMDB trouble
            log.error("read of %s (version %s) failed: %s", self.path.decode(errors="replace"), self.seq, e)
            raise OSError(errno.EIO, "unreadable version") from None
        a, b = off - offs[k], end - offs[m - 1]
        if len(raws) == 1:
            return bytes(raws[0][a:b])
        if a:
            raws[0] = raws[0][a:]
        if b < len(raws[-1]):
            raws[-1] = raws[-1][:b]
        return b"".join(raws)


def make_operations(journal: Journal, tree: PastTree, cache: ChunkCache):
    import pyfuse3

    class PastOps(pyfuse3.Operations):
        enable_writeback_cache = False
        # deltafs' pyfuse3 build: opendir answers ENOSYS, so the kernel sends no
        # OPENDIR/RELEASEDIR and keeps every listing in its page cache (nothing
        # here ever changes); readdir gets the directory's inode as its handle
        dir_handle_is_inode = "dir_handle_is_inode" in getattr(pyfuse3, "DELTAFS_PATCHES", ())
        # and it answers plain READDIR too: the kernel then asks READDIRPLUS only at
        # the start of a listing and when a program looks the entries up (ls -l),
        # so a find of the whole tree no longer makes an inode for every entry
        readdirplus_auto = "readdirplus_auto" in getattr(pyfuse3, "DELTAFS_PATCHES", ())

        def __init__(self) -> None:
            super().__init__()
            self.fhs: dict[int, FileStream] = {}
            self.next_fh = 1
            self.initialized = None  # a trio.Event made inside trio.run (serve)
            self.listed = [0, 0]  # directory entries sent in plain READDIR, in READDIRPLUS replies

        def init(self):
            if self.initialized is not None:
                self.initialized.set()

        def _attr(self, n: _Node):
            a = n.attr  # built once: pyfuse3 copies it into each reply
            if a is None:
                a = n.attr = entry_attributes(tree, n, n.ino, TIMEOUT)
            return a

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
            if self.dir_handle_is_inode:
                raise pyfuse3.FUSEError(errno.ENOSYS)
            return inode

        async def readdir(self, fh, start_id, token):
            n = self._node(fh)
            if n.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            names, children, nodes, attr = n.sorted_names(), n.children, tree.nodes, self._attr
            reply = pyfuse3.readdir_reply
            sent = 0
            for i in range(start_id, len(names)):
                name = names[i]
                if not reply(token, name, attr(nodes[children[name]]), i + 1):
                    break
                sent += 1
            self.listed[bool(getattr(token, "plus", True))] += sent

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


READAHEAD_KIB = 4096  # kernel read-ahead of the view (root only; see _raise_readahead)


async def _raise_readahead(mnt: str, ops, kib: int) -> None:
    """Let the kernel read ahead ``kib`` KiB on the view instead of 128 KiB.

    A sequential read is then one FUSE request per MiB (max_pages 256), not
    per 128 KiB: each request is a Python round trip (256 MiB past file:
    261 -> 420-500 MB/s).  The kernel caps read-ahead when INIT is answered,
    so this waits for that; the device number comes from /proc/self/mountinfo
    (touching the mount point would ask this very daemon).  Needs root;
    otherwise the default stays (set_bdi_readahead, as for the live mount)."""
    await ops.initialized.wait()
    try:
        set_bdi_readahead(mnt, kib)
    except OSError as e:
        log.debug("read-ahead of %s left at the default: %s", mnt, e)


def serve(journal_dir: str, when: str, mnt: str, *, cache_size: int = DEFAULT_CACHE,
          options: tuple[str, ...] = (), ready_fd: int | None = None,
          readahead_kib: int = READAHEAD_KIB) -> int:
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
            e.ready_reported = True  # (fork_serve: said once)
        raise
    cache = ChunkCache(cache_size)
    ops = make_operations(journal, tree, cache)
    opts = {"ro", "default_permissions", f"fsname={journal_dir}", f"subtype={SUBTYPE}"}
    for o in options:
        opts.update(x for x in o.split(",") if x)
    real_mnt = os.path.realpath(mnt)  # before the mount: afterwards it would ask this daemon
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
    async def main() -> None:
        ops.initialized = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(_raise_readahead, real_mnt, ops, readahead_kib)
            await pyfuse3.main()
            n.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        log.info("listings served: %d entries in plain READDIR replies, %d in READDIRPLUS", *ops.listed)
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


def fork_serve(journal_dir: str, when: str, mnt: str, *, cache_size: int, options: tuple[str, ...],
               log_path: str | None, log_level: str) -> None:
    """Background mount without a second interpreter: fork this process (its
    modules are loaded, no thread or journal is open yet), let the child
    serve (``serve`` with a ready pipe), return once it is READY.  Saves
    the 0.4 s a fresh ``python -m deltafs`` spends importing."""
    import sys

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(r)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            out = null
            if log_path:
                try:  # owner-only, never through a symlink
                    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o600)
                except OSError:
                    out = null
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            logging.basicConfig(level=log_level, stream=sys.stderr, force=True,
                                format="%(asctime)s %(levelname)s %(message)s")
            code = serve(journal_dir, when, mnt, cache_size=cache_size, options=options, ready_fd=w)
        except BaseException as e:  # noqa: BLE001 - the daemon reports and exits, never returns
            code = getattr(e, "exit_code", 1)
            try:
                log.error("%s", e)
                if not getattr(e, "ready_reported", False):
                    os.write(w, f"ERROR {code} {e}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(code if isinstance(code, int) else 1)
    os.close(w)
    _wait_ready(r)


def _wait_ready(r: int) -> None:
    from deltafs.errors import MountError

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
