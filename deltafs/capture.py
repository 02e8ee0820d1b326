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
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import OrderedDict, deque

import trio

from deltafs import _syscalls as sc
from deltafs import chunking
from deltafs.errors import JournalError
from deltafs.ignore import IGNORE_FILE, Ignore
from deltafs.journal import Change, Journal

log = logging.getLogger(__name__)

REUSE_SECONDS = 120  # as the journal's REUSE_WINDOW_NS
CHUNK_FLUSH_BYTES = 8 << 20  # store new chunks ahead of their record beyond this much
GROUP_WINDOW = 0.005  # seconds a commit may wait for more records when nobody waits for it
LIST_CACHE_ENTRIES = 300_000  # chunk lists kept between captures, in entries (~40 MB at most)
LIST_CACHE_OVERHEAD = 8  # a kept version counts as this many entries more (its tuple, dict slot)
LIST_CACHE_VERSIONS = 50_000  # and at most this many versions (deleted files' lists age out)
RAW_CACHE_BYTES = 32 << 20  # raw bytes of recent bases and new chunks (chunking.RawCache)
RESTART_HANDICAP = 2.0  # a delta against a skipped-to ancestor must be half a full copy
GONE_KEPT = 100_000  # paths remembered for REUSE_SECONDS after they lost their file
_FULL = None  # dirty marker: the whole file


class Item:
    """One pipeline entry: the changes it will commit, and who waits for it."""

    __slots__ = ("changes", "ready", "done", "result", "after", "skip", "list_cache", "inos")

    def __init__(self, changes: list[Change] | None = None, after=None) -> None:
        self.changes = changes
        self.ready = trio.Event()
        self.done = trio.Event()
        self.result: list[int] | BaseException | None = None
        self.after = after
        self.skip = False  # queued while capture was paused: journal nothing
        self.list_cache = None  # (new chunk list, offsets) of a content item, for the next capture
        self.inos: tuple[int, ...] = ()  # FUSE inodes whose latest queued item this is (Recorder.sync)
        if changes is not None:
            self.ready.set()


BASE_MISSES = 8  # see capture_chunks
BASE_RETRY = 16


