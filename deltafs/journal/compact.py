"""The LMDB side of maintenance: pruned versions, checkpoints, GC, verify, vacuum.

Records are immutable and hash-chained, so a version is never deleted from
``changes``: it is *pruned*.  Its seq goes into the ``pruned`` database,
its edit entries (and its checkpoint, if any) stop counting in ``refs``,
and chunks whose count reaches 0 are freed (cascading to the base of a
delta chunk).  Before that, every retained version whose chunk-list chain
passes through a version about to be pruned gets a checkpoint, so it can
still be rebuilt.  Decisions (which versions to prune) are made by
``deltafs.maintenance``; this module only carries them out, in small
transactions, under the journal's write lock.  docs/format.md, "Compaction
and retention", is the contract.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import msgpack

from deltafs.chunking import MAX_DELTA_DEPTH, chunk_id, decompress_chunk
from deltafs.errors import CorruptionError

from . import schema as S
from .packs import PACK_MAGIC, add_pack_live, incref, pack_live
from .reader import Reader
from .records import ZERO_HASH, check_link, decode_record

log = logging.getLogger(__name__)

DB_PRUNED = b"pruned"
DB_GRAVEYARD = b"graveyard"
GRAVEYARD_GRACE_NS = 600 * 1_000_000_000  # freed chunks a late commit may still name
META_PRUNED_VERSIONS = b"pruned_versions"  # counters, see docs/format.md
META_FREED_CHUNKS = b"freed_chunks"
META_FREED_BYTES = b"freed_bytes"
CHECKPOINT_BATCH = 64  # checkpoints written per transaction
PRUNE_BATCH = 128  # versions pruned per transaction


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


# --- the pruned database -------------------------------------------------------
def pruned_db(j, create: bool = False):
    """Handle of the ``pruned`` db, or None if the journal has none yet
    (then no version is pruned).  See :func:`_named_db` for the rules."""
    return _named_db(j, DB_PRUNED, create)


def graveyard_db(j, create: bool = False):
    """Handle of the ``graveyard`` db (freed chunks kept for GRAVEYARD_GRACE_NS).

    A capture decides "this chunk is already stored" in one transaction and
    commits the version naming it in a later one; GC may free the chunk in
    between.  Freed chunks therefore wait here (key: chunk id, value: u64
    time freed || the chunk value) and the writer brings one back when a
    version names it; only entries older than the grace period are deleted.
    """
    return _named_db(j, DB_GRAVEYARD, create)


def _named_db(j, name: bytes, create: bool):
    """Handle of a named db created on demand, cached in the journal's db table.

    Existence is checked in a read transaction (names of named dbs are keys
    of the main db), so asking for a db that does not exist never starts a
    write transaction.  Opening one does (LMDB opens dbs in a transaction),
    so it happens under the journal's write lock: two write transactions of
    one process must never wait for each other inside LMDB, which would
    hold the GIL and freeze the daemon.  Call it before opening the
    transaction that uses the handle, never inside one of this thread.
    """
    h = j._dbs.get(name)
    if h is not None:
        return h
    with j.env.begin() as txn:
        exists = txn.get(name) is not None
    if not exists and (not create or j.readonly):
        return None
    with j._wlock:
        h = j._dbs.get(name)
        if h is None:
            # a read-only environment opens it in a read transaction of its own
            h = j.env.open_db(name, create=create and not j.readonly)
            j._dbs[name] = h
    return h


def purge_graveyard(j, grace_ns: int | None = None) -> int:
    """Delete graveyard entries freed more than grace_ns ago.  -> entries deleted."""
    grace = GRAVEYARD_GRACE_NS if grace_ns is None else grace_ns
    db = graveyard_db(j)
    if db is None:
        return 0
    cutoff = time.time_ns() - grace
    gone = 0
    with j._wlock, j.env.begin(write=True) as txn:
        cur = txn.cursor(db=db)
        for k, v in list(cur):
            if S.from_u64(v[:8]) <= cutoff:
                txn.delete(k, db=db)
                gone += 1
    return gone


def pruned_seqs(j, txn) -> set[int]:
    """Seqs of pruned versions (``pruned_db(j)`` must have been called
    before ``txn`` began, or the db did not exist then)."""
    db = j._dbs.get(DB_PRUNED)
    if db is None:
        return set()
    return {S.from_u64(k) for k in txn.cursor(db=db).iternext(values=False)}


def pruned_info(j, txn, seq: int) -> dict | None:
    """The ``pruned`` value of ``seq`` (``{"hlc", "t"}``; ``t``: wall time ns of
    the prune, missing in entries written before it was recorded), or None."""
    db = j._dbs.get(DB_PRUNED)
    v = txn.get(S.u64(seq), db=db) if db is not None else None
    return None if v is None else msgpack.unpackb(v, raw=False)


def data_bytes(j) -> int:
    """Bytes of journal data: the pack files plus the pages in use by every
    database (the graveyard excluded: it empties by itself), i.e. data.mdb
    minus its free pages.  data.mdb itself never shrinks without
    ``compact --vacuum``; a pack's dead bytes go when :func:`repack` moves
    its live values out."""
    pruned_db(j)
    graveyard_db(j)
    grave = j._dbs.get(DB_GRAVEYARD)
    with j.env.begin() as txn:
        psize = j.env.stat()["psize"]
        st = j.env.stat()  # the main db: names of the databases
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        for db in set(j._dbs.values()):
            if db is grave:
                continue
            st = txn.stat(db)
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    return pages * psize + j._packs.total_bytes()


# --- the chunk index ------------------------------------------------------------------
INDEX_SLACK = 1.2  # rewrite the index once it spans this many times the leaf pages it needs
INDEX_SAMPLE = 256  # entries whose size estimates the index's
INDEX_REWRITE_MAX = 1_000_000  # entries: above this the rewrite would hold the writer for seconds
TMP_DB = b"rewrite.tmp"


def refill(txn, db, tmp) -> None:
    """Replace ``db``'s entries by ``tmp``'s, appended in key order (full
    pages: LMDB splits an appending page at its end), and empty ``tmp``."""
    txn.drop(db, delete=False)
    for k, v in txn.cursor(db=tmp):
        txn.put(k, v, db=db, append=True)
    txn.drop(tmp, delete=False)


def densify_index(j, slack: float = INDEX_SLACK) -> int:
    """Rewrite the chunk index in key order if its pages are mostly empty; -> pages saved.

    Chunk ids are random, so inserts land all over the B-tree and every page
    split leaves two half-full pages: the index settles at 50-70 % full.
    Copying it out and appending it back in order fills every page.  One
    write transaction (readers keep their snapshot); skipped above
    INDEX_REWRITE_MAX entries.
    """
    j._check_writable()
    db = j._dbs[S.DB_CHUNKS]
    with j._wlock, j.env.begin(write=True) as txn:
        st = txn.stat(db)
        if not st["entries"] or st["entries"] > INDEX_REWRITE_MAX:
            return 0
        sizes = [_node_bytes(k, v) for _, (k, v) in zip(range(INDEX_SAMPLE), txn.cursor(db=db))]
        need = -(-st["entries"] * sum(sizes) // (len(sizes) * (st["psize"] - 16)))  # page header: 16
        if st["leaf_pages"] - need < max(1, need * (slack - 1)):
            return 0
        saved = rewrite_in_key_order(j.env, txn, db)
    log.info("rewrote the chunk index in key order: %d pages fewer", saved)
    return saved


def rewrite_in_key_order(env, txn, db) -> int:
    """Copy ``db`` out and append it back in key order (every page full); -> pages saved."""
    st = txn.stat(db)
    before = st["leaf_pages"] + st["branch_pages"] + st["overflow_pages"]
    tmp = env.open_db(TMP_DB, txn=txn)
    for k, v in txn.cursor(db=db):
        txn.put(k, v, db=tmp, append=True)
    refill(txn, db, tmp)
    txn.drop(tmp, delete=True)
    st = txn.stat(db)
    return before - st["leaf_pages"] - st["branch_pages"] - st["overflow_pages"]


def _node_bytes(k: bytes, v: bytes) -> int:
    """Bytes an entry takes on an LMDB leaf page: node header 8, key and value, even-aligned, slot 2."""
    return (8 + len(k) + len(v) + 1) // 2 * 2 + 2


# --- record blocks ------------------------------------------------------------------
# records per block: 32 compress to 0.65-0.71 of their bytes, 64 to 0.64-0.70
# (16: 0.67-0.73), and the smaller block leaves fewer records as LMDB values
RECORD_BLOCK = 32
# the head record always stays an LMDB value (the writer chains onto it); older
# ones go in whole blocks: a reader decodes a block once and keeps a few decoded
RECORDS_KEPT = 1


def archive_records(j, keep: int = RECORDS_KEPT) -> int:
    """Move records older than the newest ``keep``, in whole blocks of
    RECORD_BLOCK, into zstd-compressed blocks in the pack files; -> records moved.

    A record costs ~210 bytes as an LMDB value on a full page; a block of
    32 compresses them to 0.65-0.71 of their bytes (their hashes and chunk
    ids do not compress).  Records are immutable, so a block never
    changes; each block is one write transaction (pack synced first), so
    a reader finds every record either in ``changes`` or in a block.
    """
    j._check_writable()
    moved = 0
    changes, blocks = j._dbs[S.DB_CHANGES], j._dbs[S.DB_RECORD_BLOCKS]
    while True:
        with j._wlock, j.env.begin(write=True) as txn:
            rd = Reader(j, txn)
            first = rd.archived_upto() + 1
            last = first + RECORD_BLOCK - 1
            if last > rd.head_seq() - keep:
                break
            values = [txn.get(S.u64(s), db=changes) for s in range(first, last + 1)]
            if any(v is None for v in values):
                raise CorruptionError(f"records {first}..{last} are not all in the changes database")
            blob = S.encode_record_block(values)
            pack, off = j._packs.append(blob)
            if not txn.put(S.u64(first), S.encode_block_loc(pack, off, len(blob), len(values)),
                           db=blocks, append=True):
                raise CorruptionError(f"a record block already starts after record {first}")
            add_pack_live(txn, j._dbs, pack, len(blob))
            for s in range(first, last + 1):
                txn.delete(S.u64(s), db=changes)
            j._seal(txn)
        moved += len(values)
    if moved:  # deleting from the front leaves its pages part empty: pack what stays
        with j._wlock, j.env.begin(write=True) as txn:
            rewrite_in_key_order(j.env, txn, changes)
        log.info("moved %d records into record blocks", moved)
    return moved


# --- pack files ---------------------------------------------------------------------
REPACK_DEAD_RATIO = 0.5  # a closed pack is rewritten once this share of it is dead
REPACK_TXN_BYTES = 64 << 20  # values moved per transaction at most


@dataclass
class RepackResult:
    packs_emptied: int = 0
    bytes_moved: int = 0
    bytes_reclaimed: int = 0  # size of the emptied packs minus what was moved
    packs_deleted: int = 0


def repack(j, dead_ratio: float = REPACK_DEAD_RATIO) -> RepackResult:
    """Move the live chunk values out of closed packs that are more than
    ``dead_ratio`` dead (0: any dead byte) into the current pack, then
    retire those packs: their files are deleted once no reader's snapshot
    can still point into them (``Journal.delete_retired_packs``).  Small
    transactions under the write lock, so a mount's writer interleaves."""
    j._check_writable()
    res = RepackResult()
    sizes = j._packs.on_disk()
    with j.reader() as r:
        live = pack_live(r.txn, j._dbs)
        v = r.txn.get(S.META_PACKS_RETIRED, db=j._dbs[S.DB_META])
        retired = {p for p, _ in (msgpack.unpackb(v) if v else [])}
    victims = set()
    for p, size in sizes.items():
        if p in retired:
            continue
        body = size - len(PACK_MAGIC)
        dead = body - live.get(p, 0)
        if dead > 0 and (dead > dead_ratio * body or live.get(p, 0) == 0):
            victims.add(p)
    if not victims:
        res.packs_deleted = len(j.delete_retired_packs())
        return res
    with j._wlock:
        if j._packs.current in victims:  # close it: appends go to a new pack from now on
            j._packs.roll()
    cdb, bdb = j._dbs[S.DB_CHUNKS], j._dbs[S.DB_RECORD_BLOCKS]
    with j.reader() as r:  # the entries to move (re-checked in each transaction)
        todo = [(cdb, bytes(k)) for k, v in r.txn.cursor(db=cdb) if S.decode_loc(v)[1] in victims]
        todo += [(bdb, bytes(k)) for k, v in r.txn.cursor(db=bdb) if S.decode_block_loc(v)[0] in victims]
    i = 0
    while i < len(todo):
        with j._wlock, j.env.begin(write=True) as txn:
            moved = 0
            while i < len(todo) and moved < REPACK_TXN_BYTES:
                db, key = todo[i]
                i += 1
                v = txn.get(key, db=db)
                if v is None:
                    continue
                if db is cdb:
                    refs, pack, off, length, depth = S.decode_loc(v)
                else:
                    pack, off, length, count = S.decode_block_loc(v)
                if pack not in victims:
                    continue
                np, noff = j._packs.append(j._packs.read(pack, off, length))
                if db is cdb:
                    txn.put(key, S.encode_loc(refs, np, noff, length, depth), db=cdb)
                else:
                    txn.put(key, S.encode_block_loc(np, noff, length, count), db=bdb)
                add_pack_live(txn, j._dbs, pack, -length)
                add_pack_live(txn, j._dbs, np, length)
                moved += length
            j._seal(txn)
        res.bytes_moved += moved
    with j._wlock, j.env.begin(write=True) as txn:
        for p in victims:  # every live value moved: nothing in them counts any more
            txn.delete(S.pack_live_key(p), db=j._dbs[S.DB_META])
        v = txn.get(S.META_PACKS_RETIRED, db=j._dbs[S.DB_META])
        lst = msgpack.unpackb(v) if v else []
        # readers whose snapshot is this transaction or newer see the new locations
        lst += [[p, txn.id()] for p in sorted(victims)]
        txn.put(S.META_PACKS_RETIRED, _packb(lst), db=j._dbs[S.DB_META])
        j._seal(txn)
    res.packs_emptied = len(victims)
    res.bytes_reclaimed = sum(sizes[p] for p in victims) - res.bytes_moved
    res.packs_deleted = len(j.delete_retired_packs())
    log.info("repacked %d pack(s): moved %d bytes, reclaimed %d", res.packs_emptied, res.bytes_moved,
             res.bytes_reclaimed)
    return res


