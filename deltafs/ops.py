"""pyfuse3 Operations: pass every request through to SRC, track dirty ranges.

Design (docs/fuse-notes.md has the why of each point):

* One Node per inode the kernel knows (lookup count > 0).  A node knows
  its parent node and name (kept right by lookup, create, link, rename and
  unlink: deltafs is SRC's only writer while mounted), so its path comes
  from the node tree at any depth, and its O_PATH descriptor is an entry of
  a bounded cache (fdcache.py): an evicted node is opened again relative to
  its parent.  Requests work relative to descriptors with *at calls.  A
  node with open handles, or one that lost its last name (unlinked but
  open), keeps its descriptor.
* FUSE inode numbers are the backing st_ino (SRC's root is swapped with 1),
  so hard links are one inode through the mount and numbers are stable.
* Every change goes through the mount, so the kernel may cache entries,
  attributes and pages for a long time (``timeout``); with the writeback
  cache the kernel merges small writes into large ones.
* The hot path (lookup, getattr, read, write) does one or two syscalls and
  nothing else: no LMDB, no hashing, no logging.  ``write`` only records the
  written range; the recorder (capture/) turns ranges into versions at
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
from typing import Protocol

import pyfuse3
import trio
from pyfuse3 import FUSEError

from deltafs import _syscalls as sc
from deltafs import hops, trace
from deltafs.fdcache import FdCache

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
# Inode numbers from here up belong to an embedded read-only view (the history
# view, historyview.py), never to SRC: live numbers are SRC's st_ino, and no
# filesystem deltafs runs on hands out numbers with the top 24 bits all set.
VIEW_INODES = 0xFFFF_FF00_0000_0000
_CAPS = b"security.capability"
_FALLOC_MODES = sc.FALLOC_FL_KEEP_SIZE | sc.FALLOC_FL_PUNCH_HOLE | sc.FALLOC_FL_ZERO_RANGE
MAX_LINKS = 16  # extra names remembered per hard-linked inode
CAPTURE_BACKLOG = 256  # queued captures (each holds a descriptor) before release waits
LISTINGS_KEPT = 256  # unfinished readdir passes remembered without open handles
PASS_SHIFT = 32  # a readdir offset is pass << PASS_SHIFT | index + 1 (without open handles)
PASS_MASK = (1 << PASS_SHIFT) - 1
PASS_MAX = (1 << 30) - 1  # pass numbers wrap: offsets stay positive 63-bit values
# Flags that must not reach an open of /proc/self/fd/N: the kernel already
# resolved and created the file, and O_NOFOLLOW would refuse the magic link.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY | os.O_DIRECT


class CaptureState(Protocol):
    """Capture's state of one node (``Node.cap``): created and owned by the
    recorder (deltafs.capture.state.NodeCapture), which ops only reports to.
    Reading ``pending`` and calling ``mark`` is all the write path does."""

    pending: trio.Event | None  # a capture of the inode is in flight: a change waits (``wait``)
    changed: bool  # written, truncated or extended since the last capture

    async def wait(self) -> None: ...

    def mark(self, start: int, end: int) -> None: ...  # bytes [start, end) were written

    def resized(self, before: int, after: int) -> None: ...  # the size changed (truncate, fallocate)

    def truncated(self) -> None: ...  # opened with O_TRUNC


class _Untracked:
    """The capture state of a node not opened for writing since it was looked
    up: nothing dirty, nothing pending.  Shared by every such node and
    read-only: a handler that changes the file first has the recorder
    ``track`` the node, which gives it a state of its own."""

    __slots__ = ()
    pending = None
    changed = False

    async def wait(self) -> None:
        pass


UNTRACKED = _Untracked()


class _Discard:
    """The capture state of every node with capture off (--no-capture):
    changes are noted nowhere."""

    __slots__ = ()
    pending = None
    changed = False

    async def wait(self) -> None:
        pass

    def mark(self, start: int, end: int) -> None:
        pass

    def resized(self, before: int, after: int) -> None:
        pass

    def truncated(self) -> None:
        pass


DISCARD = _Discard()


class Node:
    """One inode known to the kernel: only what passing requests through needs.
    What capture knows of it is ``cap`` (CaptureState), owned by the recorder."""

    __slots__ = ("ino", "cached_fd", "fc", "parent", "name", "links", "kids", "pinned", "gen", "lookups",
                 "handles", "writers", "cap")

    def __init__(self, ino: int, fc: FdCache, parent: "Node | None", name: bytes) -> None:
        self.ino = ino
        self.cached_fd = -1  # the O_PATH descriptor FdCache holds for it, -1 if none (FdCache owns it; use fd)
        self.fc = fc
        self.parent = parent  # the directory holding ``name``; None: the root, or no name left
        self.name = name
        self.links: list[tuple[Node, bytes]] | None = None  # more names of a hard-linked file
        self.kids = 0  # names of other nodes in this directory (keeps the node while > 0)
        self.pinned = parent is None  # the descriptor stays while open or nameless (fdcache.py)
        self.gen = 0  # FUSE generation: bumped when a forgotten-to-be number is reused
        self.lookups = 0
        self.handles = 0  # open file handles
        self.writers = 0  # open file handles that may write
        self.cap: CaptureState = UNTRACKED  # capture's state of the inode (Capture.track replaces it)

    @property
    def fd(self) -> int:
        """The node's O_PATH descriptor, opened again if the cache closed it.

        Valid until the next few descriptors are opened: use it at once."""
        fd = self.cached_fd
        if fd < 0:
            return self.fc.reopen(self)
        if not self.pinned:
            self.fc.lru.move_to_end(self)
        return fd


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



class Capture(Protocol):
    """What ops asks of capture (deltafs.capture.Recorder; NullRecorder with
    --no-capture).  ops never imports capture: the recorder is handed in.
    Every ``on_*`` hook reports a namespace change that already succeeded in
    SRC, from the FUSE handler, and returns at once (it queues records)."""

    enabled: bool

    def track(self, node: Node) -> None: ...  # node may change: give it a capture state of its own

    async def before_change(self, ops: Operations, node: Node | None, path: bytes | None,
                            need_base: bool = True) -> None: ...  # journal the pre-image first

    def release(self, ops: Operations, node: Node) -> None: ...  # last close of a written file

    async def fsync(self, ops: Operations, node: Node, flush: hops.Flush | None = None) -> None:
        ...  # capture now, wait until durable; flush: SRC's (start it, or run it in the capture's hop)

    def settled(self, node: Node) -> bool: ...  # nothing of this inode waits to be journaled

    async def sync(self, ino: int) -> None: ...  # wait for what is queued about this inode

    def pending(self) -> int: ...

    async def throttle(self, limit: int | None = None) -> None: ...  # backpressure: wait while the queue is full

    def on_create(self, ops: Operations, parent: Node, name: bytes, node: Node, st: os.stat_result) -> None: ...

    def on_mkdir(self, ops: Operations, parent: Node, name: bytes, node: Node) -> None: ...

    def on_mknod(self, ops: Operations, parent: Node, name: bytes, node: Node) -> None: ...

    def on_symlink(self, ops: Operations, parent: Node, name: bytes, node: Node, target: bytes) -> None: ...

    def on_link(self, ops: Operations, node: Node, parent: Node, name: bytes) -> None: ...

    def on_unlink(self, ops: Operations, parent: Node, name: bytes, last: bool) -> None: ...

    def on_rmdir(self, ops: Operations, parent: Node, name: bytes) -> None: ...

    def on_rename(self, ops: Operations, old: bytes | None, new: bytes | None, flags: int, parent: Node,
                  name: bytes, replaced, src_parent: Node, over: os.stat_result | None = None,
                  over_xattrs=(), moved_st: os.stat_result | None = None) -> None: ...

    def on_setattr(self, ops: Operations, node: Node, st: os.stat_result, mode: bool, owner: bool,
                   times: bool) -> None: ...

    def on_setxattr(self, ops: Operations, node: Node, name: bytes, value: bytes) -> None: ...

    def on_removexattr(self, ops: Operations, node: Node, name: bytes) -> None: ...


class NullRecorder:
    """Capture turned off (--no-capture): every hook does nothing."""

    enabled = False

    async def before_change(self, ops: "Operations", node: Node, path: bytes, need_base: bool = True) -> None:
        pass

    def _nothing(self, *args, **kw) -> None:
        pass

    on_create = on_mkdir = on_mknod = on_symlink = on_link = on_unlink = on_rmdir = on_rename = _nothing
    on_setattr = on_setxattr = on_removexattr = _nothing

    def track(self, node: Node) -> None:
        node.cap = DISCARD

    def release(self, ops: "Operations", node: Node) -> None:
        pass

    async def fsync(self, ops: "Operations", node: Node, flush: hops.Flush | None = None) -> None:
        pass

    def settled(self, node: Node) -> bool:
        return True

    async def sync(self, ino: int) -> None:
        pass

    def pending(self) -> int:
        return 0

    async def throttle(self, limit: int | None = None) -> None:
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
        except ExceptionGroup as eg:  # from a nursery (fsync): answer its one error
            err = _single(eg)
            if isinstance(err, FUSEError):
                raise err from None
            if isinstance(err, OSError):
                raise FUSEError(err.errno or errno.EIO) from None
            log.exception("internal error in %s%r", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("internal error in %s%r", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None

    return wrapper


def _single(eg: BaseExceptionGroup) -> BaseException:
    """The first leaf of an exception group (a nursery's errors), unwrapped."""
    while isinstance(eg, BaseExceptionGroup) and eg.exceptions:
        eg = eg.exceptions[0]
    return eg


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    # deltafs's pyfuse3 build (tools/pyfuse3/patch.py): no OPENDIR/RELEASEDIR
    # round trips, listings cached by the kernel, readdir gets the inode
    dir_handle_is_inode = "dir_handle_is_inode" in getattr(pyfuse3, "DELTAFS_PATCHES", ())
    supports_dot_lookup = False
    view = None  # an embedded view (historyview.HistoryOperations sets it): inodes >= VIEW_INODES
    view_name: bytes | None = None  # its name in the root

    def __init__(self, src: str, *, hidden: tuple[int, int] | None = None, timeout: float = 86400.0,
                 recorder=None, fd_limit: int | None = None, fd_budget: int | None = None) -> None:
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
        self.rec: Capture = recorder or NullRecorder()
        if fd_limit is None:
            import resource
            fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fc = FdCache(fd_limit, fd_budget, root_ino=self.root_ino)
        # queued captures hold a descriptor each, out of the reserve: at most half of it
        self.capture_backlog = max(16, min(CAPTURE_BACKLOG, self.fc.reserve // 2))
        root = Node(ROOT, self.fc, None, b"")
        root.lookups = 1 << 62  # never forgotten
        self.fc.add(root, root_fd)
        self.nodes: dict[int, Node] = {ROOT: root}
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        # pass -> (ino, snapshot), or (ino, None, its length) once at its end (_listing)
        self._listings: OrderedDict[int, tuple] = OrderedDict()
        self._pass = 0  # the last readdir pass number handed out
        self._negative = pyfuse3.EntryAttributes()  # st_ino 0: "no such entry", cached
        self._negative.st_ino = 0
        self._negative.entry_timeout = timeout
        self._dir_serial = 0
        self.umask = process_umask()  # the daemon's own (never 0): see _give_mode
        # inodes known to have no security.capability xattr: the kernel asks
        # before every write(2); a patched pyfuse3 (DELTAFS_PATCHES
        # 'nocaps_inodes') answers these in C without calling getxattr
        self.nocaps_inodes: set[int] = set()
        # the mass-damage guard (deltafs/guard.py, docs/guard.md): under
        # --guard-action block, while suspicious or alerted, a Block whose
        # check(ctx) paces or refuses changes (EPERM); else None: one
        # attribute test per request
        self.guard_block = None
        self.guard_opens = None  # a bounded deque: (parent, name) of read-only opens, for the guard

    # ---- helpers -------------------------------------------------------

    def fuse_ino(self, st_ino: int) -> int:
        if st_ino == self.root_ino:
            return ROOT
        if st_ino == ROOT:
            return self.root_ino
        return st_ino

    def _nameless_file_attrs(self, ino: int, attr) -> pyfuse3.EntryAttributes:
        """Attributes for a regular file nobody can reach (no name, no handle, no descriptor)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = stat.S_IFREG | 0o600
        e.st_nlink = 0
        e.st_blksize = 4096
        for f in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, f, getattr(attr, f))
        return e

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
        except KeyError:  # a view's inode: nothing of it may change
            raise FUSEError(errno.EROFS if ino >= VIEW_INODES else errno.ESTALE) from None

    def _stat_entry(self, parent: Node, name: bytes, err: int) -> os.stat_result | None:
        """lstat of parent/name (None if missing); the journal directory answers ``err``."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if st.st_ino == self.hidden_ino and st.st_dev == self.dev:
            raise FUSEError(err)
        return st

    def _known(self, st: os.stat_result | None) -> Node | None:
        return None if st is None else self.nodes.get(self.fuse_ino(st.st_ino))

    def _remember(self, parent: Node, name: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Count one lookup of the inode at parent/name (st: its lstat)."""
        ino = self.fuse_ino(st.st_ino)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, self.fc, parent, name)
            parent.kids += 1
        elif node.parent is not parent or node.name != name:
            self._saw_name(node, parent, name, st)
        node.lookups += 1
        e = self.attrs(st, ino)
        e.generation = node.gen
        return e

    def _entry(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        if st.st_ino == self.hidden_ino and st.st_dev == self.dev:
            raise FUSEError(errno.ENOENT)
        return self._remember(parent, name, st)

    # ---- names: every node knows where it is ----------------------------

    def _saw_name(self, node: Node, parent: Node, name: bytes, st: os.stat_result) -> None:
        """A lookup found node at parent/name, which is not its (first) known name."""
        if node.ino == ROOT:
            return
        if node.links and any(p is parent and n == name for p, n in node.links):
            return
        if node.parent is None:
            # It had lost its last known name.  Held open, the inode cannot
            # have been freed: this is a link of it we had not seen.  Not
            # held, the number may belong to a new inode: tell the kernel.
            if node.cached_fd < 0:
                node.gen += 1
            self._set_name(node, parent, name)
        elif stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            self._set_name(node, parent, name)  # moved behind the mount's back
        else:  # another name of a hard-linked file
            if node.links is None:
                node.links = []
            node.links.append((parent, name))
            parent.kids += 1
            if len(node.links) > MAX_LINKS:
                self._drop_name(node, *node.links[0])

    def _set_name(self, node: Node, parent: Node, name: bytes) -> None:
        """node's only known name is now parent/name."""
        while node.links:
            self._drop_name(node, *node.links[-1])
        old = node.parent
        node.parent, node.name = parent, name
        parent.kids += 1
        if old is not None:
            self._unkid(old)
        self._repin(node)

    def _drop_name(self, node: Node, parent: Node, name: bytes) -> None:
        """parent/name no longer names node (unlinked, renamed away or over)."""
        if node.parent is parent and node.name == name:
            if node.links:
                node.parent, node.name = node.links.pop()
                if not node.links:
                    node.links = None
            else:
                node.parent, node.name = None, b""
                self._repin(node)
        elif node.links:
            try:
                node.links.remove((parent, name))
            except ValueError:
                return
            if not node.links:
                node.links = None
        else:
            return
        self._unkid(parent)

    def _move_name(self, node: Node, parent: Node, name: bytes, new_parent: Node, new_name: bytes) -> None:
        if node.parent is parent and node.name == name:
            node.parent, node.name = new_parent, new_name
        elif node.links and (parent, name) in node.links:
            node.links[node.links.index((parent, name))] = (new_parent, new_name)
        else:
            self._set_name(node, new_parent, new_name)  # its name was never seen
            return
        new_parent.kids += 1
        self._unkid(parent)

    def _unkid(self, parent: Node) -> None:
        parent.kids -= 1
        if parent.kids <= 0:
            self.release_node_if_unused(parent)

    def _repin(self, node: Node) -> None:
        self.fc.pin(node, node.handles > 0 or node.parent is None)

    def _hold(self, *nodes: Node) -> list[Node]:
        """Keep these nodes' descriptors open while a request uses them together
        (opening one may otherwise evict the other)."""
        held = [n for n in nodes if not n.pinned]
        for n in held:
            self.fc.pin(n, True)
        return held

    def _unhold(self, held: list[Node]) -> None:
        for n in held:
            self._repin(n)

    def _before_last_name(self, node: Node | None, parent: Node, name: bytes, is_dir: bool) -> None:
        """parent/name is about to go: if it is node's last known name and
        the kernel may still use the node (open handles, a directory someone
        is in), take a descriptor now, while a name still leads to it."""
        if node is None or node.cached_fd >= 0 or node.links or not (node.handles or is_dir):
            return
        if node.parent is parent and node.name == name:
            node.fd  # noqa: B018 (opens it)

    def path_of(self, node: Node) -> bytes | None:
        """The node's path relative to SRC ('' is the root), None if unlinked.

        Derived from the node tree, so it works at any depth; a hard link
        gives its first known name.
        """
        parts = []
        n = node
        while n.ino != ROOT:
            if n.parent is None:
                return None
            parts.append(n.name)
            n = n.parent
        parts.reverse()
        return b"/".join(parts)

    def child_path(self, parent: Node, name: bytes) -> bytes | None:
        pp = self.path_of(parent)
        if pp is None:
            return None
        return pp + b"/" + name if pp else name

    def _proc(self, node: Node) -> bytes:
        return f"/proc/self/fd/{node.fd}".encode()

    def _stat(self, node: Node) -> os.stat_result:
        """lstat of node's inode, through its name when it holds no descriptor."""
        if node.cached_fd < 0 and node.parent is not None:
            try:
                st = os.stat(node.name, dir_fd=node.parent.fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and self.fuse_ino(st.st_ino) == node.ino:
                return st
        return os.fstat(node.fd)

    def descriptor_status(self) -> dict:
        """For status: descriptor use, the budget, evictions; inodes known."""
        return {**self.fc.status(), "inodes": len(self.nodes)}

    def shed(self, why: str) -> int:
        """Descriptors ran short elsewhere (the control socket): close cached ones."""
        return self.fc.shed(why)

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

    async def _changing(self, ctx) -> None:
        """First thing in a request that changes SRC, before it changes anything:
        backpressure (wait while capture's queue is full: capture/pipeline.py),
        then the guard's block, if on."""
        await self.rec.throttle()
        if self.guard_block is not None:
            await self.guard_block.check(ctx)

    # ---- lookup, attributes ---------------------------------------------

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode >= VIEW_INODES or parent_inode == ROOT and name == self.view_name:
            return await self.view.lookup(parent_inode, name, ctx)
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
            if node.lookups <= 0:
                self.release_node_if_unused(node)

    def release_node_if_unused(self, node: Node) -> None:
        """Forget node once nothing needs it: no lookups, handles, capture, children."""
        while (node.lookups <= 0 and node.handles == 0 and node.cap.pending is None and node.kids <= 0
               and node.ino != ROOT and self.nodes.get(node.ino) is node):
            del self.nodes[node.ino]
            self.nocaps_inodes.discard(node.ino)
            self.fc.drop(node)
            for p, _ in node.links or ():
                p.kids -= 1
                self.release_node_if_unused(p)
            node.links = None
            parent = node.parent
            if parent is None:
                return
            node.parent = None
            parent.kids -= 1
            node = parent  # its last child may have been what kept it

    @_errors
    async def getattr(self, inode, ctx=None):
        node = self.nodes.get(inode)
        if node is None:
            if inode >= VIEW_INODES and self.view is not None:
                return await self.view.getattr(inode, ctx)
            raise FUSEError(errno.ESTALE)
        return self.attrs(self._stat(node), inode)

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        # With the writeback cache the kernel itself sets mtime+ctime after
        # writes; only a caller's utimens is a change of times to journal
        # (content versions carry the mtime anyway)
        times = fields.update_atime or (fields.update_mtime and not fields.update_ctime)
        if times or fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid:
            # backpressure: wait while capture's queue is full.  Not for the writeback
            # cache's own c/mtime flush, which records nothing: the kernel sends it
            # before a written file's fsync, which then waited for room behind another
            # file's 1 GiB capture (issue 19: ~1 s)
            await self.rec.throttle()
        if self.guard_block is not None and (fields.update_size or fields.update_mode or fields.update_uid
                                             or fields.update_gid):
            await self.guard_block.check(ctx)
        node = self._node(inode)
        if (fields.update_ctime and not node.handles and not (
                fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid or fields.update_atime)):
            # the writeback cache flushing c/mtime, as it does for every
            # file rm unlinks: for a file nobody can reach any more (no
            # links, no handles) setting its times is wasted work
            if node.parent is None and not node.links and node.cached_fd < 0:
                # unlinked or renamed over while its descriptor was shed: no name leads to it,
                # so it cannot be opened (ESTALE, which a syncfs of the mount then returned:
                # `sync -f MNT` failed after an atomic save).  Only a regular file's dirty
                # times come this way: answer them as a nameless regular file's.
                return self._nameless_file_attrs(inode, attr)
            st = os.fstat(node.fd)
            if st.st_nlink == 0:
                return self.attrs(st, inode)
        if fields.update_size:
            self.rec.track(node)
            await self.rec.before_change(self, node, self.path_of(node))
            await node.cap.wait()
            h = self.handles.get(fh) if fh is not None else None
            before = os.fstat(node.fd).st_size
            if h is not None and h.writable:
                os.ftruncate(h.fd, attr.st_size)
            else:
                os.truncate(self._proc(node), attr.st_size)
            node.cap.resized(before, attr.st_size)
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
        # Only a caller's utimens (``times``)/chmod/chown is a change to journal,
        # and only if it changed something: vim chmods to the same mode after
        # every save.  A chown that clears set-id bits records the mode too.
        mode = before is not None and st.st_mode != before.st_mode
        owner = chown and (st.st_uid, st.st_gid) != (before.st_uid, before.st_gid)
        if mode or owner or times:
            self.rec.on_setattr(self, node, st, mode=mode, owner=owner, times=times)
        if fields.update_size and not node.writers:
            # truncate(2) by path: no release will follow, capture now
            self.rec.release(self, node)
        return self.attrs(st, inode)

    @_errors
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if node.cached_fd < 0 and node.parent is not None:
            return os.readlink(node.name, dir_fd=node.parent.fd)
        return os.readlink(b"", dir_fd=node.fd)

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
        fd = self.fc.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd, handle=True)
        self._dir_serial += 1
        fh = self._dir_serial
        self.dirs[fh] = DirHandle(fd, node)
        node.handles += 1
        self._repin(node)
        return fh

    def _listing(self, fh: int, start_id: int) -> tuple[Node, list, int, int]:
        """The directory, its entry snapshot for one readdir pass, the index
        to go on from and the pass's offset base.

        A pass starts at offset 0 (rewinddir starts a new one): entries
        added meanwhile may or may not show, removed ones are skipped, none
        shows twice.  Without open handles (``dir_handle_is_inode``) ``fh``
        is the directory's inode, so concurrent passes over one directory
        cannot be told apart by it: each pass gets a number of its own,
        carried in the high bits of the offsets it hands out (``PASS_SHIFT``),
        and its snapshot is kept under that number (a bounded number of
        them) until the call that finds it at its end.  Keyed by the inode
        instead, a pass that finished (or a second pass that started) would
        make the next call read a fresh listing from the old index: names
        created meanwhile shift the rest, which then show twice (issue 23).
        """
        if self.dir_handle_is_inode:
            node = self._node(fh)
            pid, i = start_id >> PASS_SHIFT, start_id & PASS_MASK
            got = self._listings.get(pid) if start_id else None
            if got is not None and got[1] is None:  # a finished pass: only its end is left
                if i >= got[2] and got[0] == fh:
                    return node, [], i, pid << PASS_SHIFT
                got = None
            if got is None or got[0] != fh:
                if start_id == 0 or got is not None:
                    self._pass = self._pass % PASS_MAX + 1
                    pid = self._pass
                # else: a pass whose snapshot was evicted goes on (best effort) from a new one
                got = self._listings[pid] = (fh, self.fc.retry(self._scan_dir, node))
                while len(self._listings) > LISTINGS_KEPT:
                    self._listings.popitem(last=False)
            return node, got[1], i, pid << PASS_SHIFT
        dh = self.dirs[fh]
        if start_id == 0 or dh.entries is None:
            dh.entries = self._scan_dir(dh.fd)
        return dh.node, dh.entries, start_id, 0

    @staticmethod
    def _scan_dir(where: Node | int) -> list:
        fd = where.fd if isinstance(where, Node) else where
        with os.scandir(f"/proc/self/fd/{fd}") as it:
            return [(b".", 0), (b"..", 0)] + [(os.fsencode(e.name), e.inode()) for e in it]

    @_errors
    async def readdir(self, fh, start_id, token):
        parent, entries, start, base = self._listing(fh, start_id)
        if base and start >= len(entries):  # the pass is at its end: keep only that
            pid = base >> PASS_SHIFT
            if pid in self._listings and self._listings[pid][1] is not None:
                self._listings[pid] = (fh, None, len(entries))
            return
        held = self._hold(parent)  # pfd stays valid whatever the names below do to the LRU
        try:
            self._readdir(parent, parent.fd, entries, start, base, token)
        finally:
            self._unhold(held)

    def _readdir(self, parent: Node, pfd: int, entries: list, start: int, base: int, token) -> None:
        hidden = self.hidden_ino
        nodes = self.nodes
        for i in range(start, len(entries)):
            name, d_ino = entries[i]
            if i < 2:
                # The kernel keeps no lookup count for '.' and '..': neither do we.
                try:
                    st = os.stat(name, dir_fd=pfd)
                except OSError:
                    continue
                if not pyfuse3.readdir_reply(token, name, self.attrs(st, self.fuse_ino(st.st_ino)), base | (i + 1)):
                    return
                continue
            if d_ino == hidden:
                continue
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except OSError:
                continue  # removed while listing
            if st.st_ino != d_ino:  # replaced while listing
                continue
            ino = self.fuse_ino(d_ino)
            node = nodes.get(ino)
            e = self.attrs(st, ino)
            if node is not None:
                e.generation = node.gen
            if not pyfuse3.readdir_reply(token, name, e, base | (i + 1)):
                return
            # readdirplus counts as a lookup of every entry it returns
            if node is None:
                node = nodes[ino] = Node(ino, self.fc, parent, name)
                parent.kids += 1
            elif node.parent is not parent or node.name != name:
                self._saw_name(node, parent, name, st)
            node.lookups += 1

    @_errors
    async def releasedir(self, fh):
        dh = self.dirs.pop(fh)
        self.fc.close_handle(dh.fd)
        dh.node.handles -= 1
        self._repin(dh.node)
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
                await self._fsyncdir(fd, node)
            finally:
                os.close(fd)
            return
        dh = self.dirs[fh]
        await self._fsyncdir(dh.fd, dh.node)

    async def _fsyncdir(self, fd: int, node: Node) -> None:
        if self.rec.settled(node):  # nothing queued about it: the flush alone (sqlite, each transaction)
            await hops.run(os.fsync, fd)
        else:
            await self._durable(os.fsync, fd, self.rec.sync, node.ino)

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._changing(ctx)
        parent = self._node(parent_inode)
        os.mkdir(name, mode, dir_fd=parent.fd)
        self._own(parent, name, ctx)
        e = self._entry(parent, name)
        node = self.nodes[e.st_ino]
        e = self._give_mode(parent, node, mode, e)
        self.rec.on_mkdir(self, parent, name, node)
        return e

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self._changing(ctx)
        parent = self._node(parent_inode)
        node = self._known(self._stat_entry(parent, name, errno.EACCES))
        self._before_last_name(node, parent, name, True)
        os.rmdir(name, dir_fd=parent.fd)
        self.rec.on_rmdir(self, parent, name)
        if node is not None:
            self._drop_name(node, parent, name)

    # ---- namespace ------------------------------------------------------

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._changing(ctx)
        parent = self._node(parent_inode)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        self._own(parent, name, ctx)
        e = self._entry(parent, name)
        node = self.nodes[e.st_ino]
        e = self._give_mode(parent, node, mode, e)
        self.rec.on_mknod(self, parent, name, node)
        return e

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        await self._changing(ctx)
        parent = self._node(parent_inode)
        os.symlink(target, name, dir_fd=parent.fd)
        self._own(parent, name, ctx)
        e = self._entry(parent, name)
        self.rec.on_symlink(self, parent, name, self.nodes[e.st_ino], target)
        return e

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        await self._changing(ctx)
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        held = self._hold(node, parent)
        try:
            sc.link_fd(node.fd, parent.fd, new_name)
            st = os.fstat(node.fd)
        finally:
            self._unhold(held)
        node.lookups += 1
        if node.parent is None:
            self._set_name(node, parent, new_name)
        else:
            if node.links is None:
                node.links = []
            node.links.append((parent, new_name))
            parent.kids += 1
        self.rec.on_link(self, node, parent, new_name)
        e = self.attrs(st, inode)
        e.generation = node.gen
        return e

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        await self._changing(ctx)
        parent = self._node(parent_inode)
        st = self._stat_entry(parent, name, errno.EACCES)
        if self.rec.enabled and st is not None:
            await self._before_replace(parent, name, st)
        node = self._known(st)
        self._before_last_name(node, parent, name, False)
        os.unlink(name, dir_fd=parent.fd)
        self.rec.on_unlink(self, parent, name, last=st is None or st.st_nlink <= 1)
        if node is not None:
            self._drop_name(node, parent, name)
        if self.guard_block is not None:
            await self._guard_scored()

    async def _guard_scored(self) -> None:
        """While the guard paces (docs/guard.md), a delete or rename returns
        once it is committed and scored, as a written file's close does: the
        alert stands before the caller begins its next file."""
        blk = self.guard_block
        if blk is not None:
            await blk.wait_scored()

    async def _before_replace(self, parent: Node, name: bytes, st: os.stat_result | None) -> bool:
        """Pre-image of a file about to be unlinked or renamed over (st: its
        lstat, as the caller just took it; None: no such entry).  -> it exists."""
        if st is None:
            return False
        if not stat.S_ISREG(st.st_mode):
            return True
        node = self.nodes.get(self.fuse_ino(st.st_ino))
        # (no wait for a capture of the file in flight: it reads its own descriptor,
        # which the unlink or rename leaves intact, and commits before this change)
        await self.rec.before_change(self, node, self.child_path(parent, name), need_base=False)
        return True

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._changing(ctx)
        old = self._node(parent_inode_old)
        new = self._node(parent_inode_new)
        st_old = self._stat_entry(old, name_old, errno.EACCES)
        st_new = self._stat_entry(new, name_new, errno.EACCES)
        src_path = dst_path = None
        replaced = False
        if self.rec.enabled:
            replaced = await self._before_replace(new, name_new, st_new)
            if flags & sc.RENAME_EXCHANGE:
                await self._before_replace(old, name_old, st_old)
            src_path = self.child_path(old, name_old)
            dst_path = self.child_path(new, name_new)
        over_xattrs: list = []  # a replaced file's xattr names: an atomic save drops those the new file lacks
        if self.rec.enabled and st_new is not None and stat.S_ISREG(st_new.st_mode):
            try:
                over_xattrs = os.listxattr(b"/proc/self/fd/%d/%s" % (new.fd, name_new), follow_symlinks=False)
            except OSError:
                pass
        moved, over = self._known(st_old), self._known(st_new)
        if over is moved:
            moved = over = None  # two names of one inode: rename changes nothing
        elif over is not None and not flags & sc.RENAME_EXCHANGE:
            self._before_last_name(over, new, name_new, stat.S_ISDIR(st_new.st_mode))
        held = self._hold(old, new)
        try:
            sc.renameat2(old.fd, name_old, new.fd, name_new, flags)
        finally:
            self._unhold(held)
        if st_new is None or (st_new.st_dev, st_new.st_ino) != (st_old.st_dev, st_old.st_ino):
            # (two names of one inode: rename(2) does nothing, so nothing to record)
            self.rec.on_rename(self, src_path, dst_path, flags, new, name_new, replaced, src_parent=old,
                               over=st_new, over_xattrs=over_xattrs, moved_st=st_old)
        if flags & sc.RENAME_EXCHANGE:
            if over is not None:
                self._move_name(over, new, name_new, old, name_old)
        elif over is not None:
            self._drop_name(over, new, name_new)
        if moved is not None:
            self._move_name(moved, old, name_old, new, name_new)
        if self.guard_block is not None:
            await self._guard_scored()

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
            fd = self._reopen_file(node, f)
        except PermissionError:
            if not writable:
                raise
            f = (f & ~os.O_ACCMODE) | (flags & os.O_ACCMODE)  # write-only file mode
            fd = self._reopen_file(node, f)
        return fd, writable

    def _reopen_file(self, node: Node, flags: int) -> int:
        """A new descriptor of node's file with flags: through its name relative
        to its parent (one openat) when the node holds no descriptor, else
        through /proc/self/fd (also for unlinked files)."""
        if node.cached_fd < 0 and node.parent is not None:
            fd = self.fc.open(node.name, flags | os.O_NOFOLLOW, dir_fd=node.parent.fd, handle=True)
            try:
                if self.fuse_ino(os.fstat(fd).st_ino) == node.ino:
                    return fd
            except BaseException:
                self.fc.close_handle(fd)
                raise
            self.fc.close_handle(fd)  # replaced behind the mount's back: go by the inode
        return self.fc.open(self._proc(node), flags, handle=True)

    def _new_handle(self, fd: int, node: Node, writable: bool) -> pyfuse3.FileInfo:
        self.handles[fd] = Handle(fd, node, writable)
        node.handles += 1
        if node.handles == 1:
            self._repin(node)
        if writable:
            node.writers += 1
            self.rec.track(node)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_errors
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            if self.guard_block is not None:
                await self.guard_block.check(ctx)
            self.rec.track(node)
            await self.rec.before_change(self, node, self.path_of(node))
            await node.cap.wait()
        elif self.guard_opens is not None:  # the guard's open-then-delete signal counts opens
            self.guard_opens.append((node.parent, node.name))
        fd, writable = self._open_fd(node, flags)
        info = self._new_handle(fd, node, writable)
        if flags & os.O_TRUNC and writable:
            node.cap.truncated()
        return info

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._changing(ctx)
        parent = self._node(parent_inode)
        f, writable = self._backing_flags(flags)
        fd = self.fc.open(name, f | os.O_CREAT, mode, dir_fd=parent.fd, handle=True)
        try:
            st = os.fstat(fd)
            if os.geteuid() == 0 and (st.st_uid != ctx.uid or st.st_gid != ctx.gid):
                pst = os.fstat(parent.fd)
                os.fchown(fd, ctx.uid, -1 if pst.st_mode & stat.S_ISGID else ctx.gid)
                st = os.fstat(fd)
        except BaseException:
            self.fc.close_handle(fd)
            raise
        e = self._remember(parent, name, st)
        node = self.nodes[e.st_ino]
        if st.st_size == 0 and st.st_nlink == 1:
            self.nocaps_inodes.add(node.ino)  # a new file has no security.capability
        e2 = self._give_mode(parent, node, mode, e, fd)
        if e2 is not e:
            e, st = e2, os.fstat(fd)
        self.rec.on_create(self, parent, name, node, st)
        return self._new_handle(fd, node, writable), e

    @_errors
    async def read(self, fh, off, size):
        try:
            fd = self.handles[fh].fd
        except KeyError:  # not a live handle: the view's (fh >= VIEW_INODES)
            if fh >= VIEW_INODES and self.view is not None:
                return await self.view.read(fh, off, size)
            raise
        return os.pread(fd, size, off)

    @_errors
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        cap = h.node.cap  # a writable handle's node is tracked (_new_handle)
        if cap.pending is not None:  # a change to a file whose capture is in flight waits for it
            await cap.wait()
        n = os.pwrite(h.fd, buf, off)
        cap.mark(off, off + n)
        return n

    @_errors
    async def flush(self, fh):
        # While the guard paces or blocks (docs/guard.md), the last writer's
        # close(2) queues the capture itself: FLUSH is answered before close
        # returns, RELEASE only after, so the caller's next change (delete
        # the original, rename to .locked) would otherwise pass the guard
        # before this file's damage was scored.  While it paces, close(2)
        # also waits for that scoring: the alert stands before the caller
        # opens its next file.
        blk = self.guard_block
        if blk is not None:
            h = self.handles.get(fh)
            if h is not None and h.writable and h.node.writers == 1 and h.node.cap.changed:
                self.rec.release(self, h.node)
                await blk.wait_scored()

    @_errors
    async def release(self, fh):
        h = self.handles.pop(fh)
        self.fc.close_handle(h.fd)
        node = h.node
        node.handles -= 1
        if node.handles == 0:
            self._repin(node)
        if h.writable:
            node.writers -= 1
            if node.writers == 0 and node.cap.changed:
                self.rec.release(self, node)
                # backpressure: each queued capture holds a descriptor and
                # memory; while the queue is full, close(2) waits for the journal
                await self.rec.throttle(self.capture_backlog)
        self.release_node_if_unused(node)

    @_errors
    async def fsync(self, fh, datasync):
        # Through any descriptor (`sync FILE` opens read-only): what was
        # written, and every capture or record already queued about the
        # inode, is durable in the journal when this returns.
        h = self.handles[fh]
        fn = os.fdatasync if datasync else os.fsync
        if trace.ON:
            trace.start()
        if self.rec.settled(h.node):
            await hops.run(fn, h.fd)
            return
        await self._durable(fn, h.fd, self.rec.fsync, self, h.node, one_hop=True)
        if trace.ON:
            trace.mark("fsync.reply")
            trace.dump(ino=h.node.ino, path=os.fsdecode(self.path_of(h.node) or b""))

    async def _durable(self, fn, fd: int, journal_wait, *args, one_hop: bool = False) -> None:
        """fn(fd) in a thread while awaiting journal_wait(*args).  The capture reads
        the page cache, not the disk: flushing SRC and committing the journal
        at the same time makes the caller wait for the slower of the two, not
        their sum.

        one_hop: journal_wait takes the flush (``flush=``, a hops.Flush) and may
        have the worker that computes and commits a small capture run it too,
        after the commit: one thread hand-off for the whole fsync instead of
        two in parallel, whose GIL hand-offs cost more CPU than the overlap
        saved (issue 19, sqlite: one captured fsync a transaction).  Whatever
        that path does not cover starts the flush in its own hop as before.
        Either way the reply waits for both, and a flush error fails it."""
        async with trio.open_nursery() as nursery:
            flush = hops.Flush(fn, fd, nursery)
            if one_hop:
                await journal_wait(*args, flush=flush)
            else:
                flush.start()
                await journal_wait(*args)
            if trace.ON:
                trace.mark("fsync.journal_done")
            await flush.wait()
        if flush.error is not None:
            raise flush.error

    @_errors
    async def fallocate(self, fh, mode, offset, length):
        """fallocate(2) in the modes the kernel passes on (deltafs's pyfuse3 build;
        a stock pyfuse3 never calls this, and the kernel answers EOPNOTSUPP)."""
        if mode & ~_FALLOC_MODES:
            raise FUSEError(errno.EOPNOTSUPP)
        h = self.handles[fh]
        cap = h.node.cap
        if cap.pending is not None:
            await cap.wait()
        before = os.fstat(h.fd).st_size
        sc.fallocate(h.fd, mode, offset, length)
        end = offset + length
        keep = mode & sc.FALLOC_FL_KEEP_SIZE
        if mode & (sc.FALLOC_FL_PUNCH_HOLE | sc.FALLOC_FL_ZERO_RANGE):
            zeroed = min(end, before) if keep else end  # these bytes read as zeros now
            if zeroed > offset:
                cap.mark(offset, zeroed)
        if not keep and end > before:
            cap.resized(before, end)  # the file grew: the new bytes are zeros

    # ---- extended attributes ------------------------------------------

    async def getxattr(self, inode, name, ctx):
        # The kernel asks for security.capability before every write(2) (to
        # strip it); deltafs is SRC's only writer, so a "none" answer is
        # cached on the inode until setxattr/removexattr of that name.
        node = self.nodes.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        if name == _CAPS:
            if inode in self.nocaps_inodes:
                raise FUSEError(errno.ENODATA)
            try:
                return os.getxattr(self._proc(node), name)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    self.nocaps_inodes.add(inode)
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
        await self._changing(ctx)
        node = self._node(inode)
        before = self._xattr_state(node, name) if self.rec.enabled else None
        os.setxattr(self._proc(node), name, value)
        if name == _CAPS:
            self.nocaps_inodes.discard(node.ino)
        # Setting what is already there is no record: the same value again,
        # or a system.posix_acl_access equal to the mode (vim writes one after
        # every save; SRC's filesystem stores no ACL for it).
        if before is None or self._xattr_state(node, name) != before:
            self.rec.on_setxattr(self, node, name, value)

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
        await self._changing(ctx)
        node = self._node(inode)
        os.removexattr(self._proc(node), name)
        self.rec.on_removexattr(self, node, name)
