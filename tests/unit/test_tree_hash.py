"""Journal format 11: the two-level content hash of a long chunk list (issue 19).

A version whose list has more than S.TREE_PAGE entries carries the tree
hash (record key 22) instead of the flat one (key 20); the writer keeps the
page hashes of a file's current list so a small edit rehashes one page.
Records written before keep their flat hash and verify by it.
"""

from __future__ import annotations

import random

import lmdb
import msgpack
import pytest

from deltafs.chunking import build_chunk
from deltafs.errors import CorruptionError, JournalFormatError
from deltafs.history.diff import entry_changes
from deltafs.journal import Change, Journal
from deltafs.journal import schema as S
from deltafs.sync.local import sync_hash

from oldformat import downgrade_to_format_11
from test_journal import FakeClock

BIG = S.TREE_PAGE + 904  # two pages


def block(n: int) -> bytes:
    return b"block %09d " % n + bytes([n % 251]) * 20


class File:
    """A file as a list of small blocks, each its own chunk; -> Changes against its last version."""

    def __init__(self, fid: int = 7, path: bytes = b"big"):
        self.fid, self.path, self.blocks, self.seq, self.made = fid, path, [], 0, 0

    def _new(self, k: int) -> list[bytes]:
        out = [block(self.made + i) for i in range(k)]
        self.made += k
        return out

    def change(self, start: int, count: int, k: int, new: list[bytes] | None = None) -> Change:
        """Replace blocks [start, start+count) by k new ones (or by ``new``)."""
        new = self._new(k) if new is None else new
        self.blocks[start:start + count] = new
        edit = [(start, count, [(build_chunk(b).id, len(b)) for b in new])]
        return Change(op="write", file_id=self.fid, path=self.path, size=len(self.data()), cause="write",
                      base_seq=self.seq, edit=edit, chunks=[build_chunk(b) for b in new])

    def commit(self, j: Journal, start: int, count: int, k: int, new: list[bytes] | None = None) -> int:
        self.seq = j.commit([self.change(start, count, k, new)])[-1]
        return self.seq

    def data(self) -> bytes:
        return b"".join(self.blocks)

    def packed(self) -> bytes:
        return S.pack_list((build_chunk(b).id, len(b)) for b in self.blocks)


def body(r, seq: int) -> dict:
    value = dict(r.raw_records())[seq]
    return msgpack.unpackb(bytes(value)[S.HASH_LEN:], raw=False, strict_map_key=False)


def test_incremental_page_hashes_equal_a_fresh_hash_after_any_edit():
    rng = random.Random(5)
    ids = [(rng.randbytes(16), rng.randrange(1, 99999)) for _ in range(3 * S.TREE_PAGE + 17)]
    packed = bytearray(S.pack_list(ids))
    total = sum(n for _, n in ids)
    pages = S.page_hashes(packed)
    for _ in range(60):
        n = len(packed) // S.ENTRY_LEN
        start = rng.randrange(n)
        count = rng.choice([0, 1, 1, 3, 50, 5000])
        count = min(count, n - start)
        k = rng.choice([count, count, 0, 1, count + 2, 4200]) if n < 6 * S.TREE_PAGE else 0
        edit = [(start, count, [(rng.randbytes(16), rng.randrange(1, 99999)) for _ in range(k)])]
        total = S.apply_edit_packed_in_place(packed, total, edit)
        dirty, tail = S.edited_pages(edit)
        pages = S.page_hashes(packed, pages, dirty, tail)
        assert pages == S.page_hashes(packed)
        assert S.tree_root(pages) == S.tree_hash(packed)
    # the definition, spelled out (docs/format.md "Content hash")
    import hashlib
    b = bytes(packed)
    pb = 4096 * 20
    want = hashlib.blake2b(b"\x00\x00\x10\x00" + b"".join(
        hashlib.blake2b(b[o:o + pb], digest_size=32).digest() for o in range(0, len(b), pb)), digest_size=32)
    assert S.tree_hash(b) == want.digest()


def test_a_big_list_gets_the_tree_hash_reads_back_and_a_small_one_keeps_the_flat_hash(tmp_path):
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        small = File(fid=3, path=b"small")
        s1 = small.commit(j, 0, 0, S.TREE_PAGE)  # exactly one page: flat, as format 10 wrote it
        f = File()
        steps = [(0, 0, BIG), (10, 1, 1), (S.TREE_PAGE + 5, 1, 1), (100, 2, 5), (BIG, 0, 3),
                 (50, 0, 0), (S.TREE_PAGE - 1, 2, 2), (0, 1200, 0)]  # the last: back to one page
        seqs = {}
        for st in steps:
            seq = f.commit(j, *st)
            seqs[seq] = (f.data(), f.packed())
        with j.reader() as r:
            rec = r.record(s1)
            assert rec.content_tree is None and rec.content_hash == S.packed_hash(small.packed())
            assert 22 not in body(r, s1) and body(r, s1)[20] == rec.content_hash
            assert r.read_content(s1) == small.data()
            for seq, (data, packed) in seqs.items():
                rec = r.record(seq)
                if len(packed) > S.TREE_PAGE_BYTES:
                    assert rec.content_hash is None and 20 not in body(r, seq)
                    assert rec.content_tree == body(r, seq)[22] == S.tree_hash(packed)
                else:
                    assert rec.content_tree is None and rec.content_hash == S.packed_hash(packed)
                assert r.read_content(seq) == data
                assert r.packed_list(seq)[0] == packed
        assert (v := j.verify(full=True)).ok, v.problem
        hit = j._lists[f.seq]  # the writer's cache: a one-page list has no page hashes
        assert hit[4] is None
        prev = f.commit(j, 0, 0, 900)  # over a page again, from a cache without page hashes
        f.commit(j, 3, 1, 1)
        assert j._lists[f.seq][4] == S.page_hashes(f.packed())
        assert prev not in j._lists
        with j.reader() as r:
            assert r.record(f.seq).content_tree == S.tree_hash(f.packed())
            assert r.read_content(f.seq) == f.data()