def is_pruned(j, txn, seq: int) -> bool:
    db = j._dbs.get(DB_PRUNED)
    return db is not None and txn.get(S.u64(seq), db=db) is not None


# --- what maintenance decides on ---------------------------------------------------
@dataclass
class Versions:
    """Retained content versions by file id, oldest first: [(seq, hlc)]."""

    by_file: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    head_hlc: int = 0  # the journal's time: HLC of the newest record
    head_seq: int = 0


def content_versions(j, r) -> Versions:
    """Every content version not pruned yet, grouped by file id (one scan of ``changes``)."""
    out = Versions(head_hlc=r.meta(S.META_HLC, 0), head_seq=r.head_seq())
    pruned = pruned_seqs(j, r.txn)
    for seq, v in r.raw_records():
        if seq in pruned:
            continue
        rec = decode_record(v, seq)
        if rec.is_content:
            out.by_file.setdefault(rec.file_id, []).append((seq, rec.hlc))
    return out


def snapshot_seqs(r) -> dict[str, int]:
    """Named snapshots -> their seq (``snapshots`` values ``{"seq": N}``)."""
    out = {}
    for name, v in r.kv_items("snapshots"):
        if isinstance(v, dict) and isinstance(v.get("seq"), int):
            out[name] = v["seq"]
    return out


