"""Turn what happens in the mount into journal records, in the order it happened.

Every event (a namespace change, or a content capture at release/fsync)
becomes an *item* in one FIFO pipeline.  Namespace items are ready at once;
content items are computed in worker threads (read the dirty regions,
re-chunk around them, hash, compress against the chunk each new chunk
replaces) and become ready when done.  One committer task takes the ready
items at the head of the queue, in order, and commits them together in one
journal transaction (group commit).  So records are always in event order,
while the expensive work runs in parallel.

The rules that make history follow what the user sees (docs/design.md):

* a file opened for writing, truncated, unlinked or renamed over, which
  has no version yet, first gets its current content captured (pre-image);
* a rename of a regular file over an existing file, or of an ignored temp
  file to a real name, is the next *content version of the target path*
  (cause ``rename-over``), stored against that path's previous chunks;
* a file renamed to an ignored name (``todo.md~``) leaves history like a
  delete; a path re-created within two minutes continues the history of
  the file that last had it only if that file is gone (no name left in the
  tree), never a file still reachable elsewhere (the journal resolves file
  ids by path at commit time; docs/design.md, "File identity");
* ignored paths (editor swap and temp files, .deltaignore) are passed
  through and never journaled.

The scan at mount time records what changed in SRC while it was not
mounted, before the mount becomes visible, so nothing races with it.

Here: the Recorder, a thin coordinator over the capture package.  ``ops``
calls its typed hooks (``before_change``, ``release``, ``fsync``,
``on_create``, ``on_rename``, ...: the ``ops.Capture`` protocol); it
decides what each event records (the rename rules in
:mod:`deltafs.capture.saves`, gone paths in :mod:`deltafs.capture.identity`),
queues records and content captures in the ordered
:class:`~deltafs.capture.pipeline.Pipeline`, and has
:class:`~deltafs.capture.content.ContentCapture` compute versions in
worker threads.
"""

from __future__ import annotations

import logging
import os
import stat
import time

import trio

from deltafs import _syscalls as sc
from deltafs import hops, trace
from deltafs.capture import saves
from deltafs.capture.content import FULL, ContentCapture
from deltafs.capture.identity import GonePaths
from deltafs.capture.pipeline import DEFER_BYTES, Item, Pipeline
from deltafs.capture.state import NodeCapture
from deltafs.errors import JournalError
from deltafs.ignore import IGNORE_FILE, Ignore
from deltafs.journal import Change, Journal, exact_reads

log = logging.getLogger(__name__)

# an fsync's capture up to this size runs SRC's flush in its own worker call
# (one hop, the two in series); a bigger one flushes SRC in parallel
ONE_HOP_BYTES = DEFER_BYTES

_IGNORE_NAME = IGNORE_FILE.encode()  # at the root of SRC: the user's patterns
# Tests only (tests/mount/test_capture_passing.py): "NAME:DIR" holds a capture of a file
# named NAME before it is computed: it creates DIR/held, then waits until DIR/go exists.
_TEST_HOLD = os.environ.get("DELTAFS_TEST_HOLD_CAPTURE")


async def _test_hold(path: bytes) -> None:
    name, _, where = _TEST_HOLD.partition(":")
    if os.path.basename(path) != os.fsencode(name):
        return
    open(os.path.join(where, "held"), "wb").close()
    while not os.path.exists(os.path.join(where, "go")):
        await trio.sleep(0.01)


