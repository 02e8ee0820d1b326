"""MemStore.paths_under (the replay state of tree_at and of tree checkpoints):
the same answer as a scan of every path, and no scan for a directory with
nothing under it (issue 19: a checkpoint's replay of rm -rf's rmdirs scanned
every path once per directory)."""

from __future__ import annotations

import random

import pytest

from deltafs.journal import MemStore, apply_record, checkpoints, state
from deltafs.journal.records import Record

NAMES = [b"a", b"b", b"a/x", b"a/y", b"a/x/1", b"a/x/2", b"b/c/d", b"ab", b"a/xy", b""]


def scan(store, d: bytes) -> list[bytes]:
    pre = d + b"/" if d else b""
    return sorted(p for p in store.paths if p.startswith(pre) and p != d)


class NoScan(dict):
    def __iter__(self):
        raise AssertionError("paths_under scanned every path")


@pytest.mark.unit
@pytest.mark.parametrize("cls", [MemStore, checkpoints.TreeState])
def test_paths_under_equals_a_scan(cls):
    rnd = random.Random(19)
    for _ in range(200):
        m = cls()
        for _ in range(rnd.randint(0, 40)):
            p = rnd.choice(NAMES)
            what = rnd.random()
            if what < 0.5:
                m.put_path(p, rnd.randint(1, 5), "f")
            elif what < 0.8:
                m.del_path(p)
            elif what < 0.9:  # a checkpoint's dict put in place, as load() does
                m.paths = {q: [1, "f"] for q in rnd.sample(NAMES, 4)}
            else:
                m.paths[rnd.choice(NAMES)] = (9, "f")  # behind the store's back
            d = rnd.choice(NAMES + [b"a/x/1/z", b"zz"])
            assert m.paths_under(d) == scan(m, d), (d, sorted(m.paths))


@pytest.mark.unit
def test_an_empty_directory_is_answered_without_a_scan():
    m = MemStore()
    for i in range(100):
        m.put_path(b"t/d%d" % i, i + 1, "d")
        m.put_path(b"t/d%d/f" % i, 1000 + i, "f")
    for i in range(state.SCANS_BEFORE_COUNTS + 1):  # scans first, then the counts are built
        assert m.paths_under(b"t/d%d" % i) == [b"t/d%d/f" % i]
    assert m._under is not None
    m.del_path(b"t/d7/f")
    m.paths = NoScan(m.paths)
    m._under_of = (id(m.paths), len(m.paths))  # the same paths, in a dict that refuses a scan
    assert m.paths_under(b"t/d7") == []
    assert m.paths_under(b"nothing/here") == []


@pytest.mark.unit
def test_a_replayed_rm_rf_leaves_the_same_tree():
    m = MemStore()
    seq = 0

    def rec(op, path, kind=None):
        nonlocal seq
        seq += 1
        return Record(seq=seq, hlc=seq, op=op, file_id=seq, path=path)

    dirs = [b"t"] + [b"t/%d" % i for i in range(20)]
    for d in dirs:
        apply_record(m, rec("mkdir", d))
    for i in range(20):
        for k in range(5):
            apply_record(m, rec("create", b"t/%d/f%d" % (i, k)))
    for i in range(20):  # rm -rf: the entries, then their directory
        for k in range(5):
            apply_record(m, rec("unlink", b"t/%d/f%d" % (i, k)))
        apply_record(m, rec("rmdir", b"t/%d" % i))
    assert sorted(m.paths) == [b"t"]
    apply_record(m, rec("rmdir", b"t"))
    assert m.paths == {}
