"""pyfuse3 Operations: pass every request through to SRC, track dirty ranges.

Design (docs/fuse-notes.md has the why of each point):

* One O_PATH descriptor per inode the kernel knows (lookup count > 0).
  Every request works relative to it with *at calls, so renames of
  ancestors, long paths and unlinked-but-open files need no bookkeeping,
  and the backing inode number cannot be reused while the kernel knows it.
* FUSE inode numbers are the backing st_ino (SRC's root is swapped with 1),
  so hard links are one inode through the mount and numbers are stable.
* Every change goes through the mount, so the kernel may cache entries,
  attributes and pages for a long time (``timeout``); with the writeback
  cache the kernel merges small writes into large ones.
* The hot path (lookup, getattr, read, write) does one or two syscalls and
  nothing else: no LMDB, no hashing, no logging.  ``write`` only records the
  written range; the recorder (capture.py) turns ranges into versions at
  release and fsync.
* ``OSError`` becomes ``FUSEError(errno)``; any other exception is logged
  once and answered with EIO, so a bug never ends the daemon.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import OrderedDict

import pyfuse3
import trio
from pyfuse3 import FUSEError

from deltafs import _syscalls as sc

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
_CAPS = b"security.capability"
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
LISTINGS_KEPT = 256  # unfinished readdir passes remembered without open handles
# Flags that must not reach an open of /proc/self/fd/N: the kernel already
# resolved and created the file, and O_NOFOLLOW would refuse the magic link.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_DIRECT


class Node:
    """One inode known to the kernel."""

    __slots__ = ("ino", "fd", "lookups", "handles", "writers", "dirty", "pending", "size_changed",
                 "base", "last_item", "path", "path_gen", "nocaps")

    def __init__(self, ino: int, fd: int) -> None:
        self.ino = ino
        self.fd = fd  # O_PATH descriptor of the backing inode
        self.lookups = 0
        self.handles = 0  # open file handles
        self.writers = 0  # open file handles that may write
        self.dirty: list[list[int]] = []  # [start, end) ranges written since the last capture
        self.pending: trio.Event | None = None  # set when an in-flight capture finished
        self.size_changed = False  # truncated/extended by setattr since the last capture
        self.base: int | None = None  # capture's: journal version the dirty ranges apply to
        self.last_item = None  # capture's: this inode's latest queued capture
        self.path: bytes | None = None  # cached path_of(), valid while path_gen is current
        self.path_gen = -1
        self.nocaps = False  # known to have no security.capability xattr

    def mark_dirty(self, start: int, end: int) -> None:
        d = self.dirty
        if d:
            last = d[-1]
            if last[0] <= start <= last[1]:
                if end > last[1]:
                    last[1] = end
                return
        d.append([start, end])
        if len(d) > 4096:  # random writes: keep memory bounded, coarsen
            self.dirty = coalesce(d, gap=64 << 10)


def coalesce(ranges: list[list[int]], gap: int) -> list[list[int]]:
    """Sort ranges and merge those less than ``gap`` bytes apart (a superset: still correct)."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    if len(out) > 4096:
        return coalesce(out, gap * 4)
    return out


class Handle:
    __slots__ = ("fd", "node", "writable")

    def __init__(self, fd: int, node: Node, writable: bool) -> None:
        self.fd = fd
        self.node = node
        self.writable = writable


class DirHandle:
    __slots__ = ("fd", "node", "entries")

    def __init__(self, fd: int, node: Node) -> None:
        self.fd = fd
        self.node = node
        self.entries: list[tuple[bytes, int]] | None = None


class NullRecorder:
    """Capture turned off (--no-capture): every hook does nothing."""

    enabled = False

    async def before_change(self, ops: "Operations", node: Node, path: bytes, need_base: bool = True) -> None:
        pass

    def event(self, op: str, **fields) -> None:
        pass

    def release(self, ops: "Operations", node: Node) -> None:
        node.dirty.clear()

    async def fsync(self, ops: "Operations", node: Node) -> None:
        node.dirty.clear()

    def settled(self, node: Node) -> bool:
        return True

    async def sync(self, ino: int) -> None:
        pass


