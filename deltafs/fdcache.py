"""Bounded descriptors for the inodes the mount knows (docs/design.md, "Descriptors").

The kernel may cache any number of inodes (with long entry timeouts it
forgets them only under memory pressure), and ops.py keeps a ``Node`` for
each.  Descriptors, though, are bounded by RLIMIT_NOFILE.  So a node's
O_PATH descriptor is an *entry of this cache*, not a fixture of the node:

* every node knows its parent node and its name (ops.py keeps them right
  through lookup, create, link, rename and unlink: deltafs is SRC's only
  writer while mounted), so a node without a descriptor is opened again
  relative to its parent, and the inode number it finds is checked;
* unpinned descriptors live in an LRU of at most ``budget`` entries
  (default a quarter of the limit); opening one more closes the least
  recently used;
* a descriptor is *pinned* (outside the LRU, never closed by it) while its
  node has open handles or has lost its last name (an unlinked-but-open
  file, a removed directory still in use), and for the root;
* at least ``RESERVE`` descriptors stay free for everything else (journal,
  pack files, control socket, mirrors, captures): an open that would eat
  into them first sheds cached descriptors, and a user's open that still
  does not fit is answered EMFILE, so the daemon itself never runs out.

Whether descriptors are short is judged from what this process owns (the
cache, pinned descriptors, open handles) plus an estimate of the rest,
recounted from /proc/self/fd every 4,096 opens and near the limit, and from the number an
open returns (the kernel gives the lowest free number, so a descriptor
numbered n means n descriptors below it are in use).  The hot path pays an
``OrderedDict.move_to_end`` per use, nothing more.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict

log = logging.getLogger(__name__)

RESERVE = 256  # descriptors always left free for the journal, control socket, mirrors, captures
MIN_BUDGET = 4  # the LRU never holds fewer (tests use 4 to evict all the time)
KEEP_ON_SHED = 8  # most recently used descriptors a shed never closes: a handler may hold them
RECOUNT_EVERY = 1.0  # seconds between recounts of /proc/self/fd near the limit
RECOUNT_OPENS = 4095  # and once every 4,096 opens anyway (a mask)
INCIDENT_GAP = 60.0  # seconds without a shortage that end an incident (one WARNING each)
_SHORT = (errno.EMFILE, errno.ENFILE)
CLOSER_BACKLOG = 1024  # deferred closes queued at most; past that, drop closes at once
O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def count_open(limit: int = 0) -> int:
    """Descriptors this process has open (a listing of /proc/self/fd, less its own);
    ``limit`` when not even that listing can be opened."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return limit


def default_budget(limit: int) -> int:
    return limit // 4


