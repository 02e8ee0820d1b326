"""Retention (pure), prune + GC on a real journal, verify, vacuum, the CLI."""

from __future__ import annotations

import json
import os
import random

import lmdb
import pytest

from deltafs import chunking as C
from deltafs import cli, maintenance as M
from deltafs.journal import Change, Journal, ns_to_hlc
from deltafs.journal import compact as JC
from deltafs.journal import schema as S
from deltafs.journal.records import decode_record

T0 = 1_700_000_000 * 10**9
SEC = 10**9
MIN = 60 * SEC
HOUR = 3600 * SEC
DAY = 24 * HOUR


class FakeClock:
    def __init__(self, ns: int = T0) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def at(ns: int) -> int:
    return ns_to_hlc(ns)


# --- retention, pure ---------------------------------------------------------------------
def test_newest_and_young_versions_kept():
    vs = [(1, at(T0)), (2, at(T0 + 5 * MIN)), (3, at(T0 + 10 * MIN))]
    assert M.retain(vs, at(T0 + 11 * MIN)) == {1, 2, 3}
    assert M.retain([(7, at(T0))], at(T0 + 400 * DAY)) == {7}


def test_burst_keeps_the_last_only_once_older_than_a_minute():
    vs = [(1, at(T0)), (2, at(T0 + 3 * SEC)), (3, at(T0 + 6 * SEC)), (4, at(T0 + 30 * SEC))]
    # 30 s later: too young to coalesce
    assert M.retain(vs, at(T0 + 40 * SEC)) == {1, 2, 3, 4}
    # 2 minutes later: 1 and 2 are followed within 10 s; 3 is 24 s before 4
    assert M.retain(vs, at(T0 + 2 * MIN)) == {3, 4}
    assert M.retain(vs, at(T0 + 2 * MIN), M.RetentionPolicy(burst=0)) == {1, 2, 3, 4}
    assert M.retain(vs, at(T0 + 2 * MIN), M.RetentionPolicy(burst=30)) == {4}