# --- applying a prune ------------------------------------------------------------------
@dataclass
class PruneResult:
    versions_pruned: int = 0
    checkpoints_written: int = 0
    chunks_freed: int = 0
    bytes_freed: int = 0
    transactions: int = 0


def _decref(txn, dbs, cid: bytes, zero: list[bytes]) -> None:
    db = dbs[S.DB_CHUNKS]
    v = txn.get(cid, db=db)
    if v is None:
        log.warning("chunk %s: named by a version being pruned but not stored", cid.hex())
        return
    n = S.loc_refs(v)
    if n == 0:
        log.warning("chunk %s: reference count already 0 while pruning", cid.hex())
    txn.put(cid, S.with_refs(v, max(0, n - 1)), db=db)
    if n <= 1:
        zero.append(cid)


def _uncount(j, txn, seq: int, cid: bytes, zero: list[bytes]) -> None:
    """Drop version ``seq``'s reference to ``cid``, unless a clone never
    counted it (``Journal._uncounted``: the mirror no longer had the chunk)."""
    if j._uncounted.get((seq, cid)):
        j._uncounted[(seq, cid)] -= 1
    else:
        _decref(txn, j._dbs, cid, zero)


def _chain_hits(r, seq: int, doomed: set[int], new_cps: set[int] = frozenset()) -> bool:
    """Does rebuilding ``seq``'s list read a version in ``doomed`` (itself
    excluded)?  ``new_cps``: checkpoints a dry run pretends to have written."""
    s = seq
    while True:
        if s != seq and s in doomed:
            return True
        if s in new_cps or r.txn.get(S.u64(s), db=r.dbs[S.DB_CHECKPOINTS]) is not None:
            return False
        rec = r.record(s)
        if not rec.base_seq:
            return False
        s = rec.base_seq


