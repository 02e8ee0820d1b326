"""Compaction re-codes chunk values against a better base set (issue 20, journal/recode.py).

A new file (``git checkout``'s unlink + create) is stored standalone at
capture; the pass finds an earlier file sharing its bytes and codes it as a
delta, deeper than it was, so the values built on it are rewritten at their
new depth in the same transaction.  Every version reads back bit-exact,
``verify --full`` passes, the reference counts stay exact, and pruning every
version frees every chunk.
"""

from __future__ import annotations

import random

from deltafs import chunking as C
from deltafs import maintenance
from deltafs.config import parse_retention
from deltafs.journal import Change, Journal
from deltafs.journal import recode as R
from deltafs.journal import schema as S

from test_journal import FakeClock


def _text(rnd: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"theta", b"kappa", b"lambda"]
    out, size = [], 0
    while size < n:
        line = b"%06d %s %s\n" % (size, b" ".join(rnd.choice(words) for _ in range(8)),
                                  rnd.randbytes(6).hex().encode())
        out.append(line)
        size += len(line)
    return b"".join(out)[:n]


class Files:
    """Single-chunk files written through the journal as a capture would."""

    def __init__(self, j: Journal) -> None:
        self.j = j
        self.last: dict[bytes, tuple[int, C.Base]] = {}  # path -> (seq, its chunk)
        self.states: dict[int, bytes] = {}  # seq -> content

    def save(self, path: bytes, raw: bytes, delta: bool = True) -> int:
        prev = self.last.get(path)
        base = prev[1] if prev and delta else None
        nc = C.build_chunk(raw, base)
        edit = [(0, 1 if prev else 0, [(nc.id, len(raw))])]
        self.j.commit([Change(op="write", path=path, size=len(raw), edit=edit, chunks=[nc], mode=0o100644,
                              cause="write", base_seq=prev[0] if prev else 0)])
        with self.j.reader() as r:
            seq = r.head_seq()
        self.last[path] = (seq, C.Base(nc.id, raw, nc.depth))
        self.states[seq] = raw
        return seq

    def unlink(self, path: bytes) -> None:
        self.j.commit([Change(op="unlink", path=path)])
        self.last.pop(path, None)


def _edit(rnd: random.Random, raw: bytes) -> bytes:
    at = rnd.randrange(0, len(raw) - 40)
    return raw[:at] + b"<edited %d>" % rnd.randrange(10 ** 6) + raw[at + 12:]


def _history(j: Journal, seed: int = 1) -> Files:
    """a.txt, then b.txt made mostly of a.txt's bytes but stored standalone
    (a new file), then edits of b.txt built on it."""
    rnd = random.Random(seed)
    f = Files(j)
    a = _text(rnd, 24_000)
    f.save(b"a.txt", a)
    a2 = _edit(rnd, a)
    f.save(b"a.txt", a2)
    b = _edit(rnd, _edit(rnd, a2))
    f.save(b"b.txt", b)
    for _ in range(4):
        b = _edit(rnd, b)
        f.save(b"b.txt", b)
    return f


def _values(j: Journal) -> dict[bytes, tuple[int, int, tuple[bytes, ...], int]]:
    """chunk -> (refs, index depth, bases, header depth) for every live chunk."""
    out = {}
    with j.reader() as r:
        for k, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]):
            refs, pack, off, length, depth = S.decode_loc(v)
            hdepth, _, bases, _ = S.decode_chunk(r._st.packs.read(pack, off, length))
            out[bytes(k)] = (refs, depth, bases, hdepth)
    return out