def capture_chunks(r, pread, size: int, old, dirty, offsets=None, spill=None,
                   cache: chunking.RawCache | None = None,
                   aligned: bool = False, holes=None, hint=None) -> tuple[chunking.Rechunk, list]:
    """Re-chunk a file around its dirty ranges and build the chunks it lacks.

    ``r`` is a journal reader: chunks it already has are not rebuilt, and
    each new chunk is compressed against the old chunk it replaces (found by
    :class:`chunking.BaseFinder`).  With ``spill``, chunks are handed to it
    in batches of about CHUNK_FLUSH_BYTES so a big file is never held whole;
    the rest are returned with the re-chunking.  ``cache`` keeps the raw
    bytes of bases and new chunks between captures.  ``aligned``: dirty
    ranges recorded from writes, so an in-place write may be cut at aligned
    offsets (:func:`chunking.prefers_aligned`).  ``holes`` (:func:`file_holes`):
    the holes of a sparse file are not read.  ``hint``: (chunk list, offsets)
    of the file this one replaced (a delete-and-create of the path): delta
    bases only, when ``old`` is empty.
    """
    if offsets is None:
        offsets = chunking.list_offsets(old)
    new: list = []
    seen: set[bytes] = set()
    buffered = 0

    def cheap(bid: bytes, info) -> bool:
        """Does reading ``bid`` decode at most CAPTURE_DECODE_MAX deltas? (With a
        cache: the chain down to the first chunk in it; without one: its depth.)"""
        if cache is None or info.depth <= chunking.CAPTURE_DECODE_MAX or bid in cache:
            return True
        for _ in range(chunking.CAPTURE_DECODE_MAX):
            bid = info.base_id
            if bid is None or bid in cache:
                return True
            info = r.chunk_info(bid)
            if info is None:  # freed since: read_chunk says so, if it gets there
                return True
        return False

    def base_for(bid: bytes) -> tuple[chunking.Base | None, float]:
        """-> (base, handicap of a delta against it).

        A base that is neither in the cache nor within CAPTURE_DECODE_MAX
        deltas of a chunk in it is not decoded (that cost grows with
        history): the new chunk is stored standalone and starts a fresh chain."""
        info = r.chunk_info(bid)
        if info is None:
            return None, 1.0
        if info.depth < chunking.MAX_DELTA_DEPTH:
            if not cheap(bid, info):
                return None, 1.0
            return chunking.Base(bid, r.read_chunk(bid, cache), info.depth), 1.0
        # a chain at its longest restarts from an ancestor halfway down (a
        # database page rewritten on every save: a delta against content a
        # few dozen saves old, not a full copy), unless that ancestor is
        # unrelated content (a log's tail chunk chains across chunks)
        while info.depth > chunking.SKIP_TO_DEPTH:
            bid = info.base_id
            info = r.chunk_info(bid)
            if info is None:
                return None, 1.0
        return chunking.Base(bid, r.read_chunk(bid, cache), info.depth), RESTART_HANDICAP

    misses = 0  # bases in a row that gave no delta (an overwrite with unrelated data)
    tried = 0

    def emit(span, raw, base_ref):
        nonlocal buffered, misses, tried
        if base_ref is not None and misses >= BASE_MISSES:
            # reading a base back costs as much as the chunk: after BASE_MISSES useless
            # ones, try only every BASE_RETRY-th chunk until a delta pays again
            tried += 1
            if tried % BASE_RETRY:
                base_ref = None
        b, handicap = base_for(base_ref[0]) if base_ref is not None else (None, 1.0)
        nc = chunking.build_chunk(raw, b, handicap=handicap)
        if b is not None:
            misses = 0 if nc.base_id is not None else misses + 1
        if cache is not None:
            cache.put(nc.id, raw)
            if base_ref is not None and base_ref[0] != nc.id:
                # replaced: the new chunk is this region's next base (keeps the
                # cache to about one chunk per hot region, not one per save)
                cache.discard(base_ref[0])
        new.append(nc)
        buffered += len(nc.payload)
        if spill is not None and buffered >= CHUNK_FLUSH_BYTES:
            spill(new)
            new.clear()
            buffered = 0

    if old:
        # an in-place write shifts nothing: bases at the same offsets
        old_size = offsets[-1]
        same = aligned and chunking.prefers_aligned(
            old_size, size, chunking.normalize_dirty(dirty, old_size, size))
        finder = chunking.BaseFinder(old, offsets, emit, same_offset=same)
    else:
        finder = chunking.BaseFinder(*(hint or ([], [0])), emit)

    def on_chunk(span, data):
        if span.id in seen:  # handled already (a hole's chunks are one id)
            finder.feed(span, None)
            return
        seen.add(span.id)
        finder.feed(span, None if r.has_chunk(span.id) else data)

    res = chunking.rechunk(pread, size, old, dirty, on_chunk, offsets=offsets, aligned=aligned,
                           holes=holes)
    finder.finish()
    return res, new


def file_holes(fd: int, size: int) -> chunking.Holes:
    """The holes of the file open as fd (SEEK_HOLE/SEEK_DATA), for chunking."""
    def holes(off: int) -> tuple[int, int]:
        try:
            start = os.lseek(fd, off, os.SEEK_HOLE)
        except OSError:  # ENXIO: off is at EOF; EINVAL: no SEEK_HOLE here
            return size, size
        if start >= size:
            return size, size
        try:
            end = os.lseek(fd, start, os.SEEK_DATA)
        except OSError:  # ENXIO: a hole up to EOF
            end = size
        return start, min(end, size)
    return holes


