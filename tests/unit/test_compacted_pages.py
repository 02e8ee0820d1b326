"""After a compaction pass every LMDB database of a journal is packed (issue 20).

A known small history (one text file edited 300 times, 60 small files
created in random order, as a git checkout makes them) is compacted with
every version kept; then each database's leaf pages are within one of what
its entries need when pages are full, and the planning state takes a page
or two (layout 4: a file's versions in segments; layout 3 took ~38 bytes a
version, 3+ pages here).  Fails if compaction stopped rewriting a database
in key order, or the planning state went back to an entry per version."""

from __future__ import annotations

import random

from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.journal import schema as S
from deltafs.journal.compact import _node_bytes

from test_capture_cache import Daemon

PAGE = 4096


def _pages(st) -> int:
    return st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]


def test_a_compacted_journal_is_packed(tmp_path):
    rnd = random.Random(20)
    d = Daemon(tmp_path)
    doc = d.src / "notes.md"
    lines = [b"line %d of the notes, with a few more words in it\n" % i for i in range(2000)]
    doc.write_bytes(b"".join(lines))
    seq = d.capture(b"notes.md")
    for i in range(300):
        lines[rnd.randrange(len(lines))] = b"changed %d\n" % i
        doc.write_bytes(b"".join(lines))
        seq = d.capture(b"notes.md", base=seq)
    (d.src / "src").mkdir()
    names = [b"src/m%03d.py" % i for i in range(60)]
    rnd.shuffle(names)
    for i, name in enumerate(names):
        (d.src / name.decode()).write_bytes(b"x = %d\n" % i * 40)
        d.capture(name)
    # as history_size's `deltafs compact --retention '*:all'` of a --coalesce 0 mount: no burst,
    # so no version waits for an age (no ``x`` entries; each is 36 bytes of its own)
    M.compact(d.j, parse_retention("*:all", burst=0.0))
    st = d.j._storage
    with st.read() as txn:
        seen, total = {}, _pages(st.env.stat())
        for name in S.ALL_DBS + S.WRITER_DBS:
            db = st.dbs[name]
            s = txn.stat(db)
            if name in S.DUP_DBS:
                need = S.dup_pages_needed(txn, db)
            else:
                need = -(-sum(_node_bytes(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)) // (PAGE - 16))
            seen[name] = (s["leaf_pages"], need, s["entries"])
            if name != S.DB_GRAVEYARD:
                total += _pages(s)
            assert s["leaf_pages"] <= need + 1, (name, s, need)
    assert seen[S.DB_PLAN][0] <= 2, seen[S.DB_PLAN]  # 361 versions of 61 files
    # measured: main 1, changes 1, chunks 3+1, files 2+1, history 2+1, plan 2+1: 15 (17 with layout 3)
    assert total <= 15, (total, seen)
    assert d.j.verify(full=True).ok
    d.j.close()
