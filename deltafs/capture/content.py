"""Content capture: a file's dirty ranges -> a content version (a ``write`` Change).

Re-chunk around the dirty ranges, hash, compress each new chunk against the
old chunk it replaces (delta bases), and keep what the next capture of the
file needs (its chunk list, the raw bytes of its bases) in bounded caches,
so a capture costs O(change) however long the history (docs/design.md).
A file created where another just left takes that file's last version as
delta bases: a hint for the compressor only, never an identity.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

from deltafs import chunking, heap, trace
from deltafs.capture.identity import GONE_KEPT, REUSE_SECONDS
from deltafs.errors import JournalError
from deltafs.journal import Change, Journal

CHUNK_FLUSH_BYTES = 8 << 20  # store new chunks ahead of their record beyond this much
LIST_CACHE_BYTES = 24 << 20  # chunk lists kept between captures, as Python objects
LIST_ENTRY_BYTES = 160  # one entry of a kept list: its (id, length) tuple, the id, its offset, two slots
LIST_CACHE_ENTRIES = LIST_CACHE_BYTES // LIST_ENTRY_BYTES  # ~157,000: a 2 GiB file's list fits, a 4 GiB one not
LIST_CACHE_OVERHEAD = 8  # a kept version counts as this many entries more (its tuple, dict slot)
LIST_CACHE_VERSIONS = 10_000  # and at most this many versions (deleted files' lists age out: a bound
# reached within the first hour of a busy mount, not after days of growth; issue 18 soak)
RAW_CACHE_BYTES = 32 << 20  # raw bytes of recent bases and new chunks (chunking.RawCache)
RAW_CACHE_IDLE_BYTES = 8 << 20  # ... of which the newest this many are kept once the mount is idle
RESTART_HANDICAP = 2.0  # a delta against a skipped-to ancestor must be half a full copy
FULL = None  # dirty marker: the whole file


BASE_MISSES = 8  # see capture_chunks
BASE_RETRY = 16
BASE_RETRY_MAX = 1024
RAW_RUN = 8  # standalone chunks in a row that did not compress: stop trying (capture_chunks)
RAW_RETRY = 16  # then try every RAW_RETRY-th chunk until one compresses again


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
    raw_run = 0  # chunks in a row whose standalone compression did not pay (random data)
    skipped = 0

    def emit(span, raw, base_ref):
        nonlocal buffered, misses, tried, raw_run, skipped
        if base_ref is not None and misses >= BASE_MISSES:
            # reading a base back costs as much as the chunk: after BASE_MISSES useless
            # ones, try only every BASE_RETRY-th chunk, the interval doubling with
            # each further miss (up to BASE_RETRY_MAX), until a delta pays again
            tried += 1
            every = min(BASE_RETRY << max(misses - BASE_MISSES, 0), BASE_RETRY_MAX)
            if tried < every:
                base_ref = None
            else:
                tried = 0
        if base_ref is None and raw_run >= RAW_RUN and (skipped + 1) % RAW_RETRY \
                and (old_end is None or span.offset + span.length < old_end) and not in_place(span):
            # the bulk lane (issue 19: fresh incompressible data, an overwrite with
            # unrelated data): no base, inside a run of incompressible chunks and
            # not a retry, not past the old end (no append chain), not in place:
            # what the general path below would store is the raw chunk, so store
            # it without the build (one copy of the bytes, no Base, no cache
            # entry: bulk raw data would only push out the bases of hot
            # regions, and a raw chunk reads back without decoding).
            # tests/unit/test_capture_bulk.py holds both paths to the same bytes
            skipped += 1
            payload = _RAW + raw
            new.append(chunking.NewChunk(span.id, span.length, payload))
            last[0] = None  # no neighbour can follow a chunk ending before the old end
            buffered += len(payload)
            if spill is not None and buffered >= CHUNK_FLUSH_BYTES:
                spill_now()
            return
        if not isinstance(raw, bytes):
            raw = bytes(raw)  # a view of the read window: kept beyond this chunk below
        prev = last[0]
        if old_end is not None and span.offset >= old_end:
            chained[0] += span.length
        neighbour = (chained[0] and chained[0] - span.length < chunking.APPEND_CHAIN_BYTES
                     and span.offset >= old_end and prev is not None and prev[0] == span.offset
                     and prev[2] < chunking.APPEND_CHAIN_DEPTH and prev[1].depth < chunking.SKIP_TO_DEPTH)
        if neighbour and finder.same_offset:
            base_ref = None  # the finder's base past the old end is the old last block, not a match
        b, handicap = base_for(base_ref[0]) if base_ref is not None else (None, 1.0)
        plain = True
        if raw_run >= RAW_RUN:
            # compressing incompressible data (media, archives, fresh random
            # bytes) costs as much as storing it: after RAW_RUN such chunks in
            # a row, try only every RAW_RETRY-th until one compresses again
            skipped += 1
            plain = not skipped % RAW_RETRY
        nc = chunking.build_chunk(raw, b, handicap=handicap, cid=span.id, plain=plain)
        if b is not None:
            misses = 0 if nc.base_id is not None else misses + 1
        if neighbour:
            # past the old end (new rows rarely share a long run with the old last
            # chunk), right after a new chunk: its bytes are the likeliest
            # dictionary, even for short strings (field names, words); the smaller
            # delta wins.  After APPEND_CHAIN_DEPTH such links in a row one is
            # stored without this base and the chain starts again; a neighbour
            # at SKIP_TO_DEPTH or deeper is not used (room for later rewrites)
            alt = chunking.build_chunk(raw, prev[1], cid=span.id, plain=False, probe=False)
            if alt.base_id is not None and len(alt.payload) < len(nc.payload):
                nc = alt
        queued = len(retry)
        if plain:
            raw_run = raw_run + 1 if nc.payload[0] == chunking.CODEC_RAW else 0
        if in_place(span) and b is not None and b.depth < chunking.MAX_DELTA_DEPTH:
            # an in-place change: its old block may hold what other changed blocks
            # gained; a block whose one-base delta stays large looks there (flush_group)
            olds.append(b)
            group[0] += len(b.raw)
            if nc.payload[0] != chunking.CODEC_RAW and len(nc.payload) * chunking.MULTI_BASE_WORSE > len(raw):
                retry.append((len(new), bytes(raw), b, handicap))
        # a chunk queued for flush_group may be re-coded deeper: never a base here
        linked = prev[2] + 1 if neighbour and nc.base_id == prev[1].id else 0
        last[0] = None if len(retry) > queued else (span.offset + span.length,
                                                    chunking.Base(nc.id, raw, nc.depth), linked)
        if cache is not None and not (raw_run >= RAW_RUN and nc.base_id is None
                                      and nc.payload[0] == chunking.CODEC_RAW):
            # a raw chunk inside a run of them (a retry of the bulk lane, one chunk in
            # RAW_RETRY of a 4 GiB write) stays out like the lane's: it reads back
            # without decoding, and 250 MiB of them pushed through a 32 MiB cache
            # only churned the heap and the hot regions' bases (issue 19)
            cache.put(nc.id, raw)
            if base_ref is not None and base_ref[0] != nc.id:
                # replaced: the new chunk is this region's next base (keeps the
                # cache to about one chunk per hot region, not one per save)
                cache.discard(base_ref[0])
        new.append(nc)
        buffered += len(nc.payload)
        if group[0] >= chunking.MULTI_BASE_GROUP:
            flush_group()
        if spill is not None and buffered >= CHUNK_FLUSH_BYTES:
            spill_now()

    def spill_now() -> None:
        nonlocal buffered
        flush_group()
        spill(new)
        new.clear()
        seen.clear()  # see on_chunk
        buffered = 0
        heap.trim()  # a big capture's freed buffers back to the kernel (at most every 10 s)

    old_end = offsets[-1] if old else None
    last: list = [None]  # (end offset, as a base, appended chunks chained before it) of the chunk emitted last
    chained = [0]  # bytes appended past the old end stored against their neighbour (APPEND_CHAIN_BYTES)
    olds: list[chunking.Base] = []  # same-offset bases of this group's in-place changed blocks
    retry: list = []  # (index in new, raw, base, handicap) of blocks whose one-base delta stayed large
    group = [0]  # bytes of olds

    def flush_group() -> None:
        """Re-code each block of ``retry`` against its base and up to
        MULTI_BASE_MAX - 1 other old blocks of the group sharing its bytes
        (journal format 9), where that stores less."""
        if retry and len(olds) > 1:
            mb = chunking.MultiBase(olds)
            for i, raw, b, handicap in retry:
                more = mb.find(raw, b, new[i].id)
                if not more:
                    continue
                nc = chunking.build_chunk_multi(raw, [*more[::-1], b], cid=new[i].id, handicap=handicap)
                if nc is not None and _value_len(nc) + 16 < _value_len(new[i]):
                    new[i] = nc
        olds.clear()
        retry.clear()
        group[0] = 0

    def in_place(span) -> bool:
        return finder.same_offset and span.offset < offsets[-1]

    if old:
        # an in-place write shifts nothing: bases at the same offsets
        old_size = offsets[-1]
        same = aligned and chunking.prefers_aligned(
            old_size, size, chunking.normalize_dirty(dirty, old_size, size))
        finder = chunking.BaseFinder(old, offsets, emit, same_offset=same)
    else:
        finder = chunking.BaseFinder(*(hint or ([], [0])), emit)

    fresh = not finder.old  # no old version and no hint: the finder would emit each chunk as fed

    def on_chunk(span, data):
        # ``seen``: the ids met since the last spill, not the whole file's (a 4 GiB
        # file's would hold ~100 bytes a chunk, issue 19).  A chunk repeated across
        # a spill is built again; the journal stores an id once (put_value), so
        # that costs a compression, never a second copy
        if span.id in seen:  # handled already (a hole's chunks are one id)
            if not fresh:
                finder.feed(span, None)
            return
        seen.add(span.id)
        if fresh:
            if not r.has_chunk(span.id):
                emit(span, data, None)
            return
        finder.feed(span, None if r.has_chunk(span.id) else data)

    res = chunking.rechunk(pread, size, old, dirty, on_chunk, offsets=offsets, aligned=aligned,
                           holes=holes)
    finder.finish()
    flush_group()
    return res, new


_RAW = bytes((chunking.CODEC_RAW,))


def _value_len(nc) -> int:
    """Bytes of ``nc``'s stored value besides the common header (base ids and payload)."""
    return len(nc.payload) + 16 * len(nc.bases) + (1 if len(nc.bases) > 1 else 0)


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