def test_a_damaged_page_of_a_big_list_is_caught(tmp_path):
    jp = tmp_path / "j"
    f = File()
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        f.commit(j, 0, 0, BIG)
        seq = f.commit(j, 7, 1, 1)
        assert j.verify(full=True).ok
    # a checkpoint (not covered by the chain) with two equal-length entries of page 1 swapped
    bad = bytearray(f.packed())
    a, b = (S.TREE_PAGE + 1) * S.ENTRY_LEN, (S.TREE_PAGE + 2) * S.ENTRY_LEN
    bad[a:a + S.ENTRY_LEN], bad[b:b + S.ENTRY_LEN] = bad[b:b + S.ENTRY_LEN], bad[a:a + S.ENTRY_LEN]
    assert bytes(bad) != f.packed() and S.page_hashes(bad)[0] == S.page_hashes(f.packed())[0]
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(S.checkpoint_key(seq), bytes(bad), db=env.open_db(S.DB_CHANGES, txn=txn))  # format 12
    env.close()
    with Journal.open(jp, readonly=True) as j:
        with j.reader() as r:
            # the tree hash catches the swap; the list is then rebuilt from the records
            assert r.packed_list(seq)[0] == f.packed() != bytes(bad)
            assert r.damaged_checkpoints() == [f"the chunk-list checkpoint of record {seq} is damaged"]
            assert r.read_content(seq) == f.data()
    with Journal.open(jp, readonly=True) as j:
        v = j.verify(full=True)
        assert not v.ok and "checkpoint" in v.problem.what


def test_a_flat_record_of_a_big_list_from_format_10_still_verifies_after_the_upgrade(tmp_path, monkeypatch):
    jp = tmp_path / "j"
    f = File()
    with monkeypatch.context() as m:  # a format-10 writer: the flat hash whatever the size
        m.setattr(S, "uses_tree", lambda n: False)
        with Journal.open(jp, create=True, clock=FakeClock()) as j:
            old1 = f.commit(j, 0, 0, BIG)
            content1 = f.data()
            old2 = f.commit(j, 9, 1, 1)
            content2 = f.data()
    downgrade_to_format_11(jp)  # the checkpoints in a database of their own
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(S.META_FORMAT, msgpack.packb(10), db=env.open_db(None, txn=txn))
    env.close()
    with pytest.raises(JournalFormatError, match="format version 10.*open it once for writing"):
        Journal.open(jp, readonly=True)
    with Journal.open(jp, clock=FakeClock()) as j:
        assert j.format_version == S.FORMAT_VERSION == 13
        with j.reader() as r:
            for seq, data in ((old1, content1), (old2, content2)):
                rec = r.record(seq)
                assert rec.content_tree is None and rec.content_hash is not None
                assert r.read_content(seq) == data
        assert (v := j.verify(full=True)).ok, v.problem
        new = f.commit(j, 9, 1, 1)  # on an old flat version: the tree hash
        again = f.commit(j, 9, 1, 1, [block(9)])  # old1's block back: content1 again
        with j.reader() as r:
            assert r.record(new).content_tree is not None
            assert r.read_content(again) == content1
            rec_old, rec_new = r.record(old1), r.record(again)
            assert rec_new.content_tree == S.tree_hash(r.packed_list(again)[0])
            assert rec_old.version_hash != rec_new.version_hash  # one content, two kinds of hash
            # ... which no one shows as a difference: diff compares the lists, sync names both flat
            assert entry_changes(r, r.entry_at(old1, b"big"), r.entry_at(again, b"big")) == []
            assert sync_hash(r, rec_new) == rec_old.content_hash
            assert entry_changes(r, r.entry_at(old2, b"big"), r.entry_at(again, b"big")) == ["content"]
        assert (v := j.verify(full=True)).ok, v.problem
        j.prune([new], [old1, old2, again])  # a pruned tree version has no flat name any more
        with j.reader() as r:
            assert r.is_pruned(new) and sync_hash(r, r.record(new)) is None
            assert r.read_content(again) == content1
