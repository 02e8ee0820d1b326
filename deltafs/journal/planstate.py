"""The planning state of compaction (database ``plan``; docs/format.md,
"Planning state"): what ``deltafs.maintenance`` needs to plan a pass from
the records since the last one instead of decoding the whole history.

It is derived data, rebuilt from the records whenever it cannot be
trusted, so an older deltafs that ignores it loses nothing:

* ``b"M"`` -> msgpack map: ``layout`` (4; a state of another layout is
  rebuilt), ``upto`` (the last record planned), ``pruned`` (the journal's
  ``pruned_versions`` counter the state agrees with), and the planner's own
  fields (policy, snapshots, mirror floor, time of the last plan, counts);
* ``b"v" + u64 file id + u64 lo`` -> a *segment*: up to SEGMENT_VERSIONS
  of the file's versions, ascending, each ``[seq, hlc, base_seq, wake]``
  as varints (:func:`encode_segment`): every content version up to
  ``upto`` that is not pruned; ``wake`` (ns, 0: none) is when the
  retention's answer about this version may next change with age alone
  (the next age threshold it reaches).  ``lo`` is at most the first seq in
  the segment, above the previous segment's last: the segment of a seq is
  the file's last key with ``lo`` <= it.  (Layout 3 had one entry per
  version, ~38 bytes on a page; a segment costs ~8 a version: issue 20.)
* ``b"c" + u64 base_seq + u64 seq`` -> u64 file id of ``seq``: the
  versions whose base is *not* the version before them in the state (a
  delta against another file's version, a branch), by their base.  A
  version whose base is its file's previous version (nearly all of them)
  has no ``c`` entry: :meth:`PlanTxn.children` finds it as the next
  version of the file.  (Layout 2 had a ``c`` entry for every version with a
  base: ~25 of the ~70 bytes a version cost.)
* ``b"x" + u64 wake + u64 file id + u64 seq`` -> empty: the versions by
  their ``wake``, so a pass finds the versions whose age crossed a threshold
  without reading the others (and only the newest part of their file's
  versions: retention's answer about a version depends only on it and the
  versions after it).

The compactor deletes a pruned version from its segment, its ``c`` entries and
bumps ``pruned`` in the transaction that prunes it (:func:`forget`), so
the state agrees with ``pruned`` exactly as long as every prune went
through this code; the planner compares the two before trusting it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import msgpack

from . import schema as S
from .hlc import hlc_to_ns
from .reader import Reader
from .records import decode_record
from .seqindex import put_uvarint

META = b"M"
NEVER = (1 << 64) - 1
LAYOUT = 4  # of the keys above; a state of another layout is rebuilt
SEGMENT_VERSIONS = 32  # versions in one ``v`` segment at most (each change rewrites its segment)


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def _vkey(fid: int, seq: int) -> bytes:
    return b"v" + S.u64(fid) + S.u64(seq)


def _ckey(base: int, seq: int) -> bytes:
    return b"c" + S.u64(base) + S.u64(seq)


def _xkey(ns: int, fid: int, seq: int) -> bytes:
    return b"x" + S.u64(ns) + S.u64(fid) + S.u64(seq)


def _segment_at(cur, fid: int, seq: int) -> tuple[int, list[list[int]]] | None:
    """(lo, versions) of the segment of ``fid`` that ``seq`` falls in (the
    last with lo <= seq; the cursor is left on it), or None."""
    ok = cur.set_range(_vkey(fid, seq + 1)) if seq + 1 < NEVER else False
    ok = cur.prev() if ok else cur.last()
    if not ok or cur.key()[:9] != b"v" + S.u64(fid):
        return None
    lo = S.from_u64(cur.key()[9:17])
    return lo, decode_segment(lo, cur.value())


def _zigzag(d: int) -> int:
    """A signed difference as an unsigned varint's value (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...)."""
    return d * 2 if d >= 0 else -d * 2 - 1


def encode_segment(lo: int, versions: list[list[int]]) -> bytes:
    """A ``v`` segment of ascending ``versions`` ([seq, hlc, base seq, wake]):
    each as uvarint(seq - previous seq, the first's against ``lo``),
    uvarint(zigzag(hlc - previous hlc), the first's against 0),
    uvarint(zigzag(seq - base seq), 0: no base), uvarint(wake)."""
    out = bytearray()
    ps, ph = lo, 0
    for v in versions:
        if v[0] < ps or (v[0] == ps and out):
            raise ValueError(f"planning state: version {v[0]} out of order after {ps}")
        _encode_one(out, ps, ph, v)
        ps, ph = v[0], v[1]
    return bytes(out)


