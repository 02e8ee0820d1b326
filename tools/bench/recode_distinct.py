"""Re-coding under a depth that counts DISTINCT values (issue 20, fourteenth session).

    .venv/bin/python -m tools.bench.recode_distinct JOURNAL [--prefix P] [--level 9] [--json FILE]
        [--cands FILE] [--global-index]
    .venv/bin/python -m tools.bench.recode_distinct probe [N]     # today's reader on a small-closure, big-sum value
    .venv/bin/python -m tools.bench.recode_distinct walk JOURNAL  # cost of computing closures from headers

Reads a (compacted) journal read-only, e.g. one ``history_size --keep`` left,
and writes nothing.  Today a value's depth is the SUM over its bases of (base
depth + 1), <= 128 (docs/format.md, "Depth and the decoding bound"), so chains
of multi-base values grow geometrically.  The study asks what a rule that
bounds the number of DISTINCT values in a value's closure (every ancestor
once: what a reader that keeps what it decoded during one read decompresses)
would let through.

Candidates are computed once per live chunk, in the order chunks first appear
(as ``recode_study.greedy``): the stored value; standalone; one base, the
previous version's chunk at the same offset; one base, the chunk at the same
offset 2, 4, 8 or 16 versions back (a shallower fallback); the first plus 1, 2 or 3 chunks
of the whole previous version sharing the most anchored windows with it
(``chunking.MultiBase``, depth ignored; each prefix of the list is a
candidate); when those stay poor, 1-4 earlier chunks of the same path found
by a window index (of any path with ``--global-index``; plus the same-offset base when there is one), again every
prefix.  All deltas at zstd level ``--level``.  Then, for every rule, a greedy
assignment: each chunk takes the smallest candidate that fits the rule given
the codings chosen before it (standalone always fits); a new coding must save
16 bytes over the stored value, else the stored value stays when it fits.

Rules: ``sum B, extras <= E`` (today's: sum of (base depth + 1) <= B, the
bases other than the same-offset one together <= E) and ``distinct B``
(|closure| <= B, closure = the union of the bases' closures plus the bases).
A plain greedy deepens early chunks to the bound and pushes the stored values
above them out, so two variants keep room: a new coding stays <= B - reserve,
or ("no deeper") within the chunk's metric under the stored values.
For each: chunk value bytes as a share of stored, the closure sizes and the
sum depths, and what a cold read of every version decompresses: with no memo
(today's ``Reader.iter_content``: every chunk its whole tree, sum depth + 1),
with a memo per chunk (1 + closure) and with a memo per version read (the
union of the version's chunks' closures, each chunk once).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import pickle
import sys
import time
from collections import defaultdict

from tools.bench.targets import ROOT

sys.path.insert(0, ROOT)

from deltafs import chunking as C  # noqa: E402
from deltafs.journal import Journal  # noqa: E402

from tools.bench.recode_study import _size, header, same_offset_base, windows  # noqa: E402

MIN_GAIN = 16
OLDER = (2, 4, 8, 16)  # same-offset fallbacks this many versions back


def candidates(journal: str, prefix: str, level: int, log=print, global_index: bool = False) -> dict:
    """-> {"order": [cid...], "stored": {cid: (stored_len, bases)}, "cands": {cid: [(size, bases, name, has_own)]},
    "versions": [[cid...] per live content version], "unlisted": {cid: bases} for bases outside every version}."""
    t0 = time.perf_counter()
    with Journal.open(journal, readonly=True) as j, j.reader() as r:
        cache = C.RawCache(1 << 40)
        vers = []
        for rec in r.records():
            if rec.is_content and not r.is_pruned(rec.seq) and rec.path.startswith(prefix.encode()):
                vers.append((rec.seq, rec.path))
        prev_list: dict[bytes, tuple[list, list[int]]] = {}
        older: dict[bytes, list] = defaultdict(list)  # path -> every (list, offs) so far
        order = []  # (cid, path, prev (list, offs) or None, offset, [(list, offs) of versions k-2, k-4, ...])
        seen: set[bytes] = set()
        versions = []
        for seq, path in vers:
            lst = r.chunk_list(seq)
            offs, o = [], 0
            for cid, n in lst:
                offs.append(o)
                o += n
            pv = prev_list.get(path)
            versions.append([c for c, _ in lst])
            ol = older[path]
            back = [ol[-m] for m in OLDER if m <= len(ol)]
            for cid, o in zip((c for c, _ in lst), offs):
                if cid not in seen:
                    seen.add(cid)
                    order.append((cid, path, pv, o, back))
            prev_list[path] = (lst, offs)
            ol.append((lst, offs))
        info = {cid: r.chunk_info(cid) for cid, *_ in order}
        raw = {cid: r.read_chunk(cid, cache) for cid in info if info[cid] is not None}
        # bases that are in no live version (their values stay as they are)
        unlisted: dict[bytes, tuple[bytes, ...]] = {}
        todo = [b for i in info.values() if i is not None for b in i.bases if b not in info]
        while todo:
            b = todo.pop()
            if b in unlisted or b in info:
                continue
            bi = r.chunk_info(b)
            unlisted[b] = tuple(bi.bases) if bi is not None else ()
            todo.extend(bi.bases if bi is not None else ())
        log(f"read {len(order)} chunks, {sum(map(len, raw.values())) / 2**20:.1f} MiB raw, "
            f"{len(unlisted)} bases outside the versions, {time.perf_counter() - t0:.1f} s")

        def rawof(b: bytes) -> bytes:
            if b not in raw:
                raw[b] = r.read_chunk(b, cache)
            return raw[b]

        gidx: dict[bytes, dict[bytes, bytes]] = defaultdict(dict)
        anchor: dict[bytes, bytes] = {}


        def sz(rw: bytes, bases: tuple) -> int:
            return header(len(bases)) + _size(rw, b"".join(rawof(b) for b in bases) if bases else None, level)

        cands: dict[bytes, list] = {}
        stored: dict[bytes, tuple[int, tuple]] = {}
        mbk: dict[int, C.MultiBase] = {}
        t1 = time.perf_counter()
        save = C.MULTI_BASE_EXTRA_DEPTH
        C.MULTI_BASE_EXTRA_DEPTH = 10 ** 9  # depth ignored here: the rules choose later
        try:
            for ci, (cid, path, pv, off, back) in enumerate(order):
                inf = info[cid]
                if inf is None:
                    continue
                if ci % 2000 == 0 and ci:
                    log(f"  {ci} chunks coded, {time.perf_counter() - t1:.0f} s")
                rw = raw[cid]
                stored[cid] = (inf.stored_len, tuple(inf.bases))
                ipath = b"" if global_index else path
                cs = [(inf.stored_len, tuple(inf.bases), "stored", False),
                      (sz(rw, ()), (), "standalone", False)]
                so = same_offset_base(pv, off, len(rw), cid)
                # a shallower fallback: the chunk at the same offset 2, 4, 8 or 16 versions back
                for m, (lst, offs) in zip(OLDER, back):
                    i = bisect.bisect_right(offs, off) - 1
                    if 0 <= i < len(lst) and lst[i][0] != cid and lst[i][0] != so:
                        cs.append((sz(rw, (lst[i][0],)), (lst[i][0],), f"same offset {m} back", True))
                last = None
                if so is not None:
                    so_raw = rawof(so)
                    last = sz(rw, (so,))
                    cs.append((last, (so,), "same offset", True))
                    if last * C.MULTI_BASE_WORSE > len(rw):
                        key = id(pv)
                        mb = mbk.get(key)
                        if mb is None:
                            u, olds = set(), []
                            for c2, _ in pv[0]:
                                if c2 not in u:
                                    u.add(c2)
                                    olds.append(C.Base(c2, rawof(c2), 0))
                            mbk.clear()
                            mb = mbk[key] = C.MultiBase(olds)
                        ex = [b.id for b in mb.find(rw, C.Base(so, so_raw, 0), cid)]
                        for k in range(1, len(ex) + 1):
                            bs = (*ex[:k], so)
                            last = sz(rw, bs)
                            cs.append((last, bs, f"prev version + {k} found", True))
                if so is None or min(c[0] for c in cs[2:]) * C.MULTI_BASE_WORSE > len(rw):
                    a = anchor.get(ipath)
                    if a is not None:
                        hits: dict[bytes, int] = {}
                        g = gidx[ipath]
                        for w in windows(rw, a):
                            c2 = g.get(w)
                            if c2 is not None and c2 != cid and c2 != so:
                                hits[c2] = hits.get(c2, 0) + 1
                        own = (so,) if so is not None else ()
                        ex2 = [c2 for c2, nh in sorted(hits.items(), key=lambda x: -x[1]) if nh >= 2]
                        ex2 = ex2[:C.MULTI_BASE_MAX - len(own)]
                        for k in range(1, len(ex2) + 1):
                            bs = (*ex2[:k], *own)
                            cs.append((sz(rw, bs), bs, f"found {k}" + (" + own" if own else ""), bool(own)))
                cands[cid] = cs
                if ipath not in anchor:
                    mb0 = C.MultiBase([C.Base(cid, rw, 0)])
                    mb0._build()
                    anchor[ipath] = mb0.anchor
                g = gidx[ipath]
                for w in windows(rw, anchor[ipath]):
                    g.setdefault(w, cid)
        finally:
            C.MULTI_BASE_EXTRA_DEPTH = save
        log(f"coded in {time.perf_counter() - t1:.1f} s")
    return {"order": [o[0] for o in order if o[0] in cands], "stored": stored, "cands": cands,
            "versions": versions, "unlisted": unlisted}


def assign(cd: dict, rule: str, bound: int, extras: int | None = None, reserve: int = 0) -> dict:
    """Greedy assignment under ``rule`` ("sum" or "distinct", or "stored": every chunk keeps its value).
    ``reserve``: a new coding (not the stored value) must stay that far under ``bound``, so the stored
    values built on the chunk keep room (a greedy that deepens early chunks to the bound pushes the
    values above them to standalone)."""
    idx: dict[bytes, int] = {}

    def ix(c: bytes) -> int:
        i = idx.get(c)
        if i is None:
            i = idx[c] = len(idx)
        return i
    dep: dict[bytes, int] = {}
    clo: dict[bytes, frozenset] = {}
    unl = cd["unlisted"]

    def udep(b: bytes) -> int:  # a value outside the versions: as stored
        if b not in dep:
            dep[b] = sum(udep(x) + 1 for x in unl.get(b, ()))
        return dep[b]

    def uclo(b: bytes) -> frozenset:
        if b not in clo:
            s = set()
            for x in unl.get(b, ()):
                s |= uclo(x)
                s.add(ix(x))
            clo[b] = frozenset(s)
        return clo[b]

    def d_of(bases) -> int:
        return sum((dep[b] if b in dep else udep(b)) + 1 for b in bases)

    def c_of(bases) -> frozenset:
        if not bases:
            return frozenset()
        if len(bases) == 1:
            b = bases[0]
            return (clo[b] if b in clo else uclo(b)) | {ix(b)}
        s = set()
        for b in bases:
            s |= clo[b] if b in clo else uclo(b)
            s.add(ix(b))
        return frozenset(s)

    cap: dict[bytes, int] = {}
    if reserve < 0:  # "no deeper": a new coding stays within the chunk's metric under the stored values
        base = assign(cd, "stored", 0)["_metric"]
        cap = base["sum" if rule == "sum" else "distinct"]
    total = 0
    picks: dict[str, int] = defaultdict(int)
    for cid in cd["order"]:
        st_len, st_bases = cd["stored"][cid]
        cs = cd["cands"][cid]
        if rule == "stored":
            best = cs[0]
        else:
            fit = []
            for c in cs:
                bs = c[1]
                lim = bound if c[2] == "stored" else cap[cid] if reserve < 0 else bound - reserve
                if rule == "sum":
                    if d_of(bs) > lim:
                        continue
                    if extras is not None and c[2] != "stored":
                        ex = bs[:-1] if c[3] else bs
                        if len(bs) > 1 and d_of(ex) > extras:
                            continue
                else:
                    if len(c_of(bs)) > lim:
                        continue
                fit.append(c)
            best = min(fit, key=lambda c: c[0]) if fit else cs[1]
            if best[2] != "stored" and best[0] + MIN_GAIN > st_len and cs[0] in fit:
                best = cs[0]
        picks[best[2]] += 1
        total += best[0]
        dep[cid] = d_of(best[1])
        clo[cid] = c_of(best[1])
    stored_total = sum(v[0] for v in cd["stored"].values())
    hist_c: dict[str, int] = defaultdict(int)
    hist_d: dict[str, int] = defaultdict(int)
    buckets = [0, 1, 2, 4, 8, 16, 32, 64, 128, 129, 1024, 10 ** 6, 10 ** 9]

    def bk(v: int) -> str:
        return f">={buckets[bisect.bisect_right(buckets, v) - 1]}"
    for cid in cd["order"]:
        hist_c[bk(len(clo[cid]))] += 1
        hist_d[bk(dep[cid])] += 1
    # a cold read of every version: no memo / memo per chunk / memo per version read
    no_memo = per_chunk = per_version = 0
    max_chunk = max_version = 0
    today_read_fails = 0
    for v in cd["versions"]:
        u = set()
        nm = pc = 0
        for c in v:
            if c not in clo:  # a chunk with no info (should not happen)
                continue
            nm += dep[c] + 1
            pc += len(clo[c]) + 1
            if dep[c] > C.MAX_DELTA_DEPTH:
                today_read_fails += 1
            max_chunk = max(max_chunk, len(clo[c]) + 1)
            u |= clo[c]
            u.add(ix(c))
        no_memo += nm
        per_chunk += pc
        per_version += len(u)
        max_version = max(max_version, len(u))
    return {"rule": rule, "bound": bound, "extras": extras, "reserve": reserve, "bytes": total, "stored": stored_total,
            "share": round(total / stored_total, 4), "picks": dict(picks),
            "closure": dict(hist_c), "sum_depth": dict(hist_d), "max_closure": max(len(s) for s in
                                                                                  (clo[c] for c in cd["order"])),
            "max_sum_depth": max(dep[c] for c in cd["order"]),
            "chunk_reads_over_sum_128": today_read_fails,
            "_metric": {"sum": dict(dep), "distinct": {c: len(v) for c, v in clo.items()}},
            "cold_read": {"versions": len(cd["versions"]),
                          "chunk_refs": sum(len(v) for v in cd["versions"]),
                          "no_memo": no_memo, "memo_per_chunk": per_chunk, "memo_per_version": per_version,
                          "max_per_chunk_memo": max_chunk, "max_per_version_memo": max_version}}


RULES = [("stored", 0, None, 0)] + [(rule, b, ex, b * q // 4) for q in (0, 1, 2) for rule, b, ex in
                                     (("sum", 128, 16), ("sum", 128, None), ("distinct", 128, None),
                                      ("distinct", 64, None), ("distinct", 32, None))] + \
    [(rule, b, ex, -1) for rule, b, ex in (("sum", 128, 16), ("sum", 128, None), ("distinct", 128, None))] + \
    [("distinct", 10 ** 9, None, 0)]  # depth ignored: the candidates' floor


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("journal")
    p.add_argument("--prefix", default="")
    p.add_argument("--level", type=int, default=9)
    p.add_argument("--json")
    p.add_argument("--cands", help="pickle of the candidates: written when missing, else read (no coding)")
    p.add_argument("--global-index", action="store_true", help="find bases in earlier chunks of any path")
    a = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.cands and os.path.exists(a.cands):
        with open(a.cands, "rb") as f:
            cd = pickle.load(f)
    else:
        cd = candidates(a.journal, a.prefix, a.level, log, a.global_index)
        if a.cands:
            with open(a.cands, "wb") as f:
                pickle.dump(cd, f)
    out = []
    sys.setrecursionlimit(100000)
    for rule, bound, ex, rs in RULES:
        t = time.perf_counter()
        res = assign(cd, rule, bound, ex, rs)
        res["s"] = round(time.perf_counter() - t, 1)
        res.pop("_metric")
        out.append(res)
        cr = res["cold_read"]
        name = rule if rule == "stored" else f"{rule} {bound}" + (f", extras <= {ex}" if ex else "") + \
            (f", new <= {bound - rs}" if rs > 0 else ", new no deeper than stored" if rs < 0 else "")
        print(f"{name:26s} {res['bytes']:>11,} B  {res['share']:.3f}x stored  max closure {res['max_closure']:4d}"
              f"  max sum depth {res['max_sum_depth']:.3g}  cold read (all {cr['versions']} versions): "
              f"no memo {cr['no_memo']:.4g}, memo/chunk {cr['memo_per_chunk']:,}, "
              f"memo/version {cr['memo_per_version']:,} (chunk refs {cr['chunk_refs']:,})", flush=True)
        print(f"    closure {res['closure']}\n    sum depth {res['sum_depth']}\n    picks {res['picks']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0




# --- does today's reader read a value whose closure is small but whose sum is not? ---------------

def reader_probe(tmp: str, n: int = 60) -> dict:
    """Write a chain x0..x{n-1} of one file, x_i coded against x_{i-4..i-1}
    (4 bases), the writer's depth patched to the distinct closure (so the
    headers say <= 128 while the sum grows like tetranacci), then read the
    last version with today's reader and with a reader that keeps what it
    decoded during one read (the budget then counts distinct values)."""
    import random

    from deltafs.errors import CorruptionError
    from deltafs.journal import Change, Journal
    from deltafs.journal import core as JC
    from deltafs.journal import reader as JR
    from deltafs.journal import schema as S

    def distinct(self, txn, nc, bases):  # the writer change: |closure| from the bases' headers
        cdb = self._dbs[S.DB_CHUNKS]
        seen: set[bytes] = set()
        todo = list(bases)
        while todo:
            b = todo.pop()
            if b in seen:
                continue
            seen.add(b)
            _, pack, off, length, _ = S.decode_loc(txn.get(b, db=cdb))
            todo.extend(S.decode_chunk(self._storage.packs.read(pack, off, length))[2])
        if len(seen) > C.MAX_DELTA_DEPTH:
            raise ValueError("closure over 128")
        return len(seen)

    rnd = random.Random(7)
    words = b"alpha beta gamma delta epsilon zeta theta kappa lambda".split()
    raw = b" ".join(rnd.choice(words) + b"%d" % rnd.randrange(1000) for _ in range(3000))[:16384]
    saved = JC.Journal._stored_depth
    JC.Journal._stored_depth = distinct
    out: dict = {"n": n}
    try:
        j = Journal.open(tmp, create=True)
        try:
            bases: list = []
            sums: list[int] = []
            prev_seq = 0
            for i in range(n):
                at = rnd.randrange(0, len(raw) - 40)
                raw = raw[:at] + b"<edit %06d>" % rnd.randrange(10 ** 6) + raw[at + 13:]
                raw = raw[:16384]
                bs = bases[-4:]
                nc = C.build_chunk_multi(raw, [C.Base(b.id, b.raw, 0) for b in bs]) if len(bs) >= 2 else None
                if nc is None:
                    nc = C.build_chunk(raw, C.Base(bs[-1].id, bs[-1].raw, 0) if bs else None)
                pos = {b.id: k for k, b in enumerate(bases)}
                sums.append(sum(sums[pos[b]] + 1 for b in nc.bases))
                j.commit([Change(op="write", path=b"f", size=len(raw), edit=[(0, 1 if i else 0, [(nc.id, len(raw))])],
                                 chunks=[nc], mode=0o100644, cause="write", base_seq=prev_seq)])
                with j.reader() as r:
                    prev_seq = r.head_seq()
                bases.append(C.Base(nc.id, raw, 0))
            out["last_sum_depth"] = sums[-1]
            with j.reader() as r:
                out["last_declared_depth"] = r.chunk_info(bases[-1].id).depth
                try:
                    ok = r.read_chunk(bases[-1].id) == raw
                    out["today"] = "read back" if ok else "wrong bytes"
                except CorruptionError as e:
                    out["today"] = f"CorruptionError: {e}"
                from deltafs.journal.verify import verify
                vr = verify(r, full=True)
                out["verify_full_today"] = "ok" if vr.ok else str(vr.problem)[:200]
                # the reader change: a memo per read, every decoded value kept in it
                calls = [0]
                r_read, r_dec = JR.Reader._read, JR.Reader._decoded_n

                def _read(self, cid, cache, limit, top=False, memo=None):
                    if memo is not None and cid in memo:
                        return memo[cid], 0
                    if cache is not None:
                        got = cache.get(cid)
                        if got is not None:
                            return got, 0
                    v = self.raw_chunk(cid)
                    return _dec(self, cid, v, cache, limit, top=top, memo=memo)

                def _dec(self, cid, v, cache, limit, views=False, top=False, memo=None):
                    memo = {} if memo is None else memo
                    calls[0] += 1
                    n_ = 1
                    depth, raw_len, bs_, payload = S.decode_chunk(v)
                    parts, left = [], limit
                    for b in bs_:
                        # the budget is checked on a miss only: a base already decoded costs nothing
                        # (today's reader checks left < 1 before it looks: one more thing to change)
                        if left < 1 and b not in memo:
                            raise CorruptionError(f"over the budget: {pos[cid]} at base {pos[b]}, limit {limit}")
                        braw, used = _read(self, b, cache, left - 1, memo=memo)
                        left -= used
                        n_ += used
                        parts.append(braw)
                    got = C.decompress_chunk(payload, b"".join(parts) if parts else None)
                    if C.chunk_id(got) != cid:
                        raise CorruptionError("mismatch")
                    memo[cid] = got
                    return got, n_
                try:
                    JR.Reader._read, JR.Reader._decoded_n = _read, _dec
                    t = time.perf_counter()
                    got, used = r._read(bases[-1].id, None, C.MAX_DELTA_DEPTH, top=True)
                    out["memo"] = f"read back: {got == raw}, {used} decompressions, " \
                                  f"{(time.perf_counter() - t) * 1e3:.1f} ms"
                finally:
                    JR.Reader._read, JR.Reader._decoded_n = r_read, r_dec
        finally:
            j.close()
    finally:
        JC.Journal._stored_depth = saved
    return out


def walk_cost(journal: str) -> dict:
    """What a writer computing |closure| from value headers would pay: for
    every live chunk, walk its stored closure (each ancestor's value read and
    its header decoded once), warm page cache."""
    from deltafs.journal import schema as S
    with Journal.open(journal, readonly=True) as j, j.reader() as r:
        cids = [k for k, _ in r.txn.cursor(db=r.dbs[S.DB_CHUNKS])]
        for c in cids:  # warm
            r.raw_chunk(c)
        t = time.perf_counter()
        reads = 0
        sizes = []
        for c in cids:
            seen: set[bytes] = set()
            todo = list(S.decode_chunk(r.raw_chunk(c))[2])
            reads += 1
            while todo:
                b = todo.pop()
                if b in seen:
                    continue
                seen.add(b)
                todo.extend(S.decode_chunk(r.raw_chunk(b))[2])
                reads += 1
            sizes.append(len(seen))
        dt = time.perf_counter() - t
    sizes.sort()
    return {"values": len(cids), "header_reads": reads, "s": round(dt, 2),
            "us_per_header": round(dt / reads * 1e6, 2), "us_per_value": round(dt / len(cids) * 1e6, 1),
            "closure_p50": sizes[len(sizes) // 2], "closure_max": sizes[-1]}


if __name__ == "__main__":
    if sys.argv[1:2] == ["walk"]:
        print(json.dumps(walk_cost(sys.argv[2])))
        sys.exit(0)
    if sys.argv[1:2] == ["probe"]:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(reader_probe(d + "/j", int(sys.argv[2]) if sys.argv[2:] else 60), indent=1))
        sys.exit(0)
    sys.exit(main())
