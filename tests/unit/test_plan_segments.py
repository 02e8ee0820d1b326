"""The planning state's versions in segments (layout 4, issue 20): a file's
versions are packed up to SEGMENT_VERSIONS a value, so a version costs ~8
bytes instead of a ~38-byte LMDB entry of its own.  Every PlanTxn question
must answer as the one-entry-per-version state did: checked here against a
plain model through adds, wake changes and prunes in any order."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from deltafs.journal import Journal
from deltafs.journal import planstate as P
from deltafs.journal import schema as S


def test_segment_encoding_round_trips():
    rnd = random.Random(1)
    for _ in range(200):
        lo = rnd.randrange(1, 1 << 40)
        seq, hlc, vs = lo, rnd.randrange(1 << 60), []
        for _ in range(rnd.randrange(1, 40)):
            seq += rnd.randrange(0 if not vs else 1, 1000)
            hlc = max(0, hlc + rnd.randrange(-(1 << 30), 1 << 40))
            base = rnd.choice([0, seq - 1, rnd.randrange(1, seq), seq + rnd.randrange(1, 99)]) if seq > 1 else 0
            vs.append([seq, hlc, base, rnd.choice([0, rnd.randrange(1 << 62)])])
        assert P.decode_segment(lo, P.encode_segment(lo, vs)) == vs
    with pytest.raises(ValueError):
        P.encode_segment(5, [[7, 1, 0, 0], [7, 2, 0, 0]])


@pytest.mark.parametrize("seed", range(4))
def test_segments_answer_as_one_entry_per_version(tmp_path, seed):
    rnd = random.Random(seed)
    j = Journal.open(str(tmp_path / "j"), create=True)
    try:
        model: dict[int, dict[int, list[int]]] = {}  # fid -> seq -> [seq, hlc, base, wake]
        cents: dict[tuple[int, int], int] = {}  # (base, seq) -> fid: the c entries
        fids = [rnd.randrange(1, 1 << 62) for _ in range(3)]
        seq = 0
        with j.planning().update() as p:
            for _ in range(300):
                seq += rnd.randrange(1, 4)
                fid = rnd.choice(fids)
                mine = sorted(model.get(fid, {}))
                prev = mine[-1] if mine else 0
                every = [s for f in model.values() for s in f]
                base = rnd.choice([prev, prev, prev, 0] + ([rnd.choice(every)] if every else []))
                assert p.add_version(fid, seq, seq * 1000, base) == (fid not in model or not model[fid])
                if base and base != prev:
                    cents[(base, seq)] = fid
                model.setdefault(fid, {})[seq] = [seq, seq * 1000, base, 0]
                r = rnd.random()
                live = [(f, s) for f in model for s in model[f]]
                if r < 0.2 and live:  # a wake
                    f, s = rnd.choice(live)
                    v = model[f][s]
                    ns = rnd.choice([0, rnd.randrange(1, 1 << 60)])
                    p.set_version_wake(f, s, v[1], v[2], v[3], ns)
                    v[3] = ns
                elif r < 0.3 and live:  # the wakes of a file's tail, as a pass sets them
                    f = rnd.choice(live)[0]
                    tail = [model[f][s] for s in sorted(model[f])][-rnd.randrange(1, 80):]
                    new = [(v[0], v[1], v[2], v[3], rnd.choice([0, v[3], rnd.randrange(1, 1 << 60)]))
                           for v in tail if rnd.random() < 0.7]
                    p.set_wakes(f, new)
                    for s, _, _, _, ns in new:
                        model[f][s][3] = ns
                elif r < 0.5 and live:  # a prune
                    f, s = rnd.choice(live)
                    v = model[f].pop(s)
                    P.forget(p._txn, j._storage.dbs, SimpleNamespace(file_id=f, seq=s, base_seq=v[2]))
                    cents = {k: x for k, x in cents.items() if s not in k}
            for fid in fids:
                want = [tuple(model.get(fid, {})[s]) for s in sorted(model.get(fid, {}))]
                assert p.tail(fid, 0) == want
                assert p.tail(fid, 10 ** 9) == want[-1:]  # newer than any hlc: the newest one only
                if not want:
                    continue
                assert p.is_first(fid, want[0][0]) and not p.is_first(fid, want[-1][0]) or len(want) == 1
                for i, (s, h, b, w) in enumerate(want):
                    assert p.version_hlc(fid, s) == h
                    assert p._previous(fid, s) == (want[i - 1][0] if i else 0)
                    kids = sorted(p.children(fid, s))
                    expect = [(fid, want[i + 1][0])] if i + 1 < len(want) and want[i + 1][2] == s else []
                    expect += [(f, c) for (bs, c), f in cents.items() if bs == s]
                    assert kids == sorted(expect), (fid, s)
            assert sorted(p.files()) == sorted(f for f in fids if model.get(f))
            wakes = sorted((v[3], f, s) for f in model for s, v in model[f].items() if v[3])
            assert p.due(P.NEVER) == wakes
    finally:
        j.close()


def test_a_long_history_takes_few_pages(tmp_path):
    """1,000 versions of one file, saved a second apart: 32 a segment, ~8 KB,
    where one entry a version took ~40 KB (11 pages)."""
    j = Journal.open(str(tmp_path / "j"), create=True)
    try:
        with j.planning().update() as p:
            for s in range(1, 1001):
                p.add_version(7, s, (1 << 56) + s * 65_536_000, s - 1)
        with j.reader() as r:
            st = r.txn.stat(r.dbs[S.DB_PLAN])
            assert st["entries"] == -(-1000 // P.SEGMENT_VERSIONS)
            assert st["leaf_pages"] + st["branch_pages"] <= 4, st
    finally:
        j.close()


def test_a_rebuild_writes_the_state_the_adds_write(tmp_path):
    """``add_file_versions`` (the rebuild: a file's versions in one go) and
    ``add_version`` one at a time give the same entries."""
    rnd = random.Random(5)
    entries, seq = [], 0
    for _ in range(500):
        seq += 1
        fid = rnd.choice([3, 9, 1 << 40])
        prev = max((s for f, s, _, _ in entries if f == fid), default=0)
        entries.append((fid, seq, seq * 7, rnd.choice([prev, prev, 0, rnd.randrange(1, seq) if seq > 1 else 0])))
    got = []
    for name, batch in (("one", False), ("many", True)):
        j = Journal.open(str(tmp_path / name), create=True)
        with j.planning().update() as p:
            if batch:
                p.add_file_versions(sorted(entries[:300]))
                p.add_file_versions(sorted(entries[300:]))
            else:
                for e in sorted(entries):
                    p.add_version(*e)
        with j.reader() as r:
            got.append([(bytes(k), bytes(v)) for k, v in r.txn.cursor(db=r.dbs[S.DB_PLAN])])
        j.close()
    assert got[0] == got[1] and len(got[0]) > 3