def _bump_meta(txn, dbs, key: bytes, n: int) -> None:
    if n:
        v = txn.get(key, db=dbs[S.DB_META])
        txn.put(key, _packb((msgpack.unpackb(v) if v else 0) + n), db=dbs[S.DB_META])


def prune(j, seqs: Iterable[int], retained: Iterable[int], dry_run: bool = False) -> PruneResult:
    """Prune content versions ``seqs``; ``retained`` = every content version
    that stays (their lists must stay rebuildable).

    1. each retained version whose chain passes through a pruned one gets a
       checkpoint (oldest first, so a new checkpoint shortens later chains),
       in transactions of CHECKPOINT_BATCH;
    2. per transaction of PRUNE_BATCH versions: mark pruned, decrement the
       refs of their edits and checkpoints, free chunks at 0 (and decrement
       a freed delta's base, cascading).  Atomic per transaction, so a crash
       leaves every count consistent.
    """
    j._check_writable()
    res = PruneResult()
    pruned_db(j)
    with j.reader() as r:
        already = pruned_seqs(j, r.txn)
    doomed = sorted(set(seqs) - already)
    if not doomed:
        return res
    doomed_set = set(doomed)
    first = doomed[0]
    keep = sorted(s for s in set(retained) if s > first and s not in doomed_set)
    if dry_run:
        return _estimate(j, doomed, keep, res)
    db = pruned_db(j, create=True)
    gdb = graveyard_db(j, create=True)
    purge_graveyard(j)
    dbs = j._dbs
    # 1. checkpoints
    i = 0
    while i < len(keep):
        with j._wlock, j.env.begin(write=True) as txn:
            r = Reader(j, txn)
            n = 0
            while i < len(keep) and n < CHECKPOINT_BATCH:
                s = keep[i]
                i += 1
                if _chain_hits(r, s, doomed_set):
                    full = r.chunk_list(s)
                    txn.put(S.u64(s), S.pack_list(full), db=dbs[S.DB_CHECKPOINTS])
                    for cid, _ in full:
                        incref(txn, dbs, cid)
                    n += 1
            res.checkpoints_written += n
        res.transactions += 1
    # 2. prune + free
    for b in range(0, len(doomed), PRUNE_BATCH):
        batch = doomed[b : b + PRUNE_BATCH]
        with j._wlock, j.env.begin(write=True) as txn:
            zero: list[bytes] = []
            n_pruned = 0
            for s in batch:
                if txn.get(S.u64(s), db=db) is not None:
                    continue
                rec = Reader(j, txn).record(s)
                if not rec.is_content:
                    raise ValueError(f"record {s} is a {rec.op}, not a content version")
                txn.put(S.u64(s), _packb({"hlc": rec.hlc, "t": time.time_ns()}), db=db)
                for _, _, refs in rec.edit or []:
                    for cid, _ in refs:
                        _uncount(j, txn, s, cid, zero)
                cp = txn.get(S.u64(s), db=dbs[S.DB_CHECKPOINTS])
                if cp is not None:
                    txn.delete(S.u64(s), db=dbs[S.DB_CHECKPOINTS])
                    for cid, _ in S.unpack_list(cp):
                        _uncount(j, txn, s, cid, zero)
                n_pruned += 1
            freed = freed_bytes = 0
            while zero:
                cid = zero.pop()
                loc = txn.get(cid, db=dbs[S.DB_CHUNKS])
                if loc is None or S.loc_refs(loc):
                    continue  # freed already, or counted again since
                _, pack, off, length, _ = S.decode_loc(loc)
                val = j._packs.read(pack, off, length)
                _, _, base, _ = S.decode_chunk(val)
                txn.delete(cid, db=dbs[S.DB_CHUNKS])
                add_pack_live(txn, dbs, pack, -length)
                txn.put(cid, S.u64(time.time_ns()) + val, db=gdb)
                freed += 1
                freed_bytes += len(val)
                if base is not None:
                    _decref(txn, dbs, base, zero)
            _bump_meta(txn, dbs, META_PRUNED_VERSIONS, n_pruned)
            _bump_meta(txn, dbs, META_FREED_CHUNKS, freed)
            _bump_meta(txn, dbs, META_FREED_BYTES, freed_bytes)
        res.transactions += 1
        res.versions_pruned += n_pruned
        res.chunks_freed += freed
        res.bytes_freed += freed_bytes
    with j._wlock:  # the writer thread uses the cache under this lock
        j._clear_list_cache()
    log.info("pruned %d versions, %d checkpoints, freed %d chunks (%d bytes)",
             res.versions_pruned, res.checkpoints_written, res.chunks_freed, res.bytes_freed)
    return res