class Recorder:
    enabled = True

    def __init__(self, journal: Journal, src: str, ignore: Ignore | None = None, *,
                 workers: int = 2) -> None:
        self.journal = journal
        self.src = src
        self.ignore = ignore or Ignore(src)
        self.pipe = Pipeline(journal)  # the ordered queue, its committer, failure counters
        self.pipe.on_recovered = self._recovered
        self.content = ContentCapture(journal)  # computes versions; chunk-list and raw caches
        self.gone = GonePaths()  # paths that just lost their file (a rename onto one is a save)
        self.limiter = trio.CapacityLimiter(workers)
        self.nursery: trio.Nursery | None = None
        self.rescanning = False
        # from a resume until its rescan has finished: SRC may hold changes made
        # while paused that no version has (before_change takes no base then)
        self.catching_up = False
        self.ops = None  # set by the first scan
        self.hidden_ino = -1
        # (path, its latest content version) as before_change just read it from the
        # journal, for the unlink or rename over it that follows in the same request
        # (remember_base needs the same figure: one journal read per unlink, not two)
        self._looked: tuple[bytes, int] | None = None

    # ---- the pipeline's face (status, control, mount and ops use these) ----

    def submit(self, *changes: Change, after=None) -> Item:
        return self.pipe.submit(*changes, after=after)

    async def drain(self) -> None:
        """Return once every item queued so far is committed (or failed)."""
        await self.pipe.drain()

    async def committed(self, item: Item) -> None:
        await self.pipe.committed(item)

    def pending(self) -> int:
        return self.pipe.pending()

    def settled(self, node) -> bool:
        """Nothing of this inode waits to be journaled (fsync's and fsyncdir's
        fast path): nothing written since its last capture, or written to an
        ignored file (sqlite's rollback journal, fsynced twice per
        transaction: no capture to queue; its ranges are dropped at its
        close, as they would be here), and nothing about it queued."""
        if node.cap.changed and not self._ignored(node):
            return False
        return self.pipe.settled(node.ino)

    def _ignored(self, node) -> bool:
        """Is the node's path ignored (never journaled)?  Not the ignore file
        itself, whose capture reloads the patterns."""
        if self.ops is None:
            return False
        path = self.ops.path_of(node)
        return path != _IGNORE_NAME and self._skip(path)

    async def sync(self, ino: int) -> None:
        await self.pipe.sync(ino)

    async def throttle(self, limit: int | None = None) -> None:
        """Backpressure: return once the queue is under its bounds (and at most
        ``limit`` items long); at once when it is."""
        await self.pipe.room(limit)

    def track(self, node) -> NodeCapture:
        """The node may change (opened for writing, truncated, captured): its
        own capture state, created on first use (ops.Node.cap holds a shared
        read-only placeholder until then)."""
        cap = node.cap
        if cap.__class__ is not NodeCapture:
            cap = node.cap = NodeCapture()
        return cap

    @property
    def paused(self) -> bool:
        return self.pipe.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.pipe.paused = value

    @property
    def guard(self):
        return self.pipe.guard

    @guard.setter
    def guard(self, value) -> None:
        self.pipe.guard = value

    versions = property(lambda self: self.pipe.versions)
    records = property(lambda self: self.pipe.records)
    failures = property(lambda self: self.pipe.failures)
    last_error = property(lambda self: self.pipe.last_error)
    last_capture_ns = property(lambda self: self.pipe.last_capture_ns)
    gap = property(lambda self: self.pipe.gap)
    needs_rescan = property(lambda self: self.pipe.needs_rescan)
    raw_cache = property(lambda self: self.content.raw_cache)

    # ---- pipeline ---------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.pipe.checkpointer)
            nursery.start_soon(self.pipe.idle_trimmer, self.content.idle)
            task_status.started()
            await self.pipe.committer()

    def _recovered(self) -> None:
        """A commit succeeded after failures: rescan for what they missed."""
        if not self.rescanning and self.ops is not None:
            self.nursery.start_soon(self._rescan)

    @property
    def behind(self) -> bool:
        """SRC may hold changes no version has, on files whose inode state may
        be gone: from a resume, or a failed capture, until its rescan ends."""
        return self.catching_up or self.rescanning or self.pipe.needs_rescan

    async def resume(self, ops, hidden_ino: int) -> dict:
        """End a pause: capture again, then rescan SRC for what changed while
        paused (-> the scan's counts).  Until the rescan is done, a file opened
        for writing is recorded whole first: its inode state may be gone (the
        kernel forgot it), so nothing says whether it changed while paused."""
        self.paused = False
        self.catching_up = True
        try:
            await self.drain()  # the items dropped while paused are out of the queue
            return await self.scan(ops, hidden_ino)
        finally:
            self.catching_up = False

    async def _rescan(self) -> None:
        """After journal failures: record what the failed commits missed."""
        self.rescanning = True
        self.pipe.needs_rescan = False
        try:
            log.warning("the journal accepts writes again: rescanning SRC for %d change(s) that "
                        "could not be recorded", len(self.pipe.gap))
            gap = len(self.pipe.gap)
            counts = await self.scan(self.ops, self.hidden_ino)
            if not self.pipe.needs_rescan:
                del self.pipe.gap[:gap]
                self.pipe.last_error = None
                self.pipe.incident = None  # repaired: the next failure is a new incident
                log.warning("rescan after journal failures recorded %s", counts)
        except Exception:
            log.exception("rescan after journal failures failed")
            self.pipe.needs_rescan = True
        finally:
            self.rescanning = False

    # ---- content capture ----------------------------------------------------

    def _capture(self, ops, node, fd: int, path: bytes, cause: str, dirty, base: int | None,
                 start=None, may_pass: bool = False) -> Item:
        """Queue a content version of the file open as fd (the item owns fd).

        ``base``: the content version the dirty ranges are relative to;
        None with dirty=FULL means "the whole file, against the path's
        latest version if any" (dedup and delta hints only).  With a node,
        ``base`` is taken from the node's previous capture once it commits.
        ``may_pass``: once computed, it may commit ahead of other files'
        captures queued before it (Pipeline, "Passing").
        """
        item = Item()
        item.path = path
        item.may_pass = may_pass
        cap = self.track(node) if node is not None else None
        prev = cap.last_item if cap is not None else None
        ev = None
        if cap is not None:
            ev = trio.Event()
            cap.pending = ev
            cap.last_item = item
            self.pipe.concerns(item, node.ino)

        def after(res):
            ok = not isinstance(res, BaseException) and bool(res)
            if cap is not None:
                cap.base = res[-1] if ok else None  # failed: the next capture of this inode is whole
                if ok or isinstance(res, BaseException):
                    cap.stale = not ok
            if not ok:
                return
            if item.list_cache is not None:
                # the new list, so the next capture of the file does not
                # rebuild it from the journal (that costs O(chunks + edits))
                self.content.remember_list(res[-1], *item.list_cache)
            elif item.changes and item.changes[-1].op == "write":
                self.content.forget_list(item.changes[-1].base_seq)  # superseded, and too large to keep
        item.after = after
        nbytes = _capture_bytes(fd, dirty)
        defer = (start is None and nbytes <= DEFER_BYTES and not self.pipe.paused and self.pipe.can_defer()
                 and (prev is None or prev.done.is_set()))
        self.pipe.push(item, nbytes, deferred=defer)
        if item.skip and cap is not None:
            # paused: SRC now holds bytes no version has, as after a failed
            # capture, so the file's next version is read whole, not built on
            # the journal's latest (a save between resume and its rescan)
            cap.base, cap.stale = None, True
        if defer:
            self._defer(item, ops, node, ev, fd, path, cause, dirty, base)
            return item
        # start: who runs the computation (fsync runs it itself); by default a new task
        (start or self.nursery.start_soon)(self._compute, item, ops, node, ev, prev, fd, path, cause, dirty, base)
        return item

    def _defer(self, item, ops, node, ev, fd, path, cause, dirty, base) -> None:
        """A small capture at close: computed by the worker that commits it
        (Pipeline.defer), as :meth:`_compute` would compute it.  Its inode's
        previous capture is committed already (the caller checked), so the
        base is final now."""
        if node is not None:
            if dirty is not FULL:
                base = node.cap.base
            node.cap.hurry = self.pipe.hurrying  # a change to the file waiting for it ends the group window
        if dirty is not FULL and base is None:
            dirty = FULL
        hint = self.content.take_hint(node.ino) if node is not None and not base else 0
        content = self.content

        def job():
            try:
                return content.compute(fd, path, cause, dirty, base, content.take(base), hint)
            finally:
                os.close(fd)

        def job_done(err) -> None:
            if err is not None:
                self.pipe.capture_failed(path, err, logged_trace=not isinstance(err, (OSError, JournalError)))
                if node is not None:
                    node.cap.base, node.cap.stale = None, True
            if node is not None:
                node.cap.pending = None
                node.cap.hurry = None
                ev.set()
                ops.release_node_if_unused(node)
        self.pipe.defer(item, job, job_done)

    async def _compute(self, item, ops, node, ev, prev, fd, path, cause, dirty, base, flush=None) -> None:
        solo = False
        one_hop = False  # this worker call runs the fsync's SRC flush too
        result: list | BaseException = []
        try:
            if trace.ON:
                trace.mark("compute.task")
            if item.skip:  # paused: the rescan at resume records the file
                item.changes = []
                return
            if prev is not None:
                if not prev.done.is_set():
                    if flush is not None:
                        flush.start()  # in parallel with the wait for the previous capture
                    await prev.done.wait()
                if trace.ON:
                    trace.mark("compute.prev_done")
                if dirty is not FULL:
                    base = node.cap.base
            if _TEST_HOLD is not None:
                await _test_hold(path)
            if dirty is not FULL and base is None:
                dirty = FULL
            cached = self.content.take(base)  # ours now: edited in place into the new list
            hint = self.content.take_hint(node.ino) if node is not None and not base else 0
            # Alone in the queue with someone waiting (an fsync): the worker
            # commits it right after computing it (Pipeline.solo), one thread
            # hand-off instead of two and no committer wake-up in between.
            solo = self.pipe.solo(item)
            if solo:
                # a small one (sqlite's transaction, an editor's save): SRC's flush
                # in the same worker call, after the commit; a big one keeps the
                # flush in parallel (flush + compute in series would cost wall time)
                one_hop = flush is not None and item.nbytes <= ONE_HOP_BYTES and flush.claim()
                change, item.list_cache, result = await hops.run(
                    self._compute_commit, fd, path, cause, dirty, base, cached, hint, flush if one_hop else None,
                    limiter=self.limiter)
            else:
                if flush is not None:
                    flush.start()
                change, item.list_cache = await hops.run(
                    self.content.compute, fd, path, cause, dirty, base, cached, hint, limiter=self.limiter)
            item.changes = [change]
            if trace.ON:
                trace.mark("compute.back")
        except Exception as e:
            self.pipe.capture_failed(path, e, logged_trace=not isinstance(e, (OSError, JournalError)))
            item.changes = []
            result = []
            if node is not None:
                node.cap.base, node.cap.stale = None, True
        finally:
            if one_hop:
                flush.ran()
            os.close(fd)
            if node is not None:
                node.cap.pending = None
                ev.set()
                ops.release_node_if_unused(node)
            if solo:
                self.pipe.finish_solo(item, result)
            else:
                item.ready.set()

    def _compute_commit(self, fd, path, cause, dirty, base, cached, hint, flush=None):
        """In a worker: compute the capture and commit it (Pipeline.solo),
        then run flush (the fsync's SRC flush, claimed for this call; run
        whatever the compute and commit did: its error is the fsync's).
        After the commit rather than before the compute: a little less CPU
        and wall in the sqlite probe (issue 19, 2026-12-07, 6 runs each).
        -> (change, list cache, seqs or the commit's exception)."""
        try:
            with exact_reads():  # a cold edit's delta base: its chunk, not 8 MiB around it
                change, cache = self.content.compute(fd, path, cause, dirty, base, cached, hint)
            try:
                (res,) = self.journal.commit_many([[change]])
            except Exception as e:  # the whole transaction failed (disk full...)
                res = e
            return change, cache, res
        finally:
            if flush is not None:
                flush.run_here()

    # ---- hooks called by ops ------------------------------------------------

    def _skip(self, path: bytes | None, is_dir: bool = False) -> bool:
        # b"": the root itself, which is no entry of the journal's tree (its mode,
        # owner and xattrs are the mount point's; docs/format.md "Path keys")
        return not path or self.ignore.match(path, is_dir)

    async def before_change(self, ops, node, path: bytes | None, need_base: bool = True) -> None:
        """Make sure the file's current content is in the journal (pre-image).

        need_base: the caller will write in place, so the inode must learn
        the exact version its dirty ranges apply to (an open for writing, a
        truncate).  An unlink or a rename over the file only needs *some*
        version of its content recorded, which a journal snapshot answers
        without waiting for the pipeline (rm -rf would otherwise wait for a
        journal sync per file).
        """
        self._looked = None
        cap = None
        if node is not None:
            cap = self.track(node)
            if self.pipe.paused:
                # nothing is journaled while paused (the rescan at resume records
                # the tree): only the file's next version must be read whole
                cap.base, cap.stale = None, True
                return
            pending = cap.last_item is not None and not cap.last_item.done.is_set()
            if not need_base and pending:
                # a capture of this inode is on its way (queued before the change
                # that follows, reading its own descriptor): some version is
                # recorded; no wait for its computation (a deferred one's commit)
                return
            await cap.wait()
            pending = cap.last_item is not None and not cap.last_item.done.is_set()
            if cap.base and not pending and not need_base and path is not None:
                # the inode's last committed version is the path's latest: what
                # the unlink's remember_base would read from the journal (rm -rf
                # of files captured through the mount: no journal read per unlink).
                # Not base 0 (created, no content captured through the node yet):
                # a capture by path (a rename exchange with an ignored name) may
                # have recorded one the node does not know; the journal says.
                self._looked = (path, cap.base)
                return
            if cap.base is not None or (not need_base and pending):
                return  # recorded, or a capture of this inode is on its way
        if self._skip(path):
            return
        # after a failed capture SRC may hold bytes no version has: record it
        # whole (below) rather than take the journal's latest version for it
        stale = (cap is not None and cap.stale) or (need_base and self.behind)
        if not need_base and not stale:
            seq = self.content.latest_content(path)
            if seq:
                self._looked = (path, seq)  # no await from here to the unlink's on_unlink
                return
        await self.drain()  # the journal now reflects every earlier event
        base = None if stale else await trio.to_thread.run_sync(self.content.latest_content, path)
        if base:
            if cap is not None and cap.base is None:
                cap.base = base
            return
        try:
            if node is not None:
                fd = os.open(f"/proc/self/fd/{node.fd}", os.O_RDONLY | os.O_CLOEXEC)
            else:
                fd = self._at(path, os.open, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return
        item = self._capture(ops, node, fd, path, "preimage", FULL, 0)
        await self.committed(item)

    def release(self, ops, node) -> None:
        """Last close of a written file: queue its capture (returns at once)."""
        self._content_event(ops, node, "write")

    async def fsync(self, ops, node, flush=None) -> None:
        """Capture what is dirty now, and return once it and everything queued
        before about this inode (a capture queued at an earlier close, its
        create, chmod, xattrs) is durable, whichever descriptor asks.

        flush (a hops.Flush, ops._durable): SRC's flush, run by the capture's
        worker call when that call also commits a small capture (one hop),
        else started in its own hop beside the journal wait; the caller
        waits for it."""
        if node.cap.changed:
            runs: list = []
            self._content_event(ops, node, "fsync", start=lambda *a: runs.append(a))
            if trace.ON:
                trace.mark("capture.queued")
            for fn, *args in runs:
                # computed (and, alone in the queue, committed) by this task: no
                # task to start and wake, one scheduler pass less each way;
                # shielded, as a task of the recorder's nursery would be
                with self.pipe.hurrying(), trio.CancelScope(shield=True):
                    await fn(*args, flush=flush)
        if flush is not None:
            flush.start()  # no capture took it (nothing to capture, ignored, paused...)
        await self.sync(node.ino)

    def _content_event(self, ops, node, cause: str, start=None) -> Item | None:
        cap = self.track(node)
        dirty = cap.take()
        path = ops.path_of(node)
        if self._skip(path):
            return None
        if path == _IGNORE_NAME:
            self.ignore.reload()
        try:
            fd = os.open(f"/proc/self/fd/{node.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.pipe.not_recorded(f"the capture of {os.fsdecode(path)}", e, path)
            return None
        # may commit ahead of other files' captures (Pipeline, "Passing") only when its
        # record writes to a path the journal's tree names once the namespace records
        # before it commit: the inode has a version or a queued create, and capture is
        # not catching up (a pause, a failure) on bytes no version has
        may_pass = cap.base is not None and not cap.stale and not self.behind
        return self._capture(ops, node, fd, path, cause, dirty if cap.base is not None else FULL, cap.base,
                             start=start, may_pass=may_pass)

    # ---- namespace events (ops.Capture): each already succeeded in SRC ----
    #
    # What an event queues is the latest item about its node, its parent
    # directory and a rename's source directory, which fsync and fsyncdir
    # of those inodes wait for.

    def _event(self, op: str, about, handler, **f) -> None:
        before = self.pipe.last_item
        try:
            handler(**f)
        except OSError as e:
            self.pipe.not_recorded(f"a {op}", e)
        finally:
            self._looked = None  # before_change's read is for this event only
        if self.pipe.last_item is not before:
            self.pipe.concerns(self.pipe.last_item, *{n.ino for n in about if n is not None})

    def on_create(self, ops, parent, name: bytes, node, st) -> None:
        self._event("create", (node, parent), self._ev_create, ops=ops, parent=parent, name=name, node=node,
                    st=st)

    def on_mkdir(self, ops, parent, name: bytes, node) -> None:
        self._event("mkdir", (node, parent), self._ev_mkdir, ops=ops, parent=parent, name=name, node=node)

    def on_mknod(self, ops, parent, name: bytes, node) -> None:
        self._event("mknod", (node, parent), self._ev_mknod, ops=ops, parent=parent, name=name, node=node)

    def on_symlink(self, ops, parent, name: bytes, node, target: bytes) -> None:
        self._event("symlink", (node, parent), self._ev_symlink, ops=ops, parent=parent, name=name,
                    node=node, target=target)

    def on_link(self, ops, node, parent, name: bytes) -> None:
        self._event("link", (node, parent), self._ev_link, ops=ops, node=node, parent=parent, name=name)

    def on_unlink(self, ops, parent, name: bytes, last: bool) -> None:
        self._event("unlink", (parent,), self._ev_unlink, ops=ops, parent=parent, name=name, last=last)
        if name == _IGNORE_NAME and ops.child_path(parent, name) == _IGNORE_NAME:
            self.ignore.reload()  # the user's patterns are gone

    def on_rmdir(self, ops, parent, name: bytes) -> None:
        self._event("rmdir", (parent,), self._ev_rmdir, ops=ops, parent=parent, name=name)

    def on_rename(self, ops, old: bytes | None, new: bytes | None, flags: int, parent, name: bytes,
                  replaced, src_parent, over=None, over_xattrs=(), moved_st=None) -> None:
        self._event("rename", (parent, src_parent), self._ev_rename, ops=ops, old=old, new=new, flags=flags,
                    parent=parent, name=name, replaced=replaced, over=over, over_xattrs=over_xattrs,
                    moved_st=moved_st)
        if _IGNORE_NAME in (old, new):
            self.ignore.reload()  # an editor's save by rename-over, or the file moved away

    def on_setattr(self, ops, node, st, mode: bool, owner: bool, times: bool) -> None:
        self._event("setattr", (node,), self._ev_setattr, ops=ops, node=node, st=st, mode=mode, owner=owner,
                    times=times)

    def on_setxattr(self, ops, node, name: bytes, value: bytes) -> None:
        self._event("setxattr", (node,), self._ev_setxattr, ops=ops, node=node, name=name, value=value)

    def on_removexattr(self, ops, node, name: bytes) -> None:
        self._event("removexattr", (node,), self._ev_removexattr, ops=ops, node=node, name=name)

    def _at(self, path: bytes, fn, *args, **kw):
        """fn on SRC/path, also beyond PATH_MAX (_syscalls.at_path)."""
        return sc.at_path(os.fsencode(self.src), path, fn, *args, **kw)

    def _lexists(self, path: bytes) -> bool:
        try:
            self._at(path, os.stat, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _ev_create(self, ops, parent, name, node, st) -> None:
        self.track(node).base = 0  # a new, empty file: later captures are edits of nothing
        path = ops.child_path(parent, name)
        self.gone.back(path)  # the path has a file again
        self.content.created(path, node.ino)  # delta bases of its first capture
        if not self._skip(path):
            self.submit(Change(op="create", path=path, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                               mtime_ns=st.st_mtime_ns))

    def _new_entry(self, ops, op, parent, name, **extra) -> None:
        path = ops.child_path(parent, name)
        self.gone.back(path)
        if self._skip(path, op == "mkdir"):
            return
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        self.submit(Change(op=op, path=path, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                           mtime_ns=st.st_mtime_ns, **extra))

    def _ev_mkdir(self, ops, parent, name, node) -> None:
        self._new_entry(ops, "mkdir", parent, name)

    def _ev_mknod(self, ops, parent, name, node) -> None:
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        self._new_entry(ops, "mknod", parent, name, rdev=st.st_rdev)

    def _ev_symlink(self, ops, parent, name, node, target) -> None:
        self._new_entry(ops, "symlink", parent, name, target=target)

    def _ev_link(self, ops, node, parent, name) -> None:
        new = ops.child_path(parent, name)
        self.gone.back(new)
        if self._skip(new):
            return
        old = ops.path_of(node)
        if self._skip(old):
            self._capture_entry(ops, parent, name, new)
        else:
            self.submit(Change(op="link", path=old, path2=new))

    def _ev_unlink(self, ops, parent, name, last: bool = True) -> None:
        path = ops.child_path(parent, name)
        if not self._skip(path):
            if last:  # its last name: the file is gone (another link keeps it alive)
                self.gone.gone(path)
                looked = self._looked
                self.content.remember_base(path, looked[1] if looked is not None and looked[0] == path else None,
                                           gone=True)
            self.submit(Change(op="unlink", path=path))

    def _ev_rmdir(self, ops, parent, name) -> None:
        path = ops.child_path(parent, name)
        if not self._skip(path, True):
            self.submit(Change(op="rmdir", path=path))

    def _ev_rename(self, ops, old, new, flags, parent, name, replaced, over=None, over_xattrs=(),
                   moved_st=None) -> None:
        """What the rename means (saves.classify_rename), recorded."""
        if old is None or new is None:
            return
        # what moved, as ops.rename saw it just before (a rename changes no
        # type or link count): recording a plain rename opens no descriptor,
        # so it is recorded even when descriptors run short (parent.fd may reopen)
        st = moved_st or os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        is_dir = stat.S_ISDIR(st.st_mode)
        ign_old, ign_new = self.ignore.match(old, is_dir), self.ignore.match(new, is_dir)
        what = saves.classify_rename(st, ign_old, ign_new, flags, replaced, over,
                                     lambda: self.gone.was_gone(new))
        if what.kind == saves.IGNORED:
            return
        if what.kind == saves.EXCHANGE:
            if not ign_old and not ign_new:
                self.submit(Change(op="rename", path=old, path2=new, flags=2))
            elif ign_old:  # the real name `new` now holds what was at `old`
                self._capture_entry(ops, parent, name, new)
            else:
                self._capture_path(ops, old)
            return
        if what.kind == saves.HIDDEN:  # todo.md -> todo.md~ : gone from the visible tree
            if not is_dir and st.st_nlink <= 1:
                self.gone.gone(old)
                self.content.remember_base(old, gone=True)
            self.submit(Change(op="rmdir" if is_dir else "unlink", path=old))
            return
        if what.kind == saves.SAVE:
            if what.replaced_lives_on:  # the replaced file lives on elsewhere
                self.submit(Change(op="unlink", path=new))
            self._capture_entry(ops, parent, name, new, over_xattrs if what.over_is_save_target else ())
            if not ign_old:
                self.submit(Change(op="unlink", path=old))
            return
        self.gone.back(new)
        if what.kind == saves.APPEARS:  # a directory or symlink appears under a real name
            self._record_tree(ops, new)
            return
        if stat.S_ISREG(st.st_mode):
            self.content.remember_base(old)  # renamed away: a file created at old deltas against it
        self.submit(Change(op="rename", path=old, path2=new))

    def _capture_entry(self, ops, parent, name: bytes, path: bytes, old_xattrs=()) -> None:
        """Capture the whole file now at parent/name as a version of path,
        with its xattrs (``old_xattrs``: names the replaced file had)."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._record_tree(ops, path)
            return
        xattrs = user_xattrs(fd)
        node = ops.nodes.get(ops.fuse_ino(st.st_ino))
        self._capture(ops, node, fd, path, "rename-over", FULL, None)
        for n in old_xattrs:  # the new file is another inode: its xattrs, not the old one's
            if n not in xattrs and not n.startswith("security."):
                self.submit(Change(op="removexattr", path=path, xattr_name=os.fsencode(n)))
        self._submit_xattrs(path, xattrs)

    def _submit_xattrs(self, path: bytes, xattrs: dict) -> None:
        for n, v in xattrs.items():
            self.submit(Change(op="setxattr", path=path, xattr_name=os.fsencode(n), xattr_value=v))

    def _capture_path(self, ops, path: bytes) -> None:
        st = self._at(path, os.stat, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            self._record_tree(ops, path)
            return
        fd = self._at(path, os.open, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._capture(ops, None, fd, path, "rename-over", FULL, None)

    def _record_tree(self, ops, path: bytes) -> None:
        """Record an entry (and a directory's content) that appeared under path."""
        root = os.fsencode(self.src)
        for rel, st in walk(root, path, self.ignore):
            if stat.S_ISDIR(st.st_mode):
                self.submit(Change(op="mkdir", path=rel, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                                   mtime_ns=st.st_mtime_ns))
            elif stat.S_ISLNK(st.st_mode):
                self.submit(Change(op="symlink", path=rel, target=self._at(rel, os.readlink),
                                   mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns))
            elif stat.S_ISREG(st.st_mode):
                self._capture_path(ops, rel)

    def _ev_setattr(self, ops, node, st, mode, owner, times) -> None:
        path = ops.path_of(node)
        if self._skip(path, stat.S_ISDIR(st.st_mode)):
            return
        ch = Change(op="setattr", path=path, mode=st.st_mode if mode else None,
                    uid=st.st_uid if owner else None, gid=st.st_gid if owner else None,
                    mtime_ns=st.st_mtime_ns if times else None)
        if not self.pipe.fold_attrs(ch):  # cp -a: the utimens of a file it just created
            self.submit(ch)

    def _ev_setxattr(self, ops, node, name, value) -> None:
        path = ops.path_of(node)
        if not self._skip(path):
            self.submit(Change(op="setxattr", path=path, xattr_name=name, xattr_value=value))

    def _ev_removexattr(self, ops, node, name) -> None:
        path = ops.path_of(node)
        if not self._skip(path):
            self.submit(Change(op="removexattr", path=path, xattr_name=name))

    # ---- the scan at mount time ----------------------------------------------

    async def scan(self, ops, hidden_ino: int, progress=None) -> dict:
        """Record what changed in SRC while it was not mounted (before mounting)."""
        t0 = time.monotonic()
        self.ops, self.hidden_ino = ops, hidden_ino
        actions = await trio.to_thread.run_sync(self._scan_diff, hidden_ino)
        total = sum(st.st_size for kind, _, st in actions if kind == "file")
        done = 0
        last = 0.0
        counts = {"new_or_changed": 0, "gone": 0, "dirs": 0}
        for kind, path, st in actions:
            # While mounted (resume, recovery) the tree may have moved on since
            # the walk: re-check in the trio thread, where no FUSE handler can
            # interleave between this check and the push.
            if kind == "gone" and self._lexists(path):
                continue
            if kind in ("dir", "symlink") and not self._lexists(path):
                continue
            if kind in ("file", "repair"):
                node = ops.nodes.get(ops.fuse_ino(st.st_ino)) if ops is not None else None
                if node is not None and (node.writers or node.cap.pending is not None):
                    continue  # open for writing: its release captures it
            if kind == "gone":
                self.submit(Change(op="rmdir" if st == "d" else "unlink", path=path))
                counts["gone"] += 1
            elif kind == "dir":
                self.submit(Change(op="mkdir", path=path, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                                   mtime_ns=st.st_mtime_ns))
                try:
                    dfd = self._at(path, os.open, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    dfd = None
                if dfd is not None:
                    try:
                        self._submit_xattrs(path, user_xattrs(dfd))
                    finally:
                        os.close(dfd)
                counts["dirs"] += 1
            elif kind == "symlink":
                target = self._at(path, os.readlink)
                self.submit(Change(op="symlink", path=path, target=target, mode=st.st_mode, uid=st.st_uid,
                                   gid=st.st_gid, mtime_ns=st.st_mtime_ns))
            else:
                try:
                    fd = self._at(path, os.open, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                except OSError as e:
                    log.warning("scan: cannot read %s: %s", os.fsdecode(path), e)
                    continue
                cause = "scan"
                if kind == "repair":  # off the merged identity first: the write gets its own
                    log.warning("scan: %s shared its history with another file; recorded again "
                                "(cause repair; 'deltafs verify --full' lists the versions)", os.fsdecode(path))
                    self.submit(Change(op="unlink", path=path))
                    counts["repaired"] = counts.get("repaired", 0) + 1
                    cause = "repair"
                xattrs = user_xattrs(fd)  # (SRC's xattrs set while unmounted, or before the first mount)
                item = self._capture(ops, None, fd, path, cause, FULL, 0 if kind == "repair" else None)
                self._submit_xattrs(path, xattrs)
                if ops is not None:  # an fsync of the file waits for this version too
                    self.pipe.concerns(item, ops.fuse_ino(st.st_ino))
                counts["new_or_changed"] += 1
                done += st.st_size
                await self.pipe.room(64)  # bounded: each queued capture holds a descriptor
                now = time.monotonic()
                if progress is not None and now - last > 1.0:
                    last = now
                    progress(f"scan: {counts['new_or_changed']} files, {done >> 20} of {total >> 20} MiB")
                del item
        await self.drain()
        counts["seconds"] = round(time.monotonic() - t0, 3)
        if actions:
            log.info("scan recorded %s", counts)
        return counts

    def _scan_diff(self, hidden_ino: int) -> list:
        root = os.fsencode(self.src)
        actions = []
        with self.journal.reader() as r:
            known = {p: (fid, kind) for p, fid, kind in r.current_tree()}
            seen = set()
            for rel, st in walk(root, b"", self.ignore, hidden_ino):
                seen.add(rel)
                k = known.get(rel)
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    if k is None:
                        actions.append(("dir", rel, st))
                elif stat.S_ISLNK(mode):
                    if k is None:
                        actions.append(("symlink", rel, st))
                elif stat.S_ISREG(mode):
                    fs = r.file_state(k[0]) if k else None
                    if fs is not None and fs.kind == "f" and rel not in fs.links:
                        # a history merged by the old re-created-path rule: the
                        # path's file id belongs to another file (docs/design.md,
                        # "File identity"): record the file again, on its own
                        actions.append(("repair", rel, st))
                    elif fs is None or fs.content_seq == 0 and st.st_size or fs.size != st.st_size \
                            or fs.mtime_ns != st.st_mtime_ns:
                        actions.append(("file", rel, st))
            gone = sorted((p for p in known if p not in seen and p), reverse=True)
            for p in gone:
                if not self.ignore.match(p, known[p][1] == "d"):
                    actions.append(("gone", p, known[p][1]))
        return actions


def walk(root: bytes, start: bytes, ignore: Ignore, hidden_ino: int = -1):
    """Yield (relative path, lstat) for start and everything under it, parents first
    (at any depth: directories are opened through _syscalls.at_path)."""
    try:
        st = sc.at_path(root, start, os.stat, follow_symlinks=False)
    except OSError:
        return
    if start:
        yield start, st
    if not stat.S_ISDIR(st.st_mode):
        return
    stack = [start]
    while stack:
        rel_dir = stack.pop()
        try:
            dfd = sc.at_path(root, rel_dir, os.open, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            it = os.scandir(dfd)
        except OSError:
            os.close(dfd)
            continue
        try:
            with it:
                for e in it:
                    if e.inode() == hidden_ino:
                        continue
                    name = os.fsencode(e.name)
                    rel = rel_dir + b"/" + name if rel_dir else name
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    is_dir = stat.S_ISDIR(st.st_mode)
                    if ignore.match(rel, is_dir):
                        continue
                    yield rel, st
                    if is_dir:
                        stack.append(rel)
        finally:
            os.close(dfd)


def _capture_bytes(fd: int, dirty) -> int:
    """What a capture will read (and hold until committed), for the queue's byte bound:
    its dirty ranges within the file, or the whole file."""
    try:
        size = os.fstat(fd).st_size
    except OSError:
        return 0
    if dirty is FULL:
        return size
    return sum(max(0, min(e, size) - s) for s, e in dirty)


def user_xattrs(fd: int) -> dict:
    """A file's xattrs by name, without security.* (the system's labels, set by
    the kernel, not the user's); {} if they cannot be read."""
    try:
        return {n: os.getxattr(fd, n) for n in os.listxattr(fd) if not n.startswith("security.")}
    except OSError:
        return {}