class FdCache:
    """The LRU of node descriptors, the pinned ones, and the descriptor accounting."""

    def __init__(self, limit: int, budget: int | None = None, root_ino: int = 1) -> None:
        self.limit = limit
        self.reserve = min(RESERVE, limit // 4)
        want = default_budget(limit) if budget is None else budget
        # the budget never eats into the reserve nor into room for open handles
        self.budget = max(MIN_BUDGET, min(want, limit - 2 * self.reserve))
        if budget is not None and self.budget != budget:
            log.info("descriptor budget %d lowered to %d (limit %d, %d kept free)",
                     budget, self.budget, limit, self.reserve)
        self.cap = self.budget  # the LRU's size right now: lowered by a shortage, restored after
        self.root_ino = root_ino  # backing inode of SRC's root (FUSE inode 1)
        self.lru: OrderedDict = OrderedDict()  # Node -> None, least recently used first
        self.pinned = 0  # node descriptors held outside the LRU
        self.handles = 0  # descriptors of open file and directory handles
        self.others = count_open()  # descriptors neither cached, pinned nor handles (estimate)
        self._recounted = time.monotonic()
        self._opens = 0
        self.high = limit - self.reserve  # a descriptor numbered this or more: the reserve is in use
        # counters shown by status
        self.evictions = 0  # descriptors closed by the LRU (budget reached)
        self.reopens = 0  # nodes opened again after an eviction (or first opened)
        self.shed_count = 0  # descriptors closed because descriptors ran short
        self.shortages = 0  # incidents (one WARNING each)
        self.refused = 0  # opens answered EMFILE to keep the reserve free
        self._last_short = -INCIDENT_GAP

    # ---- the LRU ---------------------------------------------------------

    def owned(self) -> int:
        return len(self.lru) + self.pinned + self.handles

    def add(self, node, fd: int) -> None:
        """node now holds fd (pinned or in the LRU)."""
        node.cached_fd = fd
        if node.pinned:
            self.pinned += 1
            return
        self.lru[node] = None
        if len(self.lru) > self.cap:
            self._trim()

    def _trim(self) -> None:
        if self.cap < self.budget and time.monotonic() - self._last_short > INCIDENT_GAP / 6:
            self.cap = self.budget  # the shortage is over: grow back
        lru = self.lru
        while len(lru) > self.cap:
            node, _ = lru.popitem(last=False)
            fd, node.cached_fd = node.cached_fd, -1
            os.close(fd)
            self.evictions += 1

    def drop(self, node) -> None:
        """Close node's descriptor (the node is forgotten)."""
        fd = node.cached_fd
        if fd < 0:
            return
        node.cached_fd = -1
        if node.pinned:
            self.pinned -= 1
            # pinned and forgotten: it lost its last name (rm), and this
            # close is the one that makes ext4 free the inode and its
            # blocks (0.3-0.7 ms); a thread does it while the loop answers
            # the next request
            _closer.close(fd)
            return
        else:
            del self.lru[node]
        os.close(fd)

    def pin(self, node, pinned: bool) -> None:
        if node.pinned == pinned:
            return
        node.pinned = pinned
        if node.cached_fd < 0:
            return
        if pinned:
            del self.lru[node]
            self.pinned += 1
        else:
            self.pinned -= 1
            self.lru[node] = None
            if len(self.lru) > self.cap:
                self._trim()

    # ---- opening ---------------------------------------------------------

    def reopen(self, node) -> int:
        """Open node (and any ancestor lacking a descriptor) relative to its parent."""
        chain = []
        n = node
        while n.cached_fd < 0:
            if n.parent is None:  # unlinked while not held: nothing leads to it
                raise OSError(errno.ESTALE, "no name leads to this inode any more")
            chain.append(n)
            n = n.parent
        if not n.pinned:
            self.lru.move_to_end(n)
        for n in reversed(chain):
            fd = self._open_named(n)
            self.reopens += 1
            self.add(n, fd)
        return node.cached_fd

    def _open_named(self, n) -> int:
        """An O_PATH descriptor of n through one of its names, checked by inode number."""
        want = self.root_ino if n.ino == 1 else (1 if n.ino == self.root_ino else n.ino)
        names = [(n.parent, n.name)]
        if n.links:
            names += n.links
        for parent, name in names:
            pfd = parent.fd  # used at once: the most recent descriptor, never shed before use
            try:
                fd = self.open(name, O_PATH, dir_fd=pfd)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_ino == want:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        log.debug("inode %d: none of its names leads to it any more", n.ino)
        raise OSError(errno.ESTALE, "changed behind the mount's back")

    def open(self, path, flags: int, mode: int = 0o777, *, dir_fd: int | None = None,
             handle: bool = False) -> int:
        """os.open that never runs the daemon out of descriptors.

        EMFILE/ENFILE sheds cached descriptors and tries once more; a
        result inside the reserve sheds too, and a handle (``handle``, a
        user's open) that still does not fit is closed and answered EMFILE.
        """
        try:
            fd = os.open(path, flags, mode, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in _SHORT or not self.shed("an open"):
                raise
            fd = os.open(path, flags, mode, dir_fd=dir_fd)
        self._opens += 1
        if not self._opens & RECOUNT_OPENS:  # the others (journal, captures...) drift: recount
            self.others = max(0, count_open(self.limit) - self.owned())
        if fd >= self.high or self.owned() + self.others + self.reserve >= self.limit:
            if not self._room(handle):
                os.close(fd)
                self.refused += 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        if handle:
            self.handles += 1
        return fd

    def close_handle(self, fd: int) -> None:
        self.handles -= 1
        os.close(fd)

    def _room(self, handle: bool) -> bool:
        """Near the limit: recount, shed if needed.  -> may one more descriptor be kept?"""
        now = time.monotonic()
        if now - self._recounted >= RECOUNT_EVERY:
            self.others = max(0, count_open(self.limit) - self.owned())
            self._recounted = now
        if self.owned() + self.others + self.reserve < self.limit:
            return True
        self.shed("the reserve of %d free descriptors was reached" % self.reserve)
        self.others = max(0, count_open(self.limit) - self.owned())
        self._recounted = time.monotonic()
        return not handle or self.owned() + self.others + self.reserve < self.limit

    def shed(self, why: str) -> int:
        """Descriptors run short: close half the cache (-> how many were closed)."""
        now = time.monotonic()
        keep = max(min(len(self.lru) // 2, self.budget // 2), KEEP_ON_SHED)
        n = 0
        while len(self.lru) > keep:
            node, _ = self.lru.popitem(last=False)
            fd, node.cached_fd = node.cached_fd, -1
            os.close(fd)
            n += 1
        self.shed_count += n
        self.cap = min(self.budget, max(keep, MIN_BUDGET))
        if now - self._last_short > INCIDENT_GAP:
            self.shortages += 1
            log.warning("descriptors ran short (%s): %d of %d open, %d cached for inodes, %d open "
                        "handles; closed %d cached descriptors, and the cache stays smaller until "
                        "the shortage is over (raise the limit with 'ulimit -n' or LimitNOFILE)",
                        why, count_open(self.limit), self.limit, len(self.lru), self.handles, n)
        self._last_short = now
        return n

    def retry(self, fn, *args, **kw):
        """fn(*args) (which opens a descriptor of its own), once more after a shed on EMFILE."""
        try:
            return fn(*args, **kw)
        except OSError as e:
            if e.errno not in _SHORT or not self.shed("an open"):
                raise
            return fn(*args, **kw)

    def status(self) -> dict:
        return {
            "open": count_open(),
            "limit": self.limit,
            "reserve": self.reserve,
            "budget": self.budget,
            "cached": len(self.lru),
            "pinned": self.pinned,
            "handles": self.handles,
            "evictions": self.evictions,
            "reopens": self.reopens,
            "shed": self.shed_count,
            "shortages": self.shortages,
            "refused": self.refused,
        }


# The helper process of _Closer: receives descriptors (SCM_RIGHTS, one per
# message) and closes them; exits when the daemon's end of the socket closes
# (the daemon exited or was killed).  Standard library only, started with -I -S.
# The helper closes the descriptors of one message only once the next message
# arrives, or after HELPER_HOLD seconds with none: the daemon closes its own
# copy right after sending, and a helper that closed at once (woken by the
# send, on the other core or preempting the daemon) often closed first, which
# left the daemon the last reference and the slow close (issue 19: 127-716 of
# 2,111 closes in an rm -rf with capture took 0.2-0.4 ms each on the FUSE loop).
HELPER_HOLD = 0.05
_HELPER = """
import os, select, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
hold = int(float(sys.argv[2]) * 1000)
p = select.poll()  # not select(): the number is the daemon's, often past FD_SETSIZE
p.register(s, select.POLLIN)
held = []
def close(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
while True:
    if held and not p.poll(hold):
        close(held)
        held = []
        continue
    try:
        msg, fds, _, _ = socket.recv_fds(s, 16, 16)
    except InterruptedError:
        continue
    except OSError:
        break
    close(held)
    held = fds
    if not msg and not fds:
        break
close(held)
"""


class _Closer:
    """Closes descriptors nothing uses any more, whose close may be slow
    (the last reference to an unlinked file: ext4 frees the inode and its
    blocks then, 0.3-0.7 ms), off the FUSE loop.

    First choice: hand the descriptor to a small helper process over a unix
    socket (SCM_RIGHTS) and close our copy, which is then not the last
    reference and costs ~1 us; the helper makes the slow close, once the
    next descriptor arrives or after ``hold`` seconds (so never before ours).  In a thread
    of this process instead, every ``os.close`` dropped and took back the GIL
    the FUSE loop was using: about three futex calls per unlinked file in
    rm -rf (issue 19).  When the helper cannot take one (not started, gone,
    its socket full), a thread of this process closes it as before (started
    on first use): the number stays taken until the thread has closed it, so
    nothing else can get it meanwhile; with CLOSER_BACKLOG closes queued, the
    caller closes itself.
    """

    def __init__(self, hold: float = HELPER_HOLD) -> None:
        self.hold = hold  # seconds the helper keeps the last descriptors it got (HELPER_HOLD)
        self.q: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.helper: subprocess.Popen | None = None
        self.helper_failed = False  # could not start, or died: threads only from then on
        self.handed = 0  # descriptors the helper closed for us (status, tests)

    def close(self, fd: int) -> None:
        if self._hand(fd):
            os.close(fd)  # not the last reference any more: cheap
            return
        if self.thread is None:
            with self.lock:
                if self.thread is None:
                    t = threading.Thread(target=self._run, name="deltafs-closer", daemon=True)
                    t.start()
                    self.thread = t
        if self.q.qsize() >= CLOSER_BACKLOG:
            os.close(fd)
            return
        self.q.put(fd)

    def _hand(self, fd: int) -> bool:
        """Pass fd to the helper (it then holds a reference); -> whether it took it."""
        sock = self.sock
        if sock is None:
            if self.helper_failed:
                return False
            sock = self._start()
            if sock is None:
                return False
        try:
            socket.send_fds(sock, [b"c"], [fd])
        except BlockingIOError:  # the helper is behind: a thread closes this one
            return False
        except OSError as e:  # the helper is gone (EPIPE, ECONNRESET), or the kernel refuses (ETOOMANYREFS)
            if e.errno != errno.ETOOMANYREFS:
                self._stop(f"descriptor helper gone ({e}); closing in a thread")
            return False
        self.handed += 1
        return True

    def _start(self) -> socket.socket | None:
        with self.lock:
            if self.sock is not None or self.helper_failed:
                return self.sock
            try:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            except OSError as e:
                self.helper_failed = True
                log.warning("no descriptor helper (%s): closing in a thread", e)
                return None
            try:
                self.helper = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _HELPER, str(theirs.fileno()), repr(self.hold)],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    start_new_session=True)
            except OSError as e:
                ours.close()
                self.helper_failed = True
                log.warning("no descriptor helper (%s): closing in a thread", e)
                return None
            finally:
                theirs.close()  # the helper has its copy; it reads EOF once ours closes
            ours.setblocking(False)
            self.sock = ours
            return ours

    def _stop(self, why: str | None = None) -> None:
        with self.lock:
            sock, self.sock = self.sock, None
            self.helper_failed = True
            if sock is not None:
                sock.close()  # the helper reads EOF and exits
            if self.helper is not None and self.helper.poll() is not None:
                self.helper = None  # reaped
        if why:
            log.warning("%s", why)

    def _run(self) -> None:
        while True:
            fd = self.q.get()
            try:
                os.close(fd)
            except OSError:  # EBADF cannot happen (each is queued once); EIO on close: nothing to do
                pass


_closer = _Closer()