class Recorder:
    enabled = True

    def __init__(self, journal: Journal, src: str, ignore: Ignore | None = None, *,
                 workers: int = 2) -> None:
        self.journal = journal
        self.src = src
        self.ignore = ignore or Ignore(src)
        self.queue: deque[Item] = deque()
        self.last_item: Item | None = None
        # FUSE inode -> the latest queued item concerning it (a capture of the
        # file, a record about it, or a directory's entry changing): fsync and
        # fsyncdir wait for it, and so for everything queued before it (FIFO)
        self._latest: dict[int, Item] = {}
        self._lists: OrderedDict[int, tuple[list, list]] = OrderedDict()  # seq -> (chunk list, offsets)
        self.raw_cache = chunking.RawCache(RAW_CACHE_BYTES)
        self._list_entries = 0
        self._waiters = 0  # tasks waiting for a commit (fsync, flush, pre-image)
        self._hurry = trio.Event()  # set while anyone waits: no group-commit delay
        self._more = trio.Event()
        self.limiter = trio.CapacityLimiter(workers)
        self.nursery: trio.Nursery | None = None
        # status counters (read by status/control)
        self.versions = 0
        self.records = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_capture_ns = 0
        self.gap: list[bytes] = []  # paths whose capture could not be journaled
        self.needs_rescan = False  # a commit or capture failed: rescan once writes work again
        self.rescanning = False
        self.ops = None  # set by the first scan
        self.hidden_ino = -1
        self.paused = False  # control socket: events are dropped until resume rescans
        # regular files just deleted or renamed away: a file renamed onto one
        # of these paths is the next version of it (write-new-then-delete-old)
        self.recently_gone: dict[bytes, float] = {}
        # delta base hints (never identity): path -> (time, last content version of
        # the file that left it); inode created there -> that version
        self.base_hints: dict[bytes, tuple[float, int]] = {}
        self._ino_hints: dict[int, int] = {}
        self.guard = None  # deltafs.guard.Guard (set by guard_service): sees each committed item

    # ---- pipeline ---------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await self._committer()

    def _push(self, item: Item) -> Item:
        if self.paused:
            item.skip = True
            if item.changes:
                item.changes = []
        self.queue.append(item)
        self.last_item = item
        self._more.set()
        return item

    def submit(self, *changes: Change, after=None) -> Item:
        return self._push(Item(list(changes), after))

    async def drain(self) -> None:
        """Return once every item queued so far is committed (or failed)."""
        last = self.last_item
        if last is not None:
            await self.committed(last)

    async def committed(self, item: Item) -> None:
        """Wait until item is committed; while anyone waits, commits are not delayed."""
        if item.done.is_set():
            return
        self._waiters += 1
        self._hurry.set()
        try:
            await item.done.wait()
        finally:
            self._waiters -= 1
            if not self._waiters:
                self._hurry = trio.Event()

    def pending(self) -> int:
        return len(self.queue)

    def _concerns(self, item: Item, *inos: int) -> None:
        """item is the latest queued item about these FUSE inodes."""
        for ino in inos:
            self._latest[ino] = item
        item.inos += inos

    def settled(self, node) -> bool:
        """Nothing of this inode waits to be journaled (fsync's fast path)."""
        if node.dirty or node.size_changed:
            return False
        item = self._latest.get(node.ino)
        return item is None or item.done.is_set()

    async def sync(self, ino: int) -> None:
        """Return once every item queued so far about this inode is committed
        (commits are in queue order, so with everything queued before them)."""
        item = self._latest.get(ino)
        if item is not None:
            await self.committed(item)

    async def throttle(self, limit: int) -> None:
        """Wait until at most ``limit`` items are queued (each capture holds a descriptor)."""
        while len(self.queue) > limit:
            await self.committed(self.queue[0])

    async def _committer(self) -> None:
        while True:
            while not self.queue:
                await self._more.wait()
                self._more = trio.Event()
            await self.queue[0].ready.wait()
            if not self._hurry.is_set():
                # Nobody waits for durability (fsync, flush, a pre-image):
                # gather what arrives in the next few ms into the same
                # transaction, instead of one commit and thread hand-off per
                # record (rm -rf, cp -a, untar).
                with trio.move_on_after(GROUP_WINDOW):
                    await self._hurry.wait()
            batch: list[Item] = []
            while self.queue and self.queue[0].ready.is_set() and len(batch) < 512:
                batch.append(self.queue.popleft())
            groups = [it.changes or [] for it in batch]
            try:
                results = await trio.to_thread.run_sync(self.journal.commit_many, groups)
            except Exception as e:  # the whole transaction failed (disk full...)
                results = [e] * len(batch)
            for it, res in zip(batch, results):
                it.result = res
                if isinstance(res, BaseException):
                    self._failed(it, res)
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
                it.done.set()
            if any(not isinstance(r, BaseException) and r for r in results):
                self.last_capture_ns = time.time_ns()
                if self.needs_rescan and not self.rescanning and self.ops is not None:
                    self.nursery.start_soon(self._rescan)

    def _remember_list(self, seq: int, refs: list, offsets: list, base: int = 0) -> None:
        """Keep the chunk list of a content version for the file's next capture,
        which otherwise rebuilds it from records (O(history) reads of record
        blocks).  Versions are immutable, so an entry is never wrong; one of a
        version compaction pruned is not used (``_compute_sync`` asks the
        journal).  ``base``: the version it replaces, dropped (the next capture
        of the file builds on ``seq``), so the cache holds about one list per
        file, not one per save; bounded in entries either way."""
        old = self._lists.pop(base, None) if base else None
        if old is not None:
            self._list_entries -= len(old[0]) + LIST_CACHE_OVERHEAD
        if seq in self._lists:
            return
        self._lists[seq] = (refs, offsets)
        self._list_entries += len(refs) + LIST_CACHE_OVERHEAD
        while (self._list_entries > LIST_CACHE_ENTRIES or len(self._lists) > LIST_CACHE_VERSIONS) \
                and len(self._lists) > 1:
            _, (old_refs, _) = self._lists.popitem(last=False)
            self._list_entries -= len(old_refs) + LIST_CACHE_OVERHEAD

    def _failed(self, it: Item, err: BaseException) -> None:
        paths = sorted({c.path for c in it.changes or ()})
        self.failures += 1
        self.gap.extend(paths)
        del self.gap[:-1000]
        msg = self._explain(err)
        self.needs_rescan = True
        if msg != self.last_error:  # once per incident, not per record
            log.error("journal write failed, %d change(s) not recorded (%s): %s; the mount keeps "
                      "working and SRC is rescanned once the journal accepts writes again",
                      len(it.changes or ()), b", ".join(paths[:5]).decode(errors="replace"), msg)
        self.last_error = msg

    def _explain(self, err: BaseException) -> str:
        """LMDB reports a full disk as EIO at commit: say what it is."""
        try:
            sv = os.statvfs(self.journal.path)
            free = sv.f_bavail * sv.f_frsize
        except OSError:
            return str(err)
        if free < 4 << 20 or getattr(err, "errno", None) == 28:
            return f"journal disk full ({free >> 10} KiB free at {self.journal.path}): {err}"
        return str(err)

    async def _rescan(self) -> None:
        """After journal failures: record what the failed commits missed."""
        self.rescanning = True
        self.needs_rescan = False
        try:
            log.warning("the journal accepts writes again: rescanning SRC for %d change(s) that "
                        "could not be recorded", len(self.gap))
            gap = len(self.gap)
            counts = await self.scan(self.ops, self.hidden_ino)
            if not self.needs_rescan:
                del self.gap[:gap]
                self.last_error = None
                self._incident = None  # repaired: the next failure is a new incident
                log.warning("rescan after journal failures recorded %s", counts)
        except Exception:
            log.exception("rescan after journal failures failed")
            self.needs_rescan = True
        finally:
            self.rescanning = False

    # ---- content capture ----------------------------------------------------

    def _capture(self, ops, node, fd: int, path: bytes, cause: str, dirty, base: int | None) -> Item:
        """Queue a content version of the file open as fd (the item owns fd).

        ``base``: the content version the dirty ranges are relative to;
        None with dirty=_FULL means "the whole file, against the path's
        latest version if any" (dedup and delta hints only).  With a node,
        ``base`` is taken from the node's previous capture once it commits.
        """
        item = Item()
        prev = getattr(node, "last_item", None) if node is not None else None
        ev = None
        if node is not None:
            ev = trio.Event()
            node.pending = ev
            node.last_item = item
            self._concerns(item, node.ino)

        def after(res):
            if node is not None:
                if isinstance(res, BaseException) or not res:
                    node.base = None  # next capture of this inode: whole file
                else:
                    node.base = res[-1]
            if item.list_cache is not None and not isinstance(res, BaseException) and res:
                # the new list, so the next capture of the file does not
                # rebuild it from the journal (that costs O(chunks + edits))
                self._remember_list(res[-1], *item.list_cache)
        item.after = after
        self._push(item)
        self.nursery.start_soon(self._compute, item, ops, node, ev, prev, fd, path, cause, dirty, base)
        return item

    async def _compute(self, item, ops, node, ev, prev, fd, path, cause, dirty, base) -> None:
        try:
            if item.skip:  # paused: the rescan at resume records the file
                item.changes = []
                return
            if prev is not None:
                await prev.done.wait()
                if dirty is not _FULL:
                    base = node.base
            if dirty is not _FULL and base is None:
                dirty = _FULL
            hit = self._lists.get(base) if base else None
            cached = (base, *hit) if hit is not None else None
            hint = self._ino_hints.pop(node.ino, 0) if node is not None and not base else 0
            change, item.list_cache = await trio.to_thread.run_sync(
                self._compute_sync, fd, path, cause, dirty, base, cached, hint, limiter=self.limiter)
            item.changes = [change]
        except Exception as e:
            self.failures += 1
            self.gap.append(path)
            self.needs_rescan = True
            msg = self._explain(e)
            if msg != self.last_error:  # once per incident, not per file
                log.error("capture of %s failed (the next successful write rescans SRC): %s",
                          os.fsdecode(path), msg, exc_info=not isinstance(e, (OSError, JournalError)))
            self.last_error = msg
            item.changes = []
            if node is not None:
                node.base = None
        finally:
            os.close(fd)
            if node is not None:
                node.pending = None
                ev.set()
                ops.release_node_if_unused(node)
            item.ready.set()

    def _compute_sync(self, fd: int, path: bytes, cause: str, dirty, base: int | None,
                      cached=None, hint: int = 0) -> tuple[Change, tuple | None]:
        st = os.fstat(fd)
        size = st.st_size
        j = self.journal
        whole = dirty is _FULL
        with j.reader() as r:
            if base and r.is_pruned(base):
                # compaction pruned the version the dirty ranges apply to (its
                # chunks may be freed; the writer refuses it as a base): the
                # whole file, against the path's latest version
                whole, base, cached, dirty = True, None, None, _FULL
            if whole:
                if base is None:
                    fid = r.file_id_at(path)
                    fs = r.file_state(fid) if fid else None
                    base = fs.content_seq if fs is not None and not fs.deleted else 0
                dirty = [(0, max(size, 1))]
            if cached is None and base:
                hit = self._lists.get(base)  # (GIL-atomic; the trio thread writes it)
                if hit is not None:
                    cached = (base, *hit)
            if cached is not None and base and cached[0] == base:
                _, old, offsets = cached
            else:
                old = r.chunk_list(base) if base else []
                offsets = chunking.list_offsets(old)
            pread = lambda off, n: os.pread(fd, n, off)  # noqa: E731
            holes = file_holes(fd, size)
            if whole and cause == "scan" and old:
                # changed behind our back: compare at the journal's own
                # boundaries (an in-place file's list is not the content-
                # defined one, so a fresh chunking would differ everywhere)
                dirty = chunking.changed_ranges(pread, size, old, offsets, holes)
            res, new = capture_chunks(r, pread, size, old, dirty, offsets, j.put_chunks,
                                      self.raw_cache, aligned=not whole, holes=holes,
                                      hint=self._hint_list(r, hint) if hint and not old else None)
        edit = res.edit_list(old)
        if cause == "scan" and base and not edit and not new and size == sum(n for _, n in old):
            # same bytes, other stat (touch while unmounted, or the kernel's
            # writeback cache setting mtime after the last capture): no version
            return Change(op="setattr", path=path, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                          mtime_ns=st.st_mtime_ns), None
        cache = (chunking.apply_edit(old, edit), chunking.edit_offsets(offsets, edit), base or 0)
        return Change(op="write", path=path, size=size, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, cause=cause, base_seq=base or 0,
                      edit=edit, chunks=new), cache

    def _hint_list(self, r, seq: int) -> tuple[list, list] | None:
        """(chunk list, offsets) of version ``seq`` as delta bases, if it still exists."""
        hit = self._lists.get(seq)
        if hit is not None:
            return hit
        if r.is_pruned(seq):
            return None
        try:
            refs = r.chunk_list(seq)
        except (JournalError, KeyError):  # gone since: no hint, never a failed capture
            return None
        return refs, chunking.list_offsets(refs)

    def _remember_base(self, path: bytes) -> None:
        """The file at ``path`` is leaving it: its last version is the delta base
        hint of a file created there within REUSE_SECONDS (git checkout, cp over rm)."""
        seq = self._latest_content(path)
        hints = self.base_hints
        hints.pop(path, None)
        if not seq:
            return
        now = time.monotonic()
        hints[path] = (now, seq)
        oldest = next(iter(hints))
        if now - hints[oldest][0] >= REUSE_SECONDS or len(hints) > GONE_KEPT:
            del hints[oldest]

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
        if node is not None:
            await ops.wait_capture(node)
            pending = node.last_item is not None and not node.last_item.done.is_set()
            if node.base is not None or (not need_base and pending):
                return  # recorded, or a capture of this inode is on its way
        if self._skip(path):
            return
        if not need_base and self._latest_content(path):
            return
        await self.drain()  # the journal now reflects every earlier event
        base = await trio.to_thread.run_sync(self._latest_content, path)
        if base:
            if node is not None and node.base is None:
                node.base = base
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
        item = self._capture(ops, node, fd, path, "preimage", _FULL, 0)
        await self.committed(item)

    def _latest_content(self, path: bytes) -> int:
        with self.journal.reader() as r:
            fid = r.file_id_at(path)
            fs = r.file_state(fid) if fid else None
            return fs.content_seq if fs is not None and not fs.deleted and fs.content_seq else 0

    def release(self, ops, node) -> None:
        """Last close of a written file: queue its capture (returns at once)."""
        self._content_event(ops, node, "write")

    async def fsync(self, ops, node) -> None:
        """Capture what is dirty now, and return once it and everything queued
        before about this inode (a capture queued at an earlier close, its
        create, chmod, xattrs) is durable, whichever descriptor asks."""
        if node.dirty or node.size_changed:
            self._content_event(ops, node, "fsync")
        await self.sync(node.ino)

    def _content_event(self, ops, node, cause: str) -> Item | None:
        dirty = [(s, e) for s, e in node.dirty]
        node.dirty = []
        node.size_changed = False
        path = ops.path_of(node)
        if self._skip(path):
            return None
        if path == IGNORE_FILE.encode():
            self.ignore.reload()
        try:
            fd = os.open(f"/proc/self/fd/{node.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self._not_recorded(f"the capture of {os.fsdecode(path)}", e, path)
            return None
        return self._capture(ops, node, fd, path, cause, dirty if node.base is not None else _FULL,
                             node.base)

    def event(self, op: str, *, ops, also=None, **f) -> None:
        """A namespace change that already succeeded in SRC.

        What it queues is the latest item about its ``node``, its ``parent``
        directory and ``also`` (a rename's source directory), which fsync and
        fsyncdir of those inodes wait for.
        """
        handler = getattr(self, "_ev_" + op)
        before = self.last_item
        try:
            handler(ops, **f)
        except OSError as e:
            self._not_recorded(f"a {op}", e)
        if self.last_item is not before:
            self._concerns(self.last_item, *{n.ino for n in (f.get("node"), f.get("parent"), also)
                                            if n is not None})

    def _not_recorded(self, what: str, err: OSError, path=None) -> None:
        """A change that happened in SRC cannot be journaled: never silently.
        It shows in status (failures, gap), is logged once per incident, and
        the next successful commit rescans SRC, which records it."""
        self.failures += 1
        self.gap.append(os.fsencode(path) if path else b"")
        del self.gap[:-1000]
        self.needs_rescan = True
        msg = f"{what} could not be recorded: {err}"
        incident = ("not recorded", err.errno)
        if incident != getattr(self, "_incident", None):  # once per incident, not per change
            log.error("%s; SRC is rescanned after the next successful commit", msg)
            self._incident = incident
        self.last_error = msg

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
        node.base = 0  # a new, empty file: later captures are edits of nothing
        path = ops.child_path(parent, name)
        self.recently_gone.pop(path, None)  # the path has a file again
        hint = self.base_hints.pop(path, None)
        if hint is not None and time.monotonic() - hint[0] < REUSE_SECONDS:
            self._ino_hints[node.ino] = hint[1]  # its first capture's delta bases
            while len(self._ino_hints) > GONE_KEPT:
                del self._ino_hints[next(iter(self._ino_hints))]
        if not self._skip(path):
            self.submit(Change(op="create", path=path, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                               mtime_ns=st.st_mtime_ns))

    def _new_entry(self, ops, op, parent, name, **extra) -> None:
        path = ops.child_path(parent, name)
        self.recently_gone.pop(path, None)
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
        self.recently_gone.pop(new, None)
        if self._skip(new):
            return
        old = ops.path_of(node)
        if self._skip(old):
            self._capture_entry(ops, parent, name, new)
        else:
            self.submit(Change(op="link", path=old, path2=new))

    def _gone(self, path: bytes) -> None:
        """Remember a path that lost its file (a dict in time order: the oldest go first)."""
        now = time.monotonic()
        gone = self.recently_gone
        gone.pop(path, None)
        gone[path] = now
        oldest = next(iter(gone))  # one expiry per call keeps pace with one insertion
        if now - gone[oldest] >= REUSE_SECONDS or len(gone) > GONE_KEPT:
            del gone[oldest]

    def _was_gone(self, path: bytes) -> bool:
        t = self.recently_gone.pop(path, None)
        return t is not None and time.monotonic() - t < REUSE_SECONDS

    def _ev_unlink(self, ops, parent, name, last: bool = True) -> None:
        path = ops.child_path(parent, name)
        if not self._skip(path):
            if last:  # its last name: the file is gone (another link keeps it alive)
                self._gone(path)
                self._remember_base(path)
            self.submit(Change(op="unlink", path=path))

    def _ev_rmdir(self, ops, parent, name) -> None:
        path = ops.child_path(parent, name)
        if not self._skip(path, True):
            self.submit(Change(op="rmdir", path=path))

    def _ev_rename(self, ops, old, new, flags, parent, name, replaced, over=None, over_xattrs=(),
                   moved_st=None) -> None:
        """File identity (docs/design.md): a file renamed to a live name keeps
        its identity; renamed over a regular file whose last name that was, or
        onto the path of a file just gone, it is that file's next version (an
        atomic save); renamed to an ignored name it is gone.  A replaced file
        that keeps another name keeps its identity there."""
        if old is None or new is None:
            return
        # what moved, as ops.rename saw it just before (a rename changes no
        # type or link count): recording a plain rename opens no descriptor,
        # so it is recorded even when descriptors run short (parent.fd may reopen)
        st = moved_st or os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        is_dir = stat.S_ISDIR(st.st_mode)
        ign_old, ign_new = self.ignore.match(old, is_dir), self.ignore.match(new, is_dir)
        if ign_old and ign_new:
            return
        if flags & 2:  # RENAME_EXCHANGE
            if not ign_old and not ign_new:
                self.submit(Change(op="rename", path=old, path2=new, flags=2))
            elif ign_old:  # the real name `new` now holds what was at `old`
                self._capture_entry(ops, parent, name, new)
            else:
                self._capture_path(ops, old)
            return
        if not ign_old and ign_new:  # todo.md -> todo.md~ : gone from the visible tree
            if not is_dir and st.st_nlink <= 1:
                self._gone(old)
                self._remember_base(old)
            self.submit(Change(op="rmdir" if is_dir else "unlink", path=old))
            return
        if over is not None:  # what the rename replaced, as it was before
            replaced = True
            over_is_save_target = stat.S_ISREG(over.st_mode) and over.st_nlink <= 1
        else:
            over_is_save_target = replaced = bool(replaced)
        if stat.S_ISREG(st.st_mode) and (ign_old or st.st_nlink <= 1) and (
                ign_old or over_is_save_target or (not replaced and self._was_gone(new))):
            # an atomic save: the new content is the next version of the target
            # (or, renamed from an ignored name onto a free path, a new file
            # there, continuing a gone file's history: the journal decides)
            if replaced and not over_is_save_target:  # the replaced file lives on elsewhere
                self.submit(Change(op="unlink", path=new))
            self._capture_entry(ops, parent, name, new, over_xattrs if over_is_save_target else ())
            if not ign_old:
                self.submit(Change(op="unlink", path=old))
            return
        self.recently_gone.pop(new, None)
        if ign_old:  # a directory or symlink appears under a real name
            self._record_tree(ops, new)
            return
        if stat.S_ISREG(st.st_mode):
            self._remember_base(old)  # renamed away: a file created at old deltas against it
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
        xattrs = _user_xattrs(fd)
        node = ops.nodes.get(ops.fuse_ino(st.st_ino))
        self._capture(ops, node, fd, path, "rename-over", _FULL, None)
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
        self._capture(ops, None, fd, path, "rename-over", _FULL, None)

    def _record_tree(self, ops, path: bytes) -> None:
        """Record an entry (and a directory's content) that appeared under path."""
        root = os.fsencode(self.src)
        for rel, st in _walk(root, path, self.ignore):
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
        self.submit(Change(op="setattr", path=path, mode=st.st_mode if mode else None,
                           uid=st.st_uid if owner else None, gid=st.st_gid if owner else None,
                           mtime_ns=st.st_mtime_ns if times else None))

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
                if node is not None and (node.writers or node.pending is not None):
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
                        self._submit_xattrs(path, _user_xattrs(dfd))
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
                xattrs = _user_xattrs(fd)  # (SRC's xattrs set while unmounted, or before the first mount)
                item = self._capture(ops, None, fd, path, cause, _FULL, 0 if kind == "repair" else None)
                self._submit_xattrs(path, xattrs)
                if ops is not None:  # an fsync of the file waits for this version too
                    self._concerns(item, ops.fuse_ino(st.st_ino))
                counts["new_or_changed"] += 1
                done += st.st_size
                if self.pending() > 64:  # bounded: wait for the head before queueing more
                    await self.committed(self.queue[0])
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
            for rel, st in _walk(root, b"", self.ignore, hidden_ino):
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


def _walk(root: bytes, start: bytes, ignore: Ignore, hidden_ino: int = -1):
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


def _user_xattrs(fd: int) -> dict:
    """A file's xattrs by name, without security.* (the system's labels, set by
    the kernel, not the user's); {} if they cannot be read."""
    try:
        return {n: os.getxattr(fd, n) for n in os.listxattr(fd) if not n.startswith("security.")}
    except OSError:
        return {}