def _encode_one(out: bytearray, ps: int, ph: int, v: list[int]) -> None:
    seq, hlc, base, wake = v
    put_uvarint(seq - ps, out)
    put_uvarint(_zigzag(hlc - ph), out)
    if base == seq:
        raise ValueError(f"planning state: version {seq} based on itself")
    put_uvarint(_zigzag(seq - base) if base else 0, out)
    put_uvarint(wake, out)


def decode_segment(lo: int, b: bytes) -> list[list[int]]:
    """The versions of a ``v`` segment (:func:`encode_segment`)."""
    out: list[list[int]] = []
    i, n = 0, len(b)
    ps, ph = lo, 0
    vals = [0, 0, 0, 0]
    while i < n:
        for f in range(4):
            x = sh = 0
            while True:
                c = b[i]
                i += 1
                x |= (c & 0x7F) << sh
                if c < 0x80:
                    break
                sh += 7
            vals[f] = x
        seq = ps + vals[0]
        z = vals[1]
        hlc = ph + ((z >> 1) if not z & 1 else -((z + 1) >> 1))
        z = vals[2]
        out.append([seq, hlc, seq - ((z >> 1) if not z & 1 else -((z + 1) >> 1)) if z else 0, vals[3]])
        ps, ph = seq, hlc
    return out