def process_umask() -> int:
    """The process's umask, read without changing it (no window for other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o077)  # kernels before 4.7: narrowing it for a moment is harmless
    os.umask(old)
    return old


def _no_reply(fn):
    """For a request the kernel wants no answer to (forget): an exception,
    OSError and FUSEError too, is logged and dropped.  Raised, it would end
    pyfuse3's main loop and leave a hung mount."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except Exception:
            log.exception("internal error in %s (no reply to send)", fn.__name__)

    return wrapper


def _errors(fn):
    """OSError -> FUSEError(errno); anything else -> logged once, EIO."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s%r", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None

    return wrapper


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    # deltafs's pyfuse3 build (tools/pyfuse3/patch.py): no OPENDIR/RELEASEDIR
    # round trips, listings cached by the kernel, readdir gets the inode
    dir_handle_is_inode = "dir_handle_is_inode" in getattr(pyfuse3, "DELTAFS_PATCHES", ())
    supports_dot_lookup = False

    def __init__(self, src: str, *, hidden: tuple[int, int] | None = None, timeout: float = 86400.0,
                 recorder=None) -> None:
        super().__init__()
        self.src = os.path.abspath(src)
        self.src_b = os.fsencode(self.src)
        root_fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self.dev = st.st_dev
        self.root_ino = st.st_ino
        self.hidden_ino = hidden[1] if hidden and hidden[0] == st.st_dev else -1
        # A journal directly in SRC is a subdirectory the mount does not show:
        # the root's link count must not count it (find -noleaf, test_differential).
        self.root_nlink_hidden = 0
        if self.hidden_ino >= 0:
            with os.scandir(self.src) as it:
                self.root_nlink_hidden = int(any(e.inode() == self.hidden_ino for e in it))
        self.timeout = timeout
        self.initialized = trio.Event()  # the kernel's INIT has been answered (see init)
        self.rec = recorder or NullRecorder()
        root = Node(ROOT, root_fd)
        root.lookups = 1 << 62  # never forgotten
        self.nodes: dict[int, Node] = {ROOT: root}
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._listings: OrderedDict[int, list] = OrderedDict()  # ino -> snapshot of an unfinished pass
        self._negative = pyfuse3.EntryAttributes()  # st_ino 0: "no such entry", cached
        self._negative.st_ino = 0
        self._negative.entry_timeout = timeout
        self._dir_serial = 0
        self.path_gen = 0  # bumped by every rename/unlink/rmdir: cached node paths expire
        self.umask = process_umask()  # the daemon's own (never 0): see _give_mode

    # ---- helpers -------------------------------------------------------

    def fuse_ino(self, st_ino: int) -> int:
        if st_ino == self.root_ino:
            return ROOT
        if st_ino == ROOT:
            return self.root_ino
        return st_ino

    def attrs(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink - self.root_nlink_hidden if ino == ROOT else st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _check_name(self, parent: Node, name: bytes, err: int) -> None:
        """Refuse to touch the journal directory (err is what the caller sees)."""
        if self.hidden_ino < 0:
            return
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return
        if st.st_ino == self.hidden_ino and st.st_dev == self.dev:
            raise FUSEError(err)

    def _remember(self, fd: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Count one lookup of the inode behind fd (taking ownership of fd)."""
        ino = self.fuse_ino(st.st_ino)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, fd)
        else:
            os.close(fd)
        node.lookups += 1
        return self.attrs(st, ino)

    def _lookup_fd(self, parent: Node, name: bytes) -> tuple[int, os.stat_result]:
        fd = os.open(name, _O_PATH, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if st.st_ino == self.hidden_ino and st.st_dev == self.dev:
            os.close(fd)
            raise FUSEError(errno.ENOENT)
        return fd, st

    def _entry(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        fd, st = self._lookup_fd(parent, name)
        return self._remember(fd, st)

    def path_of(self, node: Node) -> bytes | None:
        """The node's path relative to SRC ('' is the root), None if unlinked.

        Off the hot path: capture calls it at release, fsync and namespace
        changes.  Hard links give whichever name the kernel resolves.
        """
        if node.ino == ROOT:
            return b""
        if node.path_gen == self.path_gen:
            return node.path
        p = os.readlink(f"/proc/self/fd/{node.fd}".encode())
        if p.endswith(b" (deleted)") and not os.path.lexists(p):
            rel = None
        elif p.startswith(self.src_b + b"/"):
            rel = p[len(self.src_b) + 1:]
        else:
            rel = None
        node.path, node.path_gen = rel, self.path_gen
        return rel

    def child_path(self, parent: Node, name: bytes) -> bytes | None:
        pp = self.path_of(parent)
        if pp is None:
            return None
        return pp + b"/" + name if pp else name

    def _proc(self, node: Node) -> bytes:
        return f"/proc/self/fd/{node.fd}".encode()

    def _own(self, parent: Node, name: bytes, ctx, follow: bool = False) -> None:
        """Give a new entry the caller's uid (and gid unless the parent is setgid)."""
        if os.geteuid() != 0:
            return
        pst = os.fstat(parent.fd)
        gid = -1 if pst.st_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=parent.fd, follow_symlinks=follow)

    def _give_mode(self, parent: Node, node: Node, mode: int, e: pyfuse3.EntryAttributes,
                   fd: int | None = None) -> pyfuse3.EntryAttributes:
        """Give a new entry the permission bits the caller asked for.

        The kernel passes ``mode`` with the caller's umask already applied;
        creating it in SRC applies the daemon's umask once more (deltafs
        never sets umask 0).  Bits only the daemon's umask removed are put
        back, unless the parent has a default ACL (the backing filesystem
        then ignored the umask and derived the mode from the ACL, as it
        would natively).  Costs nothing when the caller's umask is at least
        as strict as the daemon's (the common case).
        """
        lost = mode & self.umask & ~e.st_mode & 0o777
        if not lost:
            return e
        try:
            os.getxattr(self._proc(parent), b"system.posix_acl_default")
            return e
        except OSError:
            pass
        perm = stat.S_IMODE(e.st_mode) | lost
        if fd is not None:
            os.fchmod(fd, perm)
        else:
            os.chmod(self._proc(node), perm)
        return self.attrs(os.fstat(node.fd), e.st_ino)

    def init(self):
        """pyfuse3 calls this while answering the kernel's INIT; the reply is
        written before any other trio task runs, so a task waiting for
        ``initialized`` sees the connection's negotiated settings in place."""
        self.initialized.set()

    # ---- lookup, attributes ---------------------------------------------

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._entry(self._node(parent_inode), name)
        except FileNotFoundError:
            # A negative entry the kernel keeps for the entry timeout: git
            # status asks for a .gitignore in every directory on every run.
            # Whatever creates the name later goes through the mount, which
            # replaces the kernel's negative dentry.
            return self._negative

    @_no_reply
    async def forget(self, inode_list):
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= n
            if node.lookups <= 0 and node.handles == 0 and node.pending is None:
                del self.nodes[ino]
                os.close(node.fd)

    def release_node_if_unused(self, node: Node) -> None:
        if node.lookups <= 0 and node.handles == 0 and node.pending is None and node.ino != ROOT:
            if self.nodes.get(node.ino) is node:
                del self.nodes[node.ino]
                os.close(node.fd)

    @_errors
    async def getattr(self, inode, ctx=None):
        node = self._node(inode)
        return self.attrs(os.fstat(node.fd), inode)

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size:
            await self.rec.before_change(self, node, self.path_of(node))
            await self.wait_capture(node)
            h = self.handles.get(fh) if fh is not None else None
            before = os.fstat(node.fd).st_size
            if h is not None and h.writable:
                os.ftruncate(h.fd, attr.st_size)
            else:
                os.truncate(self._proc(node), attr.st_size)
            node.size_changed = True
            if attr.st_size < before:  # bytes from here on are gone: dirty to EOF
                node.mark_dirty(attr.st_size, 1 << 62)
            else:  # the new bytes are zeros
                node.mark_dirty(before, attr.st_size)
        chown = fields.update_uid or fields.update_gid
        before = os.fstat(node.fd) if fields.update_mode or chown else None
        if fields.update_mode:
            os.chmod(self._proc(node), stat.S_IMODE(attr.st_mode))
        if chown:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            sc.chown_fd(node.fd, uid, gid)
        if fields.update_atime or fields.update_mtime:
            sc.utimens_fd(node.fd, attr.st_atime_ns if fields.update_atime else None,
                          attr.st_mtime_ns if fields.update_mtime else None)
        st = os.fstat(node.fd)
        # With the writeback cache the kernel itself sets mtime+ctime after
        # writes; only a caller's utimens/chmod/chown is a change to journal
        # (content versions carry the mtime anyway), and only if it changed
        # something: vim chmods to the same mode after every save.  A chown
        # that clears set-id bits records the mode too.
        times = fields.update_atime or (fields.update_mtime and not fields.update_ctime)
        mode = before is not None and st.st_mode != before.st_mode
        owner = chown and (st.st_uid, st.st_gid) != (before.st_uid, before.st_gid)
        if mode or owner or times:
            self.rec.event("setattr", ops=self, node=node, st=st, mode=mode, owner=owner, times=times)
        if fields.update_size and not node.writers:
            # truncate(2) by path: no release will follow, capture now
            self.rec.release(self, node)
        return self.attrs(st, inode)

    @_errors
    async def readlink(self, inode, ctx):
        return os.readlink(b"", dir_fd=self._node(inode).fd)

    @_errors
    async def access(self, inode, mode, ctx):
        # Permission checks are the kernel's (default_permissions); this
        # only answers access(2) for the existence of the inode.
        self._node(inode)
        return True

    @_errors
    async def statfs(self, ctx):
        s = os.statvfs(self._proc(self.nodes[ROOT]))
        d = pyfuse3.StatvfsData()
        d.f_bsize = s.f_bsize
        d.f_frsize = s.f_frsize
        d.f_blocks = s.f_blocks
        d.f_bfree = s.f_bfree
        d.f_bavail = s.f_bavail
        d.f_files = s.f_files
        d.f_ffree = s.f_ffree
        d.f_favail = s.f_favail
        d.f_namemax = s.f_namemax
        return d

    # ---- directories ----------------------------------------------------

    @_errors
    async def opendir(self, inode, ctx):
        node = self._node(inode)
        if self.dir_handle_is_inode:
            # Patched pyfuse3: ENOSYS makes the kernel stop sending OPENDIR
            # and RELEASEDIR and cache listings (docs/fuse-notes.md).
            raise FUSEError(errno.ENOSYS)
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        self._dir_serial += 1
        fh = self._dir_serial
        self.dirs[fh] = DirHandle(fd, node)
        node.handles += 1
        return fh

    def _listing(self, fh: int, start_id: int) -> tuple[Node, list]:
        """The directory and its entry snapshot for one readdir pass.

        A pass starts at offset 0 (rewinddir starts a new one): entries
        added meanwhile may or may not show, removed ones are skipped.
        Without open handles (``dir_handle_is_inode``) ``fh`` is the
        directory's inode and the snapshots of unfinished passes are kept
        per inode, a bounded number of them.
        """
        if self.dir_handle_is_inode:
            node = self._node(fh)
            entries = self._listings.get(fh)
            if start_id == 0 or entries is None:
                entries = self._listings[fh] = self._scan_dir(node.fd)
                while len(self._listings) > LISTINGS_KEPT:
                    self._listings.popitem(last=False)
            return node, entries
        dh = self.dirs[fh]
        if start_id == 0 or dh.entries is None:
            dh.entries = self._scan_dir(dh.fd)
        return dh.node, dh.entries

    @staticmethod
    def _scan_dir(fd: int) -> list:
        with os.scandir(f"/proc/self/fd/{fd}") as it:
            return [(b".", 0), (b"..", 0)] + [(os.fsencode(e.name), e.inode()) for e in it]

    @_errors
    async def readdir(self, fh, start_id, token):
        parent, entries = self._listing(fh, start_id)
        hidden = self.hidden_ino
        nodes = self.nodes
        for i in range(start_id, len(entries)):
            name, d_ino = entries[i]
            if i < 2:
                # The kernel keeps no lookup count for '.' and '..': neither do we.
                try:
                    st = os.stat(name, dir_fd=parent.fd)
                except OSError:
                    continue
                if not pyfuse3.readdir_reply(token, name, self.attrs(st, self.fuse_ino(st.st_ino)), i + 1):
                    return
                continue
            if d_ino == hidden:
                continue
            ino = self.fuse_ino(d_ino)
            node = nodes.get(ino)
            try:
                if node is not None:
                    st = os.fstat(node.fd)
                    fd = -1
                else:
                    fd = os.open(name, _O_PATH, dir_fd=parent.fd)
                    st = os.fstat(fd)
            except OSError:
                continue  # removed while listing
            if st.st_ino != d_ino:  # replaced while listing
                if fd >= 0:
                    os.close(fd)
                continue
            if not pyfuse3.readdir_reply(token, name, self.attrs(st, ino), i + 1):
                if fd >= 0:
                    os.close(fd)
                return
            if node is None:
                node = nodes.get(ino)
                if node is None:
                    node = nodes[ino] = Node(ino, fd)
                else:
                    os.close(fd)
            node.lookups += 1
        if self.dir_handle_is_inode:
            self._listings.pop(fh, None)  # the pass is complete

    @_errors
    async def releasedir(self, fh):
        dh = self.dirs.pop(fh)
        os.close(dh.fd)
        dh.node.handles -= 1
        self.release_node_if_unused(dh.node)

    @_errors
    async def fsyncdir(self, fh, datasync):
        # Durable once the backing directory is synced and every record
        # queued about it (entries created, renamed in or out, unlinked, an
        # atomic save's new version) is committed.
        if self.dir_handle_is_inode:
            node = self._node(fh)
            fd = os.open(self._proc(node), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                await self._durable(os.fsync, fd, self.rec.sync, node.ino)
            finally:
                os.close(fd)
            return
        dh = self.dirs[fh]
        await self._durable(os.fsync, dh.fd, self.rec.sync, dh.node.ino)

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._node(parent_inode)
        os.mkdir(name, mode, dir_fd=parent.fd)
        self._own(parent, name, ctx)
        e = self._entry(parent, name)
        node = self.nodes[e.st_ino]
        e = self._give_mode(parent, node, mode, e)
        self.rec.event("mkdir", ops=self, parent=parent, name=name, node=node)
        return e

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        self._check_name(parent, name, errno.EACCES)
        os.rmdir(name, dir_fd=parent.fd)
        self.path_gen += 1
        self.rec.event("rmdir", ops=self, parent=parent, name=name)

    # ---- namespace ------------------------------------------------------

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self._node(parent_inode)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        self._own(parent, name, ctx)
        e = self._entry(parent, name)
        node = self.nodes[e.st_ino]
        e = self._give_mode(parent, node, mode, e)
        self.rec.event("mknod", ops=self, parent=parent, name=name, node=node)
        return e

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        parent = self._node(parent_inode)
        os.symlink(target, name, dir_fd=parent.fd)
        self._own(parent, name, ctx)
        e = self._entry(parent, name)
        self.rec.event("symlink", ops=self, parent=parent, name=name, node=self.nodes[e.st_ino],
                       target=target)
        return e

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        sc.link_fd(node.fd, parent.fd, new_name)
        st = os.fstat(node.fd)
        node.lookups += 1
        self.rec.event("link", ops=self, node=node, parent=parent, name=new_name)
        return self.attrs(st, inode)

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        parent = self._node(parent_inode)
        self._check_name(parent, name, errno.EACCES)
        if self.rec.enabled:
            await self._before_replace(parent, name)
        os.unlink(name, dir_fd=parent.fd)
        self.path_gen += 1
        self.rec.event("unlink", ops=self, parent=parent, name=name)

    async def _before_replace(self, parent: Node, name: bytes) -> bool:
        """Pre-image of a file about to be unlinked or renamed over.  -> it exists."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return True
        node = self.nodes.get(self.fuse_ino(st.st_ino))
        if node is not None:
            await self.wait_capture(node)
        await self.rec.before_change(self, node, self.child_path(parent, name), need_base=False)
        return True

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old = self._node(parent_inode_old)
        new = self._node(parent_inode_new)
        self._check_name(old, name_old, errno.EACCES)
        self._check_name(new, name_new, errno.EACCES)
        src_path = dst_path = None
        replaced = False
        if self.rec.enabled:
            replaced = await self._before_replace(new, name_new)
            if flags & sc.RENAME_EXCHANGE:
                await self._before_replace(old, name_old)
            src_path = self.child_path(old, name_old)
            dst_path = self.child_path(new, name_new)
        sc.renameat2(old.fd, name_old, new.fd, name_new, flags)
        self.path_gen += 1
        self.rec.event("rename", ops=self, old=src_path, new=dst_path, flags=flags,
                       parent=new, name=name_new, replaced=replaced, also=old)

    # ---- files ----------------------------------------------------------

    def _backing_flags(self, flags: int) -> tuple[int, bool]:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        f = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        if writable:
            # Writeback cache: the kernel may read pages of a write-only
            # file and computes append offsets itself.
            f = (f & ~(os.O_ACCMODE | os.O_APPEND)) | os.O_RDWR
        return f, writable

    def _open_fd(self, node: Node, flags: int) -> tuple[int, bool]:
        f, writable = self._backing_flags(flags)
        try:
            fd = os.open(self._proc(node), f)
        except PermissionError:
            if not writable:
                raise
            f = (f & ~os.O_ACCMODE) | (flags & os.O_ACCMODE)  # write-only file mode
            fd = os.open(self._proc(node), f)
        return fd, writable

    def _new_handle(self, fd: int, node: Node, writable: bool) -> pyfuse3.FileInfo:
        self.handles[fd] = Handle(fd, node, writable)
        node.handles += 1
        if writable:
            node.writers += 1
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            await self.rec.before_change(self, node, self.path_of(node))
            await self.wait_capture(node)
        fd, writable = self._open_fd(node, flags)
        if flags & os.O_TRUNC and writable:
            node.size_changed = True
            node.mark_dirty(0, 1 << 62)
        return self._new_handle(fd, node, writable)

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._node(parent_inode)
        f, writable = self._backing_flags(flags)
        fd = os.open(name, f | os.O_CREAT, mode, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
            if os.geteuid() == 0 and (st.st_uid != ctx.uid or st.st_gid != ctx.gid):
                pst = os.fstat(parent.fd)
                os.fchown(fd, ctx.uid, -1 if pst.st_mode & stat.S_ISGID else ctx.gid)
                st = os.fstat(fd)
            pfd = os.open(name, _O_PATH, dir_fd=parent.fd)
        except BaseException:
            os.close(fd)
            raise
        e = self._remember(pfd, st)
        node = self.nodes[e.st_ino]
        e2 = self._give_mode(parent, node, mode, e, fd)
        if e2 is not e:
            e, st = e2, os.fstat(fd)
        self.rec.event("create", ops=self, parent=parent, name=name, node=node, st=st)
        return self._new_handle(fd, node, writable), e

    async def wait_capture(self, node: Node) -> None:
        """A change to a file whose capture is in flight waits for it."""
        while node.pending is not None:
            await node.pending.wait()

    @_errors
    async def read(self, fh, off, size):
        return os.pread(self.handles[fh].fd, size, off)

    @_errors
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        node = h.node
        if node.pending is not None:
            await self.wait_capture(node)
        n = os.pwrite(h.fd, buf, off)
        node.mark_dirty(off, off + n)
        return n

    @_errors
    async def flush(self, fh):
        pass

    @_errors
    async def release(self, fh):
        h = self.handles.pop(fh)
        os.close(h.fd)
        node = h.node
        node.handles -= 1
        if h.writable:
            node.writers -= 1
            if node.writers == 0 and (node.dirty or node.size_changed):
                self.rec.release(self, node)
        self.release_node_if_unused(node)

    @_errors
    async def fsync(self, fh, datasync):
        # Through any descriptor (`sync FILE` opens read-only): what was
        # written, and every capture or record already queued about the
        # inode, is durable in the journal when this returns.
        h = self.handles[fh]
        fn = os.fdatasync if datasync else os.fsync
        if self.rec.settled(h.node):
            await trio.to_thread.run_sync(fn, h.fd)
            return
        await self._durable(fn, h.fd, self.rec.fsync, self, h.node)

    async def _durable(self, fn, fd: int, journal_wait, *args) -> None:
        """fn(fd) in a thread while awaiting journal_wait(*args).  The capture reads
        the page cache, not the disk: flushing SRC and committing the journal
        at the same time makes the caller wait for the slower of the two, not
        their sum."""
        failed: list[OSError] = []

        async def flush_src():
            try:
                await trio.to_thread.run_sync(fn, fd)
            except OSError as e:
                failed.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush_src)
            await journal_wait(*args)
        if failed:
            raise failed[0]

    # ---- extended attributes ------------------------------------------

    async def getxattr(self, inode, name, ctx):
        # The kernel asks for security.capability before every write(2) (to
        # strip it); deltafs is SRC's only writer, so a "none" answer is
        # cached on the inode until setxattr/removexattr of that name.
        node = self.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        if name == _CAPS:
            if node.nocaps:
                raise FUSEError(errno.ENODATA)
            try:
                return os.getxattr(self._proc(node), name)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    node.nocaps = True
                raise FUSEError(e.errno or errno.EIO) from None
        return await self._getxattr(node, name)

    @_errors
    async def _getxattr(self, node, name):
        return os.getxattr(self._proc(node), name)

    @_errors
    async def listxattr(self, inode, ctx):
        node = self._node(inode)
        return [os.fsencode(n) for n in os.listxattr(self._proc(node))]

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        node = self._node(inode)
        before = self._xattr_state(node, name) if self.rec.enabled else None
        os.setxattr(self._proc(node), name, value)
        if name == _CAPS:
            node.nocaps = False
        # Setting what is already there is no record: the same value again,
        # or a system.posix_acl_access equal to the mode (vim writes one after
        # every save; SRC's filesystem stores no ACL for it).
        if before is None or self._xattr_state(node, name) != before:
            self.rec.event("setxattr", ops=self, node=node, name=name, value=value)

    def _xattr_state(self, node: Node, name: bytes) -> tuple | None:
        """(the stored value or None, st_mode): what a setxattr can change; None if unreadable."""
        try:
            value = os.getxattr(self._proc(node), name)
        except OSError as e:
            if e.errno != errno.ENODATA:
                return None
            value = None
        return value, os.fstat(node.fd).st_mode

    @_errors
    async def removexattr(self, inode, name, ctx):
        node = self._node(inode)
        os.removexattr(self._proc(node), name)
        self.rec.event("removexattr", ops=self, node=node, name=name)