def _check_depths_and_refs(j: Journal) -> None:
    vals = _values(j)
    real: dict[bytes, int] = {}

    def depth(c: bytes) -> int:
        if c not in real:
            real[c] = sum(depth(b) + 1 for b in vals[c][2])
        return real[c]
    expect: dict[bytes, int] = {c: 0 for c in vals}
    with j.reader() as r:
        pruned = r.pruned_seqs()
        for rec in r.records():
            if rec.is_content and rec.seq not in pruned:
                for _, _, refs in rec.edit or []:
                    for cid, _ in refs:
                        expect[cid] += 1
        for _, v in r.checkpoints():
            for cid, _ in S.unpack_list(v):
                expect[cid] += 1
    for c, (refs, idepth, bases, hdepth) in vals.items():
        for b in bases:
            expect[b] += 1
        assert idepth == hdepth, "index and header disagree"
        assert depth(c) <= hdepth <= C.MAX_DELTA_DEPTH, "a declared depth below the real one"
    assert {c: v[0] for c, v in vals.items()} == expect


def _read_back(j: Journal, f: Files) -> None:
    with j.reader() as r:
        for seq, raw in f.states.items():
            assert r.read_content(seq) == raw


def test_a_new_file_is_recoded_against_a_similar_one_and_reads_back(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    f = _history(j)
    b1 = f.last[b"b.txt"][1]  # (the last one; the first version's chunk is found below)
    before = {c: v for c, v in _values(j).items()}
    stored_before = sum(_stored(j).values())
    res = j.recode()
    assert res.chunks_recoded >= 1 and res.skipped == 0
    assert res.headers_rewritten >= 4  # the edits of b.txt sit on its first version
    after = _values(j)
    first_b = [c for c, v in before.items() if v[1] == 0 and after[c][1] > 0]
    assert first_b, "the standalone first version of b.txt got a base"
    assert b1.id in after
    assert sum(_stored(j).values()) < stored_before
    # a mirror keeps the old values: no chunk declares a depth below the one it had
    assert all(after[c][1] >= v[1] for c, v in before.items())
    _read_back(j, f)
    _check_depths_and_refs(j)
    assert maintenance.verify(j, full=True).problem is None
    # the next pass looks only at what came since
    assert j.recode().chunks_looked == 0
    f.save(b"b.txt", _edit(random.Random(9), f.last[b"b.txt"][1].raw))
    assert j.recode().chunks_looked == 1
    _read_back(j, f)
    _check_depths_and_refs(j)
    # pruning every version frees every chunk: the counts were exact
    with j.reader() as r:
        seqs = [rec.seq for rec in r.records() if rec.is_content]
    j.prune(seqs, [])
    assert _values(j) == {}
    j.close()


def _stored(j: Journal) -> dict[bytes, int]:
    with j.reader() as r:
        return {bytes(k): S.decode_loc(v)[3] for k, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS])}


def test_a_value_stored_after_the_plan_is_rewritten_with_the_chunk_it_builds_on(tmp_path, monkeypatch):
    """A capture that commits a delta on a chunk between the pass's snapshot
    and its write transaction declared that chunk's old depth: the pass sees
    it (Storage.watch_values) and rewrites its header too.  The plan is made
    in a child process here (recode.plan_child)."""
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    f = _history(j, seed=2)
    plans = R.Recoder._plans
    done = []

    def plan_then_capture(self, res, raw_max):
        out = plans(self, res, raw_max)
        if not done:  # a capture meanwhile (the pass's next round looks at it)
            done.append(f.save(b"b.txt", _edit(random.Random(5), f.last[b"b.txt"][1].raw)))
        return out
    monkeypatch.setattr(R.Recoder, "_plans", plan_then_capture)
    monkeypatch.setattr(R, "APART_MIN", 0)  # planned in a child process, as a large pass is
    res = j.recode()
    assert res.chunks_recoded >= 1 and res.headers_rewritten >= 5
    _read_back(j, f)
    _check_depths_and_refs(j)
    assert maintenance.verify(j, full=True).problem is None
    j.close()


