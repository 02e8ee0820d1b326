"""The ordered pipeline: every event is an item in one FIFO queue, committed
in event order by one committer task (group commit), whoever computes it.

Namespace items are ready at once, content items when their worker thread
is done, or at once when deferred (a small capture at close, computed by
the worker call that commits it: ``defer``); the committer takes the ready
items at the head, in order, into one journal transaction.  fsync waits for
the latest item about its inode (and so for every earlier item about that
inode and every earlier namespace item: see "Passing" below).  Failures are
counted here (status shows them) and logged once per incident.

Passing (issue 19: a 1-byte edit's fsync waited ~1 s behind another file's
1 GiB capture still being chunked).  While the head is not computed yet
and someone waits for a commit, a computed content item further back may
commit ahead of it, in its own transaction, when all of this holds
(``Pipeline._passers``):

* it is a plain capture of an open file at its fsync or last close
  (``Item.may_pass``, set by the Recorder: the inode has a version or a
  queued create, and capture is not catching up after a pause or a
  failure, so its record writes to a path the journal's tree already names
  and resolves no file identity from the tree's gone files); not a
  pre-image, a rename-over save, a scan's capture or a deferred capture;
* every item before it in the queue is a content capture (computing,
  computed or deferred): no namespace record of any kind (create, rename,
  unlink, link, mkdir, setattr, xattrs...) and no item of unknown kind
  (a failed or paused capture's empty one) is passed;
* none of the items it passes concerns its inode (``Item.inos``) or its
  path (``Item.path``).

So records of one file (inode and path) keep their queue order, a
namespace record is committed after everything queued before it, and a
content record after every namespace record queued before it (its create,
the renames that gave it its path).  What changes is only the order of
content versions of different files that no namespace record orders, and
only where no fsync orders them: a program that needs A's data durable
before B's fsyncs A first, and A is then committed before B is written
(the order POSIX promises; a version is read from SRC while it is
computed, not when it is queued, so content was never ordered more finely).
Sequence numbers and HLC times are assigned at commit, so they follow
commit order as before (log, restore, tree at a time, checkpoints, the
guard, sync by sequence number).  ``sync(ino)`` still returns only once its item is
committed and synced; ``drain`` waits for every queued item, not only the
last one.

The queue is bounded (backpressure), by items and by the bytes its content
captures read and hold until committed (``max_items``, ``max_bytes``).
``push`` itself never waits: a record must be queued in the same trio step
as the change it records happened in SRC, or another handler could
change SRC in between and records would leave event order.  Producers wait
instead in ``room()``, at a point where they have changed nothing yet (ops
calls it first thing in every changing request, and after queueing a
capture at close), so the queue overshoots its bound by at most one
request's records.  Nothing the committer or a capture's computation needs
waits for room: the committer only waits for the head item to be computed,
a computation only for its inode's previous capture (earlier in the queue)
and a worker thread, and both read SRC and write the journal directly,
never through the mount; so a FUSE handler waiting for room (a close, an
fsync, an unlink) always gets it, and fsync, which waits for its inode's
latest item rather than for room, never waits on the producers behind it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable

import trio

from deltafs import heap, hops, trace
from deltafs.journal import Change, Journal

log = logging.getLogger(__name__)

GROUP_WINDOW = 0.005  # seconds a commit may wait for more records when nobody waits for it
# ... when the head of the queue is a namespace record (rm -rf, mkdir -p, untar):
# the loop thread commits those itself, so each commit costs the loop an fdatasync;
# it stops early once INLINE_RECORDS items are queued (a full batch)
NAMESPACE_WINDOW = 0.025
MAX_ITEMS = 4096  # queued items before producers wait (a namespace record is ~1 KiB with its Item)
MAX_BYTES = 256 << 20  # bytes queued content captures read and hold until committed
INLINE_RECORDS = 64  # namespace records the loop thread commits at once (Pipeline._take)
# a small capture at close is computed by the commit's own worker call (Item.job):
# files up to DEFER_BYTES, and at most DEFER_BATCH_BYTES of them in one commit
DEFER_BYTES = 256 << 10
DEFER_BATCH_BYTES = 4 << 20
# ... and at most DEFER_MAX of them queued at once (each holds its file's descriptor
# until its commit); reaching it ends the group window.  16: 64 held ~60 descriptors
# and ran a mount limited to 128 (tests/mount/test_capture_backpressure.py) into its
# descriptor reserve (CI, 2026-12-07)
DEFER_MAX = 16
# the group window of a commit whose first capture is deferred (nobody waits for it:
# a close): cp -a and git closed a small file every ~1.5 ms, so GROUP_WINDOW's 5 ms
# made ~8 files a commit, each commit a pack fdatasync and an LMDB durable commit
# (issue 19, 2026-12-07: cp -a of 4,000 files 440 commits → 185, daemon CPU −18 %).
# A full batch (INLINE_RECORDS items, DEFER_MAX deferred) or any waiter ends it sooner.
# Only without a guard (--guard off): the guard scores a capture at its commit, and
# an attack's first files then waited 20 ms longer to be seen (guard bench --quick,
# block: files lost median 9 -> 15, max 17 -> 21), so with it the window stays GROUP_WINDOW
DEFER_WINDOW = 0.025
# a chunk-list checkpoint a commit left due (Journal.defer_checkpoints) is written
# once the queue has been empty and nobody has waited for a commit this long
CHECKPOINT_QUIET = 0.02
# a capture alone in the queue is computed and committed by one worker call (Pipeline.solo)
# only up to this many bytes to read: a bigger one computes for long (1 GiB: ~1 s), and
# captures queued behind it meanwhile could not pass it (its worker commits it), so it is
# committed by the committer, one thread hand-off more (issue 19: a 1-byte edit's fsync
# waited 0.7-1.1 s behind a lone 1 GiB fsync's solo capture)
SOLO_BYTES = 8 << 20
# how far back the committer looks for a computed capture that may pass an
# uncomputed head (Pipeline._passers): the search is O(items) per wake-up
PASS_SCAN = 64
TRIM_AFTER_BYTES = 64 << 20  # a committed capture that read this much: free heap pages back at once
IDLE_TRIM_S = 2.0  # after commits, this many quiet seconds: free heap pages back (idle_trimmer)


class Ready:
    """An item's "computed" flag: a trio.Event that also wakes the committer
    (``wake``, set by Pipeline.push) when an item other than the head is
    computed, which may then pass the head (module docstring, "Passing")."""

    __slots__ = ("_ev", "wake")

    def __init__(self) -> None:
        self._ev = trio.Event()
        self.wake: Callable[[], None] | None = None

    def set(self) -> None:
        self._ev.set()
        if self.wake is not None:
            self.wake()

    def is_set(self) -> bool:
        return self._ev.is_set()

    async def wait(self) -> None:
        await self._ev.wait()


class Item:
    """One pipeline entry: the changes it will commit, and who waits for it."""

    __slots__ = ("changes", "ready", "done", "result", "after", "skip", "list_cache", "inos", "nbytes",
                 "job", "job_done", "job_error", "path", "may_pass")

    def __init__(self, changes: list[Change] | None = None, after=None) -> None:
        self.changes = changes
        self.ready = Ready()
        self.done = trio.Event()
        self.result: list[int] | BaseException | None = None
        self.after = after
        self.skip = False  # queued while capture was paused: journal nothing
        self.list_cache = None  # (new chunk list, offsets) of a content item, for the next capture
        self.inos: tuple[int, ...] = ()  # FUSE inodes whose latest queued item this is (Recorder.sync)
        self.nbytes = 0  # what a content capture reads and holds (the queue's byte bound)
        # a content capture computed by the commit's worker call, right before the
        # transaction (Pipeline.defer): job() -> (Change, list cache) in that worker;
        # job_done(error or None) on the loop thread once the commit is over
        self.job = None
        self.job_done = None
        self.job_error: BaseException | None = None
        # a content capture's path (what items passing it must not touch), and
        # whether, once computed, it may commit ahead of uncomputed captures of
        # other files queued before it (module docstring, "Passing")
        self.path: bytes | None = None
        self.may_pass = False
        if changes is not None:
            self.ready.set()


class Pipeline:
    """The queue, the committer, who waits for what, and the failure counters."""

    def __init__(self, journal: Journal, *, max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES) -> None:
        self.journal = journal
        self.queue: deque[Item] = deque()  # bounded by room(), not by the deque: see the module docstring
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.queued_bytes = 0  # nbytes of the items queued or being committed
        self.waits = 0  # times a producer waited for room (status: backpressure)
        self._room = trio.Event()  # set (and replaced) after every commit: room may have appeared
        self.last_item: Item | None = None
        # FUSE inode -> the latest queued item concerning it (a capture of the
        # file, a record about it, or a directory's entry changing): fsync and
        # fsyncdir wait for it, and so for everything queued before it (FIFO)
        self._latest: dict[int, Item] = {}
        self._waiters = 0  # tasks waiting for a commit (fsync, flush, pre-image)
        self._hurry = trio.Event()  # set while anyone waits: no group-commit delay
        self._nudge = trio.Event()  # ends a group window: someone waits, or a full batch is queued
        self._more = trio.Event()
        self._committing = False  # the committer holds a batch taken off the queue (solo)
        self._solo: Item | None = None  # the item its worker is committing (solo)
        # set when an item is computed or someone starts waiting while the committer
        # waits for an uncomputed head (_head_or_passers); replaced before each wait
        self._readied = trio.Event()
        self.passed = 0  # captures committed ahead of an uncomputed head (_take_passers)
        self._lists_due = trio.Event()  # a commit left a chunk-list checkpoint due (checkpointer)
        self.deferred = 0  # queued captures computed by their commit's worker (defer)
        # status counters (read by status/control)
        self.versions = 0
        self.records = 0
        self.inline_commits = 0  # namespace-only commits made on the loop thread
        self.solo_commits = 0  # captures committed by their own worker (solo)
        self.trims = 0  # heap trims after big captures
        self.idle_trims = 0  # heap trims once quiet after commits (idle_trimmer)
        self._worked = trio.Event()  # set (and replaced by idle_trimmer) after every commit
        self.folded = 0  # setattrs set in their file's queued create record (fold_attrs)
        self.failures = 0
        self.last_error: str | None = None
        self.last_capture_ns = 0
        self.gap: list[bytes] = []  # paths whose capture could not be journaled
        self.needs_rescan = False  # a commit or capture failed: rescan once writes work again
        self.incident = None  # the last "not recorded" incident logged
        self.paused = False  # control socket: events are dropped until resume rescans
        self.guard = None  # deltafs.guard.Guard (set by guard_service): sees each committed item
        # path -> "DEVICE:N": a sync group's apply in flight through the mount; its records
        # get that origin, its content version the cause "sync" (deltafs/sync/service.py)
        self.origins: dict[bytes, str] = {}
        # called when a commit succeeds while needs_rescan is set (the Recorder rescans)
        self.on_recovered: Callable[[], None] | None = None

    async def checkpointer(self) -> None:
        """Write the chunk-list checkpoints commits left due, in their own
        transactions, while the pipeline is idle (issue 19: a checkpoint
        counts a reference per entry of the file's list, 3,400 for a 64 MiB
        file and 65,000 for 1 GiB, 20-300 ms that an fsync's commit waited
        for).  The journal aborts such a transaction as soon as a commit waits
        (Journal.write_due_lists), and writes the checkpoint inline itself
        when one stayed due too long, so nothing here is needed for
        correctness: a deferred checkpoint only shortens later rebuilds."""
        j = self.journal
        j.urgent = lambda: self._waiters > 0 or bool(self.queue)
        j.defer_checkpoints = True
        try:
            while True:
                await self._lists_due.wait()
                self._lists_due = trio.Event()
                while j.lists_due():
                    await trio.sleep(CHECKPOINT_QUIET)
                    if self.queue or self._waiters or self._committing:
                        continue
                    try:
                        await hops.run(j.write_due_lists)
                    except Exception as e:  # a commit will write it inline (or the next version's)
                        log.warning("deferred chunk-list checkpoint not written: %s", e)
                    self._worked.set()  # its transient (a packed list, LMDB's pages): trim after
        finally:
            j.defer_checkpoints = False
            j.urgent = None

    async def idle_trimmer(self, before_trim: Callable[[], None] | None = None) -> None:
        """Give the heap's free pages back (``heap.trim``) once the pipeline has
        been quiet for IDLE_TRIM_S after commits.

        Only captures that read TRIM_AFTER_BYTES trim at once; the small ones
        (cp -a, git, sqlite, 1-byte edits) and what runs after a commit (the
        guard's scoring, deferred list checkpoints) leave freed blocks between
        live ones that stay resident.  Measured after the full bench's
        sequence (issue 19, eleventh session): the next big write started from
        that high-water, not from what was live.  One trim per quiet spell: a
        busy mount (a commit at least every IDLE_TRIM_S) never trims here.
        ``before_trim()``: the owner's caches shrink first (the Recorder's raw
        cache), so the pages they held are given back too."""
        while True:
            await self._worked.wait()
            while True:
                self._worked = trio.Event()
                with trio.move_on_after(IDLE_TRIM_S) as quiet:
                    await self._worked.wait()
                if quiet.cancelled_caught and not self.queue and not self._committing:
                    break
                if quiet.cancelled_caught:  # a long commit in flight: its _finish sets _worked
                    await self._worked.wait()
            if before_trim is not None:
                before_trim()
            self.idle_trims += await trio.to_thread.run_sync(heap.trim, True)

    def push(self, item: Item, nbytes: int = 0, deferred: bool = False) -> Item:
        """Queue item (never waits: see room).  ``deferred``: a capture that
        :meth:`defer` hands to its commit's worker next (the namespace records
        before it are committed with it, not ahead of it on the loop)."""
        if self.paused:
            item.skip = True
            if item.changes:
                item.changes = []
        item.nbytes = nbytes
        item.ready.wake = self._wake
        self.queued_bytes += nbytes
        self.queue.append(item)
        self.last_item = item
        self._more.set()
        if len(self.queue) >= INLINE_RECORDS:
            self._nudge.set()
        elif not deferred and (item.changes is None or _has_content(item.changes)) and len(self.queue) > 1:
            head = self.queue[0].changes
            if head is not None and not _has_content(head):
                # a namespace batch at the head ends before this content item:
                # waiting out NAMESPACE_WINDOW cannot grow it (a create followed
                # by its file's capture: cp, an editor's save, an attacker's
                # X.crypt, whose delete of X the guard then scores 25 ms sooner)
                self._nudge.set()
        return item

    def _wake(self) -> None:
        """An item was computed: a committer waiting for an uncomputed head
        looks again (the head may be computed, or gone: a solo commit pops
        it before setting it ready; or a capture may pass it)."""
        self._readied.set()

    def defer(self, item: Item, job, job_done) -> None:
        """item (queued, not computed) is computed by the worker that commits it,
        in the same thread hand-off as its transaction: no task, no hop of its
        own and no wake-up of the loop in between (issue 19: a small file's
        capture at close cost two hand-offs, one for computing and one for
        committing).  ``job()`` runs in that worker: -> (Change, list cache);
        ``job_done(error)`` runs on the loop after the commit (or its failure),
        before the item's waiters and its ``after`` see the result."""
        item.job = job
        item.job_done = job_done
        item.ready.set()
        self.deferred += 1
        if self.deferred >= DEFER_MAX:
            self._nudge.set()

    def can_defer(self) -> bool:
        """Room for one more deferred capture (:meth:`defer`)?"""
        return self.deferred < DEFER_MAX

    def submit(self, *changes: Change, after=None) -> Item:
        return self.push(Item(list(changes), after))

    def fold_attrs(self, ch: Change) -> bool:
        """A setattr of the file whose create is the last queued item, still
        uncommitted: set its fields in that create record instead of queueing
        a record of its own (issue 19: cp -a's utimens of each file it
        creates).  The create record has the same attribute fields and its
        HLC is the commit's, after the setattr happened; the tree state after
        it is the same as after both.  -> folded (nothing to queue)."""
        it = self.last_item
        if it is None or not self.queue or self.queue[-1] is not it or it.job is not None or it.skip:
            return False
        changes = it.changes
        if changes is None or len(changes) != 1 or self.origins or self.paused:
            return False  # (paused: the setattr is dropped as any record then, not folded)
        cr = changes[0]
        if cr.op != "create" or cr.path != ch.path or cr.file_id != ch.file_id or ch.op != "setattr":
            return False
        for name in ("mode", "uid", "gid", "mtime_ns"):
            v = getattr(ch, name)
            if v is not None:
                setattr(cr, name, v)
        self.folded += 1
        return True

    async def drain(self) -> None:
        """Return once every item queued so far is committed (or failed).
        The last one is not enough: a capture may pass uncomputed ones
        queued before it (module docstring, "Passing")."""
        last = self.last_item
        earlier = [it for it in self.queue if not it.done.is_set()]
        if last is not None:
            await self.committed(last)
        for it in earlier:
            await self.committed(it)

    async def committed(self, item: Item) -> None:
        """Wait until item is committed; while anyone waits, commits are not delayed."""
        if not item.done.is_set():
            await self._wait(item.done)

    async def _wait(self, event: trio.Event) -> None:
        with self.hurrying():
            await event.wait()

    @contextmanager
    def hurrying(self):
        """While inside, someone waits for a commit: no group-commit delay."""
        self._waiters += 1
        self._hurry.set()
        self._nudge.set()
        self._readied.set()  # a committer waiting for an uncomputed head: captures may pass it now
        try:
            yield
        finally:
            self._waiters -= 1
            if not self._waiters:
                self._hurry = trio.Event()

    def pending(self) -> int:
        return len(self.queue)

    def full(self, limit: int | None = None) -> bool:
        """At or over a bound: ``max_items`` (or ``limit``) items, ``max_bytes`` bytes."""
        items = self.max_items if limit is None else min(limit, self.max_items)
        return len(self.queue) >= items or self.queued_bytes >= self.max_bytes and bool(self.queue)

    async def room(self, limit: int | None = None) -> None:
        """Backpressure: return once the queue is under its bounds (and shorter
        than ``limit`` items); at once, without a scheduling point, when it is.
        While anyone waits here, commits are not delayed (no group window)."""
        if not self.full(limit):
            return
        self.waits += 1
        while self.full(limit):
            await self._wait(self._room)

    def concerns(self, item: Item, *inos: int) -> None:
        """item is the latest queued item about these FUSE inodes."""
        for ino in inos:
            self._latest[ino] = item
        item.inos += inos

    def settled(self, ino: int) -> bool:
        """Nothing queued about this inode waits to be journaled (fsync's fast path)."""
        item = self._latest.get(ino)
        return item is None or item.done.is_set()

    async def sync(self, ino: int) -> None:
        """Return once every item queued so far about this inode is committed
        (with every namespace item queued before them: a capture passes only
        other files' captures, module docstring, "Passing")."""
        item = self._latest.get(ino)
        if item is not None:
            await self.committed(item)

    def solo(self, item: Item) -> bool:
        """May item's worker commit it itself, right after computing it, in the
        same thread hand-off (issue 19: one hop per captured fsync, not two,
        and no wake-up of the committer in between)?  Only when item is the
        whole queue, no batch is being committed (so nothing queued before
        it is left), someone waits for a commit (no group window to wait
        out), no sync origin needs tagging, and it reads at most SOLO_BYTES
        (a longer computation would hold up the captures queued behind it,
        which may pass it only while the committer waits for it).  Items
        queued behind it wait for it as for any head item; :meth:`finish_solo`
        ends it."""
        if (len(self.queue) == 1 and self.queue[0] is item and not self._committing
                and self._hurry.is_set() and not self.origins and not item.skip and item.nbytes <= SOLO_BYTES):
            self._solo = item  # no capture passes it while its worker commits (_head_or_passers)
            return True
        return False

    def finish_solo(self, item: Item, result) -> None:
        """item (the head, see :meth:`solo`) was committed by its worker (result:
        its seqs, or the exception), or has nothing to commit (result [])."""
        assert self.queue[0] is item
        self.queue.popleft()
        if self._solo is item:
            self._solo = None
        if isinstance(result, list) and result:
            self.solo_commits += 1
        item.ready.set()  # a committer waiting on the head moves on (it is gone)
        self._finish([item], [result])

    def _defer_window(self) -> float:
        """The group window of a commit whose first capture nobody waits for (a close)."""
        return DEFER_WINDOW if self.guard is None else GROUP_WINDOW

    async def committer(self) -> None:
        while True:
            while not self.queue:
                await self._more.wait()
                self._more = trio.Event()
            head = self.queue[0]
            if head.ready.is_set():
                await head.ready.wait()  # (a checkpoint per batch, as ever)
            else:
                await self._head_or_passers(head)
            if not self.queue or self.queue[0] is not head:
                continue  # its worker committed it (solo)
            passing = not head.ready.is_set()  # captures commit ahead of it (_passers)
            if trace.ON:
                trace.mark("committer.passers" if passing else "committer.head_ready")
            if (not passing and not self._hurry.is_set() and len(self.queue) < INLINE_RECORDS
                    and self.deferred < DEFER_MAX):
                # (a full batch queued before this task woke: its nudge was set before
                # the window's new event, so the window is skipped here instead)
                # Nobody waits for durability (fsync, flush, a pre-image):
                # gather what arrives in the next few ms into the same
                # transaction, instead of one commit and thread hand-off per
                # record (rm -rf, cp -a, untar).
                self._nudge = trio.Event()
                if _is_content(self.queue[0]):
                    window = self._defer_window() if self.queue[0].job is not None else GROUP_WINDOW
                elif (first := next((it for it in self.queue if _is_content(it)), None)) is not None:
                    # a deferred capture: the namespace records before it are committed
                    # with it, by its worker (_take); any other: the namespace batch ends
                    # at that content item already (push)
                    window = self._defer_window() if first.job is not None else 0.0
                else:
                    window = NAMESPACE_WINDOW
                with trio.move_on_after(window):
                    await self._nudge.wait()
            self._committing = True
            try:
                batch = self._take_passers() if passing else self._take()
                if trace.ON:
                    trace.mark(f"committer.take n={len(batch)}")
                groups = [it.changes or [] for it in batch]
                if self.origins:
                    tag_origins(groups, self.origins)
                results = None
                jobs = any(it.job is not None for it in batch)
                if not jobs and not any(_has_content(g) for g in groups):
                    # Namespace records only (rm -rf, mkdir -p, renames): commit them
                    # here on the loop thread if the write lock is free.  In a worker
                    # thread, py-lmdb's get/put (which keep the GIL) fought the FUSE
                    # loop for the GIL through every commit (issue 19: 15 futex calls
                    # per unlinked entry).  The batch is bounded (_take), so lookups
                    # wait at most one short commit; a lock held by a compaction or a
                    # capture's chunks sends the batch to a worker as before.
                    try:
                        results = self.journal.try_commit_many(groups)
                    except Exception as e:  # the whole transaction failed (read-only, disk full...)
                        results = [e] * len(batch)
                    if results is not None:
                        self.inline_commits += 1
                if results is None and jobs:
                    try:
                        results = await hops.run(self._compute_commit, batch, dict(self.origins))
                    except Exception as e:  # the whole transaction failed (disk full...)
                        results = [e] * len(batch)
                    finally:
                        self._jobs_done(batch)
                elif results is None:
                    try:
                        results = await hops.run(self.journal.commit_many, groups)
                    except Exception as e:  # the whole transaction failed (disk full...)
                        results = [e] * len(batch)
                if trace.ON:
                    trace.mark("committer.committed")
                self._finish(batch, results)
            finally:
                self._committing = False
                # no local names left on the batch while waiting for the next one:
                # ``groups`` holds the committed changes themselves (_finish only
                # drops the items' references), i.e. a big capture's last spill
                # group of payloads (up to CHUNK_FLUSH_BYTES) and its packed list,
                # ~11 MiB kept after a 4 GiB write until the next commit (issue 19)
                batch = groups = results = head = None

    async def _head_or_passers(self, head: Item) -> None:
        """Return once the head is computed, or, while someone waits for a
        commit, a computed capture behind it may commit ahead of it
        (:meth:`_passers`), and no solo commit is in flight."""
        while not head.ready.is_set():
            if self._hurry.is_set() and self._solo is None and self._passers():
                return
            self._readied = trio.Event()
            await self._readied.wait()

    def _passers(self) -> list[Item]:
        """The computed captures that may commit ahead of the uncomputed head,
        in queue order (module docstring, "Passing"): ``may_pass`` ones,
        behind nothing but content captures, none of which is about their
        inode or path.  Looks at the first PASS_SCAN items only."""
        out: list[Item] = []
        inos: set[int] = set()
        paths: set[bytes] = set()
        for k, it in enumerate(self.queue):
            if k >= PASS_SCAN:
                break
            changes = it.changes
            if changes is not None:
                if not changes or any(c.op != "write" for c in changes):
                    break  # a namespace record (or a failed or dropped capture): nothing passes it
                if (it.may_pass and it.job is None and it.ready.is_set() and it.path not in paths
                        and inos.isdisjoint(it.inos) and all(c.path not in paths for c in changes)):
                    out.append(it)
                    continue
                paths.update(c.path for c in changes)
            elif it.path is None and not it.inos:
                break  # a capture whose file is unknown: nothing passes it
            if it.path is not None:
                paths.add(it.path)
            inos.update(it.inos)
        return out

    def _take_passers(self) -> list[Item]:
        """Take :meth:`_passers` off the queue, for one commit of their own."""
        batch = self._passers()
        for it in batch:
            self.queue.remove(it)
        self.passed += len(batch)
        return batch

    def _compute_commit(self, batch: list[Item], origins: dict) -> list:
        """In a worker: compute the batch's deferred captures, then commit the
        batch in one transaction (:meth:`defer`).  A capture whose computation
        fails commits nothing (its group is empty) and is reported by its
        ``job_done``.  -> per item: its seqs, or the exception."""
        for it in batch:
            job = it.job
            if job is None:
                continue
            try:
                change, it.list_cache = job()
                it.changes = [change]
            except Exception as e:  # noqa: BLE001 - reported on the loop (job_done)
                it.job_error = e
                it.changes = []
        groups = [it.changes or [] for it in batch]
        if origins:
            tag_origins(groups, origins)
        return self.journal.commit_many(groups)

    def _jobs_done(self, batch: list[Item]) -> None:
        for it in batch:
            done = it.job_done
            if done is None:
                continue
            it.job = it.job_done = None
            self.deferred -= 1
            if it.changes is None:  # the worker call failed before computing it
                it.changes = []
                it.job_error = it.job_error or RuntimeError("capture not computed")
            try:
                done(it.job_error)
            except Exception:
                log.exception("capture bookkeeping failed")
            it.job_error = None

    def _finish(self, batch: list[Item], results: list) -> None:
        """After a commit (by the committer or a solo worker): results, counters,
        callbacks, waiters woken."""
        for it, res in zip(batch, results):
            it.result = res
            if isinstance(res, BaseException):
                self.failed(it, res)
            else:
                self.records += len(res)
                self.versions += sum(1 for c in it.changes or () if c.op == "write")
                if self.guard is not None and res:
                    self.guard.observe(it.changes, res)
            if it.after is not None:
                try:
                    it.after(res)
                except Exception:
                    log.exception("capture bookkeeping failed")
            for ino in it.inos:
                if self._latest.get(ino) is it:
                    del self._latest[ino]
            self.queued_bytes -= it.nbytes
            # a committed item stays referenced (the file's last item, the
            # queue's last) until the next one: without what it committed,
            # or a 4 GiB file's edit (~11 MiB of tuples) stays with it
            it.after = it.list_cache = None
            if _has_content(it.changes):
                it.changes = []
            it.done.set()
        self._room.set()  # producers waiting in room() look again
        self._room = trio.Event()
        self._worked.set()
        if any(it.nbytes >= TRIM_AFTER_BYTES for it in batch):
            # a big capture's transient objects (its chunk list as spans, edit and
            # decoded forms) are freed now: give their pages back (heap.py)
            self.trims += heap.trim(force=True)
        if self.journal.lists_due():
            self._lists_due.set()
        if any(not isinstance(r, BaseException) and r for r in results):
            self.last_capture_ns = time.time_ns()
            if self.needs_rescan and self.on_recovered is not None:
                self.on_recovered()

    def _take(self) -> list[Item]:
        """The ready items at the head of the queue, in order, for one commit:
        up to 512, or, when the head records no content, the namespace-only
        items before the first content capture, up to INLINE_RECORDS records
        (a batch the loop thread may commit itself), unless that capture is
        deferred (Item.job): then its worker commits them with it and what
        follows (a cp or git add: create, attributes, close; one commit for
        several files instead of an inline one and a worker's one)."""
        q = self.queue
        batch: list[Item] = []
        if not _is_content(q[0]):
            records = 0
            while q and q[0].ready.is_set() and not _is_content(q[0]):
                n = len(q[0].changes or ())
                if batch and records + n > INLINE_RECORDS:
                    break
                batch.append(q.popleft())
                records += n
            if not (q and q[0].job is not None and q[0].ready.is_set()):
                return batch
        deferred = 0  # bytes the worker computes before committing (Item.job)
        while q and q[0].ready.is_set() and len(batch) < 512:
            if q[0].job is not None:
                if deferred and deferred + q[0].nbytes > DEFER_BATCH_BYTES:
                    break
                deferred += q[0].nbytes
            batch.append(q.popleft())
        return batch

    def failed(self, it: Item, err: BaseException) -> None:
        paths = sorted({c.path for c in it.changes or ()})
        self.failures += 1
        self.gap.extend(paths)
        del self.gap[:-1000]
        msg = self.explain(err)
        self.needs_rescan = True
        if msg != self.last_error:  # once per incident, not per record
            log.error("journal write failed, %d change(s) not recorded (%s): %s; the mount keeps "
                      "working and SRC is rescanned once the journal accepts writes again",
                      len(it.changes or ()), b", ".join(paths[:5]).decode(errors="replace"), msg)
        self.last_error = msg

    def explain(self, err: BaseException) -> str:
        """LMDB reports a full disk as EIO at commit: say what it is."""
        try:
            sv = os.statvfs(self.journal.path)
            free = sv.f_bavail * sv.f_frsize
        except OSError:
            return str(err)
        if free < 4 << 20 or getattr(err, "errno", None) == 28:
            return f"journal disk full ({free >> 10} KiB free at {self.journal.path}): {err}"
        return str(err)
    def not_recorded(self, what: str, err: OSError, path=None) -> None:
        """A change that happened in SRC cannot be journaled: never silently.
        It shows in status (failures, gap), is logged once per incident, and
        the next successful commit rescans SRC, which records it."""
        self.failures += 1
        self.gap.append(os.fsencode(path) if path else b"")
        del self.gap[:-1000]
        self.needs_rescan = True
        msg = f"{what} could not be recorded: {err}"
        incident = ("not recorded", err.errno)
        if incident != self.incident:  # once per incident, not per change
            log.error("%s; SRC is rescanned after the next successful commit", msg)
            self.incident = incident
        self.last_error = msg

    def capture_failed(self, path: bytes, err: Exception, logged_trace: bool) -> None:
        """A content capture failed: counted, in the gap, logged once per incident."""
        self.failures += 1
        self.gap.append(path)
        self.needs_rescan = True
        msg = self.explain(err)
        if msg != self.last_error:  # once per incident, not per file
            log.error("capture of %s failed (the next successful write rescans SRC): %s",
                      os.fsdecode(path), msg, exc_info=logged_trace)
        self.last_error = msg


def _is_content(item: Item) -> bool:
    """Is item a content capture (computed, being computed, or deferred: Item.job)?"""
    return item.changes is None or _has_content(item.changes)


def _has_content(changes) -> bool:
    """Does a group record a content version (chunks to store, a pack to seal)?"""
    return any(c.op == "write" for c in changes or ())


def tag_origins(groups, origins: dict) -> None:
    """Mark the records of a sync group's apply (path -> "DEVICE:N"): an origin, and
    cause "sync" for a content version (a pre-image of the replaced file stays local)."""
    for changes in groups:
        for c in changes:
            o = origins.get(c.path)
            if o is not None and c.cause != "preimage":
                c.origin = o
                if c.op == "write":
                    c.cause = "sync"
