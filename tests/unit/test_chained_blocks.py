"""Format 6: record blocks keep the first and last hash only (``S`` blocks),
and the upgrade from format 5 recounts ``raw_bytes`` (issue 20)."""

from __future__ import annotations

import lmdb
import msgpack
import pytest

from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.errors import JournalFormatError
from deltafs.journal import Journal
from deltafs.journal import compact as JC
from deltafs.journal import schema as S
from deltafs.journal.records import check_link

from oldformat import downgrade_to_format_9
from test_journal import FakeClock
from test_packs import edits
from test_record_blocks import many_records


def chain_values(j: Journal) -> list[bytes]:
    with j.reader() as r:
        return [bytes(v) for _, v in r.raw_records()]


def test_an_s_block_rebuilds_every_stored_value_and_is_smaller(tmp_path):
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        many_records(j, 40)
        values = chain_values(j)[:JC.RECORD_BLOCK]
    s_block, r_block = S.encode_record_block(values), S.encode_r_block(values)
    assert s_block[:1] == b"S" and r_block[:1] == b"R"
    assert S.decode_record_block(s_block, len(values)) == values
    assert S.decode_record_block(r_block, len(values)) == values
    # 31 hashes of 32 incompressible bytes are not stored
    assert len(s_block) <= len(r_block) - 28 * (len(values) - 1), (len(s_block), len(r_block))
    one = S.encode_record_block(values[:1])
    assert S.decode_record_block(one, 1) == values[:1]
    with pytest.raises(ValueError, match="holds 32 records, its index says 33"):
        S.decode_record_block(s_block, 33)


def test_a_record_not_chained_by_its_body_goes_into_an_r_block(tmp_path):
    """Version-1 records hash their body alone: their hashes cannot be rebuilt."""
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        many_records(j, 5)
        values = chain_values(j)
    values[2] = bytes(32) + values[2][32:]  # a hash the chain rule does not give
    blob = S.encode_record_block(values)
    assert blob[:1] == b"R" and S.decode_record_block(blob, 5) == values


def test_an_altered_body_inside_an_s_block_breaks_the_chain_at_the_block_end(tmp_path):
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        many_records(j, 40)
        values = chain_values(j)[:8]
    bad = list(values)
    body = bytearray(bad[3][32:])
    body[-1] ^= 0x01  # still decodes (its op: setattr becomes setxattr)
    bad[3] = bad[3][:32] + bytes(body)
    # the S block as a writer made it, but with record 4's body altered
    frame = values[0][:32] + values[-1][:32] + b"".join(S._uvarint(len(v) - 32) + v[32:] for v in bad)
    got = S.decode_record_block(S.CHAINED_BLOCK_MAGIC + S._zstd(frame), 8)
    prev, problems = bytes(32), []
    for i, v in enumerate(got):
        rec, problem = check_link(v, i + 1, prev)
        if problem:
            problems.append((i + 1, problem))
        prev = rec.hash
    assert problems and problems[0][0] == 8 and "altered" in problems[0][1], problems


def downgrade_to_format_5(jp, raw_bytes: int) -> None:
    downgrade_to_format_9(jp, 5)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        meta = env.open_db(S.DB_META, txn=txn)
        txn.put(S.META_FORMAT, msgpack.packb(5), db=meta)
        txn.put(S.META_RAW, msgpack.packb(raw_bytes), db=meta)
    env.close()


def test_a_format_5_journal_is_upgraded_its_r_blocks_read_and_raw_bytes_recounted(tmp_path, monkeypatch):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 12)
        many_records(j, 100)
        monkeypatch.setattr(S, "encode_record_block", lambda v, *a: S.encode_r_block(v))  # what format 5 wrote
        assert M.compact(j, parse_retention("*:all", burst=0)).records_archived >= 2 * JC.RECORD_BLOCK
        monkeypatch.undo()
        values = chain_values(j)
        with j.reader() as r:
            true_raw, stored = r.meta(S.META_RAW), r.meta(S.META_STORED)
    assert true_raw > stored  # text compresses
    downgrade_to_format_5(jp, raw_bytes=true_raw // 3)  # chunks streamed ahead of their record were not counted
    with pytest.raises(JournalFormatError, match="format version 5.*open it once for writing"):
        Journal.open(jp, readonly=True)
    with Journal.open(jp, clock=FakeClock()) as j:
        assert j.format_version == S.FORMAT_VERSION == 13
        with j.reader() as r:
            assert r.meta(S.META_RAW) == true_raw and r.meta(S.META_STORED) == stored
            assert [bytes(v) for _, v in r.raw_records()] == values
            for s, data in content.items():
                assert r.read_content(s) == data
        many_records(j, 80)
        more = M.compact(j, parse_retention("*:all", burst=0)).records_archived
        assert more >= JC.RECORD_BLOCK
        assert j.verify(full=True).ok
        with j.reader() as r:
            kinds = set()
            for _, loc in r.record_blocks():
                pack, off, length, _ = S.decode_block_loc(loc)
                kinds.add(bytes(j._storage.packs.read(pack, off, 1)))
            assert kinds == {b"R", b"U"}  # old blocks stay, new ones are U (format 13)
            assert [bytes(v) for _, v in r.raw_records()][:len(values)] == values


def test_compaction_packs_history_and_pathlog_in_key_order(tmp_path):
    """Seqs appended under many file ids / paths split pages all over both
    trees; compaction rewrites them full, and every lookup still answers."""
    import random

    from deltafs.journal import Change
    rng = random.Random(20)
    ids = {fid: rng.getrandbits(62) | 1 for fid in range(1, 601)}
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        for rnd in range(9):
            j.commit([Change(op="create" if rnd == 0 else "setattr", file_id=ids[fid], path=b"m%d.py" % fid,
                             mode=0o100600 | rnd) for fid in rng.sample(range(1, 601), 600)])
        with j.reader() as r:
            before = {n: r.txn.stat(r.dbs[n])["leaf_pages"] for n in (S.DB_HISTORY,)}  # with pathlog since format 10
            need = {n: S.dup_pages_needed(r.txn, r.dbs[n]) for n in (S.DB_HISTORY,)}  # with pathlog since format 10
            seen = {fid: r.versions_of(ids[fid]) for fid in (1, 150, 300)}
            under = r.versions_under(b"m1")
        assert all(before[n] > need[n] * 1.2 for n in before), (before, need)
        saved = j.densify_index()
        with j.reader() as r:
            after = {n: r.txn.stat(r.dbs[n])["leaf_pages"] for n in (S.DB_HISTORY,)}  # with pathlog since format 10
            assert {fid: r.versions_of(ids[fid]) for fid in (1, 150, 300)} == seen
            assert r.versions_under(b"m1") == under and len(seen[150]) == 9
        assert saved >= sum(before.values()) - sum(after.values()) > 0
        assert all(after[n] <= need[n] + 1 for n in after), (after, need)
        assert j.densify_index() == 0  # nothing left to gain
        assert j.verify(full=True).ok
