"""Record blocks: compaction moves old records into compressed blocks in the
pack files, and every reader still finds each record, in order, unchanged."""

from __future__ import annotations

import random

import lmdb
import pytest

from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.errors import CorruptionError
from deltafs.journal import Change, Journal
from deltafs.journal import compact as JC
from deltafs.journal import schema as S

from test_journal import FakeClock, version
from test_packs import edits, pack_files


def many_records(j: Journal, n: int) -> None:
    """``n`` records: a file's versions interleaved with namespace changes."""
    j.commit([Change(op="mkdir", file_id=1, path=b"d", mode=0o40755)])
    for i in range(n - 1):
        j.commit([Change(op="setattr", file_id=1, path=b"d", mode=0o40700 | (i % 64))])


def lmdb_records(j: Journal) -> int:
    with j.reader() as r:  # changes holds the blocks' and the checkpoints' keys too (formats 10, 12)
        return sum(1 for k in r.txn.cursor(db=r.dbs[S.DB_CHANGES]).iternext(values=False) if S.is_record_key(k))


def test_compaction_moves_old_records_into_blocks_and_readers_still_find_them(tmp_path):
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 40)
        many_records(j, 260)
        with j.reader() as r:
            head = r.head_seq()
            before = list(r.raw_records())
        assert len(before) == head == 300
        changes_pages = j._storage.env.begin().stat(j._dbs[S.DB_CHANGES])["leaf_pages"]
        data = j.data_bytes()

        rep = M.compact(j, parse_retention("*:all", burst=0))
        # whole blocks, the newest records left as they were
        blocks = (head - JC.RECORDS_KEPT) // JC.RECORD_BLOCK * JC.RECORD_BLOCK
        assert blocks >= 4 * JC.RECORD_BLOCK and head - blocks > JC.RECORDS_KEPT
        assert rep.records_archived == blocks and lmdb_records(j) == head - blocks
        assert j._storage.env.begin().stat(j._dbs[S.DB_CHANGES])["leaf_pages"] < changes_pages
        assert j.data_bytes() < data  # the blocks take less than the pages they freed
        with j.reader() as r:
            assert r.archived_upto() == blocks
            assert list(r.raw_records()) == before
            assert list(r.raw_records(60, 70)) == before[59:70]
            assert list(r.raw_records(120, 200, reverse=True)) == before[119:200][::-1]
            assert [x.seq for x in r.records(reverse=True)] == list(range(head, 0, -1))
            assert r.record(100).hash == before[99][1][:32]
            for s in seqs:  # content versions whose records are now in blocks
                assert r.read_content(s) == content[s]
            assert j.verify(full=True).records == head
            assert r.versions_of(7) == seqs[::-1]
            assert r.seq_at_time(FakeClock().ns) == head
        assert j.verify(full=True).ok
        assert M.compact(j, parse_retention("*:all", burst=0)).records_archived == 0  # nothing new

        more, more_content = edits(j, 2 * JC.RECORD_BLOCK, fid=11)  # the writer goes on after the blocks
        assert M.compact(j, parse_retention("*:all", burst=0)).records_archived == 2 * JC.RECORD_BLOCK
    with Journal.open(tmp_path / "j", readonly=True) as j, j.reader() as r:
        assert j.verify(full=True).records == head + 2 * JC.RECORD_BLOCK
        assert r.read_content(more[-1]) == more_content[more[-1]]


def test_a_repack_moves_record_blocks_with_the_chunks(tmp_path):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 150)
        big = j.commit([version(j, 9, b"big", random.Random(5).randbytes(300_000))])[0]
        assert j.archive_records() > 0  # the blocks go into pack 1 too
        with j.reader() as r:
            before = list(r.raw_records())
            retained = [s for s in r.retained_content() if s != big]
        j._storage.packs.roll()
        j.prune([big], retained)  # pack 1 is now mostly dead
        assert j.repack().packs_emptied == 1
        assert j.repack().packs_deleted == 0 and 1 not in pack_files(jp)  # deleted at once
        with j.reader() as r:
            assert r.txn.get(S.block_key(1), db=r.dbs[S.DB_RECORD_BLOCKS]) is not None
            assert S.decode_block_loc(r.txn.get(S.block_key(1), db=r.dbs[S.DB_RECORD_BLOCKS]))[0] == 2
            assert list(r.raw_records()) == before
            assert r.read_content(seqs[-1]) == content[seqs[-1]]
        assert j.verify(full=True).ok