def _estimate(j, doomed: list[int], keep: list[int], res: PruneResult) -> PruneResult:
    """The same counts as :func:`prune` without writing (refs simulated in memory)."""
    doomed_set = set(doomed)
    with j.reader() as r:
        refs: dict[bytes, int] = {}

        def get(cid):
            if cid not in refs:
                refs[cid] = r.chunk_refs(cid)
            return refs[cid]

        new_cps: set[int] = set()
        for s in keep:
            if _chain_hits(r, s, doomed_set, new_cps):
                new_cps.add(s)
                for cid, _ in r.chunk_list(s):
                    refs[cid] = get(cid) + 1
                res.checkpoints_written += 1
        zero = []

        def dec(cid):
            refs[cid] = get(cid) - 1
            if refs[cid] <= 0:
                zero.append(cid)

        for s in doomed:
            rec = r.record(s)
            for _, _, lst in rec.edit or []:
                for cid, _ in lst:
                    dec(cid)
            cp = r.txn.get(S.u64(s), db=r.dbs[S.DB_CHECKPOINTS])
            if cp is not None:
                for cid, _ in S.unpack_list(cp):
                    dec(cid)
            res.versions_pruned += 1
        seen = set()
        while zero:
            cid = zero.pop()
            if cid in seen or refs.get(cid, 0) > 0:
                continue
            seen.add(cid)
            info = r.chunk_info(cid)
            if info is None:
                continue
            res.chunks_freed += 1
            res.bytes_freed += info.stored_len
            if info.base_id is not None:
                dec(info.base_id)
    return res