def test_tiers_hourly_daily_weekly():
    base = (T0 // DAY) * DAY  # bucket boundaries are epoch-aligned
    # one version every 20 minutes for 3 days, the newest at `end`
    vs = [(i + 1, at(base + i * 20 * MIN)) for i in range(3 * 72)]
    end = base + (3 * 72 - 1) * 20 * MIN
    keep = M.retain(vs, at(end))
    # younger than 24 h: all kept (72 versions within the day, boundary excluded)
    young = {s for s, h in vs if end - (h >> 16) * 10**6 < DAY}
    assert young <= keep
    old = sorted(keep - young)
    # older: exactly the last of each hour
    hours = {}
    for s, h in vs:
        t = (h >> 16) * 10**6
        if end - t >= DAY:
            hours[t // HOUR] = s
    assert old == sorted(hours.values())
    # 10 days later: one per day for days between 7 and 90 days old... here all are 10-13 days old
    later = end + 10 * DAY
    keep2 = M.retain(vs, at(later))
    days = {}
    for s, h in vs:
        days[((h >> 16) * 10**6) // DAY] = s
    assert keep2 == set(days.values())
    # a year later: weekly
    keep3 = M.retain(vs, at(end + 365 * DAY))
    weeks = {}
    for s, h in vs:
        weeks[((h >> 16) * 10**6) // (7 * DAY)] = s
    assert keep3 == set(weeks.values())
    # monotone: a later pass keeps a subset of an earlier pass's result
    assert keep3 <= keep2 <= keep
    # idempotent: re-running on the kept versions keeps them all
    assert M.retain([v for v in vs if v[0] in keep2], at(later)) == keep2


def test_pinned_versions_survive():
    vs = [(i + 1, at(T0 + i * 5 * SEC)) for i in range(10)]
    pinned = M.pinned_by_snapshots(vs, [4, 100])
    assert pinned == {4, 10}
    assert M.retain(vs, at(T0 + 30 * DAY), pinned=pinned) == {4, 10}


# --- a real journal ------------------------------------------------------------------------
def version(j: Journal, file_id: int, path: bytes, data: bytes, base_seq: int = 0, dirty=None) -> Change:
    with j.reader() as r:
        old = r.chunk_list(base_seq) if base_seq else []
        res = C.rechunk(lambda o, n: data[o : o + n], len(data), old, dirty or [(0, len(data))])
        chunks, seen = [], set()
        for e in res.edits:
            for span, base in zip(e.new, C.pick_bases(old, e)):
                if r.has_chunk(span.id) or span.id in seen:
                    continue
                seen.add(span.id)
                b = None
                if base is not None:
                    b = C.Base(base[0], r.read_chunk(base[0]), r.chunk_info(base[0]).depth)
                chunks.append(C.build_chunk(data[span.offset : span.offset + span.length], b))
    return Change(op="write", file_id=file_id, path=path, size=len(data), cause="write",
                  base_seq=base_seq, edit=res.edit_list(), chunks=chunks)


class History:
    """Saves of a few files at clock-driven times; remembers every version's bytes."""

    def __init__(self, j: Journal, clock: FakeClock, seed: int = 1) -> None:
        self.j, self.clock = j, clock
        self.rnd = random.Random(seed)
        self.data: dict[int, bytes] = {}
        self.head: dict[int, int] = {}
        self.content: dict[int, bytes] = {}  # seq -> bytes

    def create(self, fid: int, size: int) -> None:
        self.j.commit([Change(op="create", file_id=fid, path=f"f{fid}".encode(), mode=0o100644)])
        self.data[fid] = self.rnd.randbytes(size)
        self.save(fid, full=True)

    def save(self, fid: int, full: bool = False) -> int:
        d = bytearray(self.data[fid])
        dirty = None
        if not full:
            o = self.rnd.randrange(len(d) - 200)
            d[o : o + 100] = self.rnd.randbytes(100)
            if self.rnd.random() < 0.3:  # grow, too
                d += self.rnd.randbytes(3000)
            dirty = [(o, o + 100)]  # (start, end); a size change is dirty to EOF anyway
        self.data[fid] = bytes(d)
        ch = version(self.j, fid, f"f{fid}".encode(), self.data[fid], self.head.get(fid, 0), dirty)
        (seq,) = self.j.commit([ch])
        self.head[fid] = seq
        self.content[seq] = self.data[fid]
        return seq

    def advance(self, ns: int) -> None:
        self.clock.ns += ns


def recount_refs(j: Journal) -> dict[bytes, int]:
    """refs as docs/format.md defines them, from scratch (pruned records excluded)."""
    out: dict[bytes, int] = {}
    with j.reader() as r:
        pruned = JC.pruned_seqs(j, r.txn)
        for k, v in r.txn.cursor(db=r.dbs[S.DB_CHANGES]):
            rec = decode_record(v)
            if rec.is_content and rec.seq not in pruned:
                for _, _, lst in rec.edit:
                    for cid, _ in lst:
                        out[cid] = out.get(cid, 0) + 1
        for _, v in r.txn.cursor(db=r.dbs[S.DB_CHECKPOINTS]):
            for cid, _ in S.unpack_list(v):
                out[cid] = out.get(cid, 0) + 1
        for _, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]):
            _, _, base, _ = S.decode_chunk(v)
            if base is not None:
                out[base] = out.get(base, 0) + 1
    return out


def stored_refs(j: Journal) -> dict[bytes, int]:
    with j.reader() as r:
        return {k: S.from_u64(v) for k, v in r.txn.cursor(db=r.dbs[S.DB_REFS])}


def check_everything_readable(j: Journal, h: History, kept: set[int]) -> None:
    with j.reader() as r:
        retained = set(JC.iter_retained_content(j, r))
        assert retained == kept
        for seq in kept:
            assert r.read_content(seq) == h.content[seq], seq
        chunks = {k for k in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]).iternext(values=False)}
    refs = recount_refs(j)
    assert stored_refs(j) == refs
    assert set(refs) <= chunks  # nothing referenced was freed
    assert chunks <= set(refs)  # and everything unreferenced was
    assert M.verify(j, full=True).ok


