"""Re-coding chunk values at compaction (issue 20), as ``git gc --aggressive`` re-deltas.

A chunk value is coded once, at capture, against what that capture found
then, under a CPU and a depth budget; most new files (``git checkout``'s
unlink + create) start standalone, and a block's bytes moved from other
pages are reached only within the capture's own changed blocks.  A
compaction pass looks again at the chunks that first appeared in the
versions since its last pass (meta ``recode_upto``), with more to choose
from, and keeps a new value only when it is smaller:

- the chunk of the path's previous version at the same offset (one base);
- that base plus up to three more chunks of the previous version sharing
  the most anchored windows with it (``chunking.MultiBase`` over the whole
  previous version, not only one capture's changed blocks);
- up to four earlier chunks of any file of the pass sharing its windows
  (a new file delta-coded against a similar one, as git's window does),
  beside the same-offset base when there is one;
- standalone at zstd's highest level.

The chunk id (hash of the raw bytes) never changes, so records, edits and
checkpoints are untouched: the index entry is re-pointed to the new value,
the new bases are incremented and the old ones decremented (freed at 0, as
pruning frees) in the same transaction (docs/format.md, "Compaction and
retention", "Re-coding").

Depth.  A value's depth is the sum of (base depth + 1), written in its header
and in its index entry; every value built on it declared a depth computed
from it.  A re-coding that does not deepen the chunk leaves those declared
depths at or above the real ones (safe: they only ever bound work).  One
that deepens it must rewrite, in the same transaction, the header of every
value above it (its transitive dependents, found through a map of bases
built from the headers at the start of the pass plus every value the writer
stored since, :meth:`Storage.watch_values`), each at its new depth, and is
given up when one would exceed MAX_DELTA_DEPTH or there are more than
CLOSURE_MAX of them.  A new base is never one of the chunk's own ancestors'
dependents: the walk down from each new base must not meet the chunk.
"""

from __future__ import annotations

import bisect
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import msgpack
import zstandard

from deltafs import child_env
from deltafs import chunking as C
from deltafs.chunking import MAX_DELTA_DEPTH

from . import schema as S
from .packs import add_pack_live, decref, incref
from .reader import Reader

log = logging.getLogger(__name__)

META_RECODE_UPTO = b"recode_upto"  # the last record whose new chunks a pass looked at
RECODE_BATCH = 16  # re-coded chunks per write transaction (sqlgrow: the longest held the writer 87 ms at 64)
# a chunk re-coded deeper stays at most this deep: a capture that read its old depth
# before and commits after builds on it at the real depth (Journal._stored_depth),
# and is refused over 128; this leaves it room
DEEPEN_MAX = MAX_DELTA_DEPTH - 16
CLOSURE_MAX = 32  # values above a deepened chunk whose headers one re-coding rewrites, at most (64: 2 % smaller on sqlgrow, a third more rewrites)
EXTRA_DEPTH = C.MULTI_BASE_EXTRA_DEPTH  # (depth + 1) of the extra bases together, at most
DELTA_LEVEL = C.ZSTD_DELTA_LEVEL  # 9, as capture; 19 stores 3-4 % less for 3-4x the CPU
# standalone values (capture: level 3) at level 19 for the first PLAIN_19_MAX raw
# bytes of a pass (~10 MB/s: a bulk import costs a pass ~1.6 s more at most), then 9
# (sqlgrow's 176 standalone blocks: 78 KB smaller at 19 than at 9)
PLAIN_LEVEL, PLAIN_LEVEL_BULK, PLAIN_19_MAX = 19, 9, 16 << 20
# raw bytes of new chunks one round looks at (its windows, indexes and decode cache
# peak at ~130 MB of heap for 247 MiB); a pass runs rounds, each with fresh
# indexes, until it caught up or looked at PASS_RAW_MAX (the rest waits for the next)
ROUND_RAW_MAX = 64 << 20
PASS_RAW_MAX = 1 << 30
PV_INDEX_MAX = 64 << 20  # a previous version larger than this is not searched whole (bytes)
PV_KEPT = 8  # paths whose previous version's window index a pass keeps up to date
INDEX_MAX = 2_000_000  # windows in the pass's content index, at most
MIN_GAIN = 16  # bytes a new value must save, at least (and 1/16 of the old value)
APART_MIN = 8 << 20  # a round whose new versions are smaller than this plans in process (milliseconds)
PLAN_TIMEOUT_S = 3600  # a round's plan in its child process, at most
FOUND_MAX = C.MULTI_BASE_MAX  # bases found by content, at most


