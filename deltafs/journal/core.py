"""The Journal: opening, locking, the single writer and group commit."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import lmdb
import msgpack

from deltafs.chunking import CHUNKER_PARAMS
from deltafs.errors import JournalError, JournalFormatError, JournalLockedError, NotFoundError

from . import private
from . import schema as S
from .hlc import HLC, hlc_to_ns
from .packs import PackFiles, add_pack_live, incref, oldest_reader_txn
from .reader import LmdbStore, Reader
from .records import CAUSES, OPS, Change, decode_record, encode_record
from .state import apply_record

log = logging.getLogger(__name__)
RECORD_BLOCKS_CACHED = 8  # decoded record blocks kept per journal (RECORD_BLOCK records each)

MAP_SIZE = (1 << 40) if sys.maxsize > 2**32 else (1 << 30)
MAX_BATCH = 1024  # submits folded into one transaction at most
QUEUE_SIZE = 4096
LIST_CACHE_ENTRIES = 2_000_000  # chunk-list entries kept for the writer
_STOP = object()
REUSE_WINDOW_NS = 120 * 1_000_000_000  # a path re-created this soon continues its history

Callback = Callable[[object], None]


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


class Journal:
    """An open journal.  Use :meth:`open`; see the package docstring."""

    def __init__(self, path: str, env: lmdb.Environment, dbs: dict, packs: PackFiles, readonly: bool,
                 lock_fd: int | None, clock) -> None:
        self.path = path
        self.env = env
        self._dbs = dbs
        self._packs = packs
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._wlock = threading.Lock()
        self._hlc = HLC(clock or time.time_ns)
        self._lists: OrderedDict[int, tuple[list, int, int]] = OrderedDict()
        # (seq, chunk id) of entries of pruned records appended by append_raw whose
        # chunk the mirror no longer had: not counted, so compact.prune must not
        # uncount them either (in memory: a clone prunes before it closes the journal)
        self._uncounted: Counter[tuple[int, bytes]] = Counter()
        self._list_entries = 0
        # decoded record blocks (immutable: a repack moves their bytes, not what they hold)
        self._blocks: OrderedDict[int, list[bytes]] = OrderedDict()
        self._blocks_lock = threading.Lock()
        self._blocks_checked: set[tuple[int, int, int]] = set()  # (first seq, pack, offset) whose chain was checked
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self.sync_count = 0  # write transactions committed (each one sync)
        with self.reader() as r:
            self.journal_id: str = r.meta(S.META_JOURNAL_ID)
            self.format_version: int = r.meta(S.META_FORMAT)
            self._hlc.restore(r.meta(S.META_HLC, 0))
            pack_end = r.meta(S.META_PACK_END, [0, 0])
        if not readonly:
            packs.open_writer(*pack_end)
            self.delete_retired_packs()

    # --- opening -------------------------------------------------------------
    @classmethod
    def open(cls, path, *, readonly: bool = False, create: bool = False, clock: Callable[[], int] | None = None) -> "Journal":
        path = os.path.abspath(os.fspath(path))
        if create and not readonly:
            private.make_dir(path)
        if not os.path.exists(os.path.join(path, "data.mdb")) and not (create and not readonly):
            raise NotFoundError(f"no deltafs journal at {path}")
        lock_fd = None if readonly else _take_lock(path)
        try:
            env, dbs, packs = _share_env(path, readonly)
        except BaseException:
            _release_lock(lock_fd)
            raise
        try:
            j = cls(path, env, dbs, packs, readonly, lock_fd, clock)
        except BaseException:
            _unshare_env(path)
            _release_lock(lock_fd)
            raise
        if not readonly:
            private.tighten(path)  # the owner's alone, also a journal made before this rule
        log.info("opened journal %s (%s, id %s)", path, "read-only" if readonly else "writer", j.journal_id)
        return j

    def close(self) -> None:
        if self._thread is not None:
            self.stop_writer()
        if not self.readonly and self.env is not None:
            self._packs.close_writer()
        if self.env is not None:
            _unshare_env(self.path)
            self.env = None
        _release_lock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[Reader]:
        """A read snapshot; never blocks the writer (keep it short-lived)."""
        if self.readonly:
            self._packs.forget_deleted()  # another process may have deleted packs
        txn = self.env.begin(write=False)
        try:
            yield Reader(self, txn)
        finally:
            txn.abort()

    def data_size(self) -> int:
        """Bytes allocated on disk by data.mdb (the map is sparse)."""
        return os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512

    # --- writing ---------------------------------------------------------------
    def commit(self, changes: Sequence[Change]) -> list[int]:
        """Journal ``changes`` in one durable transaction; -> their seqs."""
        (res,) = self._commit_batch([(list(changes), None)])
        if isinstance(res, BaseException):
            raise res
        return res

    def commit_many(self, groups: Sequence[Sequence[Change]]) -> list:
        """One durable transaction for several groups; each group commits or
        fails alone.  -> per group: list of seqs, or the exception."""
        return self._commit_batch([(list(g), None) for g in groups])

    def put_chunks(self, chunks: Sequence[NewChunk]) -> int:
        """Store chunks ahead of the record that will name them (large captures
        stream this way instead of holding every chunk in memory).  Not
        synced: a crash leaves unreferenced chunks, which GC frees.  -> bytes stored."""
        self._check_writable()
        stored = 0
        with self._wlock, self.env.begin(write=True) as txn:
            for nc in chunks:
                depth = nc.depth if nc.base_id else 0
                val = S.encode_chunk(depth, nc.raw_len, nc.base_id, nc.payload)
                if self._put_value(txn, nc.id, val, depth):
                    stored += len(val)
                    if nc.base_id is not None:
                        self._incref(txn, nc.base_id)
            if stored:
                mdb = self._dbs[S.DB_META]
                rd = Reader(self, txn)
                txn.put(S.META_STORED, _packb(rd.meta(S.META_STORED, 0) + stored), db=mdb)
            self._seal(txn)
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
            txn = self.env.begin(write=True)
            try:
                rd = Reader(self, txn)
                cdb = self._dbs[S.DB_CHUNKS]
                stored = raw = 0
                new_bases = []  # a delta may come before its base: count bases once all are in
                for cid, val in chunks.items():
                    depth, raw_len, base, _ = S.decode_chunk(val)
                    if self._put_value(txn, cid, bytes(val), depth):
                        stored += len(val)
                        raw += raw_len
                        if base is not None:
                            new_bases.append(base)
                for cid, val in chunks.items():
                    base = S.decode_chunk(val)[2]
                    if base is not None and txn.get(base, db=cdb) is None:
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
                self._seal(txn)
                txn.commit()
                self.sync_count += 1
            except BaseException:
                txn.abort()
                self._clear_list_cache()
                raise
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

    def start_writer(self) -> None:
        """Start the group-commit thread used by :meth:`submit`."""
        self._check_writable()
        if self._thread is not None:
            return
        self._queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread = threading.Thread(target=self._writer_loop, name="deltafs-journal-writer", daemon=True)
        self._thread.start()

    def submit(self, changes: Sequence[Change], callback: Callback | None = None) -> None:
        """Queue ``changes`` for the writer thread (blocks when the queue is full).

        ``callback(list_of_seqs | exception)`` runs in the writer thread once
        the transaction holding them is synced; keep it short (e.g.
        ``trio.from_thread.run_sync`` of a memory-channel send).
        """
        if self._queue is None:
            raise RuntimeError("journal writer not started")
        self._queue.put((list(changes), callback))

    def stop_writer(self) -> None:
        """Commit everything queued, then stop the writer thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self._queue = None

    def set_setting(self, name: str, value) -> None:
        self._small_write(S.DB_META, S.META_SETTING_PREFIX + name.encode(), _packb(value))

    def kv_put(self, db: str, key: str, value) -> None:
        """Set ``key`` in the generic store ``db`` ("snapshots" or "mirrors")."""
        self._small_write(S.KV_DBS[db], key.encode(), _packb(value))

    def kv_delete(self, db: str, key: str) -> None:
        self._small_write(S.KV_DBS[db], key.encode(), None)

    # --- internals ---------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.readonly:
            raise JournalError(f"journal {self.path} is open read-only")

    def _small_write(self, db: bytes, key: bytes, value: bytes | None) -> None:
        self._check_writable()
        with self._wlock, self.env.begin(write=True) as txn:
            if value is None:
                txn.delete(key, db=self._dbs[db])
            else:
                txn.put(key, value, db=self._dbs[db])
        self.sync_count += 1

    def _writer_loop(self) -> None:
        q = self._queue
        stop = False
        while not stop:
            item = q.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            results = self._commit_batch(batch)
            for (_, cb), res in zip(batch, results):
                if cb is not None:
                    try:
                        cb(res)
                    except Exception:
                        log.exception("journal submit callback failed")

    def _commit_batch(self, batch: list[tuple[list[Change], Callback | None]]) -> list:
        """One write transaction for the batch; each submit in a nested
        transaction so one bad submit fails alone."""
        self._check_writable()
        results: list = []
        with self._wlock:
            txn = self.env.begin(write=True)
            try:
                for changes, _ in batch:
                    child = self.env.begin(write=True, parent=txn)
                    try:
                        seqs = [self._apply(child, ch) for ch in changes]
                        child.commit()
                        results.append(seqs)
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        child.abort()
                        self._clear_list_cache()
                        log.warning("journal rejected a change: %s", e)
                        results.append(e)
                self._seal(txn)
                txn.commit()
                self.sync_count += 1
            except BaseException as e:
                txn.abort()
                self._clear_list_cache()
                if not isinstance(e, Exception):
                    raise
                log.debug("journal commit failed: %s", e)  # the caller reports it, once
                err = _translate(e, self.path)
                results = [err for _ in batch]
        return results

    def _apply(self, txn, ch: Change) -> int:
        if ch.op not in OPS:
            raise ValueError(f"unknown op {ch.op!r}")
        if ch.op in ("rename", "link") and ch.path2 is None:
            raise ValueError(f"{ch.op} needs path2")
        rd = Reader(self, txn)
        if not ch.file_id:
            ch.file_id = self._resolve_file_id(txn, rd, ch)
        seq = rd.head_seq() + 1
        prev = rd.head_hash()
        hlc = self._hlc.tick()
        stored = chash = None
        if ch.op == "write":
            stored, chash = self._content(txn, rd, ch, seq)
        value, _ = encode_record(seq, hlc, ch, prev, stored, chash)
        txn.put(S.u64(seq), value, db=self._dbs[S.DB_CHANGES], append=True)
        rec = decode_record(value, seq)
        apply_record(LmdbStore(txn, self._dbs), rec)
        S.index_record(txn, self._dbs, seq, rec.file_id, (rec.path, rec.path2))
        txn.put(S.META_HLC, _packb(hlc), db=self._dbs[S.DB_META])
        return seq

    def _resolve_file_id(self, txn, rd: Reader, ch: Change) -> int:
        """file_id=0: the file at ``ch.path`` in the tree as of this record.

        A path that names nothing gets the id of the file that last had
        this path if that file was deleted or renamed away within
        REUSE_WINDOW_NS (an editor's delete-old-write-new or backup-rename
        save continues the same history), else a new random id.
        """
        if ch.op not in ("create", "mkdir", "symlink", "mknod"):
            fid = rd.file_id_at(ch.path)
            if fid:
                return fid
        elif rd.file_id_at(ch.path):
            return _new_id()
        cur = txn.cursor(db=self._dbs[S.DB_PATHLOG])
        if cur.set_key(S.path_key(ch.path)) and cur.last_dup():
            fid = rd.record(S.from_u64(cur.value())).file_id
            st = rd.file_state(fid)
            if st is not None and st.kind == "f" and st.last_seq and (st.deleted or ch.path not in st.links):
                age = self._hlc._clock() - hlc_to_ns(rd.record(st.last_seq).hlc)
                if age <= REUSE_WINDOW_NS:
                    return fid
        return _new_id()

    def _record_block(self, first: int, loc: tuple[int, int, int, int]) -> list[bytes]:
        """The stored values of the record block starting at ``first`` (a few kept decoded)."""
        with self._blocks_lock:
            values = self._blocks.get(first)
            if values is not None:
                self._blocks.move_to_end(first)
                return values
        pack, off, length, count = loc
        values = S.decode_record_block(self._packs.read(pack, off, length), count)
        with self._blocks_lock:
            self._blocks[first] = values
            while len(self._blocks) > RECORD_BLOCKS_CACHED:
                self._blocks.popitem(last=False)
        return values

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

    def _put_value(self, txn, cid: bytes, val: bytes, depth: int) -> bool:
        """Append a chunk value to the pack and index it (refs 0), unless the
        chunk is stored already.  -> whether it was stored now."""
        cdb = self._dbs[S.DB_CHUNKS]
        if txn.get(cid, db=cdb) is not None:
            return False
        pack, off = self._packs.append(val)
        txn.put(cid, S.encode_loc(0, pack, off, len(val), depth), db=cdb)
        add_pack_live(txn, self._dbs, pack, len(val))
        return True

    def _seal(self, txn) -> None:
        """Before a commit: make the pack bytes it names durable and record
        the pack's committed end (docs/format.md, "Pack files")."""
        pos = self._packs.sync()
        if pos is not None:
            txn.put(S.META_PACK_END, _packb(list(pos)), db=self._dbs[S.DB_META])

    def delete_retired_packs(self) -> list[int]:
        """Delete packs emptied by compaction once no LMDB reader (in any
        process) holds a snapshot older than the move.  -> packs deleted."""
        with self.env.begin() as txn:
            v = txn.get(S.META_PACKS_RETIRED, db=self._dbs[S.DB_META])
        retired = msgpack.unpackb(v) if v else []
        if not retired:
            return []
        self.env.reader_check()  # forget slots of dead processes
        oldest = oldest_reader_txn(self.env)
        done = [p for p, t in retired if oldest is None or oldest >= t]
        if not done:
            return []
        with self._wlock, self.env.begin(write=True) as txn:
            v = txn.get(S.META_PACKS_RETIRED, db=self._dbs[S.DB_META])
            left = [[p, t] for p, t in (msgpack.unpackb(v) if v else []) if p not in done]
            self._packs.delete(done)
            if left:
                txn.put(S.META_PACKS_RETIRED, _packb(left), db=self._dbs[S.DB_META])
            else:
                txn.delete(S.META_PACKS_RETIRED, db=self._dbs[S.DB_META])
        log.info("deleted %d emptied pack file(s)", len(done))
        return done

    def _chunk_present(self, txn, cid: bytes) -> bool:
        """Is the chunk stored?  One freed by GC after a capture saw it is
        brought back from the graveyard (see compact.graveyard_db)."""
        if txn.get(cid, db=self._dbs[S.DB_CHUNKS]) is not None:
            return True
        gdb = self._dbs.get(b"graveyard")
        v = txn.get(cid, db=gdb) if gdb is not None else None
        if v is None:
            return False
        val = bytes(v[8:])
        depth, _, base, _ = S.decode_chunk(val)
        if base is not None:
            if not self._chunk_present(txn, base):
                return False
            self._incref(txn, base)
        self._put_value(txn, cid, val, depth)
        txn.delete(cid, db=gdb)
        log.info("chunk %s freed by compaction is named again: brought back", cid.hex())
        return True

    def _content(self, txn, rd: Reader, ch: Change, seq: int) -> tuple[int, bytes]:
        if ch.size is None or ch.edit is None:
            raise ValueError("a content version needs size and edit")
        if ch.cause not in CAUSES:
            raise ValueError(f"unknown cause {ch.cause!r}")
        stored = raw = 0
        cdb = self._dbs[S.DB_CHUNKS]
        for nc in ch.chunks:
            if len(nc.id) != S.ID_LEN:
                raise ValueError("chunk id must be 16 bytes")
            if nc.base_id is not None and not self._chunk_present(txn, nc.base_id):
                raise ValueError(f"base chunk {nc.base_id.hex()} of chunk {nc.id.hex()} is not stored")
            depth = nc.depth if nc.base_id else 0
            val = S.encode_chunk(depth, nc.raw_len, nc.base_id, nc.payload)
            if self._put_value(txn, nc.id, val, depth):
                stored += len(val)
                raw += nc.raw_len
                if nc.base_id is not None:
                    self._incref(txn, nc.base_id)
        base = ch.base_seq or 0
        pdb = self._dbs.get(b"pruned")  # compact.DB_PRUNED: its chunks may be freed
        if base and pdb is not None and txn.get(S.u64(base), db=pdb) is not None:
            raise ValueError(f"base version {base} of {ch.path!r} has been pruned by compaction")
        old, total, depth, accum = self._list_for(rd, base) if base else (b"", 0, -1, 0)
        edit = [(int(s), int(c), [(bytes(i), int(n)) for i, n in refs]) for s, c, refs in ch.edit]
        new, new_total = S.apply_edit_packed(old, total, edit)
        if new_total != ch.size:
            raise ValueError(f"chunk list of {ch.path!r} sums to {new_total} bytes, size is {ch.size}")
        ch.edit = edit
        entries = 0
        named: dict[bytes, int] = {}  # one incref per distinct chunk (a hole names one id 160k times)
        for _, _, refs in edit:
            for cid, _ in refs:
                named[cid] = named.get(cid, 0) + 1
            entries += len(refs)
        for cid, n in named.items():
            if txn.get(cid, db=cdb) is None and not self._chunk_present(txn, cid):
                raise ValueError(f"chunk {cid.hex()} named by the edit is not stored")
            self._incref(txn, cid, n)
        depth, accum = self._maybe_checkpoint(txn, seq, base, new, new_total, depth + 1, accum + entries)
        mdb = self._dbs[S.DB_META]
        txn.put(S.META_STORED, _packb(rd.meta(S.META_STORED, 0) + stored), db=mdb)
        txn.put(S.META_RAW, _packb(rd.meta(S.META_RAW, 0) + raw), db=mdb)
        return stored, S.packed_hash(new)

    def _maybe_checkpoint(self, txn, seq: int, base: int, new: bytes, total: int, depth: int,
                          accum: int, lenient: bool = False) -> tuple[int, int]:
        """Write a full list (checkpoint) when the edit chain got long; cache the list."""
        entries = len(new) // S.ENTRY_LEN
        if base and (depth >= S.checkpoint_every(entries) or accum > 2 * entries + 64):
            # the head's seq is above every checkpoint key: append (full pages)
            if not txn.put(S.u64(seq), new, db=self._dbs[S.DB_CHECKPOINTS], append=True):
                txn.put(S.u64(seq), new, db=self._dbs[S.DB_CHECKPOINTS])
            for o in range(0, len(new), S.ENTRY_LEN):
                self._count(txn, seq, new[o : o + S.ID_LEN], lenient)
            depth = accum = 0
        self._cache_list(seq, new, total, depth, accum)
        return depth, accum

    def _list_for(self, rd: Reader, seq: int) -> tuple[bytes, int, int, int]:
        """(packed full list, total length, edits since a full list, edit entries since) of ``seq``."""
        hit = self._lists.get(seq)
        if hit is not None:
            self._lists.move_to_end(seq)
            return hit
        start, chain = rd.list_chain(seq)
        packed = S.pack_list(start)
        total = sum(n for _, n in start)
        for r in chain:
            packed, total = S.apply_edit_packed(packed, total, r.edit or [])
        depth = len(chain) - (1 if chain and not chain[0].base_seq else 0)
        accum = sum(len(x[2]) for r in chain for x in (r.edit or []))
        self._cache_list(seq, packed, total, depth, accum)
        return packed, total, depth, accum

    def _cache_list(self, seq: int, packed: bytes, total: int, depth: int, accum: int) -> None:
        self._lists[seq] = (packed, total, depth, accum)
        self._list_entries += len(packed) // S.ENTRY_LEN
        while self._list_entries > LIST_CACHE_ENTRIES and len(self._lists) > 1:
            _, (old, _, _, _) = self._lists.popitem(last=False)
            self._list_entries -= len(old) // S.ENTRY_LEN

    def _clear_list_cache(self) -> None:
        self._lists.clear()
        self._list_entries = 0


