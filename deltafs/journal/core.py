"""The Journal: opening, locking, the single writer; it owns its storage and its compaction.

Layers inside the package (each uses only the public names of those below):
``core`` (Journal: the writer, the public face) -> ``compact`` (Compactor),
``verify`` -> ``reader`` (Reader) -> ``checkpoints`` (tree checkpoints) -> ``storage`` (Storage: LMDB environment,
databases, packs, write lock; the only ``lmdb`` importer) -> ``upgrade``,
``packs``, ``state``, ``records``, ``seqindex`` (history/pathlog), ``schema``, ``hlc``, ``private``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import msgpack

from deltafs import trace
from deltafs.chunking import MAX_DELTA_DEPTH, PackedRefs
from deltafs.errors import CorruptionError, JournalError, NotFoundError

from . import checkpoints, private, seqindex
from . import schema as S
from .compact import INDEX_SLACK, RECORDS_KEPT, REPACK_DEAD_RATIO, Compactor, PruneResult, RepackResult
from .hlc import HLC, hlc_to_ns
from .packs import add_packs_live, incref
from .reader import LmdbStore, Reader
from .records import CAUSES, OPS, Change, encode_record, record_of
from .state import KIND_FILE, apply_record
from .storage import Storage, release_lock, take_lock, translate
from .verify import VerifyResult, verify

log = logging.getLogger(__name__)

LIST_CACHE_BYTES = 16 << 20  # packed chunk lists kept for the writer (24 bytes an entry)
LIST_CACHE_ENTRIES = LIST_CACHE_BYTES // S.ENTRY_LEN  # ~700,000: an 11 GiB file's list (the newest is always kept)
REUSE_WINDOW_NS = 120 * 1_000_000_000  # a gone file's path re-created this soon continues its history
_CREATES = frozenset(("create", "mkdir", "symlink", "mknod"))
# A commit may leave a due chunk-list checkpoint to write_due_lists (defer_checkpoints):
# at most this far past checkpoint_every, and never past the chain a reader accepts
# (reader: CHECKPOINT_MAX + 10 records)
CHECKPOINT_DEFER_MAX = S.CHECKPOINT_MAX + 8
# ... only for a list this long: a shorter one's references cost less inline (~3 us
# each) than a transaction of its own with its flushes (sqlite's file: ~10 entries)
DEFER_LIST_ENTRIES = 512
YIELD_ENTRIES = 256  # write_due_lists looks whether a commit waits this often (entries counted)
LIST_CACHE_VERSIONS = 10_000  # and lists at most (one per file edited lately; deleted files' age out)
# spill_chunks: chunk values appended to the packs at once, their index entries held
# (about 250 bytes each) and written in one transaction once this many bytes or entries
# wait, or by the next write transaction (the capture's commit at the latest).  One
# transaction per 8 MiB spill dirtied a 4 KiB leaf of the chunk index per new entry
# once the index held >= ~130,000 chunks: ~250 MiB of LMDB pages per GiB captured
# (issue 19, docs/performance-notes.md)
HOLD_BYTES = 64 << 20
HOLD_ENTRIES = 8192


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


class Journal:
    """An open journal.  Use :meth:`open`; see the package docstring."""

    def __init__(self, path: str, storage: Storage, readonly: bool, lock_fd: int | None, clock) -> None:
        self.path = path
        self._storage: Storage | None = storage
        self._dbs = storage.dbs  # the storage's database handles (the commit path's)
        self._wlock = storage.wlock
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._hlc = HLC(clock or time.time_ns)
        self._applied_hlc = 0  # the clock of the record _apply applied last
        # seq -> (packed list, total, depth, accum, page hashes or None): see _cache_list; the
        # packed list is a bytearray the writer owns (edited in place by the next version),
        # or bytes or a read-only view (a first version's PackedRefs buffer), copied first
        self._lists: OrderedDict[int, tuple[bytes, int, int, int, list | None]] = OrderedDict()
        # (seq, chunk id) of entries of pruned records appended by append_raw whose
        # chunk the mirror no longer had: not counted, so the compactor must not
        # uncount them either (in memory: a clone prunes before it closes the journal)
        self._uncounted: Counter[tuple[int, bytes]] = Counter()
        self._list_entries = 0
        self._compactor = Compactor(storage, self._uncounted)
        self.sync_count = 0  # write transactions committed (each one sync)
        # Chunk-list checkpoints a commit found due may be left to write_due_lists,
        # a transaction of their own while no commit waits (the mount's pipeline
        # sets this; issue 19: a 64 MiB file's checkpoint counted 3,400 refs, a
        # 1 GiB file's 65,000, inside an fsync's commit: 20-300 ms)
        self.defer_checkpoints = False
        self.urgent: Callable[[], bool] | None = None  # someone waits for a commit (set by the pipeline)
        self._due_now: list[int] | None = None  # seqs found due by the commit in progress
        self._due: dict[int, None] = {}  # content seqs whose checkpoint is due (oldest first)
        self._wanted = 0  # threads about to take the write lock for a commit (write_due_lists yields)
        self._wanted_lock = threading.Lock()
        self.lists_deferred = 0  # checkpoints left to write_due_lists (status, tests)
        self.lists_written_later = 0  # ... written by it
        with self.reader() as r:
            self.journal_id: str = r.meta(S.META_JOURNAL_ID)
            self.format_version: int = r.meta(S.META_FORMAT)
            self._hlc.restore(r.meta(S.META_HLC, 0))
            pack_end = r.meta(S.META_PACK_END, [0, 0])
        if not readonly:
            storage.packs.open_writer(*pack_end)
            storage.held.clear()
            storage.held_bytes = 0
            storage.index_held = self._index_held
            storage.delete_retired_packs()

    # --- opening -------------------------------------------------------------
    @classmethod
    def open(cls, path, *, readonly: bool = False, create: bool = False, clock: Callable[[], int] | None = None) -> "Journal":
        path = os.path.abspath(os.fspath(path))
        if create and not readonly:
            private.make_dir(path)
        if not os.path.exists(os.path.join(path, "data.mdb")) and not (create and not readonly):
            raise NotFoundError(f"no deltafs journal at {path}")
        lock_fd = None if readonly else take_lock(path)
        try:
            storage = Storage.share(path, readonly)
        except BaseException:
            release_lock(lock_fd)
            raise
        try:
            j = cls(path, storage, readonly, lock_fd, clock)
        except BaseException:
            storage.release()
            release_lock(lock_fd)
            raise
        if not readonly:
            private.tighten(path)  # the owner's alone, also a journal made before this rule
        log.info("opened journal %s (%s, id %s)", path, "read-only" if readonly else "writer", j.journal_id)
        return j

    def close(self) -> None:
        """Close (again: nothing happens); the writer lock goes last."""
        if self._storage is not None:
            if not self.readonly:
                try:
                    self.flush_chunks()
                except Exception as e:  # noqa: BLE001 - their bytes stay dead, as after a crash
                    log.warning("journal %s: chunks spilled ahead of their record not indexed at close: %s",
                                self.path, e)
                self._storage.index_held = None
                self._storage.held.clear()
                self._storage.held_bytes = 0
                self._storage.packs.close_writer()
            self._storage.release()
            self._storage = None
        release_lock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[Reader]:
        """A read snapshot; never blocks the writer (keep it short-lived)."""
        st = self._storage
        if self.readonly:
            st.packs.forget_deleted()  # another process may have deleted packs
            st.open_new_dbs()  # or made the databases a writer makes
        with st.read() as txn:  # an LMDB error in the block leaves it as JournalError
            yield Reader(st, txn)

    def data_size(self) -> int:
        """Bytes allocated on disk by data.mdb (the map is sparse)."""
        return os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512

    # --- writing ---------------------------------------------------------------
    def commit(self, changes: Sequence[Change]) -> list[int]:
        """Journal ``changes`` in one durable transaction; -> their seqs."""
        (res,) = self._commit_batch([list(changes)])
        if isinstance(res, BaseException):
            raise res
        return res

    def commit_many(self, groups: Sequence[Sequence[Change]]) -> list:
        """One durable transaction for several groups; each group commits or
        fails alone.  -> per group: list of seqs, or the exception."""
        return self._commit_batch([list(g) for g in groups])

    def try_commit_many(self, groups: Sequence[Sequence[Change]]) -> list | None:
        """:meth:`commit_many` if the write lock is free right now, else None at
        once (nothing written): for a caller that must not wait behind a
        compaction or a large capture holding it (the FUSE loop)."""
        return self._commit_batch([list(g) for g in groups], blocking=False)

    def spill_chunks(self, chunks: Sequence[NewChunk]) -> int:
        """Store chunks ahead of the record that will name them, as :meth:`put_chunks`
        does, but only append their values to the pack now (the caller frees its
        payloads) and hold their index entries (refs 0, with their bases' increfs,
        pack_live and the stored/raw counters) for one transaction later: when
        HOLD_BYTES or HOLD_ENTRIES wait, else the next write transaction of any
        kind but a namespace-only commit (the record's own commit at the latest:
        :meth:`_commit_batch` indexes them first).  A large capture streams its
        chunks this way: one index transaction per 64 MiB, not per 8 MiB spill.

        A chunk already indexed or held (an earlier spill of this capture, or
        another capture's) is not stored again.  A crash before the entries'
        transaction leaves their pack bytes dead: cut off at the next open, or,
        when another transaction synced past them, named by no entry and so not
        counted in pack_live (repacking drops them).  A chunk whose base is not
        indexed or held (freed into the graveyard) goes through put_chunks with
        the rest of the batch.  -> bytes appended."""
        self._check_writable()
        st = self._storage
        held = st.held
        cdb = self._dbs[S.DB_CHUNKS]
        appended = 0
        rest = None
        with self._wlock, st.read() as rtxn:  # under the write lock: the newest index, and it stays so
            for i, nc in enumerate(chunks):
                cid = nc.id
                if cid in held or rtxn.get(cid, db=cdb) is not None:
                    continue
                bases = _bases(nc)
                depth = 0
                for b in bases:  # as _stored_depth: the depth of the bases as stored (or held)
                    h = held.get(b)
                    if h is not None:
                        depth += h[3] + 1
                        continue
                    loc = rtxn.get(b, db=cdb)
                    if loc is None:
                        depth = -1
                        break
                    depth += S.decode_loc(loc)[4] + 1
                if depth < 0 or depth > MAX_DELTA_DEPTH:
                    rest = chunks[i:]  # put_chunks brings the base back, or refuses as it does
                    break
                if bases:
                    head, payload = S.encode_chunk(depth, nc.raw_len, bases, nc.payload), b""
                else:
                    head, payload = S.chunk_header(nc.raw_len), nc.payload
                n = len(head) + len(payload)
                pack, off = st.packs.append(head, payload)
                held[cid] = (S.encode_loc(0, pack, off, n, depth), pack, n, depth, nc.raw_len, bases)
                st.held_bytes += n
                appended += n
            full = st.held_bytes >= HOLD_BYTES or len(held) >= HOLD_ENTRIES
        if rest is not None:
            appended += self.put_chunks(rest)
        elif full:
            self.flush_chunks()
        return appended

    def flush_chunks(self) -> None:
        """Index the chunks :meth:`spill_chunks` holds now, in a transaction of their own."""
        self._check_writable()
        if self._storage.held:
            with self._storage.write():  # Storage.write indexes them first
                pass
            self.sync_count += 1

    def _index_held(self, txn) -> None:
        """Put the index entries :meth:`spill_chunks` holds, in key order, in
        ``txn`` (under the write lock, before anything else the transaction
        does), with what put_chunks would have put beside them.  Taken out of
        the storage first: a transaction that fails leaves their bytes dead and
        the records that would name them fail to commit ("not stored"), rather
        than every later transaction failing on them."""
        st = self._storage
        held = st.held
        st.held, st.held_bytes = {}, 0
        cdb = self._dbs[S.DB_CHUNKS]
        live: dict[int, int] = {}
        stored = raw = 0
        deltas = []
        for cid in sorted(held):
            loc, pack, n, depth, raw_len, bases = held[cid]
            if txn.get(cid, db=cdb) is not None:
                # indexed meanwhile: not possible while every transaction that stores
                # chunks indexes the held ones first; these bytes would just be dead
                continue
            st.index_value(txn, cid, loc, pack, n, depth, live)
            stored += n
            raw += raw_len
            if bases:
                deltas.append(bases)
        for bases in deltas:  # once every held value is in: a base may be one of them
            for b in bases:
                if txn.get(b, db=cdb) is None and not self._chunk_present(txn, b):
                    raise CorruptionError(f"base chunk {b.hex()} of a spilled chunk is not stored")
                self._incref(txn, b)
        add_packs_live(txn, self._dbs, live)
        if stored:
            mdb = self._dbs[S.DB_META]
            rd = Reader(st, txn)
            txn.put(S.META_STORED, _packb(rd.meta(S.META_STORED, 0) + stored), db=mdb)
            txn.put(S.META_RAW, _packb(rd.meta(S.META_RAW, 0) + raw), db=mdb)
        if trace.ON:
            trace.mark(f"journal.index_held n={len(held)}")

    def put_chunks(self, chunks: Sequence[NewChunk]) -> int:
        """Store chunks ahead of the record that will name them, indexed in a
        durable transaction of their own (held ones first: :meth:`spill_chunks`).
        Unreferenced until a record names them: a crash before that leaves
        chunks at refs 0, which GC leaves alone.  -> bytes stored."""
        self._check_writable()
        stored = raw = 0
        with self._storage.write() as txn:  # packs synced before it commits
            live: dict[int, int] = {}
            for nc in chunks:
                if nc.base_id is None:  # standalone: its header, then the payload as it is
                    n = self._put_standalone(txn, nc, live)
                    stored += n
                    raw += nc.raw_len if n else 0
                    continue
                bases = _bases(nc)
                depth = self._stored_depth(txn, nc, bases)
                val = S.encode_chunk(depth, nc.raw_len, bases, nc.payload)
                if self._storage.put_value(txn, nc.id, val, depth, live=live):
                    stored += len(val)
                    raw += nc.raw_len  # as _content counts them (status's ratio is raw / stored)
                    for b in bases:
                        self._incref(txn, b)
            add_packs_live(txn, self._dbs, live)
            if stored:
                mdb = self._dbs[S.DB_META]
                rd = Reader(self._storage, txn)
                txn.put(S.META_STORED, _packb(rd.meta(S.META_STORED, 0) + stored), db=mdb)
                txn.put(S.META_RAW, _packb(rd.meta(S.META_RAW, 0) + raw), db=mdb)
        return stored

    def append_raw(self, values: Sequence[bytes], chunks: dict[bytes, bytes] | None = None,
                   pruned: set[int] | frozenset[int] = frozenset()) -> int:
        """Append records exactly as stored elsewhere (``hash || body``) in
        one durable transaction, with the chunk values they need; -> new head.

        For ``deltafs clone``: the records keep their seqs, HLCs and hashes,
        so the chain of the copy is the original's.  Each value must hash
        to its stored hash, carry seq = head + 1 and prev = head's hash
        (CorruptionError otherwise); chunk values (``id -> stored value``,
        docs/format.md) are inserted first and every chunk an edit names
        must be present.  Indexes, refs and checkpoints are built as the
        writer builds them.  Content records in ``pruned`` (versions a mirror
        shipped after compaction freed some of their chunks) may name missing
        chunks; the caller prunes them once all records are in.
        """
        from deltafs.errors import CorruptionError

        from .records import check_link

        self._check_writable()
        chunks = chunks or {}
        with self._wlock:
            txn = self._storage.env.begin(write=True)
            try:
                if self._storage.held:
                    self._index_held(txn)
                rd = Reader(self._storage, txn)
                cdb = self._dbs[S.DB_CHUNKS]
                stored = raw = 0
                new_bases = []  # a delta may come before its base: count bases once all are in
                for cid, val in chunks.items():
                    try:
                        depth, raw_len, bases, _ = S.decode_chunk(val)
                    except ValueError as e:
                        raise CorruptionError(f"chunk {cid.hex()} has a bad header: {e}") from e
                    if self._storage.put_value(txn, cid, bytes(val), depth):
                        stored += len(val)
                        raw += raw_len
                        new_bases.extend(bases)
                for cid, val in chunks.items():
                    for base in S.decode_chunk(val)[2]:
                        if txn.get(base, db=cdb) is None:
                            raise CorruptionError(f"base chunk {base.hex()} of chunk {cid.hex()} is missing")
                for base in new_bases:
                    self._incref(txn, base)
                head, prev = rd.head_seq(), rd.head_hash()
                last_hlc = rd.record(head).hlc if head else -1
                for value in values:
                    seq = head + 1
                    rec, problem = check_link(value, seq, prev)
                    if problem:
                        raise CorruptionError(f"record {seq} {problem}")
                    if rec.hlc <= last_hlc:
                        raise CorruptionError(f"record {seq} goes back in time")
                    txn.put(S.u64(seq), bytes(value), db=self._dbs[S.DB_CHANGES], append=True)
                    if rec.is_content:
                        self._raw_content(txn, rd, rec, seq in pruned)
                    apply_record(LmdbStore(txn, self._dbs), rec)
                    S.index_record(txn, self._dbs, seq, rec.file_id, (rec.path, rec.path2))
                    head, prev, last_hlc = seq, rec.hash, rec.hlc
                mdb = self._dbs[S.DB_META]
                if last_hlc > rd.meta(S.META_HLC, 0):
                    txn.put(S.META_HLC, _packb(last_hlc), db=mdb)
                    self._hlc.restore(last_hlc)
                txn.put(S.META_STORED, _packb(rd.meta(S.META_STORED, 0) + stored), db=mdb)
                txn.put(S.META_RAW, _packb(rd.meta(S.META_RAW, 0) + raw), db=mdb)
                self._storage.seal(txn)
                txn.commit()
                self.sync_count += 1
            except BaseException as e:
                txn.abort()
                self._clear_list_cache()
                err = translate(e, self.path)
                if err is e:
                    raise
                raise err from e
        return head

    def _raw_content(self, txn, rd: Reader, rec, lenient: bool = False) -> None:
        """Refs and checkpoint of an appended content record (as in :meth:`_content`)."""
        from deltafs.errors import CorruptionError

        cdb = self._dbs[S.DB_CHUNKS]
        base = rec.base_seq or 0
        old, total, depth, accum = self._list_for(rd, base) if base else (b"", 0, -1, 0)
        new, total = S.apply_edit_packed(old, total, rec.edit or [])
        entries = 0
        for _, _, refs in rec.edit or []:
            for cid, _ in refs:
                if not lenient and txn.get(cid, db=cdb) is None:
                    raise CorruptionError(f"record {rec.seq}: chunk {cid.hex()} is missing")
                self._count(txn, rec.seq, cid, lenient)
            entries += len(refs)
        self._maybe_checkpoint(txn, rec.seq, base, new, total, depth + 1, accum + entries, lenient)

    def set_setting(self, name: str, value) -> None:
        self._small_write(S.DB_META, S.META_SETTING_PREFIX + name.encode(), _packb(value))

    def kv_put(self, db: str, key: str, value) -> None:
        """Set ``key`` in the generic store ``db`` ("snapshots" or "mirrors")."""
        self._small_write(S.KV_DBS[db], key.encode(), _packb(value))

    def kv_delete(self, db: str, key: str) -> None:
        self._small_write(S.KV_DBS[db], key.encode(), None)

    # --- compaction (writer only; compact.py carries it out) ----------------------
    def prune(self, seqs: Iterable[int], retained: Iterable[int], dry_run: bool = False) -> PruneResult:
        """Prune content versions ``seqs`` (docs/format.md, "Pruning procedure");
        ``retained``: every content version that stays.  ``dry_run``: the
        counts, nothing written."""
        self._check_writable()
        seqs = list(seqs)
        res = self._compactor.prune(seqs, retained, dry_run)
        if res.transactions:
            with self._wlock:  # the commit path uses the cache under this lock
                # the lists of retained versions are unchanged (a checkpoint
                # only shortens how they are rebuilt); pruned ones go
                for s in seqs:
                    self._uncache_list(s)
        return res

    def planning(self):
        """A write transaction over compaction's planning state, as a
        ``journal.planstate.PlanTxn`` (used by ``deltafs.maintenance.plan_incremental``)."""
        self._check_writable()
        return self._compactor.planning()

    def repack(self, dead_ratio: float = REPACK_DEAD_RATIO) -> RepackResult:
        """Rewrite the live values of packs more than ``dead_ratio`` dead; delete emptied packs."""
        self._check_writable()
        return self._compactor.repack(dead_ratio)

    def recode(self, raw_max: int | None = None, apart: bool = True):
        """Re-code chunk values first named since the last pass where it stores
        them smaller (docs/format.md, "Re-coding"); ``apart``: plan in a child
        process; -> recode.RecodeResult."""
        self._check_writable()
        return self._compactor.recode(raw_max, apart)

    def archive_records(self, keep: int = RECORDS_KEPT) -> int:
        """Move all records but the newest ``keep`` into compressed blocks; -> records moved."""
        self._check_writable()
        return self._compactor.archive_records(keep)

    def checkpoint_trees(self) -> int:
        """Write the tree checkpoints due (all of them the first time on an
        older journal; docs/format.md, "Tree checkpoints"); -> written."""
        self._check_writable()
        return checkpoints.write_due(self._storage, self.reader)

    def densify_index(self, slack: float = INDEX_SLACK) -> int:
        """Rewrite the chunk index in key order when its pages are mostly empty; -> pages saved."""
        self._check_writable()
        return self._compactor.densify_index(slack)

    def vacuum(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Rewrite data.mdb compactly; the journal must be its only opener in
        this process, and is closed afterwards.  -> ((size, allocated) before, after)."""
        self._check_writable()
        if not self._storage.only_user():
            raise JournalError(f"cannot vacuum {self.path}: vacuum needs the only opener of the journal")
        return self._compactor.vacuum(self._close_keeping_lock)

    def _close_keeping_lock(self) -> int | None:
        fd, self._lock_fd = self._lock_fd, None
        self.close()
        return fd

    def data_bytes(self) -> int:
        """Journal data: pack files plus LMDB pages in use (what --journal-limit counts)."""
        return self._compactor.data_bytes()

    def verify(self, full: bool = False) -> VerifyResult:
        """Walk the hash chain (with ``full`` every retained version's chunks);
        the first problem is named in the result, never raised."""
        with self.reader() as r:
            return verify(r, full)

    # --- internals ---------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.readonly:
            raise JournalError(f"journal {self.path} is open read-only")

    def _small_write(self, db: bytes, key: bytes, value: bytes | None) -> None:
        self._check_writable()
        with self._storage.write() as txn:
            if value is None:
                txn.delete(key, db=self._dbs[db])
            else:
                txn.put(key, value, db=self._dbs[db])
        self.sync_count += 1

    def _commit_batch(self, groups: list[list[Change]], blocking: bool = True) -> list | None:
        """One write transaction for the groups; each group in a nested
        transaction so one bad group fails alone.  blocking=False: None at
        once when another thread holds the write lock."""
        self._check_writable()
        results: list = []
        env = self._storage.env
        if blocking:
            with self._wanted_lock:
                self._wanted += 1
            try:
                self._wlock.acquire()
            finally:
                with self._wanted_lock:
                    self._wanted -= 1
        elif not self._wlock.acquire(False):
            return None
        self._due_now = []
        try:
            if trace.ON:
                trace.mark("commit.locked")
            txn = env.begin(write=True)
            try:
                if self._storage.held and any(ch.op == "write" for g in groups for ch in g):
                    # chunks spilled ahead of their records (spill_chunks): in before any
                    # record that may name them; a namespace-only batch (the FUSE loop's
                    # inline commit) names none and leaves them for later
                    self._index_held(txn)
                hlc = None  # the clock of the last record applied: META_HLC, put once per batch
                for changes in groups:
                    child = env.begin(write=True, parent=txn)
                    due = len(self._due_now)
                    try:
                        seqs = [self._apply(child, ch) for ch in changes]
                        child.commit()
                        results.append(seqs)
                        if seqs:
                            hlc = self._applied_hlc
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        child.abort()
                        del self._due_now[due:]  # its seqs go to the next group
                        self._clear_list_cache()
                        log.warning("journal rejected a change: %s", e)
                        results.append(translate(e, self.path))
                if hlc is not None:
                    txn.put(S.META_HLC, _packb(hlc), db=self._dbs[S.DB_META])
                if trace.ON:
                    trace.mark("commit.applied")
                self._storage.seal(txn)
                if trace.ON:
                    trace.mark("commit.sealed")
                txn.commit()
                if trace.ON:
                    trace.mark("commit.lmdb_committed")
                self.sync_count += 1
                for seq in self._due_now:  # committed: its checkpoint may be written later
                    self._due[seq] = None
                self.lists_deferred += len(self._due_now)
            except BaseException as e:
                txn.abort()
                self._clear_list_cache()
                if not isinstance(e, Exception):
                    raise
                log.debug("journal commit failed: %s", e)  # the caller reports it, once
                err = translate(e, self.path)
                results = [err for _ in groups]
        finally:
            self._due_now = None
            self._wlock.release()
        return results

    def _apply(self, txn, ch: Change) -> int:
        if ch.op not in OPS:
            raise ValueError(f"unknown op {ch.op!r}")
        if ch.op in ("rename", "link") and ch.path2 is None:
            raise ValueError(f"{ch.op} needs path2")
        rd = Reader(self._storage, txn)
        if not ch.file_id:
            ch.file_id = self._resolve_file_id(txn, rd, ch)
        if ch.op == "write" and rd.file_id_at(ch.path) is None:
            st = rd.file_state(ch.file_id)
            if st is not None and st.deleted:
                # a gone file's identity continues at its path (an editor's
                # save through a temp name): it is there again, so create it
                # there first (a write alone leaves a deleted file deleted)
                self._apply(txn, Change(op="create", file_id=ch.file_id, path=ch.path, mode=ch.mode,
                                        uid=ch.uid, gid=ch.gid, mtime_ns=ch.mtime_ns))
                rd = Reader(self._storage, txn)
        seq, prev = rd.head()
        seq += 1
        hlc = self._hlc.tick()
        stored = chash = ctree = listed = None
        if ch.op == "write":
            stored, tree, h, listed = self._content(txn, rd, ch, seq)
            if tree:
                ctree = h
            else:
                chash = h
        value, h = encode_record(seq, hlc, ch, prev, stored, chash, ctree)
        txn.put(S.u64(seq), value, db=self._dbs[S.DB_CHANGES], append=True)
        del value  # a 4 GiB file's record is 3.7 MB: gone before its references dirty the chunk index
        if listed is not None:
            self._count_content(txn, rd, ch, seq, listed)
        rec = record_of(seq, hlc, ch, h, stored, chash, ctree)  # what decoding value would give
        apply_record(rd.store, rec)
        S.index_record(txn, self._dbs, seq, rec.file_id, (rec.path, rec.path2))
        self._applied_hlc = hlc  # _commit_batch puts META_HLC once, after the batch's groups
        return seq

    def _resolve_file_id(self, txn, rd: Reader, ch: Change) -> int:
        """file_id=0: the file at ``ch.path`` in the tree as of this record.

        A file created or written at a path that names nothing continues
        the identity of the file that last had this path only if that file
        is *gone*: no path of the tree names it any more (its last link was
        unlinked, or it was renamed to an ignored name, which capture
        records as an unlink), and it went within REUSE_WINDOW_NS (an
        editor's delete-old-write-new or backup-rename save).  A file still
        reachable under any name keeps its identity alone; anything else
        gets a new random id (docs/design.md, "File identity").
        """
        fid = rd.file_id_at(ch.path)
        if fid and ch.op not in _CREATES:
            return fid
        if fid or ch.op not in ("create", "write"):
            return _new_id()
        return self._gone_file(txn, rd, ch.path) or _new_id()

    def _gone_file(self, txn, rd: Reader, path: bytes) -> int:
        """The id of the regular file that last had ``path`` if it is gone
        from the tree and went within REUSE_WINDOW_NS, else 0."""
        last = seqindex.last_seq(txn, self._dbs[S.DB_PATHLOG], *seqindex.pathlog_keys(path))
        if not last:
            return 0
        rec = rd.record(last)
        if path not in (rec.path, rec.path2):  # a hashed key's other path
            return 0
        st = rd.file_state(rec.file_id)
        if st is None or st.kind != KIND_FILE or not st.deleted or st.links or not st.last_seq:
            return 0
        age = self._hlc.now_ns() - hlc_to_ns(rd.record(st.last_seq).hlc)
        return rec.file_id if age <= REUSE_WINDOW_NS else 0

    def _incref(self, txn, cid: bytes, n: int = 1) -> None:
        incref(txn, self._dbs, cid, n)

    def _count(self, txn, seq: int, cid: bytes, lenient: bool) -> None:
        """Count version ``seq``'s reference to ``cid``.  ``lenient`` (a clone's
        version pruned upstream): a chunk the mirror no longer had is
        remembered in ``_uncounted`` instead, for the prune that follows."""
        if lenient and txn.get(cid, db=self._dbs[S.DB_CHUNKS]) is None:
            self._uncounted[(seq, cid)] += 1
        else:
            self._incref(txn, cid)

    def _put_standalone(self, txn, nc, live: dict[int, int]) -> int:
        """Store a chunk without bases (what ``S.encode_chunk`` makes of it:
        its header, then its payload, appended without joining them into one
        more copy of the chunk); -> bytes stored (0: stored already)."""
        head = S.chunk_header(nc.raw_len)
        if self._storage.put_value(txn, nc.id, head, 0, nc.payload, live):
            return len(head) + len(nc.payload)
        return 0

    def _stored_depth(self, txn, nc, bases: tuple[bytes, ...]) -> int:
        """The depth chunk ``nc`` is written at: the sum of (depth + 1) over its
        bases *as stored*, not the depth its coder believed.  A base may be
        stored under another coding than the one the capture built on (two
        captures building the same chunk at once: the first one stored wins),
        and a coding path that miscounts must not write a value whose read
        needs more than MAX_DELTA_DEPTH + 1 decompressions (the reader refuses
        it).  ValueError when the real depth is over MAX_DELTA_DEPTH (or a base
        is not stored): the capture fails, is logged, and the next write
        rescans the file."""
        if not bases:
            return 0
        cdb = self._dbs[S.DB_CHUNKS]
        depth = 0
        for b in bases:
            loc = txn.get(b, db=cdb)
            if loc is None and self._chunk_present(txn, b):  # back from the graveyard
                loc = txn.get(b, db=cdb)
            if loc is None:
                raise ValueError(f"base chunk {b.hex()} of chunk {nc.id.hex()} is not stored")
            depth += S.decode_loc(loc)[4] + 1
        if depth > MAX_DELTA_DEPTH:
            raise ValueError(f"chunk {nc.id.hex()} would be at delta depth {depth}, over {MAX_DELTA_DEPTH} "
                             f"(its coder counted {nc.depth})")
        if depth != nc.depth:
            log.debug("chunk %s: depth %d as stored, %d as coded", nc.id.hex(), depth, nc.depth)
        return depth

    def _chunk_present(self, txn, cid: bytes) -> bool:
        """Is the chunk stored?  One freed by GC after a capture saw it is
        brought back from the graveyard (``Compactor.chunk_present``)."""
        return self._compactor.chunk_present(txn, cid)

    def _content(self, txn, rd: Reader, ch: Change, seq: int) -> tuple[int, bool, bytes, tuple]:
        """Store a content version's chunks and build its list; -> (bytes
        stored, tree hash?, content hash, what :meth:`_count_content` needs):
        the flat hash up to one tree page of list, else the tree hash, from
        the base's cached page hashes where only some pages changed
        (schema.version_hash).  The caller puts the record, then counts the
        references (``_count_content``): a big version's record (3.7 MB for
        4 GiB) is copied into LMDB and its Python bytes freed before the
        increfs dirty nearly every page of the chunk index, not on top of them
        (issue 19, twelfth session)."""
        if ch.size is None or ch.edit is None:
            raise ValueError("a content version needs size and edit")
        if ch.cause not in CAUSES:
            raise ValueError(f"unknown cause {ch.cause!r}")
        stored = raw = 0
        cdb = self._dbs[S.DB_CHUNKS]
        live: dict[int, int] = {}
        for nc in ch.chunks:
            if len(nc.id) != S.ID_LEN:
                raise ValueError("chunk id must be 16 bytes")
            if nc.base_id is None:
                n = self._put_standalone(txn, nc, live)
                stored += n
                raw += nc.raw_len if n else 0
                continue
            bases = _bases(nc)
            for b in bases:
                if not self._chunk_present(txn, b):
                    raise ValueError(f"base chunk {b.hex()} of chunk {nc.id.hex()} is not stored")
            depth = self._stored_depth(txn, nc, bases)
            val = S.encode_chunk(depth, nc.raw_len, bases, nc.payload)
            if self._storage.put_value(txn, nc.id, val, depth, live=live):
                stored += len(val)
                raw += nc.raw_len
                for b in bases:
                    self._incref(txn, b)
        add_packs_live(txn, self._dbs, live)
        base = ch.base_seq or 0
        if base and rd.is_pruned(base):  # its chunks may be freed
            raise ValueError(f"base version {base} of {ch.path!r} has been pruned by compaction")
        edit = ch.edit if _plain_edit(ch.edit) else \
            [(int(s), int(c), [(bytes(i), int(n)) for i, n in refs]) for s, c, refs in ch.edit]
        pages = None
        if base:  # the base's list, out of the cache and edited in place into this version's
            new, total, depth, accum, old_pages = self._take_list(rd, base)
            new_total = S.apply_edit_packed_in_place(new, total, edit)
            if S.uses_tree(len(new)):
                dirty, tail = S.edited_pages(edit)
                pages = S.page_hashes(new, old_pages, dirty, tail)
        else:
            depth, accum = -1, 0
            if len(edit) == 1 and type(edit[0][2]) is PackedRefs and edit[0][:2] == (0, 0):
                # a first version's whole list, packed by the capture: the cache shares its
                # buffer, read-only (_take_list copies a list it is not the owner of before
                # editing it), instead of one more copy of it (3.7 MB for 4 GiB; issue 19)
                refs = edit[0][2]
                new, new_total = memoryview(refs.packed).toreadonly(), refs.total
            else:
                new = bytearray()  # the next version edits it in place
                new_total = S.apply_edit_packed_in_place(new, 0, edit)  # no bytes copy first (issue 19)
            if S.uses_tree(len(new)):
                pages = S.page_hashes(new)
        if new_total != ch.size:
            raise ValueError(f"chunk list of {ch.path!r} sums to {new_total} bytes, size is {ch.size}")
        ch.edit = edit
        mdb = self._dbs[S.DB_META]
        txn.put(S.META_STORED, _packb(rd.meta(S.META_STORED, 0) + stored), db=mdb)
        txn.put(S.META_RAW, _packb(rd.meta(S.META_RAW, 0) + raw), db=mdb)
        return (stored, *S.version_hash(new, pages), (base, new, new_total, depth, accum, pages))

    def _count_content(self, txn, rd: Reader, ch: Change, seq: int, listed: tuple) -> None:
        """The rest of :meth:`_content`, once its record is put: count the
        version's references (and its checkpoint's, when one is due), cache
        its list for the file's next version."""
        base, new, new_total, depth, accum, pages = listed
        edit = ch.edit
        cdb = self._dbs[S.DB_CHUNKS]
        # one incref per distinct chunk of a batch (a hole names one id 160k times),
        # in key order within it; sorted lists of the ids, not a dict of counts (10
        # MiB for a 4 GiB file's 185,000 chunks), and INCREF_BATCH ids at a time: a
        # capture's packed list (PackedRefs) holds no id objects, so the ids
        # made here are all new (~64 bytes each); an id in two batches is
        # counted in two increfs, which add up
        entries = 0
        all_ids = (cid for _, _, refs in edit for cid, _ in refs)
        while True:
            ids = sorted(itertools.islice(all_ids, INCREF_BATCH))
            if not ids:
                break
            entries += len(ids)
            for cid, same in itertools.groupby(ids):
                n = sum(1 for _ in same)
                v = txn.get(cid, db=cdb)
                if v is None:
                    if not self._chunk_present(txn, cid):
                        raise ValueError(f"chunk {cid.hex()} named by the edit is not stored")
                    v = txn.get(cid, db=cdb)
                # packs.incref without its second look-up (one per chunk of a capture)
                txn.put(cid, S.with_refs(v, S.loc_refs(v) + n), db=cdb)
            del ids
        self._maybe_checkpoint(txn, seq, base, new, new_total, depth + 1, accum + entries, pages=pages)
        if base:  # the file's next version builds on seq: one cached list per file, not per save
            self._uncache_list(base)

    def _maybe_checkpoint(self, txn, seq: int, base: int, new: bytes, total: int, depth: int,
                          accum: int, lenient: bool = False, pages: list | None = None) -> tuple[int, int]:
        """Write a full list (checkpoint) when the edit chain got long; cache the list."""
        entries = len(new) // S.ENTRY_LEN
        every = S.checkpoint_every(entries)
        if base and (depth >= every or accum > 2 * entries + 64):
            if (self.defer_checkpoints and not lenient and entries >= DEFER_LIST_ENTRIES
                    and depth < min(2 * every, CHECKPOINT_DEFER_MAX)
                    and accum <= 4 * entries + 128 and self._due_now is not None):
                # left to write_due_lists, once this commit is over and nobody waits;
                # the next version of the file is due too (depth keeps counting)
                self._due_now.append(seq)
            else:
                # in ``changes`` before record 1 (format 12), after the other checkpoints
                txn.put(S.checkpoint_key(seq), new, db=self._dbs[S.DB_CHECKPOINTS])
                self._count_list(txn, seq, new, lenient)
                depth = accum = 0
        self._cache_list(seq, new, total, depth, accum, pages)
        return depth, accum

    def _count_list(self, txn, seq: int, packed, lenient: bool = False, yield_check=None) -> bool:
        """Count version ``seq``'s checkpoint's references, one per entry of the
        packed list.  ``yield_check()`` true (asked every YIELD_ENTRIES entries):
        stop, -> False (the caller aborts the transaction)."""
        if lenient:
            for o in range(0, len(packed), S.ENTRY_LEN):
                self._count(txn, seq, bytes(packed[o : o + S.ID_LEN]), True)
            return True
        db = self._dbs[S.DB_CHUNKS]
        get, put, add = txn.get, txn.put, S.add_refs
        mv = memoryview(packed)
        step = S.ENTRY_LEN * YIELD_ENTRIES
        for start in range(0, len(packed), step):
            if yield_check is not None and yield_check():
                return False
            for o in range(start, min(start + step, len(packed)), S.ENTRY_LEN):
                cid = mv[o : o + S.ID_LEN].tobytes()
                v = get(cid, db=db)
                if v is None:
                    incref(txn, self._dbs, cid)  # raises: named but not stored
                put(cid, add(v, 1), db=db)
        return True

    def lists_due(self) -> int:
        """Chunk-list checkpoints left by commits for :meth:`write_due_lists`."""
        return len(self._due)

    def _waited_for(self) -> bool:
        return bool(self._wanted) or (self.urgent is not None and self.urgent())

    def write_due_lists(self, limit: int = 16) -> int:
        """Write the chunk-list checkpoints commits left due (``defer_checkpoints``),
        oldest first, each in a durable transaction of its own, exactly as the
        commit would have written it (the full list under the version's seq, one
        reference per entry).  Yields to a commit: when another thread waits
        for the write lock, or ``urgent()`` says someone waits for a commit,
        the transaction is aborted (nothing written) and the rest stays due.
        -> checkpoints written, or -1 when it yielded before finishing."""
        if not self._due:
            return 0
        if self._waited_for() or not self._wlock.acquire(False):
            return -1
        written = 0
        try:
            env = self._storage.env
            while self._due and written < limit:
                if self._waited_for():
                    return -1
                seq = next(iter(self._due))
                txn = env.begin(write=True)
                try:
                    rd = Reader(self._storage, txn)
                    cdb = self._dbs[S.DB_CHECKPOINTS]
                    done = True
                    if txn.get(S.checkpoint_key(seq), db=cdb) is None and not rd.is_pruned(seq):
                        hit = self._lists.get(seq)
                        packed = hit[0] if hit is not None else self._list_for(rd, seq)[0]
                        txn.put(S.checkpoint_key(seq), bytes(packed), db=cdb)
                        done = self._count_list(txn, seq, packed, yield_check=self._waited_for)
                    if not done:
                        txn.abort()
                        return -1
                    txn.commit()
                    self.sync_count += 1
                except BaseException as e:
                    txn.abort()
                    self._due.pop(seq, None)  # not again: a later version will be due
                    err = translate(e, self.path)
                    if err is e:
                        raise
                    raise err from e
                self._due.pop(seq, None)
                hit = self._lists.get(seq)
                if hit is not None:  # the next version counts its depth from here
                    self._lists[seq] = (hit[0], hit[1], 0, 0, hit[4])
                written += 1
                self.lists_written_later += 1
        finally:
            self._wlock.release()
        return written

    def _list_for(self, rd: Reader, seq: int) -> tuple[bytes, int, int, int]:
        """(packed full list, total length, edits since a full list, edit entries since) of ``seq``."""
        hit = self._lists.get(seq)
        if hit is not None:
            self._lists.move_to_end(seq)
            return hit[:4]
        start, chain = rd.list_chain(seq)
        packed = S.pack_list(start)
        total = sum(n for _, n in start)
        for r in chain:
            packed, total = S.apply_edit_packed(packed, total, r.edit or [])
        depth = len(chain) - (1 if chain and not chain[0].base_seq else 0)
        accum = sum(len(x[2]) for r in chain for x in (r.edit or []))
        self._cache_list(seq, packed, total, depth, accum)
        return packed, total, depth, accum

    def _take_list(self, rd: Reader, seq: int) -> tuple[bytearray, int, int, int, list | None]:
        """:meth:`_list_for`, taken out of the cache for the caller to edit in place
        (a transaction that fails clears the whole cache, so a half-edited
        list is never seen again; one that commits caches it under the new version)."""
        self._due.pop(seq, None)  # its next version is due instead (if still due)
        if self._due_now and seq in self._due_now:  # (due in this very transaction)
            self._due_now.remove(seq)
        hit = self._lists.pop(seq, None)
        if hit is not None:
            self._list_entries -= _cost(hit)
        else:
            hit = self._list_for(rd, seq) + (None,)
            self._uncache_list(seq)
        packed, total, depth, accum, pages = hit
        return (packed if isinstance(packed, bytearray) else bytearray(packed)), total, depth, accum, pages

    def _cache_list(self, seq: int, packed: bytes, total: int, depth: int, accum: int,
                    pages: list | None = None) -> None:
        """Cache a version's packed list and, over one tree page, its page
        hashes (32 bytes a page of 81,920: counted in the same budget)."""
        hit = (packed, total, depth, accum, pages)
        self._lists[seq] = hit
        self._list_entries += _cost(hit)
        while (self._list_entries > LIST_CACHE_ENTRIES or len(self._lists) > LIST_CACHE_VERSIONS) \
                and len(self._lists) > 1:
            _, old = self._lists.popitem(last=False)
            self._list_entries -= _cost(old)

    def _uncache_list(self, seq: int) -> None:
        hit = self._lists.pop(seq, None)
        if hit is not None:
            self._list_entries -= _cost(hit)

    def _clear_list_cache(self) -> None:
        self._lists.clear()
        self._list_entries = 0


def _cost(hit) -> int:
    """A cached list's weight in LIST_CACHE_ENTRIES: its entries, its page hashes as entries' worth."""
    pages = hit[4]
    return len(hit[0]) // S.ENTRY_LEN + (0 if pages is None else (len(pages) * S.HASH_LEN) // S.ENTRY_LEN + 1)


INCREF_BATCH = 16_384  # ids sorted at a time for a content record's increfs (_content)


def _plain_edit(edit) -> bool:
    """Is ``edit`` already ``[(int, int, [(bytes, int), ...]), ...]`` (what a
    capture builds)?  Then the writer keeps it as it is instead of a copy
    (a 4 GiB file's edit is ~11 MiB of tuples: the copy doubled it)."""
    for s, c, refs in edit:
        if type(s) is not int or type(c) is not int:
            return False
        if type(refs) is PackedRefs:  # a capture's packed new list (16-byte ids, checked as it was built)
            continue
        if type(refs) is not list:
            return False
        for ref in refs:
            if type(ref) is not tuple or len(ref) != 2 or type(ref[0]) is not bytes or type(ref[1]) is not int:
                return False
    return True


def _new_id() -> int:
    """A random 63-bit file id (never 0: 0 asks the writer to resolve)."""
    return int.from_bytes(os.urandom(8), "big") >> 1 or 1


def _bases(nc) -> tuple[bytes, ...]:
    """The base ids of a chunk to store, in dictionary order (a NewChunk, or
    any object with ``base_id`` and optionally ``more_bases``)."""
    if nc.base_id is None:
        return ()
    return (*getattr(nc, "more_bases", ()), nc.base_id)