class PlanTxn:
    """The planning state inside one write transaction (``Journal.planning``)."""

    LAYOUT = LAYOUT

    def __init__(self, storage, txn) -> None:
        self._txn = txn
        self._db = storage.dbs[S.DB_PLAN]
        self.reader = Reader(storage, txn)
        # file id -> [lo, versions, encoded] of its last segment as written in this
        # transaction, so adding a file's next version appends without decoding
        self._tails: dict[int, list] = {}

    # --- meta -------------------------------------------------------------------------
    def meta(self) -> dict | None:
        v = self._txn.get(META, db=self._db)
        return None if v is None else msgpack.unpackb(v, raw=False)

    def set_meta(self, m: dict) -> None:
        self._txn.put(META, _packb(m), db=self._db)

    def head_hlc(self) -> int:
        """The journal's time: the HLC of its newest record."""
        return self.reader.meta(S.META_HLC, 0)

    def pruned_counter(self) -> int:
        return self.reader.meta(S.META_PRUNED_VERSIONS, 0)

    def clear(self) -> None:
        """Empty the state (invalid until set_meta)."""
        self._tails.clear()
        self._txn.drop(self._db, delete=False)

    # --- versions ---------------------------------------------------------------------
    def add_version(self, fid: int, seq: int, hlc: int, base: int) -> bool:
        """-> True when ``fid`` had no version in the state before.  A file's
        versions are added in seq order (the records' order)."""
        t = self._tails.get(fid)
        if t is not None and seq > t[1][-1][0] and self._txn.get(_vkey(fid, t[0]), db=self._db) == t[2]:
            # after the file's newest (and its last segment as cached: ``forget`` may have
            # changed it in this transaction): append
            last = t[1][-1]
            if base and base != last[0]:
                self._txn.put(_ckey(base, seq), S.u64(fid), db=self._db)
            v = [seq, hlc, base, 0]
            if len(t[1]) < SEGMENT_VERSIONS:
                out = bytearray(t[2])
                _encode_one(out, last[0], last[1], v)
                t[1].append(v)
                t[2] = bytes(out)
            else:
                t[:] = [seq, [v], encode_segment(seq, [v])]
            self._txn.put(_vkey(fid, t[0]), t[2], db=self._db)
            return False
        new = self._add_version(fid, seq, hlc, base)
        for lo, vs in self._segments(fid, reverse=True):  # the file's last segment, for the next add
            self._tails[fid] = [lo, vs, encode_segment(lo, vs)]
            break
        return new

    def _add_version(self, fid: int, seq: int, hlc: int, base: int) -> bool:
        seg = _segment_at(self._txn.cursor(db=self._db), fid, seq)
        if seg is None:  # before every segment of the file (or it has none)
            cur = self._txn.cursor(db=self._db)
            new_file = not (cur.set_range(_vkey(fid, 0)) and cur.key()[:9] == _vkey(fid, 0)[:9])
            prev = 0
            lo, vs = seq, []
        else:
            new_file = False
            lo, vs = seg
            prev = max((v[0] for v in vs if v[0] < seq), default=0)
            if not prev:  # seq is first in its segment: the previous one ends the segment before
                prev = self._previous(fid, seq)
        if base and base != prev:
            self._txn.put(_ckey(base, seq), S.u64(fid), db=self._db)
        vs = [v for v in vs if v[0] != seq]
        vs.append([seq, hlc, base, 0])
        vs.sort()
        self._put_segment(fid, lo, vs)
        return new_file

    def add_file_versions(self, entries: list[tuple[int, int, int, int]]) -> int:
        """:meth:`add_version` of each (file id, seq, hlc, base), sorted by
        file id then seq, each file's after every version it has in the state
        (a rebuild): -> files new to the state.  Each segment written once."""
        new, i = 0, 0
        while i < len(entries):
            fid = entries[i][0]
            j = i
            while j < len(entries) and entries[j][0] == fid:
                j += 1
            run = entries[i:j]
            i = j
            new += self.add_version(*run[0])
            if len(run) == 1:
                continue
            prev = run[0][1]
            lo, vs = _segment_at(self._txn.cursor(db=self._db), fid, prev)
            for _, seq, hlc, base in run[1:]:
                if seq <= prev:
                    raise ValueError(f"planning state: versions of {fid:#x} out of order ({seq} after {prev})")
                if base and base != prev:
                    self._txn.put(_ckey(base, seq), S.u64(fid), db=self._db)
                vs.append([seq, hlc, base, 0])
                prev = seq
            self._put_segment(fid, lo, vs)
        return new

    def _put_segment(self, fid: int, lo: int, vs: list[list[int]]) -> None:
        """Write segment ``lo`` of ``fid`` (empty: delete it).  Over
        SEGMENT_VERSIONS it is cut after each SEGMENT_VERSIONS versions, the
        later parts keyed by their first seq, so appends fill a segment to
        the end."""
        self._tails.pop(fid, None)
        if not vs:
            self._txn.delete(_vkey(fid, lo), db=self._db)
            return
        while len(vs) > SEGMENT_VERSIONS:
            head, vs = vs[:SEGMENT_VERSIONS], vs[SEGMENT_VERSIONS:]
            self._txn.put(_vkey(fid, lo), encode_segment(lo, head), db=self._db)
            lo = vs[0][0]
        self._txn.put(_vkey(fid, lo), encode_segment(lo, vs), db=self._db)

    def _segments(self, fid: int, reverse: bool = False):
        """(lo, versions) of ``fid``'s segments, oldest first (``reverse``: newest first)."""
        cur = self._txn.cursor(db=self._db)
        pre = b"v" + S.u64(fid)
        if reverse:
            ok = cur.set_range(b"v" + S.u64(fid + 1)) if fid + 1 < NEVER else cur.last()
            ok = cur.prev() if ok else cur.last()
        else:
            ok = cur.set_range(pre)
        while ok:
            k = cur.key()
            if k[:9] != pre:
                break
            lo = S.from_u64(k[9:17])
            yield lo, decode_segment(lo, cur.value())
            ok = cur.prev() if reverse else cur.next()

    def versions(self, fid: int) -> list[tuple[int, int, int]]:
        """[(seq, hlc, base_seq)] of ``fid``, oldest first."""
        return [(s, h, b) for s, h, b, _ in self.tail(fid, 0)]

    def tail(self, fid: int, since_ns: int) -> list[tuple[int, int, int, int]]:
        """[(seq, hlc, base_seq, wake)] of ``fid``'s versions from the newest back
        to the first one older than ``since_ns`` (included: the version before
        a changed one is asked about too), oldest first.  Reads only the
        segments holding those."""
        out = []
        for _, vs in self._segments(fid, reverse=True):
            for seq, hlc, base, wake in reversed(vs):
                out.append((seq, hlc, base, wake))
                if hlc_to_ns(hlc) < since_ns:
                    out.reverse()
                    return out
        out.reverse()
        return out

    def _find(self, fid: int, seq: int) -> list[int] | None:
        seg = _segment_at(self._txn.cursor(db=self._db), fid, seq)
        if seg is None:
            return None
        return next((v for v in seg[1] if v[0] == seq), None)

    def version_hlc(self, fid: int, seq: int) -> int | None:
        v = self._find(fid, seq)
        return None if v is None else v[1]

    def is_first(self, fid: int, seq: int) -> bool:
        """Is ``seq`` the oldest version of ``fid`` in the state?"""
        for _, vs in self._segments(fid):
            return bool(vs) and vs[0][0] == seq
        return False

    def set_version_wake(self, fid: int, seq: int, hlc: int, base: int, old: int, ns: int) -> None:
        """Version ``seq`` may next be decided otherwise at ``ns`` (0: never)."""
        ns = self._rewake(fid, seq, old, ns)
        if ns is not None:
            self._put_version(fid, [seq, hlc, base, ns])

    def _rewake(self, fid: int, seq: int, old: int, ns: int) -> int | None:
        """Move version ``seq``'s ``x`` entry from wake ``old`` to ``ns`` (clamped;
        0: never). -> the new wake, or None when it is unchanged."""
        ns = min(max(ns, 0), NEVER)
        if ns == NEVER:
            ns = 0
        if ns == old:
            return None
        if old:
            self._txn.delete(_xkey(old, fid, seq), db=self._db)
        if ns:
            self._txn.put(_xkey(ns, fid, seq), b"", db=self._db)
        return ns

    def set_wakes(self, fid: int, wakes: list[tuple[int, int, int, int, int]]) -> None:
        """:meth:`set_version_wake` of each (seq, hlc, base, old, ns) of ``fid``,
        each segment rewritten once (a pass sets the wake of every version
        it read and kept)."""
        changed: dict[int, int] = {}
        for seq, hlc, base, old, ns in wakes:
            ns = self._rewake(fid, seq, old, ns)
            if ns is not None:
                changed[seq] = ns
        if not changed:
            return
        todo, low = dict(changed), min(changed)
        out = []
        for lo, vs in self._segments(fid, reverse=True):
            hit = False
            for v in vs:
                ns = todo.pop(v[0], None)
                if ns is not None:
                    v[3], hit = ns, True
            if hit:
                out.append((lo, vs))
            if not todo or lo <= low:
                break
        self._tails.pop(fid, None)
        for lo, vs in out:
            self._txn.put(_vkey(fid, lo), encode_segment(lo, vs), db=self._db)
        for seq, hlc, base, old, ns in wakes:  # not in the state: put back, as set_version_wake does
            if seq in todo:
                self._put_version(fid, [seq, hlc, base, todo.pop(seq)])

    def _put_version(self, fid: int, v: list[int]) -> None:
        seg = _segment_at(self._txn.cursor(db=self._db), fid, v[0])
        lo, vs = seg if seg is not None else (v[0], [])
        self._put_segment(fid, lo, sorted([x for x in vs if x[0] != v[0]] + [v]))

    def files(self) -> list[int]:
        """Every file id with a version in the state."""
        out = []
        cur = self._txn.cursor(db=self._db)
        ok = cur.set_range(b"v")
        while ok:
            k = cur.key()
            if k[:1] != b"v":
                break
            fid = S.from_u64(k[1:9])
            out.append(fid)
            ok = cur.set_range(b"v" + S.u64(fid + 1)) if fid + 1 < NEVER else False
        return out

    def _previous(self, fid: int, seq: int) -> int:
        """The seq of ``fid``'s version before ``seq`` in the state (0: none)."""
        cur = self._txn.cursor(db=self._db)
        seg = _segment_at(cur, fid, seq)
        while seg is not None:
            lo, vs = seg
            p = max((v[0] for v in vs if v[0] < seq), default=0)
            if p or not lo:
                return p
            seg = _segment_at(cur, fid, lo - 1)
        return 0

    def _next(self, fid: int, seq: int) -> list[int] | None:
        """``fid``'s first version after ``seq`` in the state."""
        cur = self._txn.cursor(db=self._db)
        pre = b"v" + S.u64(fid)
        seg = _segment_at(cur, fid, seq)
        if seg is not None:
            v = next((v for v in seg[1] if v[0] > seq), None)
            if v is not None:
                return v
            ok = cur.next()  # _segment_at left the cursor on seg's key
        else:
            ok = cur.set_range(pre)
        while ok and cur.key()[:9] == pre:
            lo = S.from_u64(cur.key()[9:17])
            v = next((v for v in decode_segment(lo, cur.value()) if v[0] > seq), None)
            if v is not None:
                return v
            ok = cur.next()
        return None

    def children(self, fid: int, seq: int) -> list[tuple[int, int]]:
        """(file id, seq) of the versions in the state whose base is version
        ``seq`` of file ``fid``: the file's next version if its base is
        ``seq``, and those with a ``c`` entry under ``seq``."""
        out = []
        nxt = self._next(fid, seq)
        if nxt is not None and nxt[2] == seq:
            out.append((fid, nxt[0]))
        cur = self._txn.cursor(db=self._db)
        pre = b"c" + S.u64(seq)
        if cur.set_range(pre):
            for k, v in cur.iternext():
                if k[:9] != pre:
                    break
                out.append((S.from_u64(v), S.from_u64(k[9:17])))
        return out

    def has_checkpoint(self, seq: int) -> bool:
        return self._txn.get(S.checkpoint_key(seq), db=self.reader.dbs[S.DB_CHECKPOINTS]) is not None

    # --- wake-ups ---------------------------------------------------------------------
    def due(self, now_ns: int) -> list[tuple[int, int, int]]:
        """(wake, file id, seq) of the versions whose wake-up time is ``now_ns`` or earlier."""
        out = []
        cur = self._txn.cursor(db=self._db)
        if cur.set_range(b"x"):
            for k in cur.iternext(values=False):
                if k[:1] != b"x" or S.from_u64(k[1:9]) > now_ns:
                    break
                out.append((S.from_u64(k[1:9]), S.from_u64(k[9:17]), S.from_u64(k[17:25])))
        return out