class ContentCapture:
    """Computes content versions against a journal, with the caches that keep
    a capture O(change): chunk lists of the latest versions (``lists``), raw
    bytes of recent bases and new chunks (``raw_cache``), and delta-base
    hints for files created where another just left (``base_hints``)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.lists: OrderedDict[int, tuple[list, list]] = OrderedDict()  # seq -> (chunk list, offsets)
        self.raw_cache = chunking.RawCache(RAW_CACHE_BYTES)
        self.list_entries = 0
        # guards ``lists``: a capture worker takes a file's list out (``take``) and
        # edits it in place, other workers read copies (``_shared``)
        self._lists_lock = threading.Lock()
        # delta base hints (never identity): path -> (time, last content version of
        # the file that left it); inode created there -> that version
        self.base_hints: dict[bytes, tuple[float, int]] = {}
        self.ino_hints: dict[int, int] = {}

    def cached(self, base: int | None) -> tuple | None:
        """(base, chunk list, offsets) of version ``base`` if its list is cached
        (the cache's own lists: read them, never change them)."""
        with self._lists_lock:
            hit = self.lists.get(base) if base else None
        return (base, *hit) if hit is not None else None

    def take(self, base: int | None) -> tuple | None:
        """(base, chunk list, offsets, True) of version ``base``, taken out of the
        cache: the caller owns the lists, and ``compute`` edits them in place
        into the new version's (no copy of a huge file's list per save); the
        commit's ``remember_list`` puts them back under the new version.  A
        capture that fails just drops them (the next one reads the journal)."""
        if not base:
            return None
        with self._lists_lock:
            hit = self.lists.pop(base, None)
            if hit is not None:
                self.list_entries -= len(hit[0]) + LIST_CACHE_OVERHEAD
        return (base, *hit, True) if hit is not None else None

    def _shared(self, seq: int) -> tuple[list, list] | None:
        """Copies of version ``seq``'s cached lists, for a worker that does not own
        them (a whole-file capture: its O(file) read dwarfs the copy)."""
        with self._lists_lock:
            hit = self.lists.get(seq)
            return (list(hit[0]), list(hit[1])) if hit is not None else None

    def remember_list(self, seq: int, refs: list, offsets: list, base: int = 0) -> None:
        """Keep the chunk list of a content version for the file's next capture,
        which otherwise rebuilds it from records (O(history) reads of record
        blocks).  Versions are immutable, so an entry is never wrong; one of a
        version compaction pruned is not used (``compute`` asks the
        journal).  ``base``: the version it replaces, dropped (the next capture
        of the file builds on ``seq``), so the cache holds about one list per
        file, not one per save; bounded in entries either way."""
        self.forget_list(base)
        with self._lists_lock:
            if seq in self.lists or len(refs) + LIST_CACHE_OVERHEAD > LIST_CACHE_ENTRIES:
                return  # a list larger than the whole cache is not kept (the next capture reads it back)
            self.lists[seq] = (refs, offsets)
            self.list_entries += len(refs) + LIST_CACHE_OVERHEAD
            while (self.list_entries > LIST_CACHE_ENTRIES or len(self.lists) > LIST_CACHE_VERSIONS) \
                    and len(self.lists) > 1:
                _, (old_refs, _) = self.lists.popitem(last=False)
                self.list_entries -= len(old_refs) + LIST_CACHE_OVERHEAD

    def idle(self) -> None:
        """The mount went quiet (Pipeline.idle_trimmer): the raw cache keeps its
        newest RAW_CACHE_IDLE_BYTES, the bases of the regions saved last.  The
        rest (up to 24 MiB of a burst's chunks) would stay resident while
        nothing is saved; after the full bench's rounds it was the floor the
        next big write started from (issue 19, eleventh session).  It fills
        again with the next captures."""
        self.raw_cache.shrink(RAW_CACHE_IDLE_BYTES)

    def forget_list(self, seq: int | None) -> None:
        """Drop version ``seq``'s kept list (superseded by the file's next version)."""
        with self._lists_lock:
            old = self.lists.pop(seq, None) if seq else None
            if old is not None:
                self.list_entries -= len(old[0]) + LIST_CACHE_OVERHEAD

    def compute(self, fd: int, path: bytes, cause: str, dirty, base: int | None,
                      cached=None, hint: int = 0) -> tuple[Change, tuple | None]:
        st = os.fstat(fd)
        size = st.st_size
        j = self.journal
        whole = dirty is FULL
        with j.reader() as r:
            if trace.ON:
                trace.mark("compute.reader")
            if base and r.is_pruned(base):
                # compaction pruned the version the dirty ranges apply to (its
                # chunks may be freed; the writer refuses it as a base): the
                # whole file, against the path's latest version
                whole, base, cached, dirty = True, None, None, FULL
            if whole:
                if base is None:
                    fid = r.file_id_at(path)
                    fs = r.file_state(fid) if fid else None
                    base = fs.content_seq if fs is not None and not fs.deleted else 0
                dirty = [(0, max(size, 1))]
            owned = False
            if cached is None and base:
                hit = self._shared(base)
                if hit is not None:
                    cached = (base, *hit, True)  # a copy: ours
            if cached is not None and base and cached[0] == base:
                _, old, offsets = cached[:3]
                owned = len(cached) > 3 and cached[3]
            else:
                old = r.chunk_list(base) if base else []
                offsets = chunking.list_offsets(old)
                owned = True  # read for this capture alone
                if trace.ON:
                    trace.mark("compute.list_read")
            pread = lambda off, n: os.pread(fd, n, off)  # noqa: E731
            holes = file_holes(fd, size)
            if whole and cause == "scan" and old:
                # changed behind our back: compare at the journal's own
                # boundaries (an in-place file's list is not the content-
                # defined one, so a fresh chunking would differ everywhere)
                dirty = chunking.changed_ranges(pread, size, old, offsets, holes)
            res, new = capture_chunks(r, pread, size, old, dirty, offsets, j.spill_chunks,
                                      self.raw_cache, aligned=not whole, holes=holes,
                                      hint=self.hint_list(r, hint) if hint and not old else None)
            if trace.ON:
                trace.mark(f"compute.rechunked new={len(new)}")
        edit = res.edit_list(old)
        del res  # its spans (~100 bytes per chunk of the new content) before the new list is built
        if cause == "scan" and base and not edit and not new and size == sum(n for _, n in old):
            # same bytes, other stat (touch while unmounted, or the kernel's
            # writeback cache setting mtime after the last capture): no version
            return Change(op="setattr", path=path, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                          mtime_ns=st.st_mtime_ns), None
        if len(old) + sum(len(refs) - c for _, c, refs in edit) + LIST_CACHE_OVERHEAD > LIST_CACHE_ENTRIES:
            cache = None  # too large to keep (remember_list): not built, its ~160 bytes per chunk never held
        elif owned:  # the base's lists are ours (take, or a copy): edited in place, O(edit)
            chunking.apply_edit_in_place(old, offsets, edit)
            cache = (old, offsets, base or 0)
        else:
            cache = (chunking.apply_edit(old, edit, copy=False), chunking.edit_offsets(offsets, edit), base or 0)
        return Change(op="write", path=path, size=size, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, cause=cause, base_seq=base or 0,
                      edit=edit, chunks=new), cache

    def hint_list(self, r, seq: int) -> tuple[list, list] | None:
        """(chunk list, offsets) of version ``seq`` as delta bases, if it still exists."""
        hit = self._shared(seq)
        if hit is not None:
            return hit
        if r.is_pruned(seq):
            return None
        try:
            refs = r.chunk_list(seq)
        except (JournalError, KeyError):  # gone since: no hint, never a failed capture
            return None
        return refs, chunking.list_offsets(refs)

    def remember_base(self, path: bytes, seq: int | None = None, gone: bool = False) -> None:
        """The file at ``path`` is leaving it: its last version is the delta base
        hint of a file created there within REUSE_SECONDS (git checkout, cp over rm).
        ``seq``: that version, if the caller has just read it from the journal.
        ``gone``: the file itself is gone (its last name unlinked), so its kept
        chunk list is dropped: deleted files' lists would otherwise push live
        files' lists out of the bounded cache, and each such file's next save
        would read its list back (a 1 GiB file: ~150 ms).  A file created here
        within the window reads the hint's list from the journal."""
        if seq is None:
            seq = self.latest_content(path)
        if gone:
            self.forget_list(seq)
        hints = self.base_hints
        hints.pop(path, None)
        if not seq:
            return
        now = time.monotonic()
        hints[path] = (now, seq)
        oldest = next(iter(hints))
        if now - hints[oldest][0] >= REUSE_SECONDS or len(hints) > GONE_KEPT:
            del hints[oldest]
    def latest_content(self, path: bytes) -> int:
        with self.journal.reader() as r:
            fid = r.file_id_at(path)
            fs = r.file_state(fid) if fid else None
            return fs.content_seq if fs is not None and not fs.deleted and fs.content_seq else 0

    def created(self, path: bytes, ino: int) -> None:
        """A file was created at ``path`` as FUSE inode ``ino``: if a file left
        the path within REUSE_SECONDS, its last version is the delta base
        hint of this one's first capture."""
        hint = self.base_hints.pop(path, None)
        if hint is not None and time.monotonic() - hint[0] < REUSE_SECONDS:
            self.ino_hints[ino] = hint[1]  # its first capture's delta bases
            while len(self.ino_hints) > GONE_KEPT:
                del self.ino_hints[next(iter(self.ino_hints))]

    def take_hint(self, ino: int) -> int:
        """The delta-base hint of inode ``ino``'s first capture (0: none), used once."""
        return self.ino_hints.pop(ino, 0)