def flip(jp, pack: int, at: int) -> None:
    with open(jp / "packs" / f"{pack:08x}.pack", "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("where", ["frame header", "middle"])
def test_a_damaged_record_block_is_reported_not_raised(tmp_path, where):
    """A block that no longer decodes is named; one that decodes to altered
    bytes breaks the hash chain. Either way verify says so, without a traceback."""
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        many_records(j, 140)
        assert j.archive_records() >= JC.RECORD_BLOCK
        with j.reader() as r:
            pack, off, length, n = S.decode_block_loc(r.txn.get(S.block_key(1), db=r.dbs[S.DB_RECORD_BLOCKS]))
    flip(jp, pack, off + 1 if where == "frame header" else off + length // 2)
    with Journal.open(jp, readonly=True) as j:
        res = j.verify()
        assert not res.ok
        if where == "frame header":
            assert "record block of records 1.." in res.problem.what
            with j.reader() as r, pytest.raises(CorruptionError, match="record block"):
                r.record(5)
        else:
            # an S block rebuilds the hashes inside it: an altered body shows as a
            # record that no longer decodes, or as the block's last record breaking the chain;
            # a U block's (format 13) deltas may also no longer unpack: the block is named
            assert ("altered" in res.problem.what or "cannot be decoded" in res.problem.what) \
                and res.problem.seq <= n or "record block of records 1.." in res.problem.what
        with j.reader() as r:
            assert r.record(n + 1).seq == n + 1  # other records still read
            assert r.record(140).seq == 140


def test_a_block_that_names_the_wrong_count_is_corruption(tmp_path):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        many_records(j, 140)
        j.archive_records()
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        db = env.open_db(S.DB_CHANGES, txn=txn)  # record blocks are keys of changes since format 10
        pack, off, length, _ = S.decode_block_loc(txn.get(S.block_key(1), db=db))
        txn.put(S.block_key(1), S.encode_block_loc(pack, off, length, JC.RECORD_BLOCK + 1), db=db)
    env.close()
    with Journal.open(jp, readonly=True) as j:
        res = j.verify()
        assert not res.ok and "record block" in res.problem.what
        with j.reader() as r, pytest.raises(CorruptionError):
            list(r.records())


def test_a_pass_archives_whole_multiples_of_32_in_blocks_of_up_to_the_max(tmp_path, monkeypatch):
    """A bigger block compresses better (a path comes again within its
    window); a reader decodes at most RECORD_BLOCK_MAX records for one."""
    assert JC.RECORD_BLOCK_MAX % JC.RECORD_BLOCK == 0
    monkeypatch.setattr(JC, "RECORD_BLOCK_MAX", 256)  # small enough for a short history
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        many_records(j, 700)
        assert j.archive_records() == 699 // JC.RECORD_BLOCK * JC.RECORD_BLOCK == 672
        with j.reader() as r:
            counts = [S.decode_block_loc(loc)[3] for _, loc in r.record_blocks()]
            assert counts == [JC.RECORD_BLOCK_MAX, JC.RECORD_BLOCK_MAX, 672 - 2 * JC.RECORD_BLOCK_MAX]
            assert [rec.seq for rec in r.records()] == list(range(1, 701))
        many_records(j, 40)  # the next pass: what came since, from where the last block ended
        assert j.archive_records() == 64
        with j.reader() as r:
            assert [S.decode_block_loc(loc)[3] for _, loc in r.record_blocks()][-1] == 64
        assert j.verify().ok
