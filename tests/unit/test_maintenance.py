"""Retention (pure), prune + GC on a real journal, verify, vacuum, the CLI."""

from __future__ import annotations

import json
import os
import random

import lmdb
import pytest

from deltafs import chunking as C
from deltafs import cli, maintenance as M
from deltafs.capture import capture_chunks
from deltafs.journal import Change, Journal, ns_to_hlc
from deltafs.journal import schema as S

from test_journal import corrupt_chunk

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
        res, chunks = capture_chunks(r, lambda o, n: data[o : o + n], len(data), old,
                                     dirty or [(0, len(data))])
    return Change(op="write", file_id=file_id, path=path, size=len(data), cause="write",
                  base_seq=base_seq, edit=res.edit_list(old), chunks=chunks)


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
        pruned = r.pruned_seqs()
        for rec in r.records():  # LMDB values and record blocks
            if rec.is_content and rec.seq not in pruned:
                for _, _, lst in rec.edit:
                    for cid, _ in lst:
                        out[cid] = out.get(cid, 0) + 1
        for _, v in r.checkpoints():
            for cid, _ in S.unpack_list(v):
                out[cid] = out.get(cid, 0) + 1
        for k in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]).iternext(values=False):
            for base in r.chunk_info(k).bases:  # each base of a value counts it once (format 9)
                out[base] = out.get(base, 0) + 1
    return out


def stored_refs(j: Journal) -> dict[bytes, int]:
    with j.reader() as r:
        return {k: S.loc_refs(v) for k, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]) if S.loc_refs(v)}


def check_everything_readable(j: Journal, h: History, kept: set[int]) -> None:
    with j.reader() as r:
        retained = set(r.retained_content())
        assert retained == kept
        for seq in kept:
            assert r.read_content(seq) == h.content[seq], seq
        chunks = {k for k in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]).iternext(values=False)}
    refs = recount_refs(j)
    assert stored_refs(j) == refs
    assert set(refs) <= chunks  # nothing referenced was freed
    assert chunks <= set(refs)  # and everything unreferenced was
    assert j.verify(full=True).ok


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
        vs = r.content_versions()
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
        kept = set(r.retained_content())
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
        kept = set(r.retained_content())
    assert first not in kept
    check_everything_readable(j, h, kept)