@pytest.fixture
def jc(tmp_path):
    clock = FakeClock()
    j = Journal.open(tmp_path / "j", create=True, clock=clock)
    yield j, clock
    j.close()


def test_compact_over_simulated_weeks(jc):
    j, clock = jc
    h = History(j, clock)
    h.create(1, 200_000)
    h.create(2, 50_000)
    # 3 weeks of work: file 1 saved every 20 min during 8 h a day (with a
    # burst of 3 quick saves each hour), file 2 once a day
    for day in range(21):
        for k in range(24):
            h.advance(20 * MIN)
            h.save(1)
            if k % 3 == 0:
                h.advance(2 * SEC)
                h.save(1)
                h.advance(2 * SEC)
                h.save(1)
        h.save(2)
        h.advance(16 * HOUR)
    all_versions = set(h.content)
    expect_prune, expect_keep, files = M.plan(j)
    assert files == 2 and set(expect_prune) | set(expect_keep) == all_versions
    dry = M.compact(j, dry_run=True)
    assert dry.versions_pruned == len(expect_prune) > 0
    assert stored_refs(j) == recount_refs(j)  # dry run wrote nothing
    rep = M.compact(j)
    assert (rep.versions_pruned, rep.chunks_freed, rep.bytes_freed) == (
        dry.versions_pruned, dry.chunks_freed, dry.bytes_freed)
    assert rep.checkpoints_written == dry.checkpoints_written
    assert rep.chunks_freed > 0 and rep.bytes_freed > 0
    # exactly the versions retention chose remain, and they are exactly
    # what retain() says per file
    with j.reader() as r:
        vs = JC.content_versions(j, r)
    now = vs.head_hlc
    for fid, versions in vs.by_file.items():
        assert {s for s, _ in versions} == set(expect_keep) & {s for s, _ in versions}
        assert M.retain(versions, now) == {s for s, _ in versions}  # a second pass prunes nothing
    check_everything_readable(j, h, set(expect_keep))
    again = M.compact(j)
    assert again.versions_pruned == 0
    # the journal keeps working: new saves on top of pruned history
    h.advance(MIN)
    s = h.save(1)
    with j.reader() as r:
        assert r.read_content(s) == h.content[s]
    check_everything_readable(j, h, set(expect_keep) | {s})


def test_snapshot_pins_versions(jc):
    j, clock = jc
    h = History(j, clock)
    h.create(1, 60_000)
    seqs = []
    for _ in range(10):
        h.advance(HOUR)
        seqs.append(h.save(1))
    snap_seq = seqs[3] + 0  # the version current at that seq
    j.kv_put("snapshots", "before-refactor", {"seq": snap_seq})
    h.advance(60 * DAY)
    last = h.save(1)
    M.compact(j)
    with j.reader() as r:
        kept = set(JC.iter_retained_content(j, r))
    assert snap_seq in kept and last in kept
    check_everything_readable(j, h, kept)


def test_version_shared_as_base_keeps_delta_base(jc):
    """Chunks of a pruned version used as delta bases by a retained one stay."""
    j, clock = jc
    h = History(j, clock)
    h.create(1, 100_000)
    first = min(h.content)
    for _ in range(5):  # one day bucket (T0 is 22:13 UTC)
        h.advance(5 * MIN)
        h.save(1)
    h.advance(10 * DAY)
    h.save(1)
    M.compact(j)
    with j.reader() as r:
        kept = set(JC.iter_retained_content(j, r))
    assert first not in kept
    check_everything_readable(j, h, kept)


