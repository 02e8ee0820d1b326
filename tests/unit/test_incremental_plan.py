"""Incremental compaction planning (issue 18): a pass plans from its
planning state (the records since the last pass, files due by age) and
must prune exactly what the full plan (every version decoded) prunes, over
random histories: saves, time jumps, snapshots, mirrors, policy changes,
cross-file delta bases, lost state.  Each retained version still reads
back its bytes afterwards."""

from __future__ import annotations

import random
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.journal import Change, Journal

from test_maintenance import DAY, HOUR, MIN, SEC, FakeClock, at, version

POLICIES = [
    M.RetentionPolicy(),
    parse_retention("1m:all,1h:10m,1d:1h,*:1d"),
    parse_retention("30s:all,*:none", burst=5.0),
    parse_retention("2m:all,*:1h", burst=0.0),
]
STEPS = [1 * SEC, 4 * SEC, 20 * SEC, 59 * SEC, 61 * SEC, 2 * MIN, 10 * MIN, HOUR, 5 * HOUR, DAY, 3 * DAY]

class Run:
    def __init__(self, path: str, seed: int) -> None:
        self.clock = FakeClock()
        self.j = Journal.open(path, create=True, clock=self.clock)
        self.rnd = random.Random(seed)
        self.data: dict[int, bytes] = {}
        self.head: dict[int, int] = {}
        self.content: dict[int, bytes] = {}
        self.passes = 0

    def save(self, fid: int, how: int) -> None:
        if fid not in self.data:
            self.j.commit([Change(op="create", file_id=fid, path=f"f{fid}".encode(), mode=0o100644)])
            self.data[fid] = self.rnd.randbytes(self.rnd.randrange(30_000, 90_000))  # several chunks
            base = 0
        else:
            d = bytearray(self.data[fid])
            o = self.rnd.randrange(len(d) - 100)
            d[o : o + 50] = self.rnd.randbytes(50)  # the other chunks are inherited from the base
            self.data[fid] = bytes(d)
            base = self.head[fid]
        if how == 0 and len(self.head) > 1:  # a delta against another file's version (allowed by the writer)
            base = self.rnd.choice(sorted(s for f, s in self.head.items() if f != fid))
        with self.j.reader() as r:
            if base and r.is_pruned(base):
                base = 0
        ch = version(self.j, fid, f"f{fid}".encode(), self.data[fid], base)
        (seq,) = self.j.commit([ch])
        self.head[fid] = seq
        self.content[seq] = self.data[fid]

    def compact(self, pi: int, when: int) -> None:
        policy = POLICIES[pi]
        now = None if when else at(self.clock.ns)  # the journal's time, or the clock's (later)
        full_prune, full_keep, _ = M.plan(self.j, policy, now)
        rep = M.compact(self.j, policy, now_hlc=now)
        assert sorted(rep.pruned) == full_prune, (self.passes, policy.spec())
        assert rep.versions == len(full_prune) + len(full_keep)
        self.passes += 1
        self.check()

    def check(self) -> None:
        with self.j.reader() as r:
            retained = set(r.retained_content())
            for seq in retained:
                assert r.read_content(seq) == self.content[seq], seq

    def apply(self, o) -> None:
        kind, a, b = o
        if kind == "save":
            self.save(a, b)
        elif kind == "advance":
            self.clock.ns += a
        elif kind == "compact":
            self.compact(a, b)
        elif kind == "snapshot":
            name = f"s{a}"
            if b:
                with self.j.reader() as r:
                    self.j.kv_put("snapshots", name, {"seq": r.head_seq()})
            else:
                self.j.kv_delete("snapshots", name)
        elif kind == "mirror":
            if b:
                with self.j.reader() as r:
                    self.j.kv_put("mirrors", "file:///m", {"seq": r.head_seq() * a // 100})
            else:
                self.j.kv_delete("mirrors", "file:///m")
        elif kind == "lose_state":
            self.j.planning().invalidate()


def random_ops(rnd: random.Random, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        x = rnd.random()
        if x < 0.45:
            out.append(("save", rnd.randint(1, 5), rnd.randint(0, 9)))
        elif x < 0.70:
            out.append(("advance", rnd.choice(STEPS), 0))
        elif x < 0.88:
            out.append(("compact", rnd.choice([0, 0, 0, 1, 2, 3]), rnd.randint(0, 3)))
        elif x < 0.93:
            out.append(("snapshot", rnd.randint(0, 2), rnd.randint(0, 1)))
        elif x < 0.98:
            out.append(("mirror", rnd.randint(0, 100), rnd.randint(0, 1)))
        else:
            out.append(("lose_state", 0, 0))
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32))
def test_incremental_plan_prunes_what_the_full_plan_prunes(seed):
    rnd = random.Random(seed)
    ops = random_ops(rnd, 70)
    with tempfile.TemporaryDirectory() as d:
        run = Run(d + "/j", seed)
        try:
            for o in ops:
                run.apply(o)
            run.compact(seed % len(POLICIES), 1)  # and a last pass at the journal's time
            assert run.j.verify(full=True).ok
        finally:
            run.j.close()


def test_a_quiet_file_is_planned_again_once_its_versions_age():
    """Nothing new for file 1, but its burst became old enough to coalesce:
    the pass must still prune it (the wake-up index), and asks only about
    the files that are due."""
    with tempfile.TemporaryDirectory() as d:
        run = Run(d + "/j", 1)
        try:
            for _ in range(3):
                run.save(1, 1)
                run.clock.ns += 2 * SEC
            for fid in range(2, 30):
                run.save(fid, 1)
            run.compact(0, 1)  # too young to coalesce: nothing pruned
            run.clock.ns += 2 * MIN
            run.save(2, 1)  # the journal's time moves on
            rep = M.compact(run.j, POLICIES[0])
            assert len(rep.pruned) == 2 and rep.files_examined == 2  # file 1 (due) and file 2 (new)
            run.check()
        finally:
            run.j.close()


def test_a_prune_outside_the_planner_makes_it_rebuild():
    """The state agrees with the journal's pruned counter, or is rebuilt."""
    with tempfile.TemporaryDirectory() as d:
        run = Run(d + "/j", 2)
        try:
            for _ in range(4):
                run.save(1, 1)
                run.clock.ns += 2 * SEC
            run.clock.ns += 2 * MIN
            run.save(2, 1)
            M.compact(run.j, POLICIES[1])
            with run.j.planning().update() as p:  # what an older deltafs's prune leaves behind
                m = p.meta()
                p.set_meta({**m, "pruned": m["pruned"] - 1})
            run.save(1, 1)
            run.clock.ns += 2 * MIN
            run.save(3, 1)
            full = M.plan(run.j, POLICIES[1])[0]
            rep = M.compact(run.j, POLICIES[1])
            assert sorted(rep.pruned) == full and rep.files_examined == 3
            run.check()
        finally:
            run.j.close()


def test_a_pass_reads_what_changed_not_the_history():
    """A file with a long retained history (everything younger than a day is
    kept): a pass after one more save reads only its newest versions, and a
    version whose age crosses a threshold is found without reading the rest."""
    with tempfile.TemporaryDirectory() as d:
        run = Run(d + "/j", 3)
        try:
            for _ in range(60):
                run.save(1, 1)
                run.clock.ns += 30 * SEC  # no bursts: every version is kept for a day
            run.compact(0, 0)
            run.save(1, 1)
            run.clock.ns += 30 * SEC
            run.save(2, 1)
            rep = M.compact(run.j, POLICIES[0])
            # file 1: the new version, those that reached a minute of age since, the one before; file 2: 1
            assert rep.versions_examined <= 6 and rep.files_examined == 2, rep
            run.save(1, 1)
            run.clock.ns += 2 * SEC
            run.save(1, 1)  # 2 s later: the previous one is a burst once older than a minute
            run.clock.ns += 2 * MIN
            run.save(3, 1)
            full = M.plan(run.j, POLICIES[0])[0]
            rep = M.compact(run.j, POLICIES[0])
            assert sorted(rep.pruned) == full and len(full) >= 1
            assert rep.versions_examined <= 8, rep
            run.check()
        finally:
            run.j.close()


def test_graveyard_purge_is_bounded_and_goes_round():
    """Each pass looks at a bounded share of the graveyard, going on where the
    last one stopped, so every expired entry goes in a few passes."""
    from deltafs.journal import schema as S

    with tempfile.TemporaryDirectory() as d:
        run = Run(d + "/j", 4)
        try:
            st = run.j._storage
            with st.write() as txn:
                for i in range(100):
                    txn.put(i.to_bytes(16, "big"), S.u64(1) + b"x", db=st.dbs[S.DB_GRAVEYARD])
            comp = run.j._compactor
            got = [comp.purge_graveyard(limit=30) for _ in range(4)]
            assert got == [30, 30, 30, 10]
            assert comp.purge_graveyard(limit=30) == 0
        finally:
            run.j.close()


def test_a_new_snapshot_does_not_replan_every_file():
    """A snapshot added (a guard alert names one) only pins more: the next
    pass asks about what changed, not every file (the soak's "files planned"
    spike to all 24,000 files); a snapshot removed asks about every file."""
    with tempfile.TemporaryDirectory() as d:
        run = Run(d + "/j", 5)
        try:
            for fid in range(1, 41):
                run.save(fid, 1)
            run.clock.ns += 2 * MIN
            run.compact(0, 1)
            with run.j.reader() as r:
                head = r.head_seq()
            run.j.kv_put("snapshots", "guard-1", {"seq": head})
            run.save(1, 1)
            rep = M.compact(run.j, POLICIES[0])
            assert rep.files_examined == 1 and rep.plan_full_why is None, rep
            assert sorted(rep.pruned) == M.plan(run.j, POLICIES[0])[0]
            run.j.kv_delete("snapshots", "guard-1")
            run.save(2, 1)
            rep = M.compact(run.j, POLICIES[0])
            assert rep.files_examined == 40 and rep.plan_full_why == "a snapshot removed", rep
            run.check()
        finally:
            run.j.close()


def test_planning_decodes_new_records_without_their_lists(tmp_path, monkeypatch):
    """The plan needs a record's file, time and base only: records are decoded
    with ``lists=False``, by the planning state's rebuild and by each plan after
    it (issue 19, eleventh session: a 4 GiB file's edit decodes to ~27 MiB of
    Python objects, at the compaction pass after its capture)."""
    from deltafs.journal import planstate
    calls = []
    real = M.decode_record

    def spy(v, seq, **kw):
        calls.append(kw.get("lists", True))
        return real(v, seq, **kw)
    monkeypatch.setattr(M, "decode_record", spy)
    monkeypatch.setattr(planstate, "decode_record", spy)
    run = Run(str(tmp_path / "j"), 19)
    for rnd in range(2):  # the first plan rebuilds the state, the second reads new records
        for i in range(12):
            run.save(1 + i % 3, 1)
            run.clock.ns += MIN
        n = len(calls)
        run.compact(1, 0)
        assert len(calls) > n and not any(calls)