# --- verify ----------------------------------------------------------------------------
@dataclass
class Problem:
    what: str  # one line
    seq: int | None = None
    path: bytes | None = None
    chunk: str | None = None  # hex id

    def to_dict(self) -> dict:
        return {"seq": self.seq, "path": None if self.path is None else self.path.decode("utf-8", "surrogateescape"),
                "chunk": self.chunk, "what": self.what}


@dataclass
class VerifyResult:
    records: int = 0
    versions_checked: int = 0
    versions_pruned: int = 0
    chunks_checked: int = 0
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "records": self.records, "versions_checked": self.versions_checked,
                "versions_pruned": self.versions_pruned, "chunks_checked": self.chunks_checked,
                "problem": self.problem.to_dict() if self.problem else None}


def verify(j, full: bool = False) -> VerifyResult:
    """Walk the hash chain (and with ``full`` every retained version's list
    and chunks); stop at the first problem and name it (seq, path, what)."""
    res = VerifyResult()
    pruned_db(j)
    with j.reader() as r:
        pruned = pruned_seqs(j, r.txn)
        res.versions_pruned = len(pruned)
        prev, expected, last_hlc = ZERO_HASH, 1, -1
        content: list[tuple[int, bytes]] = []
        try:  # streamed: a journal may hold millions of records
            for seq, v in r.raw_records(check=False):
                if seq != expected:
                    res.problem = Problem(f"record {expected} is missing (next key is {seq})", expected)
                    return res
                rec, problem = check_link(v, seq, prev)
                if problem:
                    res.problem = Problem(f"record {seq} {problem}", seq, rec.path if rec else None)
                    return res
                if rec.hlc <= last_hlc:
                    res.problem = Problem(f"record {seq} goes back in time (HLC {rec.hlc} <= {last_hlc})", seq, rec.path)
                    return res
                if full and rec.is_content and seq not in pruned:
                    content.append((seq, rec.path))
                prev, last_hlc, expected = rec.hash, rec.hlc, seq + 1
                res.records += 1
        except CorruptionError as e:  # a record block that cannot be read
            res.problem = Problem(str(e))
            return res
        if not full:
            return res
        good: set[bytes] = set()
        for seq, path in content:
            try:
                lst = r.chunk_list(seq)  # checked against the version's size and content hash
            except CorruptionError as e:
                res.problem = Problem(f"version {seq}: {e.detail}", seq, path)
                return res
            except Exception as e:  # noqa: BLE001 - a decode error
                res.problem = Problem(f"version {seq}: its chunk list cannot be rebuilt: {e}", seq, path)
                return res
            for cid, n in lst:
                if cid in good:
                    continue
                why = _check_chunk(r, cid, n, good)
                if why:
                    res.problem = Problem(f"version {seq}: {why}", seq, path, cid.hex())
                    return res
            res.versions_checked += 1
        res.chunks_checked = len(good)
    return res


