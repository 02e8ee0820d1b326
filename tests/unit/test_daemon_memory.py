"""The daemon's memory does not grow with its history (issue 18, part 4).

LMDB keeps every page a write transaction dirtied in a pool of the
environment and gives it back only when the environment closes.  A rewrite
of a whole database in key order (``Journal.densify_index``) dirtied every
page of it (the chunk index twice): in a mounted daemon that became a
high-water mark of RssAnon that grew with the history.  The rewrite runs in
a child process now; these tests measure this process's RssAnon around it."""

from __future__ import annotations

import os
import random

import lmdb

from deltafs.journal import Journal
from deltafs.journal import schema as S
from deltafs.journal.storage import MAP_SIZE

ENTRIES = 150_000  # a chunk index of ~9 MiB of dense pages


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def sparse_index(path: str) -> None:
    """A chunk index of ENTRIES random ids, inserted in random order (half-full
    pages), written with an environment of its own that is closed again: what
    LMDB pooled for it goes with it."""
    rng = random.Random(18)
    env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=S.MAX_DBS, subdir=True)
    try:
        db = env.open_db(S.DB_CHUNKS, create=False)
        with env.begin(write=True) as txn:
            for i in range(ENTRIES):
                txn.put(rng.randbytes(S.ID_LEN), S.encode_loc(1, 1, 8 + 100 * i, 100, 0), db=db)
    finally:
        env.close()


def test_rewriting_the_chunk_index_leaves_this_process_no_bigger(tmp_path):
    path = str(tmp_path / "j")
    Journal.open(path, create=True).close()
    sparse_index(path)
    with Journal.open(path) as j:
        with j.reader() as r:
            before = r.txn.stat(r.dbs[S.DB_CHUNKS])
            some = [(bytes(k), bytes(v)) for _, (k, v) in zip(range(50), r.txn.cursor(db=r.dbs[S.DB_CHUNKS]))]
        rss0 = rss_anon()
        saved = j.densify_index()
        rise = rss_anon() - rss0
        with j.reader() as r:
            after = r.txn.stat(r.dbs[S.DB_CHUNKS])
            assert all(r.txn.get(k, db=r.dbs[S.DB_CHUNKS]) == v for k, v in some)
    assert before["entries"] == after["entries"] == ENTRIES
    assert saved > 0 and after["leaf_pages"] < 0.8 * before["leaf_pages"], (before, after)
    # in this process, the rewrite dirtied 2 x the dense index (~18 MiB) and LMDB kept it all
    assert rise < 3 << 20, f"RssAnon rose {rise / 2**20:.1f} MiB during the rewrite"


def test_a_failed_child_fails_the_rewrite_and_leaves_the_index(tmp_path, monkeypatch):
    import pytest

    from deltafs.errors import JournalError

    path = str(tmp_path / "j")
    Journal.open(path, create=True).close()
    sparse_index(path)
    monkeypatch.setenv("PYTHONPATH", "")
    with Journal.open(path) as j:
        st = j._storage
        real = st.run_apart

        def broken(entry, args, *a):
            import sys
            monkeypatch.setattr(sys, "executable", "/bin/false")
            return real(entry, args, *a)

        monkeypatch.setattr(st, "run_apart", broken)
        with pytest.raises(JournalError, match="child process"):
            j.densify_index()
        with j.reader() as r:
            assert r.txn.stat(r.dbs[S.DB_CHUNKS])["entries"] == ENTRIES
        # and the write lock is free again
        j.set_setting("x", 1)
