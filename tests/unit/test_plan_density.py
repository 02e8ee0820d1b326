"""The planning state (database ``plan``), ``files`` and ``paths`` are packed
by compaction (issue 20).

Its ``v`` (file id, seq) and ``c`` (base seq, seq) keys each grow at the
end of their own key range, inside the tree: every page split leaves two
half-full pages.  (Since layout 3 a version whose base is its file's
previous version, nearly every one, has no ``c`` entry; since layout 4 a
file's versions are packed 32 a ``v`` value.)  A small history's journal then carried 7 pages of
planning state where 4 would do ("files+paths+meta+main" in
docs/benchmarks.md grew from 20 to 48 KiB).  ``densify_index`` rewrites it
in key order like the chunk index; the planner reads the same state back.
"""

from __future__ import annotations

from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.journal import planstate
from deltafs.journal import schema as S
from deltafs.journal.compact import _node_bytes

from test_capture_cache import Daemon


def _plan(j) -> tuple[int, int, list]:
    """-> (leaf pages, pages its entries need when full, its entries)."""
    with j.reader() as r:
        db = r.dbs[S.DB_PLAN]
        st = r.txn.stat(db)
        items = [(bytes(k), bytes(v)) for k, v in r.txn.cursor(db=db)]
    need = -(-sum(_node_bytes(k, v) for k, v in items) // (st["psize"] - 16))
    return st["leaf_pages"], need, items


def test_compaction_packs_the_planning_state(tmp_path):
    d = Daemon(tmp_path)
    path = d.src / "notes.md"
    path.write_bytes(b"line\n" * 200)
    seq = d.capture(b"notes.md")
    for i in range(400):
        path.write_bytes(b"line %d\n" % i + b"line\n" * 200)
        seq = d.capture(b"notes.md", base=seq)
    M.compact(d.j, parse_retention("*:all"))  # plans (fills the state), then packs
    leaves, need, items = _plan(d.j)
    tags = [k[:1] for k, _ in items]
    # a v segment per 32 versions (layout 4; and an x entry while a burst may coalesce)
    assert tags.count(b"v") == -(-401 // planstate.SEGMENT_VERSIONS)
    assert tags.count(b"c") == 0  # none: each base is the version before (layout 3)
    assert leaves <= need + 1, (leaves, need)
    # the planner trusts the packed state and plans the next pass from it
    rep = M.compact(d.j, parse_retention("*:all"))
    assert rep.plan_full_why is None, rep.plan_full_why
    assert _plan(d.j)[2] == items
    assert d.j.verify(full=True).ok
    d.j.close()


def _packed(j, name: bytes) -> tuple[int, int, int]:
    """-> (leaf pages, pages its entries need when full, entries) of database ``name``."""
    with j.reader() as r:
        db = r.dbs[name]
        st = r.txn.stat(db)
        need = -(-sum(_node_bytes(bytes(k), bytes(v)) for k, v in r.txn.cursor(db=db)) // (st["psize"] - 16))
    return st["leaf_pages"], need, st["entries"]


def test_compaction_packs_the_files_and_paths_databases(tmp_path):
    """A work tree's files (random file ids, paths created in any order: a
    git checkout) leave ``files`` and ``paths`` pages part empty."""
    d = Daemon(tmp_path)
    names = [b"src/mod%03d.py" % i for i in range(400)]
    (d.src / "src").mkdir()
    for i, name in enumerate(reversed(names)):
        (d.src / name.decode()).write_bytes(b"x = %d\n" % i)
        d.capture(name)
    with d.j.reader() as r:
        files = {n: r.file_id_at(n) for n in names}
    M.compact(d.j, parse_retention("*:all"))
    for name in (S.DB_FILES, S.DB_PATHS):
        leaves, need, entries = _packed(d.j, name)
        assert entries >= 400 and leaves <= need + 1, (name, leaves, need)
    with d.j.reader() as r:
        assert {n: r.file_id_at(n) for n in names} == files
    assert d.j.verify(full=True).ok
    d.j.close()


def test_children_are_found_without_c_entries_for_the_previous_version(tmp_path):
    """Layout 3: ``children`` finds a file's next version by its ``v`` entry
    when its base is the version before it, and the others (a base in
    another file, an older version of its own) by their ``c`` entry; a
    pruned version in between hides nothing and invents nothing."""
    from deltafs.journal import Journal

    j = Journal.open(tmp_path / "j", create=True)
    with j.planning().update() as p:
        # file 1: 10 <- 11 <- 12, 13 (base 11: a branch), 14 (base 20, file 2's)
        # file 2: 20 <- 21
        for fid, seq, base in ((1, 10, 0), (1, 11, 10), (2, 20, 0), (1, 12, 11), (2, 21, 20),
                               (1, 13, 11), (1, 14, 20)):
            p.add_version(fid, seq, seq * 100, base)
    items = _plan(j)[2]
    assert [(S.from_u64(k[1:9]), S.from_u64(k[9:17]), S.from_u64(v)) for k, v in items if k[:1] == b"c"] \
        == [(11, 13, 1), (20, 14, 1)]  # (base, seq, file id of seq)
    with j.planning().update() as p:
        assert p.children(1, 10) == [(1, 11)]
        assert sorted(p.children(1, 11)) == [(1, 12), (1, 13)]
        assert p.children(1, 12) == [] and p.children(1, 14) == []
        assert sorted(p.children(2, 20)) == [(1, 14), (2, 21)]
    j.close()