def _check_chunk(r, cid: bytes, length: int, good: set[bytes], depth: int = 0) -> str | None:
    """-> why chunk ``cid`` is bad, or None (and it and its bases join ``good``)."""
    try:
        v = r.raw_chunk(cid)
    except Exception as e:  # noqa: BLE001 - CorruptionError: pack missing or short
        return f"chunk {cid.hex()} cannot be read: {e}"
    if v is None:
        return f"chunk {cid.hex()} is missing"
    if depth > MAX_DELTA_DEPTH:
        return f"chunk {cid.hex()}: delta chain loops"
    try:
        _, raw_len, base, payload = S.decode_chunk(v)
    except Exception as e:  # noqa: BLE001
        return f"chunk {cid.hex()} has a bad header: {e}"
    base_raw = None
    if base is not None:
        if base not in good:
            why = _check_chunk(r, base, -1, good, depth + 1)
            if why:
                return f"base of chunk {cid.hex()}: {why}"
        if r.chunk_refs(base) == 0:
            return f"chunk {cid.hex()}: its base {base.hex()} has no reference count"
        base_raw = r.read_chunk(base)
    try:
        raw = decompress_chunk(payload, base_raw)
    except Exception as e:  # noqa: BLE001
        return f"chunk {cid.hex()} does not decompress: {e}"
    if len(raw) != raw_len:
        return f"chunk {cid.hex()} decompresses to {len(raw)} bytes but its header says {raw_len}"
    if length >= 0 and raw_len != length:
        return f"chunk {cid.hex()} holds {raw_len} bytes but the chunk list names it with {length}"
    if chunk_id(raw) != cid:
        return f"chunk {cid.hex()} is corrupt: its content does not match its id"
    good.add(cid)
    return None


