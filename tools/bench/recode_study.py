"""What re-coding chunk values at compaction would store (issue 20, tenth session).

    .venv/bin/python -m tools.bench.recode_study JOURNAL [--prefix P] [--levels 9,19] [--json FILE]

Reads a (compacted) journal read-only, e.g. one ``history_size --keep`` left,
and for every live chunk computes what other codings would store, without
writing anything.  Chunk values are coded once, at capture, against what the
capture found then, under a CPU budget and a depth budget; ``git gc
--aggressive`` re-codes every object with a wide window.  Candidates per
chunk, taken from the version of its path where it first appears (``k``) and
the one before (``k - 1``):

- ``stored``: what the journal holds now;
- ``same bases, level L``: the stored value's own bases, zstd level L;
- ``same offset, level L``: one base, the chunk of version k - 1 overlapping
  its offset most;
- ``same offset + 3 found, level L``: that base plus up to three other chunks
  of version k - 1 sharing the most anchored windows with it
  (``chunking.MultiBase`` over the *whole* previous version, not only the
  capture's changed blocks), depth ignored;
- ``best``: per chunk the smallest of all above (and the stored value).

Depth is reported for ``best`` as the depth the chosen bases would give if
every chunk took its choice (a lower bound on what a depth budget lets
through is the same table restricted to chunks whose new depth stays <= 128).
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from collections import defaultdict

from tools.bench.targets import ROOT

sys.path.insert(0, ROOT)

from deltafs import chunking as C  # noqa: E402
from deltafs.journal import Journal  # noqa: E402
from deltafs.journal import schema as S  # noqa: E402


def windows(rw: bytes, a: bytes):
    """The MULTI_BASE_WINDOW-byte windows of ``rw`` starting at anchor byte ``a``
    (at least MULTI_BASE_PROBE apart; runs of one byte skipped), as MultiBase takes them."""
    W, GAP = C.MULTI_BASE_WINDOW, C.MULTI_BASE_PROBE
    end = len(rw) - W
    q = rw.find(a)
    while 0 <= q <= end:
        w = rw[q:q + W]
        if w.count(w[:1]) != W:
            yield w
        q = rw.find(a, q + GAP)


def same_offset_base(pv, off: int, n: int, cid: bytes) -> bytes | None:
    """The chunk of the previous version ``pv`` (its list, its offsets) that
    overlaps ``[off, off + n)`` most, other than ``cid`` itself; None without one."""
    if pv is None:
        return None
    lst, offs = pv
    i = bisect.bisect_right(offs, off) - 1
    best_ov, so = 0, None
    for jj in range(max(i, 0), min(i + 3, len(lst))):
        c2, n2 = lst[jj]
        ov = min(offs[jj] + n2, off + n) - max(offs[jj], off)
        if ov > best_ov and c2 != cid:
            best_ov, so = ov, c2
    return so


def _size(raw: bytes, dict_raw: bytes | None, level: int) -> int:
    """Bytes of a value: header + codec byte + body (as compress_chunk would pick, delta forced when it wins)."""
    import zstandard
    p = C._params(level)
    plain = len(zstandard.ZstdCompressor(compression_params=p).compress(raw)) + 1
    best = min(plain, len(raw) + 1)
    if dict_raw:
        d = zstandard.ZstdCompressionDict(dict_raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        best = min(best, len(zstandard.ZstdCompressor(compression_params=p, dict_data=d).compress(raw)) + 1)
    return best


def header(n_bases: int) -> int:
    return 6 + (0 if n_bases == 0 else 16 if n_bases == 1 else 1 + 16 * n_bases)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("journal")
    p.add_argument("--prefix", default="", help="only versions of paths starting with this")
    p.add_argument("--levels", default="9,19")
    p.add_argument("--json")
    p.add_argument("--limit", type=int, default=0, help="study only the first N chunks (quick look)")
    p.add_argument("--every", type=int, default=1, help="study every Nth chunk (sizes scaled back up)")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    t0 = time.perf_counter()
    with Journal.open(a.journal, readonly=True) as j, j.reader() as r:
        cache = C.RawCache(1 << 40)
        by_path: dict[bytes, list[int]] = defaultdict(list)
        for rec in r.records():
            if rec.is_content and not r.is_pruned(rec.seq) and rec.path.startswith(a.prefix.encode()):
                by_path[rec.path].append(rec.seq)
        first: dict[bytes, tuple[bytes, int, int]] = {}  # cid -> (path, k, offset)
        lists: dict[tuple[bytes, int], tuple[list, list[int]]] = {}
        for path, seqs in by_path.items():
            for k, s in enumerate(seqs):
                lst = r.chunk_list(s)
                offs, o = [], 0
                for cid, n in lst:
                    offs.append(o)
                    o += n
                lists[(path, k)] = (lst, offs)
                for cid, o in zip((c for c, _ in lst), offs):
                    first.setdefault(cid, (path, k, o))
        info = {cid: r.chunk_info(cid) for cid in first}
        info = {c: i for c, i in info.items() if i is not None}
        raw = {}
        for cid in info:
            raw[cid] = r.read_chunk(cid, cache)
        t_read = time.perf_counter() - t0
        totals: dict[str, int] = defaultdict(int)
        depth_hist: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        mb_cache: dict[tuple[bytes, int], C.MultiBase] = {}
        choice: dict[bytes, tuple[int, tuple[bytes, ...]]] = {}
        n = 0
        t1 = time.perf_counter()
        for ci, (cid, inf) in enumerate(info.items()):
            if a.limit and n >= a.limit:
                break
            if ci % a.every:
                continue
            n += 1
            rw = raw[cid]
            path, k, off = first[cid]
            cands: dict[str, tuple[int, tuple[bytes, ...]]] = {"stored": (inf.stored_len, inf.bases)}
            for L in levels:
                d = b"".join(raw[b] for b in inf.bases) if inf.bases else None
                cands[f"same bases, level {L}"] = (header(len(inf.bases)) + _size(rw, d, L), inf.bases)
            so = None
            if k > 0:
                lst, offs = lists[(path, k - 1)]
                i = bisect.bisect_right(offs, off) - 1
                best_ov = 0
                for jj in range(max(i, 0), min(i + 3, len(lst))):
                    c2, n2 = lst[jj]
                    ov = min(offs[jj] + n2, off + len(rw)) - max(offs[jj], off)
                    if ov > best_ov and c2 != cid and c2 in raw:
                        best_ov, so = ov, c2
            if so is not None:
                for L in levels:
                    cands[f"same offset, level {L}"] = (header(1) + _size(rw, raw[so], L), (so,))
                mb = mb_cache.get((path, k - 1))
                if mb is None:
                    lst, _ = lists[(path, k - 1)]
                    seen, olds = set(), []
                    for c2, _ in lst:
                        if c2 not in seen and c2 in raw:
                            seen.add(c2)
                            olds.append(C.Base(c2, raw[c2], 0))
                    mb = mb_cache[(path, k - 1)] = C.MultiBase(olds)
                    if len(mb_cache) > 4:
                        mb_cache.pop(next(iter(mb_cache)))
                extra = [b.id for b in mb.find(rw, C.Base(so, raw[so], 0), cid)]
                if extra:
                    bases = (*extra, so)
                    d = b"".join(raw[b] for b in bases)
                    for L in levels:
                        cands[f"same offset + 3 found, level {L}"] = (header(len(bases)) + _size(rw, d, L), bases)
            for name, (sz, _) in cands.items():
                totals[name] += sz
            for name in ("same offset", "same offset + 3 found"):
                for L in levels:
                    if f"{name}, level {L}" not in cands:
                        totals[f"{name}, level {L}"] += cands["stored"][0]  # no candidate: keep
            bname = min(cands, key=lambda x: cands[x][0])
            totals["best"] += cands[bname][0]
            totals[f"best is: {bname.split(',')[0]}"] += 1
            choice[cid] = cands[bname][1] if cands[bname][0] < inf.stored_len else inf.bases
            depth_hist["stored"][inf.depth] += 1
        t_code = time.perf_counter() - t1

        # depths if every chunk took its choice (others keep their stored bases)
        memo: dict[bytes, int] = {}

        def depth(c: bytes, stack=()) -> int:
            if c in memo:
                return memo[c]
            if c in stack or len(stack) > 5000:
                return 10 ** 6  # a loop (a choice naming a newer chunk that names it)
            bs = choice.get(c, info[c].bases if c in info else ())
            d = sum(depth(b, stack + (c,)) + 1 for b in bs)
            memo[c] = d
            return d
        sys.setrecursionlimit(100000)
        over = 0
        over_bytes = 0
        for cid in choice:
            d = depth(cid)
            depth_hist["best"][min(d, 10 ** 6)] += 1
            if d > 128:
                over += 1
        out = {"chunks": n, "totals": dict(totals), "read_s": round(t_read, 1), "code_s": round(t_code, 1),
               "best_over_depth_128": over, "raw_bytes": sum(len(raw[c]) for c in choice),
               "depth_stored": _hist(depth_hist["stored"]), "depth_best": _hist(depth_hist["best"])}
    st = out["totals"]["stored"]
    for name, v in sorted(out["totals"].items()):
        if name.startswith("best is"):
            print(f"{name:45s} {v}")
        else:
            print(f"{name:45s} {v / 2**20:9.2f} MiB  {v / st:6.3f}x stored")
    print(f"chunks {n}, raw {out['raw_bytes'] / 2**20:.1f} MiB, read {t_read:.1f} s, coding {t_code:.1f} s; "
          f"best over depth 128: {over}")
    print("depth stored:", out["depth_stored"])
    print("depth best:  ", out["depth_best"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _hist(h: dict[int, int]) -> dict[str, int]:
    buckets = [0, 1, 2, 4, 8, 16, 32, 64, 128, 129, 10 ** 6, 10 ** 9]
    out: dict[str, int] = defaultdict(int)
    for d, c in h.items():
        i = bisect.bisect_right(buckets, d) - 1
        out[f">={buckets[i]}"] += c
    return dict(out)




# --- greedy re-coding under the depth rule ------------------------------------------------

def greedy(journal: str, prefix: str, extra_budget: int, level: int, every_version: int = 1,
           shallow: bool = True, min_gain: int = 16,
           global_index: bool = False, no_deeper: bool = False, leaf_ok: bool = False) -> dict:
    """Re-code every live chunk in the order it first appears, each taking the
    smallest of its candidates whose depth (sum of (base depth + 1), with the
    bases' depths as re-coded before it) stays <= 128; the stored value
    competes too, at its bases' new depths (and must then fit as well, or the
    chunk falls back to the smallest candidate that fits, standalone at worst).
    Extra bases (beyond the same-offset one) get at most ``extra_budget`` of
    depth together."""
    import zstandard  # noqa: F401
    MAX = C.MAX_DELTA_DEPTH
    t0 = time.perf_counter()
    with Journal.open(journal, readonly=True) as j, j.reader() as r:
        cache = C.RawCache(1 << 40)
        vers = []  # (seq, path)
        for rec in r.records():
            if rec.is_content and not r.is_pruned(rec.seq) and rec.path.startswith(prefix.encode()):
                vers.append((rec.seq, rec.path))
        prev_list: dict[bytes, tuple[list, list[int]]] = {}
        order = []  # (cid, path, prev (list, offs) or None, offset)
        seen = set()
        for seq, path in vers:
            lst = r.chunk_list(seq)
            offs, o = [], 0
            for cid, n in lst:
                offs.append(o)
                o += n
            pv = prev_list.get(path)
            for cid, o in zip((c for c, _ in lst), offs):
                if cid not in seen:
                    seen.add(cid)
                    order.append((cid, path, pv, o))
            prev_list[path] = (lst, offs)
        info = {cid: r.chunk_info(cid) for cid, *_ in order}
        raw = {cid: r.read_chunk(cid, cache) for cid in info if info[cid] is not None}
        cur: dict[bytes, int] = {}
        has_dep = {b for i in info.values() if i is not None for b in i.bases}

        def dep(b: bytes) -> int:
            if b in cur:
                return cur[b]
            return r.chunk_info(b).depth  # not in any version: keeps its value

        def rawof(b: bytes) -> bytes:
            if b not in raw:
                raw[b] = r.read_chunk(b, cache)
            return raw[b]

        # windows -> first chunk holding it, per path
        gidx: dict[bytes, dict[bytes, bytes]] = defaultdict(dict)
        anchor: dict[bytes, bytes] = {}
        totals = defaultdict(int)
        stored_total = 0
        mbk: dict[int, C.MultiBase] = {}
        for cid, path, pv, off in order:
            inf = info[cid]
            if inf is None:
                continue
            rw = raw[cid]
            stored_total += inf.stored_len
            cands = []  # (size, bases, name)
            d_st = sum(dep(b) + 1 for b in inf.bases)
            cands.append((inf.stored_len, inf.bases, "stored"))
            cands.append((header(0) + _size(rw, None, level), (), "standalone"))
            so = same_offset_base(pv, off, len(rw), cid)
            if so is not None and dep(so) + 1 <= MAX:
                so_raw = rawof(so)
                s1 = header(1) + _size(rw, so_raw, level)
                cands.append((s1, (so,), "same offset"))
                budget = min(MAX - (dep(so) + 1), extra_budget)
                if s1 * C.MULTI_BASE_WORSE > len(rw) and budget > 0:
                    # extras from the previous version (whole), depth-limited
                    key = id(pv)
                    mb = mbk.get(key)
                    if mb is None:
                        u, olds = set(), []
                        for c2, _ in pv[0]:
                            if c2 not in u:
                                u.add(c2)
                                olds.append(C.Base(c2, rawof(c2), dep(c2)))
                        mbk.clear()
                        mb = mbk[key] = C.MultiBase(olds)
                    save = C.MULTI_BASE_EXTRA_DEPTH
                    C.MULTI_BASE_EXTRA_DEPTH = extra_budget
                    try:
                        ex = [b.id for b in mb.find(rw, C.Base(so, so_raw, dep(so)), cid)]
                    finally:
                        C.MULTI_BASE_EXTRA_DEPTH = save
                    if ex:
                        bs = (*ex, so)
                        cands.append((header(len(bs)) + _size(rw, b"".join(rawof(b) for b in bs), level), bs,
                                      "prev version + found"))
            if shallow and (so is None or cands[-1][0] * C.MULTI_BASE_WORSE > len(rw)):
                ipath = b"" if global_index else path
                a = anchor.get(ipath)
                if a is not None:
                    hits: dict[bytes, int] = {}
                    g = gidx[ipath]
                    for w in windows(rw, a):
                        c2 = g.get(w)
                        if c2 is not None and c2 != cid and c2 != so:
                            hits[c2] = hits.get(c2, 0) + 1
                    own = (so,) if so is not None and dep(so) + 1 <= MAX else ()
                    bud = min(MAX - sum(dep(b) + 1 for b in own), extra_budget if own else MAX)
                    ex2 = []
                    for c2, nh in sorted(hits.items(), key=lambda x: -x[1]):
                        if nh < 2 or dep(c2) + 1 > bud:
                            continue
                        ex2.append(c2)
                        bud -= dep(c2) + 1
                        if len(ex2) == 4 - len(own):
                            break
                    if ex2:
                        bs = (*ex2, *own)
                        cands.append((header(len(bs)) + _size(rw, b"".join(rawof(b) for b in bs), level),
                                      bs, "shallow found" if own else "found (no own base)"))
            cap = MAX
            if no_deeper and not (leaf_ok and cid not in has_dep):
                cap = min(MAX, inf.depth)
            fit = [c for c in cands if sum(dep(b) + 1 for b in c[1]) <= cap] or [cands[1]]
            best = min(fit, key=lambda c: c[0])
            if best[2] != "stored" and best[0] + min_gain > inf.stored_len and d_st <= MAX:
                best = cands[0]
            totals[best[2]] += 1
            totals["bytes " + best[2]] += best[0]
            totals["saved " + best[2]] += inf.stored_len - best[0]
            cur[cid] = sum(dep(b) + 1 for b in best[1])
            # index this chunk's windows (first holder wins: older, usually shallower)
            if shallow:
                ipath = b"" if global_index else path
                if ipath not in anchor:
                    mb0 = C.MultiBase([C.Base(cid, rw, 0)])
                    mb0._build()
                    anchor[ipath] = mb0.anchor
                g = gidx[ipath]
                for w in windows(rw, anchor[ipath]):
                    g.setdefault(w, cid)
            totals["total"] += best[0]
        hist = defaultdict(int)
        for d in cur.values():
            hist[d // 16 * 16] += 1
    return {"extra_budget": extra_budget, "level": level, "stored": stored_total, "recoded": totals["total"],
            "ratio": round(totals["total"] / stored_total, 4), "choices": dict(totals),
            "depth_by_16": dict(sorted(hist.items())), "s": round(time.perf_counter() - t0, 1)}


def main_greedy(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("journal")
    p.add_argument("--prefix", default="")
    p.add_argument("--budgets", default="16,32,64")
    p.add_argument("--level", type=int, default=9)
    p.add_argument("--no-shallow", action="store_true")
    p.add_argument("--global-index", action="store_true")
    p.add_argument("--no-deeper", action="store_true")
    p.add_argument("--leaf-ok", action="store_true")
    a = p.parse_args(argv)
    for b in a.budgets.split(","):
        out = greedy(a.journal, a.prefix, int(b), a.level, shallow=not a.no_shallow, global_index=a.global_index,
                     no_deeper=a.no_deeper, leaf_ok=a.leaf_ok)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_greedy(sys.argv[2:]) if sys.argv[1:2] == ["greedy"] else main())