def test_pruning_frees_the_bases_only_pruned_versions_needed(jc):
    """A file saved again and again: each version's chunk is a delta of the
    one before, so every pruned version's chunk was the base of the next.
    Compaction re-codes the kept versions' chunks past them (step 3), so no
    chunk stays alive only as a base, the chains a read walks get shorter
    (the depth each chunk declares does not fall: a mirror keeps the old
    values), the bytes
    of the values the kept versions need fall, a dry run counts the same,
    and every kept version still reads back byte for byte."""
    j, clock = jc
    h = History(j, clock)
    h.create(1, 30_000)
    fixed = random.Random(5)
    for _ in range(300):  # the same paragraph edited every 20 minutes, for 4 days
        h.advance(20 * MIN)
        d = bytearray(h.data[1])
        d[8000:8100] = fixed.randbytes(100)
        h.data[1] = bytes(d)
        ch = version(j, 1, b"f1", h.data[1], h.head[1], [(8000, 8100)])
        (seq,) = j.commit([ch])
        h.head[1] = seq
        h.content[seq] = h.data[1]

    def live_bytes_and_depth():
        """-> live value bytes, the longest chain a read decodes (links
        walked, not declared), and each chunk's declared depth."""
        with j.reader() as r:
            locs = {bytes(k): S.decode_loc(v) for k, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS])}
            links: dict[bytes, int] = {}

            def chain(cid: bytes) -> int:
                if cid not in links:
                    links[cid] = max((chain(b) + 1 for b in r.chunk_info(cid).bases), default=0)
                return links[cid]
            longest = max(chain(c) for c in locs)
        return sum(loc[3] for loc in locs.values()), longest, {c: loc[4] for c, loc in locs.items()}

    before, depth_before, declared_before = live_bytes_and_depth()
    dry = M.compact(j, dry_run=True)
    rep = M.compact(j)
    assert rep.versions_pruned > 100 and rep.chunks_rebased > 0
    assert (rep.chunks_freed, rep.bytes_freed) == (dry.chunks_freed, dry.bytes_freed)
    assert rep.chunks_freed >= rep.versions_pruned  # each pruned edit's chunk went
    with j.reader() as r:
        kept = set(r.retained_content())
        named = {cid for s in kept for cid, _ in r.chunk_list(s)}
        stored = {bytes(k) for k in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]).iternext(values=False)}
    assert stored == named, f"{len(stored - named)} chunks kept only as a delta base"
    after, depth_after, declared_after = live_bytes_and_depth()
    assert after < 0.8 * before and depth_after < depth_before
    # a mirror keeps the old values: no chunk declares less depth than it did
    lower = [c for c, d in declared_after.items() if d < declared_before.get(c, 0)]
    assert not lower, f"{len(lower)} re-coded chunks declare less depth than before"
    check_everything_readable(j, h, kept)
    assert M.compact(j).chunks_rebased == 0  # nothing left to re-code


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
    assert j.verify(full=True).ok
    with j.reader() as r:
        victim = r.chunk_list(max(h.content))[-1][0]
    j.close()

    corrupt_chunk(tmp_path / "j", victim, at=-3)
    with Journal.open(tmp_path / "j", readonly=True) as j2:
        assert j2.verify().ok  # the chain is intact
        res = j2.verify(full=True)
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
        res = j2.verify()
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
    assert "holds its write lock" in capsys.readouterr().err  # a mount: compact goes through it


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
    daemon = SimpleNamespace(journal=j, cfg=SimpleNamespace(compact_every=60.0))
    async with trio.open_nursery() as n:
        progress = await n.start(M.maintenance_service, daemon)
        t0 = trio.current_time()
        while progress.passes == 0:
            await trio.sleep(1)
        assert trio.current_time() - t0 >= 60
        n.cancel_scope.cancel()
    with j.reader() as r:
        kept = set(r.retained_content())
    assert len(kept) < len(h.content)
    check_everything_readable(j, h, kept)


def test_chunk_freed_by_gc_comes_back_when_a_late_commit_names_it(tmp_path):
    """A capture saw a chunk as stored, GC freed it, then the version naming it commits."""
    from deltafs import chunking
    from deltafs.journal import Change, Journal

    data = os.urandom(50_000)
    refs = chunking.chunk_bytes(data)
    chunks = {cid: chunking.build_chunk(data[o:o + n]) for (cid, n), o in
              zip(refs, [sum(n for _, n in refs[:i]) for i in range(len(refs))])}
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        (s1,) = j.commit([Change(op="write", path=b"a", size=len(data), cause="write", base_seq=0,
                                 edit=[(0, 0, refs)], chunks=list(chunks.values()))])
        (s2,) = j.commit([Change(op="write", path=b"a", size=0, cause="write", base_seq=s1,
                                 edit=[(0, len(refs), [])])])
        res = j.prune([s1], [s2])
        assert res.chunks_freed == len(refs)
        with j.reader() as r:
            assert not any(r.has_chunk(cid) for cid, _ in refs)
        # the late commit: computed when the chunks were still there, so it ships none
        (s3,) = j.commit([Change(op="write", path=b"b", size=len(data), cause="write", base_seq=0,
                                 edit=[(0, 0, refs)])])
        with j.reader() as r:
            assert r.read_content(s3) == data
        j._compactor.purge_graveyard(0)
        with j.reader() as r:
            assert r.read_content(s3) == data  # brought back chunks are live, not purged