REBUILD_BATCH = 20_000  # versions written per transaction while rebuilding


class PlanStore:
    """The planning state of one writing journal (``Journal.planning()``)."""

    def __init__(self, storage) -> None:
        self._st = storage

    @contextmanager
    def update(self) -> Iterator[PlanTxn]:
        """A write transaction over the planning state."""
        with self._st.write() as txn:
            yield PlanTxn(self._st, txn)

    def invalidate(self) -> None:
        """Forget the state: the next plan rebuilds it."""
        with self._st.write() as txn:
            txn.delete(META, db=self._st.dbs[S.DB_PLAN])

    def rebuild(self) -> bool:
        """Rebuild the state from the records: one scan in a read snapshot,
        written in transactions of REBUILD_BATCH versions (the mount's writer
        interleaves), valid once the last one sets ``M``.  The result has no
        planner fields, so the next plan examines every file.  -> False when a
        prune ran meanwhile (then try again later)."""
        with self._st.read() as txn:
            r = Reader(self._st, txn)
            head = r.head_seq()
            counter = r.meta(S.META_PRUNED_VERSIONS, 0)
            pruned = r.pruned_seqs()
            entries = []
            for seq, v in r.raw_records():
                if seq in pruned:
                    continue
                rec = decode_record(v, seq, lists=False)  # no edit: a 4 GiB file's is ~27 MiB decoded
                if rec.is_content:
                    entries.append((rec.file_id, seq, rec.hlc, rec.base_seq or 0))
        del pruned
        with self.update() as p:
            p.clear()
        files = 0
        entries.sort()  # by file, then seq: each file's segments written whole
        for b in range(0, len(entries), REBUILD_BATCH):
            with self.update() as p:
                files += p.add_file_versions(entries[b : b + REBUILD_BATCH])
        with self.update() as p:
            if p.pruned_counter() != counter:
                p.clear()
                return False
            p.set_meta({"layout": LAYOUT, "upto": head, "pruned": counter, "versions": len(entries),
                        "files": files})
        return True