@dataclass
class RecodeResult:
    chunks_looked: int = 0
    chunks_recoded: int = 0
    bytes_before: int = 0  # old values of the re-coded chunks
    bytes_after: int = 0  # their new values
    headers_rewritten: int = 0  # values above a deepened chunk, rewritten at their new depth
    skipped: int = 0  # planned, then given up in the write transaction (changed meanwhile, too deep)
    chunks_freed: int = 0  # old bases nothing names any more
    bytes_freed: int = 0
    transactions: int = 0
    upto: int = 0
    seconds: float = 0.0
    raw_looked: int = 0  # raw bytes of the chunks looked at
    rounds: int = 1
    plan_s: float = 0.0  # of it, choosing the new values (a read snapshot; no lock held)
    txn_max_s: float = 0.0  # the longest write transaction (the writer lock held: captures wait)


@dataclass
class _Plan:
    cid: bytes
    loc: bytes  # its index entry when planned (skipped if it changed)
    bases: tuple[bytes, ...]
    payload: bytes
    raw_len: int
    old_len: int


def _value_len(n_bases: int, payload: bytes) -> int:
    return 6 + (0 if not n_bases else 16 if n_bases == 1 else 1 + 16 * n_bases) + len(payload)


class Recoder:
    """One re-coding pass over a writing journal's storage (see the module docstring).
    ``free(txn, zero)``: the compactor's freeing of chunks whose count reached 0."""

    def __init__(self, storage, free: Callable, apart: bool = False) -> None:
        self._st = storage
        self._apart = apart
        self._dbs = storage.dbs
        self._free = free
        self._wins: dict[bytes, list[bytes]] = {}  # chunk -> its windows (the new chunks of the last version)
        self._pvs: dict[bytes, tuple] = {}  # path -> (list, its ids, window -> chunk, chunk -> windows)
        self._plain_done = 0  # raw bytes coded standalone at PLAIN_LEVEL this pass
        self._moved: dict[bytes, bytes] = {}  # chunk -> index entry after this pass rewrote its header

    # --- planning (read snapshot, no lock held) ---------------------------------------
    def run(self, raw_max: int = ROUND_RAW_MAX) -> RecodeResult:
        t0 = time.monotonic()
        res = RecodeResult()
        watched = self._st.watch_values()
        try:
            plans, upto, deps = self._plans(res, raw_max)
            res.plan_s = round(time.monotonic() - t0, 3)
            res.upto = upto
            for b in range(0, len(plans), RECODE_BATCH):
                t1 = time.monotonic()
                with self._st.write() as txn:
                    self._extend_deps(txn, deps, watched)
                    zero: list[bytes] = []
                    for p in plans[b:b + RECODE_BATCH]:
                        self._apply(txn, p, deps, res, zero)
                    self._free(txn, zero)
                res.transactions += 1
                res.txn_max_s = max(res.txn_max_s, round(time.monotonic() - t1, 4))
            with self._st.write() as txn:
                txn.put(META_RECODE_UPTO, msgpack.packb(upto), db=self._dbs[S.DB_META])
            res.transactions += 1
        finally:
            self._st.unwatch_values(watched)
        res.seconds = round(time.monotonic() - t0, 3)
        if res.chunks_recoded:
            log.info("re-coded %d of %d chunks: %d -> %d bytes (%d headers rewritten, %d given up)",
                     res.chunks_recoded, res.chunks_looked, res.bytes_before, res.bytes_after,
                     res.headers_rewritten, res.skipped)
        return res

    def _plans(self, res: RecodeResult, raw_max: int):
        """The plan of a round: in a child process (``apart``), so its seconds of
        Python and its indexes are not the daemon's (the mount's request loop
        needs the GIL; the windows and the decode cache peak at ~130 MB), else
        here.  Either way a read snapshot taken after the watch began."""
        if not self._apart or self._little(raw_max):
            with self._st.read() as txn:
                return self._plan(Reader(self._st, txn), res, raw_max)
        cmd = [sys.executable, "-c", "import sys; from deltafs.journal.recode import plan_child; "
               "sys.exit(plan_child(sys.argv[1:]))", self._st.path, str(raw_max)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), close_fds=True,
                             timeout=PLAN_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError(f"re-coding plan failed: {out.stderr.decode(errors='replace').strip()[-400:]}")
        d = msgpack.unpackb(out.stdout, raw=False)
        res.chunks_looked, res.raw_looked = d["looked"], d["raw"]
        plans = [_Plan(c, loc, tuple(bs), pl, n, ol) for c, loc, bs, pl, n, ol in d["plans"]]
        return plans, d["upto"], {b: set(v) for b, v in d["deps"].items()}

    def _little(self, raw_max: int) -> bool:
        """Is the round's work small (the new content versions' sizes add up
        to less than APART_MIN): planned here, no child process to start."""
        with self._st.read() as txn:
            r = Reader(self._st, txn)
            v = txn.get(META_RECODE_UPTO, db=self._dbs[S.DB_META])
            total = 0
            for rec in r.records((msgpack.unpackb(v) if v else 0) + 1, r.head_seq()):
                if rec.is_content:
                    total += rec.size or 0
                    if total >= min(APART_MIN, raw_max):
                        return False
        return True

    def _plan(self, r: Reader, res: RecodeResult, raw_max: int):
        """-> (plans, the last record looked at, dependents map)."""
        cdb = self._dbs[S.DB_CHUNKS]
        v = r.txn.get(META_RECODE_UPTO, db=self._dbs[S.DB_META])
        start = (msgpack.unpackb(v) if v else 0) + 1
        head = r.head_seq()
        if head < start:
            return [], head, {}
        deps = self._dependents(r)
        cache = C.RawCache(32 << 20)
        prev: dict[bytes, tuple[list, list[int]] | None] = {}
        seen: set[bytes] = set()
        depth: dict[bytes, int] = {}  # depths as this plan leaves them
        index: dict[bytes, bytes] = {}  # window -> first chunk of the pass holding it
        anchor: bytes | None = None
        plans: list[_Plan] = []
        raw_done = 0
        upto = start - 1

        def dep(c: bytes) -> int | None:
            if c in depth:
                return depth[c]
            loc = r.txn.get(c, db=cdb)
            return None if loc is None else S.decode_loc(loc)[4]

        anchor = self._sample_anchor(r, start, head, cache)
        for rec in r.records(start, head):
            if raw_done >= raw_max:
                break
            upto = rec.seq
            if not rec.is_content or r.is_pruned(rec.seq):
                continue
            lst = r.chunk_list(rec.seq)
            offs, o = [], 0
            for _, n in lst:
                offs.append(o)
                o += n
            if rec.path not in prev:
                prev[rec.path] = self._previous(r, rec.path, rec.seq)
            pv = prev[rec.path]
            old_ids = {c for c, _ in pv[0]} if pv else set()
            for (cid, n), off in zip(lst, offs):
                if cid in seen or cid in old_ids:
                    continue
                seen.add(cid)
                loc = r.txn.get(cid, db=cdb)
                if loc is None:
                    continue
                _, pack, voff, old_len, old_depth = S.decode_loc(loc)
                if not old_depth and old_len > n:  # stored raw: incompressible, and no base found at capture
                    continue
                time.sleep(0)  # let the mount's threads have the GIL between chunks (a pass is seconds of Python)
                raw = r.read_chunk(cid, cache)
                raw_done += len(raw)
                res.raw_looked += len(raw)
                res.chunks_looked += 1
                ws = self._wins[cid] = _windows(raw, anchor)  # once per chunk: looked up, indexed
                if old_len * C.MULTI_BASE_WORSE > len(raw) and old_len > 4 * MIN_GAIN:
                    # a value under 1/32 of its chunk is as good as any base set makes it
                    # deeper: only if the values above it can follow (see _deepen)
                    cap = max(DEEPEN_MAX, old_depth) if _closure(deps, cid) is not None else old_depth
                    best = self._choose(r, rec.path, cid, raw, ws, off, pv, old_len, old_depth, cap, dep, cache,
                                        index, anchor)
                    if best is not None:
                        bases, payload, d = best
                        if d > old_depth:
                            up = self._deepen(r.txn, cid, d, deps, dep)
                            if up is None:
                                best = None
                            else:
                                depth.update(up)
                    if best is not None:
                        plans.append(_Plan(cid, bytes(loc), bases, payload, len(raw), old_len))
                        depth[cid] = max(d, old_depth)
                if len(index) < INDEX_MAX:
                    for w in ws:
                        index.setdefault(w, cid)
            prev[rec.path] = (lst, offs)
            # the next version's previous-version index asks for this version's new chunks only
            self._wins = {c: self._wins[c] for c, _ in lst if c in self._wins}
        return plans, upto, deps

    def _sample_anchor(self, r: Reader, start: int, head: int, cache) -> bytes:
        """The anchor byte of the pass's windows, from the first 2 KiB of up to
        64 chunks of its first versions (as MultiBase picks it from its blocks)."""
        sample: list[bytes] = []
        seen: set[bytes] = set()
        for rec in r.records(start, head):
            if rec.is_content and not r.is_pruned(rec.seq):
                lst = r.chunk_list(rec.seq)
                for cid, _ in lst[:: max(1, len(lst) // 16)]:
                    if cid not in seen:
                        seen.add(cid)
                        sample.append(r.read_chunk(cid, cache)[:2048])
            if len(sample) >= 64:
                break
        return _anchor(b"".join(sample[:64]))

    def _previous(self, r: Reader, path: bytes, seq: int) -> tuple[list, list[int]] | None:
        """The chunk list (and offsets) of ``path``'s newest retained content version before ``seq``."""
        for s in r.versions_under(path):  # newest first
            if s >= seq or r.is_pruned(s):
                continue
            rec = r.record(s)
            if rec.path != path or not rec.is_content:
                continue  # (an unlink or a rename away: its last content is still the best hint)
            lst = r.chunk_list(s)
            offs, o = [], 0
            for _, n in lst:
                offs.append(o)
                o += n
            return lst, offs
        return None

    def _choose(self, r, path, cid, raw, ws, off, pv, old_len, old_depth, cap, dep, cache, index, anchor):
        """-> (bases, payload, depth) of the smallest coding that saves enough
        and is at most ``cap`` deep, or None."""
        raw = bytes(raw)
        need = old_len - max(MIN_GAIN, old_len // 16)  # a new value must be at most this long
        best: tuple[tuple[bytes, ...], bytes, int] | None = None
        best_len = need + 1

        def consider(bases: tuple[bytes, ...], dict_raw: bytes | None, level: int) -> None:
            nonlocal best, best_len
            d = 0
            for b in bases:
                db = dep(b)
                if db is None:
                    return
                d += db + 1
            if d > cap:
                return
            payload = _code(raw, dict_raw, level)
            n = _value_len(len(bases), payload)
            if n < best_len:
                best, best_len = (bases, payload, d), n

        def rawof(b: bytes) -> bytes:
            return r.read_chunk(b, cache)

        if not old_depth:  # standalone now: at a higher level
            level = PLAIN_LEVEL if self._plain_done < PLAIN_19_MAX else PLAIN_LEVEL_BULK
            self._plain_done += len(raw)
            consider((), None, level)
        own = None
        if pv is not None:
            lst, offs = pv
            i = bisect.bisect_right(offs, off) - 1
            top = 0
            for k in range(max(i, 0), min(i + 3, len(lst))):
                c2, n2 = lst[k]
                ov = min(offs[k] + n2, off + len(raw)) - max(offs[k], off)
                if ov > top and c2 != cid:
                    top, own = ov, c2
        own_raw = None
        if own is not None and dep(own) is not None:
            own_raw = rawof(own)
            consider((own,), own_raw, DELTA_LEVEL)
        else:
            own = None
        if best is not None and best_len * C.MULTI_BASE_WORSE <= len(raw):
            return best  # the one base is good enough: no search
        own_d = dep(own) + 1 if own is not None else 0
        budget = min(cap - own_d, EXTRA_DEPTH) if own is not None else cap
        # the previous version's other chunks sharing its bytes
        if own is not None and budget > 0 and pv[1][-1] <= PV_INDEX_MAX:  # as MultiBase, over the whole previous version
            hits = _hits(ws, self._pv_index(path, pv[0], anchor, rawof))
            extra = _pick(hits, budget, dep, {own, cid}, FOUND_MAX - 1)
            if extra:
                bs = (*extra, own)
                consider(bs, b"".join(rawof(b) for b in bs), DELTA_LEVEL)
        # any earlier chunk of the pass sharing its bytes
        hits = _hits(ws, index)
        extra = _pick(hits, budget, dep, {own, cid}, FOUND_MAX - (1 if own is not None else 0))
        if extra:
            bs = (*extra, own) if own is not None else tuple(extra)
            consider(bs, b"".join(rawof(b) for b in bs), DELTA_LEVEL)
        return best

    def _pv_index(self, path: bytes, lst: list, anchor: bytes, rawof) -> dict[bytes, bytes]:
        """Windows of a previous version's chunks -> chunk.  Kept per path and
        brought up to date from the version before by the chunks that came
        and went (a database's next version shares most of its blocks)."""
        st = self._pvs.pop(path, None)
        if st is None or st[0] is not lst:
            ids = set(c for c, _ in lst)
            if st is None:
                st = (lst, set(), {}, {})
            _, old, idx, wins = st
            for c in old - ids:
                for w in wins.pop(c, ()):
                    if idx.get(w) == c:
                        del idx[w]
            for c in dict.fromkeys(c for c, _ in lst):  # in list order: the same on every run
                if c in old:
                    continue
                ws = self._wins.get(c)
                ws = wins[c] = ws if ws is not None else _windows(rawof(c), anchor)
                for w in ws:
                    idx.setdefault(w, c)
            st = (lst, ids, idx, wins)
        self._pvs[path] = st
        while len(self._pvs) > PV_KEPT:
            self._pvs.pop(next(iter(self._pvs)))
        return st[2]

    # --- dependents ----------------------------------------------------------------------
    def _dependents(self, r: Reader) -> dict[bytes, set[bytes]]:
        """base -> the values naming it, from every live value's header."""
        deps: dict[bytes, set[bytes]] = {}
        read = self._st.packs.read
        for k, v in r.txn.cursor(db=self._dbs[S.DB_CHUNKS]):
            _, pack, off, length, d = S.decode_loc(v)
            if not d:
                continue
            for b in S.decode_chunk(read(pack, off, min(length, S.CHUNK_HDR_MAX)))[2]:
                deps.setdefault(b, set()).add(bytes(k))
        return deps

    def _extend_deps(self, txn, deps: dict[bytes, set[bytes]], watched: set[bytes]) -> None:
        """Add the values the writer stored since the pass began (under the write lock: complete)."""
        cdb, read = self._dbs[S.DB_CHUNKS], self._st.packs.read
        while watched:
            cid = watched.pop()
            loc = txn.get(cid, db=cdb)
            if loc is None:
                continue
            _, pack, off, length, d = S.decode_loc(loc)
            if d:
                for b in S.decode_chunk(read(pack, off, min(length, S.CHUNK_HDR_MAX)))[2]:
                    deps.setdefault(b, set()).add(cid)

    # --- writing ---------------------------------------------------------------------------
    def _apply(self, txn, p: _Plan, deps: dict[bytes, set[bytes]], res: RecodeResult,
               zero: list[bytes]) -> None:
        cdb, dbs = self._dbs[S.DB_CHUNKS], self._dbs
        loc = txn.get(p.cid, db=cdb)
        if loc is None or (bytes(loc) != p.loc and self._moved.get(p.cid) != bytes(loc)):
            res.skipped += 1  # freed, re-coded or moved since the plan (not by this pass)
            return
        refs, pack, off, length, old_depth = S.decode_loc(loc)
        new_depth = 0
        for b in p.bases:
            bl = txn.get(b, db=cdb)
            if bl is None:
                res.skipped += 1
                return
            new_depth += S.decode_loc(bl)[4] + 1
        if new_depth > MAX_DELTA_DEPTH or any(self._reaches(txn, b, p.cid) for b in p.bases):
            res.skipped += 1
            return
        rewrites: dict[bytes, int] | None = {}
        if new_depth > old_depth:
            rewrites = self._deepen(txn, p.cid, new_depth, deps)
            if rewrites is None:
                res.skipped += 1
                return
        else:  # never declared shallower than before: a mirror keeps the old value, and the
            new_depth = old_depth  # values built on it from now on declare a depth from this one
        old = self._st.packs.read(pack, off, length)
        _, _, old_bases, _ = S.decode_chunk(old)
        val = S.encode_chunk(new_depth, p.raw_len, p.bases, p.payload)
        np_, noff = self._st.packs.append(val)
        txn.put(p.cid, S.encode_loc(refs, np_, noff, len(val), new_depth), db=cdb)
        add_pack_live(txn, dbs, pack, -length)
        add_pack_live(txn, dbs, np_, len(val))
        for b in p.bases:
            incref(txn, dbs, b)
            deps.setdefault(b, set()).add(p.cid)
        for b in old_bases:
            decref(txn, dbs, b, zero, "a re-coded value, as its old base,")
            s = deps.get(b)
            if s is not None and b not in p.bases:
                s.discard(p.cid)
        for d_cid, d in rewrites.items():
            self._rewrite_header(txn, d_cid, d)
        # the new value replaces the old: stored_bytes stays the live sum when nothing was freed
        mdb = dbs[S.DB_META]
        v = txn.get(S.META_STORED, db=mdb)
        txn.put(S.META_STORED, msgpack.packb((msgpack.unpackb(v) if v else 0) + len(val) - length), db=mdb)
        res.chunks_recoded += 1
        res.bytes_before += length
        res.bytes_after += len(val)
        res.headers_rewritten += len(rewrites)

    def _reaches(self, txn, start: bytes, target: bytes) -> bool:
        """Does the walk down from ``start`` through its bases meet ``target``?
        (Then ``target`` may not take ``start`` as a base: a loop.)  At most
        MAX_DELTA_DEPTH + 1 values deep; an unreadable header counts as a yes."""
        cdb, read = self._dbs[S.DB_CHUNKS], self._st.packs.read
        todo, looked = [start], set()
        while todo:
            c = todo.pop()
            if c == target:
                return True
            if c in looked:
                continue
            looked.add(c)
            if len(looked) > 4 * (MAX_DELTA_DEPTH + 1):
                return True
            loc = txn.get(c, db=cdb)
            if loc is None:
                continue
            _, pack, off, length, d = S.decode_loc(loc)
            if d:
                try:
                    todo.extend(S.decode_chunk(read(pack, off, min(length, S.CHUNK_HDR_MAX)))[2])
                except ValueError:
                    return True
        return False

    def _deepen(self, txn, cid: bytes, new_depth: int, deps, dep=None) -> dict[bytes, int] | None:
        """The values above ``cid`` whose declared depth would fall below
        their real one once ``cid`` is at ``new_depth``: -> {chunk: new
        depth}, or None when there are more than CLOSURE_MAX of them or one
        would be over MAX_DELTA_DEPTH.  ``dep``: the depth of a chunk outside
        them (default: its index entry in ``txn``)."""
        cdb, read = self._dbs[S.DB_CHUNKS], self._st.packs.read
        closure = _closure(deps, cid)
        if closure is None or cid in closure:
            return None  # too many, or a loop (never built by this code: refuse to touch it)
        info: dict[bytes, tuple[int, tuple[bytes, ...]]] = {}
        for d in closure:
            loc = txn.get(d, db=cdb)
            if loc is None:
                continue
            _, pack, off, length, dd = S.decode_loc(loc)
            info[d] = (dd, S.decode_chunk(read(pack, off, min(length, S.CHUNK_HDR_MAX)))[2])
        memo: dict[bytes, int] = {cid: new_depth}

        def depth_of(c: bytes, guard: int = 0) -> int:
            if c in memo:
                return memo[c]
            if c not in info or guard > len(closure) + 1:
                if c in info:
                    return 10 ** 6
                if dep is not None:
                    x = dep(c)
                    return 10 ** 6 if x is None else x
                loc = txn.get(c, db=cdb)
                return S.decode_loc(loc)[4] if loc else 10 ** 6
            n = sum(depth_of(b, guard + 1) + 1 for b in info[c][1])
            memo[c] = n
            return n
        out = {}
        for d in info:
            n = depth_of(d)
            if n > MAX_DELTA_DEPTH:
                return None
            if n > info[d][0]:
                out[d] = n
        return out

    def _rewrite_header(self, txn, cid: bytes, depth: int) -> None:
        """The same value with ``depth`` in its header, appended; its index entry re-pointed."""
        cdb = self._dbs[S.DB_CHUNKS]
        refs, pack, off, length, _ = S.decode_loc(txn.get(cid, db=cdb))
        _, raw_len, bases, payload = S.decode_chunk(self._st.packs.read(pack, off, length))
        val = S.encode_chunk(depth, raw_len, bases, bytes(payload))
        np_, noff = self._st.packs.append(val)
        new = S.encode_loc(refs, np_, noff, len(val), depth)
        txn.put(cid, new, db=cdb)
        self._moved[cid] = new
        add_pack_live(txn, self._dbs, pack, -length)
        add_pack_live(txn, self._dbs, np_, len(val))


# --- helpers ---------------------------------------------------------------------------------
def _anchor(sample: bytes) -> bytes:
    """The byte value whose share of ``sample`` is nearest 1/MULTI_BASE_STEP (as chunking.MultiBase picks it)."""
    counts = Counter(sample)
    target = len(sample) / C.MULTI_BASE_STEP
    return bytes((min(range(256), key=lambda c: (abs(counts.get(c, 0) - target), c)),))


def _zparams(level: int) -> zstandard.ZstdCompressionParameters:
    """Magicless frames with the content size and no dict id (docs/format.md, codecs 3-4)."""
    return zstandard.ZstdCompressionParameters.from_level(
        level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=True, write_dict_id=False)


def _closure(deps: dict[bytes, set[bytes]], cid: bytes) -> set[bytes] | None:
    """Every value above ``cid`` (built on it, or on one built on it...), or
    None when there are more than CLOSURE_MAX."""
    closure: set[bytes] = set()
    todo = [cid]
    while todo:
        for d in deps.get(todo.pop(), ()):
            if d not in closure:
                closure.add(d)
                if len(closure) > CLOSURE_MAX:
                    return None
                todo.append(d)
    return closure


_RUNS: dict[bytes, bytes] = {}


def _windows(raw: bytes, anchor: bytes) -> list[bytes]:
    """The MULTI_BASE_WINDOW bytes from each occurrence of ``anchor`` in ``raw``
    (a run of the anchor byte itself left out: free space, padding)."""
    W = C.MULTI_BASE_WINDOW
    run = _RUNS.get(anchor)
    if run is None:
        run = _RUNS[anchor] = anchor * W
    end = len(raw) - W
    out = []
    find, q = raw.find, raw.find(anchor)
    while 0 <= q <= end:
        w = raw[q:q + W]
        if w != run:
            out.append(w)
        q = find(anchor, q + C.MULTI_BASE_PROBE)
    return out


def _hits(ws: list[bytes], index: dict[bytes, bytes]) -> dict[bytes, int]:
    hits: dict[bytes, int] = {}
    get = index.get
    for w in ws:
        c = get(w)
        if c is not None:
            hits[c] = hits.get(c, 0) + 1
    return hits


def _pick(hits: dict[bytes, int], budget: int, dep, exclude: set, n: int) -> list[bytes]:
    """Up to ``n`` chunks with the most hits (2 at least), their (depth + 1) together within ``budget``."""
    out: list[bytes] = []
    for c, k in sorted(hits.items(), key=lambda x: (-x[1], x[0])):
        if k < 2 or c in exclude:
            continue
        d = dep(c)
        if d is None or d + 1 > budget:
            continue
        out.append(c)
        budget -= d + 1
        if len(out) == n:
            break
    return out


def _code(raw: bytes, dict_raw: bytes | None, level: int) -> bytes | None:
    """A payload (codec byte + body): standalone at ``level``, or a delta against ``dict_raw``."""
    p = _zparams(level)
    if dict_raw is None:
        body = zstandard.ZstdCompressor(compression_params=p).compress(raw)
        if len(body) + 1 >= len(raw) + 1:
            return bytes([C.CODEC_RAW]) + raw
        return bytes([C.CODEC_ZSTD]) + body
    d = zstandard.ZstdCompressionDict(dict_raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return bytes([C.CODEC_ZSTD_DELTA]) + zstandard.ZstdCompressor(compression_params=p, dict_data=d).compress(raw)


def plan_child(argv: list[str]) -> int:
    """``PATH RAW_MAX``: plan one round over the journal at PATH (opened
    read-only, beside its writer) and print the plan, msgpack, on stdout."""
    from .storage import Storage
    path, raw_max = argv[0], int(argv[1])
    st = Storage.share(path, readonly=True)
    try:
        st.open_new_dbs()
        rc = Recoder(st, lambda txn, zero: None)
        res = RecodeResult()
        with st.read() as txn:
            plans, upto, deps = rc._plan(Reader(st, txn), res, raw_max)
        out = {"plans": [[p.cid, p.loc, list(p.bases), p.payload, p.raw_len, p.old_len] for p in plans],
               "upto": upto, "deps": {b: sorted(v) for b, v in deps.items()},
               "looked": res.chunks_looked, "raw": res.raw_looked}
        sys.stdout.buffer.write(msgpack.packb(out, use_bin_type=True))
        sys.stdout.flush()
    finally:
        st.release()
    return 0