def test_unshipped_versions_wait_for_the_mirror(jc):
    j, clock = jc
    h = History(j, clock)
    h.create(1, 40_000)
    for _ in range(4):
        h.advance(5 * MIN)
        h.save(1)
    h.advance(10 * DAY)
    h.save(1)
    j.kv_put("mirrors", "file:///m", {"seq": 3})
    prune, _, _ = M.plan(j)
    assert prune and max(prune) <= 3
    j.kv_put("mirrors", "file:///m", {"seq": 100})
    assert len(M.plan(j)[0]) > len(prune)


# --- verify --------------------------------------------------------------------------------
def small_journal(path, clock=None):
    clock = clock or FakeClock()
    j = Journal.open(path, create=True, clock=clock)
    h = History(j, clock)
    h.create(1, 80_000)
    for _ in range(3):
        h.advance(MIN)
        h.save(1)
    return j, h


def raw_edit(path, fn):
    env = lmdb.open(str(path), max_dbs=S.MAX_DBS, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            fn(env, txn)
    finally:
        env.close()


def test_verify_names_a_corrupt_chunk(tmp_path):
    j, h = small_journal(tmp_path / "j")
    assert M.verify(j, full=True).ok
    with j.reader() as r:
        victim = r.chunk_list(max(h.content))[-1][0]
    j.close()

    def flip(env, txn):
        db = env.open_db(S.DB_CHUNKS, txn=txn)
        v = bytearray(txn.get(victim, db=db))
        v[-3] ^= 0xFF
        txn.put(victim, bytes(v), db=db)

    raw_edit(tmp_path / "j", flip)
    with Journal.open(tmp_path / "j", readonly=True) as j2:
        assert M.verify(j2).ok  # the chain is intact
        res = M.verify(j2, full=True)
    assert not res.ok and res.problem.chunk == victim.hex()
    assert res.problem.path == b"f1" and res.problem.seq in h.content
    assert victim.hex() in res.problem.what


def test_verify_names_a_broken_chain_link(tmp_path):
    j, h = small_journal(tmp_path / "j")
    j.close()

    def alter(env, txn):
        db = env.open_db(S.DB_CHANGES, txn=txn)
        v = bytearray(txn.get(S.u64(3), db=db))
        i = v.index(b"f1", 32)
        v[i + 1 : i + 2] = b"X"  # the path now says fX
        txn.put(S.u64(3), bytes(v), db=db)

    raw_edit(tmp_path / "j", alter)
    with Journal.open(tmp_path / "j", readonly=True) as j2:
        res = M.verify(j2)
    assert not res.ok and res.problem.seq == 3 and res.problem.path == b"fX"
    assert "altered" in res.problem.what


# --- vacuum and the CLI ---------------------------------------------------------------------
def test_cli_compact_vacuum_and_verify(tmp_path, capsys):
    clock = FakeClock()
    jdir = tmp_path / "j"
    j = Journal.open(jdir, create=True, clock=clock)
    h = History(j, clock)
    h.create(1, 3_000_000)  # mostly incompressible: freeing it shows in the file
    for _ in range(3):  # one day bucket (T0 is 22:13 UTC)
        h.advance(10 * MIN)
        h.data[1] = h.rnd.randbytes(3_000_000)  # every version new
        h.save(1, full=True)
    h.advance(10 * DAY)
    j.commit([Change(op="mkdir", file_id=9, path=b"d", mode=0o40755)])  # the journal's now moves
    j.close()
    assert cli.main(["verify", "--journal", str(jdir), "--full"]) == 0
    capsys.readouterr()
    assert cli.main(["compact", "--journal", str(jdir), "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["versions_pruned"] == 3 and dry["bytes_freed"] > 8_000_000
    assert cli.main(["compact", "--journal", str(jdir), "--vacuum", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["versions_pruned"] == 3 and rep["bytes_freed"] == dry["bytes_freed"]
    shrunk = rep["data_file_before"] - rep["data_file_after"]
    assert shrunk >= 0.8 * rep["bytes_freed"], rep
    assert os.stat(jdir / "data.mdb").st_size == rep["data_file_after"]
    assert not (jdir / "vacuum.tmp").exists()
    with Journal.open(jdir, readonly=True) as j2, j2.reader() as r:
        assert r.read_content(max(h.content)) == h.content[max(h.content)]
    assert cli.main(["verify", "--journal", str(jdir), "--full", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["ok"] and out["versions_pruned"] == 3


def test_cli_compact_refuses_a_locked_journal(tmp_path, capsys):
    j, _ = small_journal(tmp_path / "j")
    try:
        assert cli.main(["compact", "--journal", str(tmp_path / "j")]) == 3
    finally:
        j.close()
    assert "stop the mount" in capsys.readouterr().err


def test_cli_verify_exit_status_3(tmp_path, capsys):
    j, _ = small_journal(tmp_path / "j")
    j.close()

    def drop(env, txn):
        txn.delete(S.u64(2), db=env.open_db(S.DB_CHANGES, txn=txn))

    raw_edit(tmp_path / "j", drop)
    assert cli.main(["verify", "--journal", str(tmp_path / "j")]) == 3
    assert "record 2 is missing" in capsys.readouterr().out


async def test_background_service_compacts(jc, autojump_clock):
    import trio
    from types import SimpleNamespace

    j, clock = jc
    h = History(j, clock)
    h.create(1, 40_000)
    for _ in range(4):
        h.advance(5 * MIN)
        h.save(1)
    h.advance(10 * DAY)
    h.save(1)
    daemon = SimpleNamespace(journal=j, cfg=SimpleNamespace(maintenance_interval=60.0))
    async with trio.open_nursery() as n:
        await n.start(M.maintenance_service, daemon)
        await trio.sleep(61)
        for _ in range(100):
            with j.reader() as r:
                if len(set(JC.iter_retained_content(j, r))) < len(h.content):
                    break
            await trio.sleep(1)
        n.cancel_scope.cancel()
    JC.pruned_db(j)
    with j.reader() as r:
        kept = set(JC.iter_retained_content(j, r))
    assert len(kept) < len(h.content)
    check_everything_readable(j, h, kept)


def test_chunk_freed_by_gc_comes_back_when_a_late_commit_names_it(tmp_path):
    """A capture saw a chunk as stored, GC freed it, then the version naming it commits."""
    from deltafs import chunking
    from deltafs.journal import Change, Journal
    from deltafs.journal import compact

    data = os.urandom(50_000)
    refs = chunking.chunk_bytes(data)
    chunks = {cid: chunking.build_chunk(data[o:o + n]) for (cid, n), o in
              zip(refs, [sum(n for _, n in refs[:i]) for i in range(len(refs))])}
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        (s1,) = j.commit([Change(op="write", path=b"a", size=len(data), cause="write", base_seq=0,
                                 edit=[(0, 0, refs)], chunks=list(chunks.values()))])
        (s2,) = j.commit([Change(op="write", path=b"a", size=0, cause="write", base_seq=s1,
                                 edit=[(0, len(refs), [])])])
        res = compact.prune(j, [s1], [s2])
        assert res.chunks_freed == len(refs)
        with j.reader() as r:
            assert not any(r.has_chunk(cid) for cid, _ in refs)
        # the late commit: computed when the chunks were still there, so it ships none
        (s3,) = j.commit([Change(op="write", path=b"b", size=len(data), cause="write", base_seq=0,
                                 edit=[(0, 0, refs)])])
        with j.reader() as r:
            assert r.read_content(s3) == data
        compact.purge_graveyard(j, 0)
        with j.reader() as r:
            assert r.read_content(s3) == data  # brought back chunks are live, not purged