# python-lmdb refuses to open one environment twice in a process, so a
# read-only opener in the writer's process (history tools run in-process,
# tests) shares the writer's environment.
_ENVS: dict[str, list] = {}  # path -> [env, dbs, readonly, users, PackFiles]
_ENVS_LOCK = threading.Lock()


def _share_env(path: str, readonly: bool):
    with _ENVS_LOCK:
        e = _ENVS.get(path)
        if e is not None:
            if e[2] and not readonly:
                raise JournalError(f"journal {path} is already open read-only in this process")
            e[3] += 1
            return e[0], e[1], e[4]
        try:
            env = lmdb.open(
                path, map_size=MAP_SIZE, max_dbs=S.MAX_DBS, readonly=readonly, lock=True,
                sync=True, metasync=True, readahead=False, max_readers=510, subdir=True,
                mode=private.FILE_MODE,
            )
        except lmdb.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        try:
            dbs = _open_dbs(env, path, readonly)
        except BaseException:
            env.close()
            raise
        packs = PackFiles(path)
        _ENVS[path] = [env, dbs, readonly, 1, packs]
        return env, dbs, packs


def _unshare_env(path: str) -> None:
    with _ENVS_LOCK:
        e = _ENVS[path]
        e[3] -= 1
        if e[3] == 0:
            del _ENVS[path]
            e[4].close()
            e[0].close()


