"""pastfs without FUSE: the decoded-chunk cache stays within its bound; the inode table."""

import pytest

from deltafs.journal import KIND_DIR, KIND_FILE, KIND_SYMLINK, TreeEntry
from deltafs.pastfs import ChunkCache, PastTree

pytestmark = pytest.mark.unit


def test_cache_evicts_least_recently_used_within_its_byte_bound():
    c = ChunkCache(10)
    c.put(b"a", b"1234")
    c.put(b"b", b"1234")
    assert c.get(b"a") == b"1234"  # a is now the most recent
    c.put(b"c", b"1234")  # 12 bytes > 10: b goes
    assert c.get(b"b") is None
    assert c.get(b"a") == b"1234" and c.get(b"c") == b"1234"
    assert c.used == 8 <= c.limit


def test_cache_never_holds_a_chunk_larger_than_its_bound():
    c = ChunkCache(4)
    c.put(b"big", b"12345")
    assert c.get(b"big") is None and c.used == 0


def test_cache_bound_holds_over_many_puts():
    c = ChunkCache(1000)
    for i in range(500):
        c.put(i.to_bytes(4, "big"), bytes(i % 97))
        assert c.used <= 1000
    assert c.used == sum(len(v) for v in c._d.values())


def test_cache_replacing_a_chunk_counts_it_once():
    c = ChunkCache(100)
    c.put(b"a", b"xx")
    c.put(b"a", b"xx")
    assert c.used == 2 and len(c) == 1


def _e(path, kind, fid, link_group=None, target=None, mode=None):
    return TreeEntry(path, kind, fid, 0, 0, mode, None, None, 5, None, target, {}, link_group)


def test_tree_shares_an_inode_between_hard_links_and_counts_links():
    tree = {b"d": _e(b"d", KIND_DIR, 1, mode=0o40750), b"d/a": _e(b"d/a", KIND_FILE, 2, link_group=2),
            b"b": _e(b"b", KIND_FILE, 2, link_group=2), b"s": _e(b"s", KIND_SYMLINK, 3, target=b"b")}
    t = PastTree(tree, 7, 0, 0)
    a, b = t.lookup_path(b"d/a"), t.lookup_path(b"b")
    assert a is b and a.nlink == 2
    assert t.lookup_path(b"d").mtime_ns == 5 and t.nodes[1].mtime_ns == 7
    assert t.nodes[1].nlink == 3  # ., .. and d/..
    assert t.mode(t.lookup_path(b"d")) == 0o40750
    assert t.size(t.lookup_path(b"s")) == 1
    assert t.lookup_path(b"nope") is None