# --- retention options ------------------------------------------------------------------------
def test_parse_retention_and_options():
    from deltafs.config import RetentionPolicy, parse_minutes, parse_retention, parse_size
    from deltafs.errors import UsageError

    assert parse_retention("24h:all,7d:1h,90d:1d,*:1w") == RetentionPolicy()
    assert parse_retention(RetentionPolicy().spec()) == RetentionPolicy()
    p = parse_retention("3s:all,10s:2s,*:none", burst=0)
    assert (p.keep_all, p.tiers, p.after, p.burst) == (3.0, ((10.0, 2.0),), None, 0)
    assert parse_retention("1h:all,*:all").bucket(10 * 86400) is None  # keep everything
    assert parse_size("10G") == 10 << 30 and parse_size("500MiB") == 500 << 20 and parse_size("4096") == 4096
    assert parse_minutes("0.05") == pytest.approx(3.0)
    for bad, why in [("24h", "AGE:EVERY"), ("7d:1h,1d:all,*:1w", "ages must increase"),
                     ("24h:all", "end it with"), ("*:1w,1d:1h", "must be the last"),
                     ("1d:xx,*:none", "bad --retention interval"), ("1d:none,*:1w", "only allowed")]:
        with pytest.raises(UsageError, match=why) as e:
            parse_retention(bad)
        assert "\n" not in str(e.value)
    for fn, bad in [(parse_size, "10X"), (parse_size, "0"), (parse_minutes, "0"), (parse_minutes, "abc")]:
        with pytest.raises(UsageError):
            fn(bad)


def test_retention_none_keeps_only_young_newest_and_pinned():
    from deltafs.config import parse_retention

    p = parse_retention("10s:all,1m:20s,*:none", burst=0)
    vs = [(i + 1, at(T0 + i * 5 * SEC)) for i in range(60)]  # 5 minutes, one every 5 s
    now = vs[-1][1]
    keep = M.retain(vs, now, p, pinned={3})
    young = {s for s, h in vs if (vs[-1][1] - h) >> 16 < 10_000}
    assert young <= keep and 3 in keep and 60 in keep
    assert all(s in young or s == 3 or (vs[-1][1] - h) >> 16 < 60_000 for s, h in vs if s in keep)
    assert len(keep - young - {3}) <= 4  # one per 20 s between 10 s and 1 min


