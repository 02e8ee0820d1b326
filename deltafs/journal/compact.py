"""Compaction: pruned versions, checkpoints, GC and its graveyard, repacking,
record blocks, the index rewrite and vacuum.  docs/format.md, "Compaction
and retention", is the contract.

Records are immutable and hash-chained, so a version is never deleted from
``changes``: it is *pruned*.  Its seq goes into the ``pruned`` database,
its edit entries (and its checkpoint, if any) stop counting in ``refs``,
and chunks whose count reaches 0 are freed (cascading to the base of a
delta chunk).  Decisions (which versions to prune) are made by
``deltafs.maintenance``; the :class:`Compactor` only carries them out, in
small transactions under the journal's write lock.

One :class:`Compactor` per writing :class:`~deltafs.journal.Journal`,
which owns it and offers its work as public methods (``Journal.prune``,
``repack``, ``archive_records``, ``densify_index``, ``vacuum``,
``data_bytes``).  It is the only code that writes ``pruned`` and
``graveyard`` and the only one that decrements ``refs``, so the rules that
lose data when broken live here, in this order:

1. *must*: a retained version's chunk list stays rebuildable: every
   retained version whose chain reads a version about to be pruned gets a
   checkpoint, committed before any prune touches that version
   (:meth:`Compactor.prune`, step 1; docs/format.md "Pruning procedure").
2. *must*: a chunk is freed only at count 0, in the transaction that
   decremented it, and a freed delta releases its base (step 2).  Chunks
   stored by ``put_chunks`` and never named (count 0 from the start) are
   left alone: a capture may be about to name them.  Chunks a capture
   spilled whose index entries are still held (``Journal.spill_chunks``)
   are indexed, their bases counted, by ``Storage.write`` before any
   transaction here does anything.
3. *must*: a freed chunk a late commit still names comes back
   (:meth:`Compactor.chunk_present`, called by the writer inside the
   commit; "graveyard" database); graveyard entries are deleted only after
   GRAVEYARD_GRACE_NS, or all of them by an offline vacuum.
4. *must*: the writer refuses a new content version whose base is pruned
   (``Journal._content`` asks ``Reader.is_pruned``).
5. *must*: a pack file is deleted only once no reader's snapshot can still
   point into it (:meth:`Compactor.repack` retires it,
   ``Storage.delete_retired_packs`` deletes it).
6. *must*: versions after the lowest mirror cursor are never pruned
   (``maintenance.plan`` decides; the clone prunes only what its mirror
   pruned).
7. *should*: a pass is idempotent and resumable (already-pruned seqs are
   skipped; a crash leaves extra checkpoints at worst).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import msgpack

from deltafs.chunking import MAX_DELTA_DEPTH, Base, RawCache, build_chunk
from deltafs.errors import CorruptionError

from . import planstate, seqindex
from . import schema as S
from .packs import PACK_MAGIC, add_pack_live, decref, incref, pack_live
from .reader import Reader
from .records import decode_record
from .storage import Storage, open_env, release_lock

log = logging.getLogger(__name__)

GRAVEYARD_GRACE_NS = 600 * 1_000_000_000  # freed chunks a late commit may still name
META_PRUNED_VERSIONS = S.META_PRUNED_VERSIONS  # counters, see docs/format.md
META_FREED_CHUNKS = b"freed_chunks"
META_FREED_BYTES = b"freed_bytes"
CHECKPOINT_BATCH = 64  # checkpoints written per transaction
PRUNE_BATCH = 128  # versions pruned per transaction

INDEX_SLACK = 1.2  # rewrite the index once it spans this many times the leaf pages it needs
INDEX_SAMPLE = 256  # entries whose size estimates the index's
INDEX_REWRITE_MAX = 1_000_000  # entries: above this the rewrite would hold the writer for seconds
INDEX_REGROW = 0.25  # look at an index again once this share of its entries went in since
GRAVEYARD_SCAN = 4096  # graveyard entries a pass looks at, at least (and twice the chunks it freed)

# records per block: a pass archives whole multiples of RECORD_BLOCK (32 leave
# fewer records as LMDB values than 64) in blocks of up to RECORD_BLOCK_MAX:
# a bigger block finds a path again in its window (history_size's gitreplay,
# 3,968 records in T blocks: 32 a block 159 KB, 256 111 KB, 512 101 KB, 1024
# 93 KB, 4096 87 KB), but a reader decodes and checks a whole block for one
# record (a cold read of one gitreplay record: ~7.5 ms with 1024, 0.5 ms with
# 32), and a history of one file reads every block it has a version in
RECORD_BLOCK = 32
RECORD_BLOCK_MAX = 512
# the head record always stays an LMDB value (the writer chains onto it); older
# ones go in whole blocks: a reader decodes a block once and keeps a few decoded
RECORDS_KEPT = 1

MAX_REBASE_WALK = 128  # links of a delta chain step 3 walks down at most (a chain is at most 128 deep)
REPACK_DEAD_RATIO = 0.5  # a closed pack is rewritten once this share of it is dead
REPACK_TXN_BYTES = 64 << 20  # values moved per transaction at most


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


@dataclass
class PruneResult:
    versions_pruned: int = 0
    checkpoints_written: int = 0
    chunks_freed: int = 0
    bytes_freed: int = 0
    transactions: int = 0
    chunks_rebased: int = 0  # survivors' chunks re-coded so a pruned base could go (step 3)


@dataclass
class RepackResult:
    packs_emptied: int = 0
    bytes_moved: int = 0
    bytes_reclaimed: int = 0  # size of the emptied packs minus what was moved
    packs_deleted: int = 0


class Compactor:
    """The compaction of one writing journal (see the module docstring).

    ``uncounted``: (seq, chunk id) of entries of pruned records that
    ``Journal.append_raw`` appended without counting (the mirror no longer
    had the chunk); :meth:`prune` must not uncount them either.  The
    writer fills it, the compactor empties it (in memory: a clone prunes
    before it closes the journal).
    """

    def __init__(self, storage: Storage, uncounted: Counter[tuple[int, bytes]]) -> None:
        self._st = storage
        self._dbs = storage.dbs
        self._uncounted = uncounted
        self._densify_marks: dict[bytes, tuple[int, int]] = {}  # db -> (entries, freed) when looked at
        self._graveyard_next = b""  # where the next bounded graveyard purge goes on
        self._graveyard_owed = 0  # chunks freed since the last purge

    @contextmanager
    def _snapshot(self) -> Iterator[Reader]:
        with self._st.read() as txn:
            yield Reader(self._st, txn)

    def planning(self) -> planstate.PlanStore:
        """Compaction's planning state (journal/planstate.py)."""
        return planstate.PlanStore(self._st)

    # --- pruning ---------------------------------------------------------------------
    def prune(self, seqs: Iterable[int], retained: Iterable[int], dry_run: bool = False) -> PruneResult:
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
        res = PruneResult()
        with self._snapshot() as r:  # per seq: the pruned set grows with history
            doomed = sorted(s for s in set(seqs) if not r.is_pruned(s))
        if not doomed:
            return res
        doomed_set = set(doomed)
        first = doomed[0]
        keep = sorted(s for s in set(retained) if s > first and s not in doomed_set)
        if dry_run:
            return self._estimate(doomed, keep, res)
        self.purge_graveyard(limit=max(GRAVEYARD_SCAN, 2 * self._graveyard_owed))
        self._graveyard_owed = 0
        self._checkpoint_chains(keep, doomed_set, res)  # 1.
        files: dict[int, int] = {}  # file id -> its oldest version pruned now
        for b in range(0, len(doomed), PRUNE_BATCH):  # 2.
            with self._st.write() as txn:
                self._prune_batch(txn, doomed[b : b + PRUNE_BATCH], res, files)
            res.transactions += 1
        self._rebase_survivors(files, res)  # 3.
        self._graveyard_owed += res.chunks_freed
        log.info("pruned %d versions, %d checkpoints, freed %d chunks (%d bytes), re-coded %d",
                 res.versions_pruned, res.checkpoints_written, res.chunks_freed, res.bytes_freed,
                 res.chunks_rebased)
        return res

    def _checkpoint_chains(self, keep: list[int], doomed: set[int], res: PruneResult) -> None:
        """Step 1: a checkpoint for each version of ``keep`` whose chain reads one of ``doomed``."""
        i = 0
        while i < len(keep):
            with self._st.write() as txn:
                r = Reader(self._st, txn)
                n = 0
                while i < len(keep) and n < CHECKPOINT_BATCH:
                    s = keep[i]
                    i += 1
                    if _chain_hits(r, s, doomed):
                        full = r.chunk_list(s)
                        txn.put(S.checkpoint_key(s), S.pack_list(full), db=self._dbs[S.DB_CHECKPOINTS])
                        for cid, _ in full:
                            incref(txn, self._dbs, cid)
                        n += 1
                res.checkpoints_written += n
            res.transactions += 1

    def _prune_batch(self, txn, batch: list[int], res: PruneResult, files: dict[int, int]) -> None:
        """Step 2 for the versions of ``batch``, in the transaction ``txn``;
        ``files`` gets each pruned version's file id (-> its oldest pruned seq)."""
        dbs, db = self._dbs, self._dbs[S.DB_PRUNED]
        zero: list[bytes] = []
        n_pruned = 0
        for s in batch:
            if txn.get(S.u64(s), db=db) is not None:
                continue
            rec = Reader(self._st, txn).record(s)
            if not rec.is_content:
                raise ValueError(f"record {s} is a {rec.op}, not a content version")
            txn.put(S.u64(s), _packb({"hlc": rec.hlc, "t": time.time_ns()}), db=db)
            files.setdefault(rec.file_id, s)
            for _, _, refs in rec.edit or []:
                for cid, _ in refs:
                    self._uncount(txn, s, cid, zero)
            cp = txn.get(S.checkpoint_key(s), db=dbs[S.DB_CHECKPOINTS])
            if cp is not None:
                txn.delete(S.checkpoint_key(s), db=dbs[S.DB_CHECKPOINTS])
                for cid, _ in S.unpack_list(cp):
                    self._uncount(txn, s, cid, zero)
            planstate.forget(txn, dbs, rec)
            n_pruned += 1
        _bump_meta(txn, dbs, META_PRUNED_VERSIONS, n_pruned)
        planstate.bump_pruned(txn, dbs, n_pruned)
        res.versions_pruned += n_pruned
        self._free(txn, zero, res)

    def _free(self, txn, zero: list[bytes], res: PruneResult) -> None:
        """Free the chunks of ``zero`` still at count 0 (into the graveyard), and
        release a freed delta's bases, cascading."""
        dbs, gdb = self._dbs, self._dbs[S.DB_GRAVEYARD]
        freed = freed_bytes = 0
        while zero:
            cid = zero.pop()
            loc = txn.get(cid, db=dbs[S.DB_CHUNKS])
            if loc is None or S.loc_refs(loc):
                continue  # freed already, or counted again since
            _, pack, off, length, _ = S.decode_loc(loc)
            val = self._st.packs.read(pack, off, length)
            _, _, bases, _ = S.decode_chunk(val)
            txn.delete(cid, db=dbs[S.DB_CHUNKS])
            add_pack_live(txn, dbs, pack, -length)
            txn.put(cid, S.u64(time.time_ns()) + val, db=gdb)
            freed += 1
            freed_bytes += len(val)
            for base in bases:
                decref(txn, dbs, base, zero, "a freed value, as its base,")
        _bump_meta(txn, dbs, META_FREED_CHUNKS, freed)
        _bump_meta(txn, dbs, META_FREED_BYTES, freed_bytes)
        res.chunks_freed += freed
        res.bytes_freed += freed_bytes

    def _rebase_survivors(self, files: dict[int, int], res: PruneResult) -> None:
        """Step 3: a pruned version's chunk that a kept chunk is a delta of
        stays alive as that delta's base: in a file saved again and again
        every version's chunk is the base of the next one, so pruning the
        versions in between would free nothing.  For each file pruned now, the
        chunks of its retained versions after the oldest pruned one are
        looked at; a delta whose one base is named by nothing else (count 1:
        this delta) is re-coded against the nearest ancestor on that chain
        that something else still names (standalone when none is), in one
        transaction with the count changes, so the bases in between are
        freed (into the graveyard, as in step 2) by the usual cascade.  The
        chunk keeps its id; readers of older snapshots still find its old
        value where it was (rule 5)."""
        if not files:
            return
        with self._snapshot() as r:
            todo = survivors_after(r, files)
        cache = RawCache(8 << 20)
        seen: set[bytes] = set()
        i = 0
        while i < len(todo):
            with self._st.write() as txn:
                rd = Reader(self._st, txn)
                zero: list[bytes] = []
                n = 0
                while i < len(todo) and n < CHECKPOINT_BATCH:
                    for cid, _ in rd.chunk_list(todo[i]):
                        if cid not in seen:
                            seen.add(cid)
                            n += self._rebase(txn, rd, cid, cache, zero)
                    i += 1
                self._free(txn, zero, res)
                res.chunks_rebased += n
            res.transactions += 1

    def _rebase(self, txn, rd: Reader, cid: bytes, cache: RawCache, zero: list[bytes]) -> int:
        """Re-code ``cid`` past the bases only it keeps alive (see
        :meth:`_rebase_survivors`); -> 1 if it was, else 0."""
        cdb = self._dbs[S.DB_CHUNKS]
        loc = txn.get(cid, db=cdb)
        if loc is None:
            return 0
        refs, pack, off, length, depth = S.decode_loc(loc)
        plan = _rebase_plan(rd, cid, depth, rd.chunk_refs)
        if plan is None:
            return 0
        dead, target = plan
        base = None
        if target is not None:
            base = Base(target, rd.read_chunk(target, cache), S.decode_loc(txn.get(target, db=cdb))[4])
        nc = build_chunk(rd.read_chunk(cid, cache), base, cid=cid)  # read_chunk checks what it decoded
        # The depth declared never falls (docs/format.md, pruning step 3): a
        # mirror or a sync member keeps the old value, on its longer chain, and
        # values built on this chunk from now on count their depth from this
        # one; declaring the shorter chain's depth let a clone's chains pass 128.
        # A standalone value's header says 0 (no base); its index entry keeps
        # the old depth, which is what a new delta on it counts from.
        declared = max(depth, nc.depth if nc.bases else 0)
        val = S.encode_chunk(declared if nc.bases else 0, nc.raw_len, nc.bases, nc.payload)
        np_, noff = self._st.packs.append(val)
        txn.put(cid, S.encode_loc(refs, np_, noff, len(val), declared), db=cdb)
        add_pack_live(txn, self._dbs, pack, -length)
        add_pack_live(txn, self._dbs, np_, len(val))
        for b in nc.bases:
            incref(txn, self._dbs, b)
        decref(txn, self._dbs, dead, zero, "a re-coded value, as its old base,")
        return 1

    def _uncount(self, txn, seq: int, cid: bytes, zero: list[bytes]) -> None:
        """Drop version ``seq``'s reference to ``cid``, unless a clone never
        counted it (the mirror no longer had the chunk)."""
        if self._uncounted.get((seq, cid)):
            self._uncounted[(seq, cid)] -= 1
        else:
            decref(txn, self._dbs, cid, zero, "a version being pruned")

    def _estimate(self, doomed: list[int], keep: list[int], res: PruneResult) -> PruneResult:
        """The same counts as :meth:`prune` without writing (refs simulated in memory)."""
        doomed_set = set(doomed)
        with self._snapshot() as r:
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

            files: dict[int, int] = {}
            for s in doomed:
                rec = r.record(s)
                files.setdefault(rec.file_id, s)
                for _, _, lst in rec.edit or []:
                    for cid, _ in lst:
                        dec(cid)
                cp = r.txn.get(S.checkpoint_key(s), db=r.dbs[S.DB_CHECKPOINTS])
                if cp is not None:
                    for cid, _ in S.unpack_list(cp):
                        dec(cid)
                res.versions_pruned += 1
            seen: set[bytes] = set()

            def cascade():
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
                    for base in info.bases:
                        dec(base)

            cascade()
            looked: set[bytes] = set()
            for s in survivors_after(r, files, doomed_set):  # step 3, as :meth:`_rebase_survivors`
                for cid, _ in r.chunk_list(s):
                    if cid in looked or cid in seen:
                        continue
                    looked.add(cid)
                    plan = _rebase_plan(r, cid, S.decode_loc(r.txn.get(cid, db=r.dbs[S.DB_CHUNKS]))[4], get)
                    if plan is not None:
                        dead, target = plan
                        if target is not None:
                            refs[target] = get(target) + 1
                        dec(dead)
                        res.chunks_rebased += 1
                        cascade()
        return res

    # --- re-coding (recode.py) ---------------------------------------------------------
    def recode(self, raw_max: int | None = None, apart: bool = True):
        """Re-code the chunks first named since the last pass where a better
        base set stores them smaller (journal/recode.py), in rounds of
        ROUND_RAW_MAX raw bytes (``raw_max``) until caught up or PASS_RAW_MAX
        looked at; ``apart``: each round plans in a child process
        (recode.plan_child); -> RecodeResult (summed over the rounds)."""
        from .recode import PASS_RAW_MAX, ROUND_RAW_MAX, Recoder
        freed = PruneResult()
        total = None
        while True:
            out = Recoder(self._st, lambda txn, zero: self._free(txn, zero, freed), apart).run(
                ROUND_RAW_MAX if raw_max is None else raw_max)
            if total is None:
                total = out
            else:
                for f in ("chunks_looked", "chunks_recoded", "bytes_before", "bytes_after", "headers_rewritten",
                          "skipped", "transactions", "seconds", "plan_s", "raw_looked", "rounds"):
                    setattr(total, f, getattr(total, f) + getattr(out, f))
                total.upto, total.txn_max_s = out.upto, max(total.txn_max_s, out.txn_max_s)
            with self._snapshot() as r:
                head = r.head_seq()
            if out.upto >= head or not out.raw_looked or total.raw_looked >= PASS_RAW_MAX:
                break
        total.chunks_freed, total.bytes_freed = freed.chunks_freed, freed.bytes_freed
        total.seconds = round(total.seconds, 3)
        self._graveyard_owed += freed.chunks_freed
        return total

    # --- the graveyard -------------------------------------------------------------------
    def chunk_present(self, txn, cid: bytes) -> bool:
        """Is the chunk stored?  (The writer asks, inside its transaction.)

        A capture decides "this chunk is already stored" in one transaction
        and commits the version naming it in a later one; GC may free the
        chunk in between.  Freed chunks therefore wait in the graveyard
        (key: chunk id, value: u64 time freed || the chunk value), and one
        that is named again is brought back here (its base too, counted)."""
        if txn.get(cid, db=self._dbs[S.DB_CHUNKS]) is not None:
            return True
        gdb = self._dbs[S.DB_GRAVEYARD]
        v = txn.get(cid, db=gdb)
        if v is None:
            return False
        val = bytes(v[8:])
        depth, raw_len, bases, payload = S.decode_chunk(val)
        for base in bases:
            if not self.chunk_present(txn, base):
                return False
        if bases:  # a base may have been re-coded deeper since (recode.py): declare the real depth
            real = sum(S.decode_loc(txn.get(b, db=self._dbs[S.DB_CHUNKS]))[4] + 1 for b in bases)
            if real > MAX_DELTA_DEPTH:
                log.warning("chunk %s freed by compaction is named again but its bases are now too deep",
                            cid.hex())
                return False
            if real > depth:
                depth, val = real, S.encode_chunk(real, raw_len, bases, bytes(payload))
        for base in bases:
            incref(txn, self._dbs, base)
        self._st.put_value(txn, cid, val, depth)
        txn.delete(cid, db=gdb)
        log.info("chunk %s freed by compaction is named again: brought back", cid.hex())
        return True

    def purge_graveyard(self, grace_ns: int | None = None, limit: int | None = None) -> int:
        """Delete graveyard entries freed more than grace_ns ago.  -> entries deleted.

        ``limit``: look at this many entries at most, going on where the last
        call stopped (wrapping around), so a pass's share of the purge is
        bounded; None: the whole graveyard."""
        grace = GRAVEYARD_GRACE_NS if grace_ns is None else grace_ns
        db = self._dbs[S.DB_GRAVEYARD]
        cutoff = time.time_ns() - grace
        gone = looked = 0
        with self._st.write() as txn:
            cur = txn.cursor(db=db)
            start = self._graveyard_next if limit is not None else b""
            ok = cur.set_range(start) if start else cur.first()
            wrapped = not start
            while limit is None or looked < limit:
                if not ok:
                    if wrapped:
                        break
                    wrapped = True
                    ok = cur.first()
                    continue
                k = cur.key()
                if wrapped and start and k >= start:
                    break  # all the way round
                looked += 1
                if S.from_u64(cur.value()[:8]) <= cutoff:
                    ok = cur.delete()  # moves to the next entry
                    gone += 1
                    if ok and not cur.key():
                        ok = False
                else:
                    ok = cur.next()
            self._graveyard_next = bytes(cur.key()) if ok else b""
        return gone

    # --- sizes -----------------------------------------------------------------------
    def data_bytes(self) -> int:
        """Bytes of journal data: the pack files plus the pages in use by every
        database (the graveyard excluded: it empties by itself), i.e. data.mdb
        minus its free pages.  data.mdb itself never shrinks without
        :meth:`vacuum`; a pack's dead bytes go when :meth:`repack` moves
        its live values out."""
        return self._st.page_bytes(skip=frozenset({S.DB_GRAVEYARD})) + self._st.packs.total_bytes()

    # --- the chunk index ------------------------------------------------------------------
    def densify_index(self, slack: float = INDEX_SLACK) -> int:
        """Rewrite the chunk index, ``history``, ``pathlog``, ``files`` and
        ``paths`` (random file ids; paths created in any order) and the
        planning state (``plan``: its ``v`` and ``c`` keys grow at two places
        inside the tree, which leaves its pages about half full) in key order
        where their pages are mostly empty; -> pages saved.

        Amortized: a database is looked at (and rewritten if it needs it) only
        once INDEX_REGROW times its entries went in since it was last looked
        at, so a pass costs about what the passes since added, not what the
        history holds (random inserts leave a rewritten tree 60-70 % full again
        only after about as many inserts as it has entries).  The first pass
        of a process looks at each once."""
        return self._densify([S.DB_CHUNKS, S.DB_HISTORY, S.DB_FILES, S.DB_PLAN],  # with pathlog, paths
                             slack)

    def _due_for_densify(self, txn, name: bytes) -> bool:
        st = txn.stat(self._dbs[name])
        n = st["entries"]
        freed = _meta_int(txn, self._dbs, META_FREED_CHUNKS) if name == S.DB_CHUNKS else 0
        mark = self._densify_marks.get(name)
        if mark is not None and (n - mark[0]) + (freed - mark[1]) < INDEX_REGROW * max(mark[0], 1):
            return False
        self._densify_marks[name] = (n, freed)
        return True

    def _densify(self, names: list[bytes], slack: float) -> int:
        """The databases of ``names`` that are due (:meth:`_due_for_densify`)
        checked and rewritten by :func:`densify_db` in a child process
        (``Storage.run_apart``: what LMDB keeps of a transaction that dirtied
        a whole database goes with it, :func:`densify_child`)."""
        with self._st.read() as txn:
            due = [n for n in names if self._due_for_densify(txn, n)
                   and sparse_pages(txn, self._dbs[n], n, slack)]
        if not due:
            return 0
        out = self._st.run_apart("deltafs.journal.compact:densify_child", [repr(float(slack)),
                                                                          *(n.decode() for n in due)])
        saved = json.loads(out)
        for name, n in saved.items():
            if n:
                log.info("rewrote %s in key order: %d pages fewer", name, n)
        return sum(saved.values())

    # --- record blocks ------------------------------------------------------------------
    def archive_records(self, keep: int = RECORDS_KEPT) -> int:
        """Move records older than the newest ``keep``, a whole multiple of
        RECORD_BLOCK, into zstd-compressed blocks of up to RECORD_BLOCK_MAX
        records in the pack files; -> records moved.

        A record costs ~210 bytes as an LMDB value on a full page; a block of
        32 compresses them to 0.65-0.71 of their bytes (their hashes and chunk
        ids do not compress).  Records are immutable, so a block never
        changes; each block is one write transaction (pack synced first), so
        a reader finds every record either in ``changes`` or in a block.
        """
        moved = 0
        changes, blocks = self._dbs[S.DB_CHANGES], self._dbs[S.DB_RECORD_BLOCKS]
        while True:
            # the block is made from a read snapshot, outside the write lock (a T block
            # rebuilds lists): records never change, and only this pass moves them
            with self._st.read() as txn:
                rd = Reader(self._st, txn)
                first = rd.archived_upto() + 1
                n = min(RECORD_BLOCK_MAX, (rd.head_seq() - keep - first + 1) // RECORD_BLOCK * RECORD_BLOCK)
                if n < RECORD_BLOCK:
                    break
                last = first + n - 1
                values = [txn.get(S.u64(s), db=changes) for s in range(first, last + 1)]
                if any(v is None for v in values):
                    raise CorruptionError(f"records {first}..{last} are not all in the changes database")
                values = [bytes(v) for v in values]
                bodies: dict[int, list[bytes]] = {}  # blocks read for the lists, shared by the records
                blob = S.encode_record_block(values, first, lambda s: rd.unchecked_list(s, bodies))
                about = [(r.file_id, r.path, r.path2)  # their history and pathlog keys (format 13)
                         for r in (decode_record(v, s, lists=False) for s, v in zip(range(first, last + 1), values))]
            with self._st.write() as txn:
                if Reader(self._st, txn).archived_upto() + 1 != first or any(
                        txn.get(S.u64(s), db=changes) != v for s, v in zip(range(first, last + 1), values)):
                    raise CorruptionError(f"records {first}..{last} changed while compaction archived them")
                pack, off = self._st.packs.append(blob)
                if not txn.put(S.block_key(first), S.encode_block_loc(pack, off, len(blob), len(values)),
                               db=blocks, overwrite=False):  # keys before record 1: not an append
                    raise CorruptionError(f"a record block already starts at record {first}")
                add_pack_live(txn, self._dbs, pack, len(blob))
                for s in range(first, last + 1):
                    txn.delete(S.u64(s), db=changes)
                seqindex.pack_records(txn, self._dbs[S.DB_HISTORY], last, about)  # their seqs into segments
            moved += len(values)
        if moved:  # deleting from the front leaves its pages part empty: pack what stays
            with self._st.write() as txn:
                self._st.rewrite_in_key_order(txn, changes)
            log.info("moved %d records into record blocks", moved)
        return moved

    # --- pack files ---------------------------------------------------------------------
    def repack(self, dead_ratio: float = REPACK_DEAD_RATIO) -> RepackResult:
        """Move the live chunk values out of closed packs that are more than
        ``dead_ratio`` dead (0: any dead byte) into the current pack, then
        retire those packs: their files are deleted once no reader's snapshot
        can still point into them (``Storage.delete_retired_packs``).  Small
        transactions under the write lock, so a mount's writer interleaves."""
        res = RepackResult()
        st = self._st
        if st.held:  # values a capture spilled, not indexed yet, would look dead
            with st.write():  # (Storage.write indexes them first)
                pass
        sizes = st.packs.on_disk()
        victims = self._repack_victims(sizes, dead_ratio)
        if not victims:
            res.packs_deleted = len(st.delete_retired_packs())
            return res
        with st.write():  # values spilled since are indexed first, so none is left out of the moves below
            if st.packs.current in victims:  # close it: appends go to a new pack from now on
                st.packs.roll()
        cdb, bdb = self._dbs[S.DB_CHUNKS], self._dbs[S.DB_RECORD_BLOCKS]
        with self._snapshot() as r:  # the entries to move (re-checked in each transaction)
            todo = [(cdb, bytes(k)) for k, v in r.txn.cursor(db=cdb) if S.decode_loc(v)[1] in victims]
            todo += [(bdb, S.block_key(first)) for first, v in r.record_blocks()
                     if S.decode_block_loc(v)[0] in victims]
        i = 0
        while i < len(todo):
            with st.write() as txn:
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
                    np, noff = st.packs.append(st.packs.read(pack, off, length))
                    if db is cdb:
                        txn.put(key, S.encode_loc(refs, np, noff, length, depth), db=cdb)
                    else:
                        txn.put(key, S.encode_block_loc(np, noff, length, count), db=bdb)
                    add_pack_live(txn, self._dbs, pack, -length)
                    add_pack_live(txn, self._dbs, np, length)
                    moved += length
            res.bytes_moved += moved
        with st.write() as txn:
            mdb = self._dbs[S.DB_META]
            for p in victims:  # every live value moved: nothing in them counts any more
                txn.delete(S.pack_live_key(p), db=mdb)
            v = txn.get(S.META_PACKS_RETIRED, db=mdb)
            lst = msgpack.unpackb(v) if v else []
            # readers whose snapshot is this transaction or newer see the new locations
            lst += [[p, txn.id()] for p in sorted(victims)]
            txn.put(S.META_PACKS_RETIRED, _packb(lst), db=mdb)
        res.packs_emptied = len(victims)
        res.bytes_reclaimed = sum(sizes[p] for p in victims) - res.bytes_moved
        res.packs_deleted = len(st.delete_retired_packs())
        log.info("repacked %d pack(s): moved %d bytes, reclaimed %d", res.packs_emptied, res.bytes_moved,
                 res.bytes_reclaimed)
        return res

    def _repack_victims(self, sizes: dict[int, int], dead_ratio: float) -> set[int]:
        """Packs (not retired yet) more than ``dead_ratio`` dead, or holding nothing live."""
        with self._snapshot() as r:
            live = pack_live(r.txn, self._dbs)
            v = r.txn.get(S.META_PACKS_RETIRED, db=self._dbs[S.DB_META])
            retired = {p for p, _ in (msgpack.unpackb(v) if v else [])}
        victims = set()
        for p, size in sizes.items():
            if p in retired:
                continue
            body = size - len(PACK_MAGIC)
            dead = body - live.get(p, 0)
            if dead > 0 and (dead > dead_ratio * body or live.get(p, 0) == 0):
                victims.add(p)
        return victims

    # --- vacuum ----------------------------------------------------------------------------
    def vacuum(self, close: Callable[[], int | None]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Rewrite data.mdb compactly and swap it in atomically (docs/format.md
        "Vacuum"); the journal must be the only opener in this process and
        hold the writer lock.  ``close()`` closes the journal and hands its
        lock fd over: the lock is held until the new file is in place.
        -> (sizes before, sizes after), see :func:`data_file_sizes`."""
        path = self._st.path
        self.purge_graveyard(0)  # offline: no capture can name a freed chunk any more
        self.repack(0.0)
        before = data_file_sizes(path)
        tmp = os.path.join(path, "vacuum.tmp")
        os.makedirs(tmp, mode=0o700, exist_ok=True)
        for name in ("data.mdb", "lock.mdb"):
            try:
                os.unlink(os.path.join(tmp, name))
            except FileNotFoundError:
                pass
        lock_fd = None
        try:
            self._st.copy_compacted(tmp)
            lock_fd = close()  # keeps the writer lock across the swap
            os.replace(os.path.join(tmp, "data.mdb"), os.path.join(path, "data.mdb"))
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            release_lock(lock_fd)
            try:
                for name in os.listdir(tmp):
                    os.unlink(os.path.join(tmp, name))
                os.rmdir(tmp)
            except OSError:
                pass
        after = data_file_sizes(path)
        log.info("vacuumed %s: %d -> %d bytes", path, before[0], after[0])
        return before, after


def data_file_sizes(path: str) -> tuple[int, int]:
    """(apparent size, allocated bytes) of PATH/data.mdb."""
    st = os.stat(os.path.join(path, "data.mdb"))
    return st.st_size, st.st_blocks * 512


def _rebase_plan(rd: Reader, cid: bytes, depth: int, refs: Callable[[bytes], int]
                 ) -> tuple[bytes, bytes | None] | None:
    """Step 3's decision for one kept chunk (``depth`` from its index entry;
    ``refs``: the counts, real or a dry run's): -> (its base that only it
    keeps alive, the ancestor to re-code it against, None: standalone), or
    None to leave it.  The walk goes down single-base links while each is
    named by nothing but its successor; it stops at a link something else
    names (the new base), at a value of several bases (format 9: kept as
    the new base) or at the chain's root (freed too: standalone)."""
    if depth == 0:
        return None  # standalone: no base to free
    bases = rd.chunk_info(cid).bases
    if len(bases) != 1 or refs(bases[0]) != 1:
        return None  # several bases, or its base is named elsewhere too
    dead = target = bases[0]
    for _ in range(MAX_REBASE_WALK):
        bases = rd.chunk_info(target).bases
        if not bases:
            target = None  # the root only serves this chain
            break
        if len(bases) != 1 or refs(bases[0]) != 1:
            if len(bases) == 1:
                target = bases[0]
            break
        target = bases[0]
    return None if target == dead else (dead, target)


def survivors_after(r: Reader, files: dict[int, int], doomed: set[int] = frozenset()) -> list[int]:
    """Step 3's versions: each file's retained content versions after its
    oldest version pruned now (``files``: file id -> that seq)."""
    out = []
    for fid, oldest in files.items():
        for s in r.versions_of(fid):  # newest first
            if s <= oldest:
                break
            if s not in doomed and not r.is_pruned(s) and r.record(s).is_content:
                out.append(s)
    return sorted(out)


def _chain_hits(r: Reader, seq: int, doomed: set[int], new_cps: set[int] = frozenset()) -> bool:
    """Does rebuilding ``seq``'s list read a version in ``doomed`` (itself
    excluded)?  ``new_cps``: checkpoints a dry run pretends to have written."""
    s = seq
    while True:
        if s != seq and s in doomed:
            return True
        if s in new_cps or r.txn.get(S.checkpoint_key(s), db=r.dbs[S.DB_CHECKPOINTS]) is not None:
            return False
        rec = r.record(s)
        if not rec.base_seq:
            return False
        s = rec.base_seq


def _bump_meta(txn, dbs, key: bytes, n: int) -> None:
    if n:
        v = txn.get(key, db=dbs[S.DB_META])
        txn.put(key, _packb((msgpack.unpackb(v) if v else 0) + n), db=dbs[S.DB_META])


def _meta_int(txn, dbs, key: bytes) -> int:
    v = txn.get(key, db=dbs[S.DB_META])
    return msgpack.unpackb(v) if v else 0


def densify_db(env, txn, db, name: bytes, slack: float = INDEX_SLACK) -> int:
    """In the write transaction ``txn``: rewrite ``db`` in key order if its leaf
    pages are more than ``slack`` times what it needs; -> pages saved (0: not
    worth it, or above INDEX_REWRITE_MAX entries).

    Chunk ids are random, so inserts land all over the B-tree and every page
    split leaves two half-full pages: the index settles at 50-70 % full; so
    do ``history`` and ``pathlog`` (a record's seq appended under its file id
    / path).  Copying a database out and appending it back in order fills
    every page.  (A rewrite of a key range in place does not fill pages: the
    re-inserted keys split pages in the middle.)  Runs in the child process
    of :func:`densify_child`."""
    if not sparse_pages(txn, db, name, slack):
        return 0
    if name in S.DUP_DBS:
        return S.rewrite_dups_in_key_order(txn, db)
    return S.rewrite_in_key_order(env, txn, db)


def densify_child(argv: list[str]) -> int:
    """``PATH SLACK NAME...`` (``Storage.run_apart``): :func:`densify_db` each
    database in a write transaction of its own; prints {name: pages saved}."""
    path, slack, names = argv[0], float(argv[1]), [n.encode() for n in argv[2:]]
    env = open_env(path)
    try:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
        out = {}
        for name in names:
            dup = name in S.DUP_DBS
            with env.begin(write=True) as txn:
                db = env.open_db(name, txn=txn, create=False, dupsort=dup, dupfixed=dup)
                out[name.decode()] = densify_db(env, txn, db, name, slack)
        print(json.dumps(out), flush=True)
    finally:
        env.close()
    return 0


def sparse_pages(txn, db, name: bytes, slack: float = INDEX_SLACK) -> bool:
    """Are ``db``'s leaf pages more than ``slack`` times what it needs (and its
    entries at most INDEX_REWRITE_MAX)?  Reads only (a sample, or for
    ``history``/``pathlog`` a walk over their keys)."""
    st = txn.stat(db)
    if not st["entries"] or st["entries"] > INDEX_REWRITE_MAX:
        return False
    if name in S.DUP_DBS:
        need = S.dup_pages_needed(txn, db)
    elif name == S.DB_FILES:  # file states, then the paths (format 10): each range sampled
        v = txn.get(S.META_FILES)  # the main database
        nfiles = min(st["entries"], msgpack.unpackb(v) if v else 0)
        cur = txn.cursor(db=db)
        fs = [_node_bytes(k, v) for _, (k, v) in zip(range(INDEX_SAMPLE), cur) if k < S.PATH_PREFIX]
        ps = [_node_bytes(k, v) for _, (k, v) in zip(range(INDEX_SAMPLE), cur)] if cur.set_range(S.PATH_PREFIX) else []
        used = nfiles * sum(fs) / max(len(fs), 1) + (st["entries"] - nfiles) * sum(ps) / max(len(ps), 1)
        need = -(-int(used) // (st["psize"] - 16))
    else:
        sizes = [_node_bytes(k, v) for _, (k, v) in zip(range(INDEX_SAMPLE), txn.cursor(db=db))]
        need = -(-st["entries"] * sum(sizes) // (len(sizes) * (st["psize"] - 16)))  # page header: 16
    return st["leaf_pages"] - need >= max(1, need * (slack - 1))


def _node_bytes(k: bytes, v: bytes) -> int:
    """Bytes an entry takes on an LMDB leaf page: node header 8, key and value, even-aligned, slot 2."""
    return (8 + len(k) + len(v) + 1) // 2 * 2 + 2