def forget(txn, dbs, rec) -> None:
    """Drop pruned content version ``rec`` from the state (in the pruning transaction)."""
    db = dbs.get(S.DB_PLAN)
    if db is None:
        return
    seg = _segment_at(txn.cursor(db=db), rec.file_id, rec.seq)
    if seg is not None:
        lo, vs = seg
        gone = [v for v in vs if v[0] == rec.seq]
        if gone:
            if gone[0][3]:
                txn.delete(_xkey(gone[0][3], rec.file_id, rec.seq), db=db)
            vs = [v for v in vs if v[0] != rec.seq]
            if vs:
                txn.put(_vkey(rec.file_id, lo), encode_segment(lo, vs), db=db)
            else:
                txn.delete(_vkey(rec.file_id, lo), db=db)
    if rec.base_seq:
        txn.delete(_ckey(rec.base_seq, rec.seq), db=db)
    pre = b"c" + S.u64(rec.seq)
    cur = txn.cursor(db=db)
    if cur.set_range(pre):
        while cur.key()[:9] == pre:
            if not cur.delete():
                break


def bump_pruned(txn, dbs, n: int) -> None:
    """The state's ``pruned`` follows the journal's counter (same transaction)."""
    db = dbs.get(S.DB_PLAN)
    if not n or db is None:
        return
    v = txn.get(META, db=db)
    if v is None:
        return
    m = msgpack.unpackb(v, raw=False)
    m["pruned"] = m.get("pruned", 0) + n
    m["versions"] = max(0, m.get("versions", 0) - n)
    txn.put(META, _packb(m), db=db)