def test_compaction_recodes_then_reclaims_the_old_values(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    f = _history(j, seed=3)
    f.unlink(b"a.txt")  # its versions stay (retention keeps everything): still a base
    before = j.data_bytes()
    rep = maintenance.compact(j, parse_retention("*:all", burst=0))
    assert rep.chunks_recoded >= 1 and rep.recode_bytes_saved > 0
    assert rep.packs_emptied == 1  # the old values were reclaimed
    assert j.data_bytes() < before
    _read_back(j, f)
    _check_depths_and_refs(j)
    assert maintenance.verify(j, full=True).problem is None
    j.close()


def test_a_chunk_brought_back_from_the_graveyard_declares_its_bases_real_depth(tmp_path):
    """A freed value waits in the graveyard with the depth it was written at;
    if its base was re-coded deeper since, it comes back at the real depth."""
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(4)
    f = Files(j)
    raw = _text(rnd, 8000)
    other_raw = _edit(rnd, raw)
    f.save(b"root", raw)
    f.save(b"other", other_raw, delta=False)
    top_raw = _edit(rnd, raw)
    f.last[b"top"] = f.last[b"root"]  # top's first version is a delta on root's chunk
    seq = f.save(b"top", top_raw)
    top = f.last[b"top"][1]
    assert top.depth == 1
    j.prune([seq], [])  # top's chunk goes to the graveyard, declaring depth 1
    with j.reader() as r:
        assert not r.has_chunk(top.id)
    # root is re-coded against other: depth 0 -> 1 (nothing live builds on it)
    root = f.last[b"root"][1]
    rec = R.Recoder(j._storage, lambda txn, zero: None)
    with j._storage.read() as txn:
        loc = bytes(txn.get(root.id, db=j._storage.dbs[S.DB_CHUNKS]))
    payload = R._code(raw, other_raw, C.ZSTD_DELTA_LEVEL)
    plan = R._Plan(root.id, loc, (f.last[b"other"][1].id,), payload, len(raw), S.decode_loc(loc)[3])
    res = R.RecodeResult()
    with j._storage.write() as txn:
        rec._apply(txn, plan, {}, res, [])
    assert res.chunks_recoded == 1
    # a late commit names top again: it comes back at depth 2
    j.commit([Change(op="write", path=b"again", size=len(top_raw), edit=[(0, 0, [(top.id, len(top_raw))])],
                     chunks=[], mode=0o100644, cause="write", base_seq=0)])
    vals = _values(j)
    assert vals[top.id][1] == vals[top.id][3] == 2
    with j.reader() as r:
        assert r.read_chunk(top.id) == top_raw
    _check_depths_and_refs(j)
    j.close()


def test_a_value_recoded_onto_shallower_bases_keeps_declaring_its_old_depth(tmp_path):
    """A mirror keeps a chunk's old value; values built on the chunk after the
    re-coding declare their depth from its index entry, so that entry (and
    the new header) never goes below the old depth."""
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(6)
    f = Files(j)
    a = _text(rnd, 12_000)
    f.save(b"a", a)
    c = _edit(rnd, a)
    f.last[b"c"] = f.last[b"a"]
    for _ in range(5):
        c = _edit(rnd, c)
        f.save(b"c", c)
    top = f.last[b"c"][1]
    assert top.depth == 5
    with j._storage.read() as txn:
        loc = bytes(txn.get(top.id, db=j._storage.dbs[S.DB_CHUNKS]))
    plan = R._Plan(top.id, loc, (f.last[b"a"][1].id,), R._code(c, a, C.ZSTD_DELTA_LEVEL), len(c),
                   S.decode_loc(loc)[3])
    res = R.RecodeResult()
    with j._storage.write() as txn:
        R.Recoder(j._storage, lambda txn, zero: None)._apply(txn, plan, {}, res, [])
    assert res.chunks_recoded == 1
    vals = _values(j)
    assert vals[top.id][2] == (f.last[b"a"][1].id,)  # one base at depth 0: really 1 deep
    assert vals[top.id][1] == vals[top.id][3] == 5
    _read_back(j, f)
    _check_depths_and_refs(j)
    j.close()