def _translate(e: Exception, path: str) -> Exception:
    if isinstance(e, lmdb.MapFullError):
        return JournalError(f"journal {path} is full (LMDB map size reached)")
    if isinstance(e, lmdb.DiskError) or (isinstance(e, OSError) and e.errno == errno.ENOSPC):
        return JournalError(f"journal {path}: disk full or I/O error: {e}")
    return e


def _take_lock(path: str) -> int:
    lock_path = os.path.join(path, "lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, private.FILE_MODE)
    except OSError as e:
        raise JournalError(f"cannot open the journal {path} for writing: {private.reason(e, path)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise JournalLockedError(f"journal {path} is locked by another writer (pid {pid})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the only fd drops the flock


def _open_dbs(env: lmdb.Environment, path: str, readonly: bool) -> dict:
    dbs = {}
    try:
        meta = env.open_db(S.DB_META, create=not readonly)
    except lmdb.NotFoundError:
        raise JournalFormatError(f"{path} is not a deltafs journal (no meta database)") from None
    upgrade_from = None
    with env.begin(write=not readonly) as txn:
        fmt = txn.get(S.META_FORMAT, db=meta)
        if fmt is None and readonly:
            raise JournalFormatError(f"{path} is not an initialised deltafs journal")
        if fmt is not None and msgpack.unpackb(fmt) in UPGRADABLE and not readonly:
            upgrade_from = msgpack.unpackb(fmt)  # after this transaction (see upgrade.py)
        elif fmt is not None:
            _check_format(path, msgpack.unpackb(fmt), txn.get(S.META_CHUNKER, db=meta))
        else:
            txn.put(S.META_FORMAT, _packb(S.FORMAT_VERSION), db=meta)
            txn.put(S.META_JOURNAL_ID, _packb(str(uuid.uuid4())), db=meta)
            txn.put(S.META_CREATED, _packb(time.time_ns()), db=meta)
            txn.put(S.META_CHUNKER, _packb(CHUNKER_PARAMS), db=meta)
            txn.put(S.META_HLC, _packb(0), db=meta)
            log.info("created journal %s", path)
    if upgrade_from is not None:
        from .upgrade import upgrade

        with env.begin() as txn:
            _check_chunker(path, txn.get(S.META_CHUNKER, db=meta))
        upgrade(env, path, meta, upgrade_from)
    for name in S.ALL_DBS:
        dup = name in S.DUP_DBS
        try:
            dbs[name] = meta if name == S.DB_META else \
                env.open_db(name, create=not readonly, dupsort=dup, dupfixed=dup)
        except lmdb.NotFoundError:
            raise JournalFormatError(f"journal {path} lacks database {name.decode()}: damaged or of another format") from None
    return dbs


UPGRADABLE = (1, 2, 3)  # formats a writer upgrades in place at open (upgrade.py)


def _check_format(path: str, fmt, chunker: bytes | None) -> None:
    if fmt in UPGRADABLE:
        raise JournalFormatError(
            f"journal {path} has format version {fmt}; open it once for writing (deltafs mount, or "
            f"deltafs compact --journal {path}) to upgrade it to format {S.FORMAT_VERSION}")
    if fmt != S.FORMAT_VERSION:
        raise JournalFormatError(
            f"journal {path} has format version {fmt}; this deltafs reads format version {S.FORMAT_VERSION}"
        )
    _check_chunker(path, chunker)


def _check_chunker(path: str, chunker: bytes | None) -> None:
    if chunker is None or msgpack.unpackb(chunker, raw=False) != CHUNKER_PARAMS:
        raise JournalFormatError(f"journal {path} was chunked with other parameters than this deltafs uses")


def _new_id() -> int:
    """A random 63-bit file id (never 0: 0 asks the writer to resolve)."""
    return int.from_bytes(os.urandom(8), "big") >> 1 or 1