# --- vacuum ----------------------------------------------------------------------------
def data_file_sizes(path: str) -> tuple[int, int]:
    """(apparent size, allocated bytes) of PATH/data.mdb."""
    st = os.stat(os.path.join(path, "data.mdb"))
    return st.st_size, st.st_blocks * 512


def vacuum(j) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rewrite data.mdb compactly (``env.copy(compact=True)``) and swap it in
    atomically.  ``j`` must be the only opener (a writer: it holds the lock),
    and is closed afterwards.  -> (sizes before, sizes after)."""
    j._check_writable()
    from .core import _ENVS, _release_lock

    if j._thread is not None or _ENVS.get(j.path, [None, None, None, 1])[3] != 1:
        raise RuntimeError("vacuum needs the only opener of the journal")
    purge_graveyard(j, 0)  # offline: no capture can name a freed chunk any more
    repack(j, 0.0)
    before = data_file_sizes(j.path)
    tmp = os.path.join(j.path, "vacuum.tmp")
    os.makedirs(tmp, mode=0o700, exist_ok=True)
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.unlink(os.path.join(tmp, name))
        except FileNotFoundError:
            pass
    lock_fd, j._lock_fd = j._lock_fd, None  # keep the writer lock across the swap
    try:
        j.env.copy(tmp, compact=True)
        fd = os.open(os.path.join(tmp, "data.mdb"), os.O_RDONLY)
        try:
            os.fchmod(fd, 0o600)  # LMDB's copy is created 0666 less the umask: the journal's is 0600
            os.fsync(fd)
        finally:
            os.close(fd)
        j.close()
        os.replace(os.path.join(tmp, "data.mdb"), os.path.join(j.path, "data.mdb"))
        dfd = os.open(j.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        _release_lock(lock_fd)
        try:
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
        except OSError:
            pass
    after = data_file_sizes(j.path)
    log.info("vacuumed %s: %d -> %d bytes", j.path, before[0], after[0])
    return before, after


def iter_retained_content(j, r) -> Iterator[int]:
    """Seqs of every content version not pruned (tests, verify helpers)."""
    pruned = pruned_seqs(j, r.txn)
    for seq, v in r.raw_records():
        if seq not in pruned and decode_record(v, seq).is_content:
            yield seq