def test_cli_rejects_bad_retention_in_one_line(tmp_path, capsys):
    j, _ = small_journal(tmp_path / "j")
    j.close()
    assert cli.main(["compact", "--journal", str(tmp_path / "j"), "--retention", "7d:1h"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "*:EVERY" in err
    assert cli.main(["mount", str(tmp_path), str(tmp_path / "nomnt"), "--journal-limit", "lots"]) == 2
    assert "bad --journal-limit 'lots'" in capsys.readouterr().err


def test_cli_compact_with_a_retention_policy(tmp_path, capsys):
    clock = FakeClock()
    j = Journal.open(tmp_path / "j", create=True, clock=clock)
    h = History(j, clock)
    h.create(1, 30_000)
    for _ in range(10):
        h.advance(20 * SEC)
        h.save(1)
    j.close()
    # the default policy keeps everything younger than a day (20 s apart: no burst)
    assert cli.main(["compact", "--journal", str(tmp_path / "j"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["versions_pruned"] == 0
    assert cli.main(["compact", "--journal", str(tmp_path / "j"), "--json", "--retention", "30s:all,*:none",
                     "--coalesce", "0"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["versions_pruned"] == 11 - 2  # the ones 0 and 20 s old stay
    with Journal.open(tmp_path / "j", readonly=True) as j2:
        with j2.reader() as r:
            kept = set(r.retained_content())
            for s in kept:
                assert r.read_content(s) == h.content[s]
    assert len(kept) == 2


# --- pruned versions in the history tools -----------------------------------------------------
def iso(ns: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")


@pytest.fixture
def pruned_journal(tmp_path):
    """f1 saved every 10 minutes for 3 hours, then 2 days later once more; compacted
    with the default policy (hourly buckets for the old ones)."""
    clock = FakeClock((T0 // HOUR) * HOUR)
    jdir = tmp_path / "j"
    j = Journal.open(jdir, create=True, clock=clock)
    h = History(j, clock)
    h.create(1, 20_000)
    h.create(2, 5_000)
    times = {}
    for _ in range(18):
        h.advance(10 * MIN)
        s = h.save(1)
        times[s] = clock.ns
    h.advance(2 * DAY)
    times[h.save(1)] = clock.ns
    rep = M.compact(j)
    assert rep.versions_pruned > 0
    with j.reader() as r:
        kept = set(r.retained_content())
    j.close()
    return jdir, h, kept, set(h.content) - kept, times


def test_log_hides_pruned_versions_unless_all(pruned_journal, capsys):
    from deltafs import history

    jdir, h, kept, pruned, _ = pruned_journal
    with Journal.open(jdir, readonly=True) as j:
        with j.reader() as r:
            shown = [d["version"] for d in history.log_entries(r, b"f1") if d["op"] == "write"]
            every = list(history.log_entries(r, b"f1", show_pruned=True))
    f1 = set(h.content) - {4}  # seq 4 is f2's only version
    assert set(shown) == kept & f1 and pruned & f1
    assert {d["version"] for d in every if d.get("pruned")} == pruned & {d["version"] for d in every}
    assert cli.main(["log", "--records", "--journal", str(jdir), "f1"]) == 0
    out = capsys.readouterr().out
    assert "pruned" not in out
    assert cli.main(["log", "--records", "--journal", str(jdir), "--all", "f1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = {int(x.split("\t")[0]) for x in lines if x.endswith("(pruned)")}
    assert marked and marked <= pruned


def test_cat_diff_restore_of_a_pruned_version_say_so(pruned_journal, capsys, tmp_path):
    """The file's first versions were pruned: nothing retained at or before them."""
    jdir, h, kept, pruned, _ = pruned_journal
    victim = sorted(s for s in pruned if s in h.content)[0]
    assert not [s for s in kept if s < victim and s != 4]  # seq 4 is f2's
    for argv in (["cat", "--version", str(victim)], ["diff"], ["restore", "--to", str(tmp_path / "out"),
                                                               "--version", str(victim)]):
        args = [argv[0], "--journal", str(jdir), *argv[1:], "f1"]
        if argv[0] == "diff":
            args += [str(victim), "now"]
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"version {victim} of f1 was pruned by retention on " in err, err
        assert "no earlier version of it is retained" in err, err
        near = int(err.rsplit("the next retained one is version ", 1)[1].rstrip(")\n"))
        assert near in kept and near > victim
    assert not (tmp_path / "out").exists()


def test_at_a_time_uses_the_latest_retained_version(pruned_journal, capsys, tmp_path):
    import io
    import sys

    jdir, h, kept, pruned, times = pruned_journal
    victim = sorted(s for s in pruned if s in h.content)[-1]
    f1 = set(h.content) - {4}  # seq 4 is f2's only version
    expect = max(s for s in kept & f1 if s < victim)
    buf = io.BytesIO()

    class Out:
        buffer = buf

    old = sys.stdout
    sys.stdout = Out()
    try:  # said on stderr, and a partial result unless --nearest
        at = iso(times[victim] + 1_000_000)
        assert cli.main(["cat", "--journal", str(jdir), "--at", at, "f1"]) == 1
        err = capsys.readouterr().err
        assert err == (f"deltafs: note: f1 given at version {expect} instead of {victim}, which retention "
                       f"pruned ({expect} is the latest version of it retained before that); exit status 1 "
                       "(--nearest accepts this)\n")
        assert buf.getvalue() == h.content[expect]
        assert cli.main(["cat", "--journal", str(jdir), "--at", at, "f1", "--nearest"]) == 0
        assert capsys.readouterr().err.count("\n") == 1
        # a version id names a moment too: the same answer
        assert cli.main(["cat", "--journal", str(jdir), "--version", str(victim), "f1", "--nearest"]) == 0
        assert "instead of" in capsys.readouterr().err
    finally:
        sys.stdout = old
    assert buf.getvalue() == h.content[expect] * 3
    # a whole-tree restore at that time, too
    assert cli.main(["restore", "--journal", str(jdir), "--at", at, "--to", str(tmp_path / "tree"), "",
                     "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["thinned"] == [{"path": "f1", "asked": victim, "given": expect}]
    assert err.count("\n") == 1 and f"f1 restored at version {expect} instead of {victim}" in err
    assert (tmp_path / "tree" / "f1").read_bytes() == h.content[expect]
    assert (tmp_path / "tree" / "f2").read_bytes() == h.content[4]
    assert cli.main(["restore", "--journal", str(jdir), "--at", at, "--to", str(tmp_path / "t2"), "",
                     "--nearest"]) == 0
    assert (tmp_path / "t2" / "f1").read_bytes() == h.content[expect]


# --- the journal size limit --------------------------------------------------------------------
def limit_history(j, clock, n=20, size=200_000):
    h = History(j, clock)
    h.create(1, size)
    h.create(2, size)
    for i in range(n):
        h.advance(2 * MIN)
        for fid in (1, 2):
            h.data[fid] = h.rnd.randbytes(size)  # every version new bytes
            h.save(fid, full=True)
    return h


def test_compact_to_fit_thins_under_a_small_limit(jc):
    j, clock = jc
    h = limit_history(j, clock)
    pinned = sorted(h.content)[3]
    j.kv_put("snapshots", "pin", {"seq": pinned})
    before = j.data_bytes()
    assert M.compact(j).versions_pruned == 0  # all younger than a day
    limit = before // 4
    rep = M.compact_to_fit(j, M.RetentionPolicy(), limit)
    assert rep.pressure_steps > 0 and rep.versions_pruned > 0
    assert rep.data_bytes <= limit < before
    with j.reader() as r:
        kept = set(r.retained_content())
    assert pinned in kept and h.head[1] in kept and h.head[2] in kept
    check_everything_readable(j, h, kept)
    # an unreachable limit: thins as far as it goes, never below newest + pinned
    rep = M.compact_to_fit(j, M.RetentionPolicy(), 1)
    with j.reader() as r:
        kept = set(r.retained_content())
    at_snap = {max(s for s in h.content if s <= pinned and s % 2 == p) for p in (0, 1)}  # files alternate
    assert pinned in at_snap and kept == at_snap | {h.head[1], h.head[2]}
    check_everything_readable(j, h, kept)


@pytest.fixture
def idle_jump_clock():
    """Virtual time that jumps only after 50 ms of real idleness: with a
    threshold of 0 the test's own loop would spin while the compaction
    thread works and starve it of the GIL."""
    import trio.testing

    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_service_compacts_at_once_over_the_limit(jc, idle_jump_clock, caplog):
    import logging
    import trio
    from types import SimpleNamespace

    j, clock = jc
    h = limit_history(j, clock)
    limit = j.data_bytes() // 4
    daemon = SimpleNamespace(journal=j, cfg=SimpleNamespace(
        compact_every=1e9, retention=M.RetentionPolicy(), journal_limit=limit))
    with caplog.at_level(logging.INFO, logger="deltafs.maintenance"):
        async with trio.open_nursery() as n:
            progress = await n.start(M.maintenance_service, daemon)
            t0 = trio.current_time()
            while not progress.pressure:  # set as the pressure pass starts
                await trio.sleep(1)
            took = trio.current_time() - t0
            while progress.passes == 0:
                await trio.sleep(1)
            n.cancel_scope.cancel()
    assert took <= 2 * M.PRESSURE_CHECK_EVERY  # at the first check, not the regular pass (1e9 s)
    assert progress.versions_pruned > 0 and progress.limit_bytes == limit
    assert j.data_bytes() <= limit
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "exceeds its limit" in warnings[0] and "thinning harder" in warnings[0]
    with j.reader() as r:
        kept = set(r.retained_content())
    assert h.head[1] in kept and h.head[2] in kept
    check_everything_readable(j, h, kept)


def test_reading_beside_a_committing_writer_never_deadlocks(tmp_path):
    """Regression: opening a db for a reader started a write transaction
    outside the journal's lock; against a committing thread that froze the
    daemon (both waited inside LMDB, one holding the GIL).  Every database is
    now open once the journal is; readers and data_bytes beside commits."""
    import threading

    from deltafs.journal import Change, Journal

    with Journal.open(str(tmp_path / "j"), create=True) as j:
        stop = threading.Event()

        def commits():
            i = 0
            while not stop.is_set():
                j.commit([Change(op="mkdir", path=f"d{i}".encode(), mode=0o40755)])
                i += 1

        t = threading.Thread(target=commits, daemon=True)
        t.start()
        done = threading.Event()

        def lookups():
            with Journal.open(str(tmp_path / "j"), readonly=True) as ro:  # shares the writer's environment
                for _ in range(300):
                    with ro.reader() as r:
                        assert r.pruned_seqs() == set() and not r.is_pruned(1)
                    j.data_bytes()
            done.set()

        u = threading.Thread(target=lookups, daemon=True)
        u.start()
        assert done.wait(60), "readers deadlocked against the writer"
        stop.set()
        t.join(10)
        assert not t.is_alive()
