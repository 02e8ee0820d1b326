"""Format 12: ``T`` record blocks leave out the content hashes their own
edits give back; format 13: ``U`` blocks also hold each HLC and mtime as a
delta (issue 20, journal bytes other than chunk values)."""

from __future__ import annotations

import random

import lmdb
import msgpack
import pytest

from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.errors import CorruptionError, JournalFormatError
from deltafs.journal import Change, Journal
from deltafs.journal import compact as JC
from deltafs.journal import schema as S

from oldformat import downgrade_to_format_11
from test_fewer_dbs import named_dbs
from test_journal import FakeClock
from test_packs import edits, text, version
from test_record_blocks import flip, many_records

ALL = parse_retention("*:all", burst=0)


def chain_values(j: Journal) -> list[bytes]:
    with j.reader() as r:
        return [bytes(v) for _, v in r.raw_records()]


def block_kinds(j: Journal) -> list[bytes]:
    with j.reader() as r:
        out = []
        for _, loc in r.record_blocks():
            pack, off, length, _ = S.decode_block_loc(loc)
            out.append(bytes(j._storage.packs.read(pack, off, 1)))
        return out


def block_bytes(j: Journal) -> int:
    with j.reader() as r:
        return sum(S.decode_block_loc(loc)[2] for _, loc in r.record_blocks())


def two_files(j: Journal, n: int) -> dict[int, bytes]:
    """``n`` versions of each of two files, interleaved with other records, so
    a version's base is often in an earlier block and its chain passes a
    checkpoint (every 32 edits)."""
    content = {}
    rng = random.Random(n)
    data = {7: bytearray(text(1, 150_000)), 8: bytearray(text(2, 100_000))}
    base = {7: 0, 8: 0}
    for i in range(n):
        fid = 7 if i % 3 else 8
        d = data[fid]
        at = rng.randrange(len(d) - 100)
        d[at : at + 10] = rng.randbytes(10)
        seq = j.commit([version(j, fid, b"f%d" % fid, bytes(d), base_seq=base[fid],
                                dirty=[(at, at + 10)] if base[fid] else None)])[0]
        content[seq], base[fid] = bytes(d), seq
        if i % 10 == 9:
            many_records(j, 3)
    return content


@pytest.fixture(params=[b"U", b"T"])
def kind(request, monkeypatch):
    """The block kind compaction writes: ``U`` (format 13), or ``T`` (format
    12's, what it writes when no HLC can be squeezed)."""
    if request.param == b"T":
        monkeypatch.setattr(S, "_squeeze", lambda bodies: None)
    return request.param


def test_compaction_writes_t_blocks_that_give_every_stored_value_back(tmp_path, kind):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        content = two_files(j, 120)
        before = chain_values(j)
        rep = M.compact(j, ALL)
        assert rep.records_archived >= 4 * JC.RECORD_BLOCK
        kinds = block_kinds(j)
        assert kinds and set(kinds) == {kind}, kinds
        assert chain_values(j) == before
        t_bytes = block_bytes(j)
        with j.reader() as r:
            s_bytes = sum(len(S.encode_record_block(before[first - 1 : first - 1 + S.decode_block_loc(loc)[3]]))
                          for first, loc in r.record_blocks())
            contents = sum(1 for rec in r.records(1, r.archived_upto()) if rec.is_content)
        # ~33 bytes less a content record (its 32-byte hash is not stored)
        assert t_bytes <= s_bytes - 25 * contents, (t_bytes, s_bytes, contents)
        assert (v := j.verify(full=True)).ok, v.problem
    with Journal.open(jp, readonly=True) as j, j.reader() as r:  # a cold reader, blocks not cached
        assert [bytes(v) for _, v in r.raw_records()] == before
        for seq, data in content.items():
            assert r.read_content(seq) == data


def test_a_cold_read_decodes_the_block_and_at_most_the_one_before(tmp_path, monkeypatch):
    """Putting a block's hashes back reads the bodies of the records its lists
    build on, never another block's hashes: no cascade back to record 1."""
    monkeypatch.setattr(JC, "RECORD_BLOCK_MAX", JC.RECORD_BLOCK)  # many blocks, bases in earlier ones
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        two_files(j, 200)
        M.compact(j, ALL)
        n_blocks = len(block_kinds(j))
        values = chain_values(j)
    assert n_blocks >= 6
    calls = []
    real = S.decode_record_block
    monkeypatch.setattr(S, "decode_record_block", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    with Journal.open(jp, readonly=True) as j, j.reader() as r:
        last = r.archived_upto()
        assert bytes(r.raw_record(last)) == values[last - 1]
    assert 1 <= len(calls) <= 2, calls  # the block, and the one before for the chain's link into it


def _flip_checkpoint(jp, seq: int) -> None:
    """Flip a bit in every chunk id of the chunk-list checkpoint of ``seq``."""
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        db = env.open_db(S.DB_CHANGES, txn=txn)  # checkpoints are keys of changes since format 12
        cp = bytearray(txn.get(S.checkpoint_key(seq), db=db))
        for o in range(3, len(cp), S.ENTRY_LEN):
            cp[o] ^= 0x40
        txn.put(S.checkpoint_key(seq), bytes(cp), db=db)
    env.close()


def test_a_damaged_checkpoint_under_a_t_block_costs_no_record(tmp_path, monkeypatch):
    """A T block puts its content hashes back from lists that may start at a
    chunk-list checkpoint.  A damaged checkpoint gives wrong hashes and the
    block's chain check fails; the reader then rebuilds those lists from the
    records alone, so every record and version still reads back, and verify
    names the checkpoint (before, the whole block of up to 512 records was
    unreadable)."""
    monkeypatch.setattr(JC, "RECORD_BLOCK_MAX", JC.RECORD_BLOCK)  # bases in earlier blocks
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        content = two_files(j, 120)
        M.compact(j, ALL)
        values = chain_values(j)
        with j.reader() as r:
            cps = [seq for seq, _ in r.checkpoints()]
            blocks = [(first, S.decode_block_loc(loc)[3]) for first, loc in r.record_blocks()]
            # a record in a later block than the checkpoint it builds on
            target = next((rec.seq, rec.base_seq) for rec in r.records(1, r.archived_upto())
                          if rec.is_content and rec.base_seq in cps
                          and not any(f <= rec.base_seq < f + n and f <= rec.seq < f + n for f, n in blocks))
    _flip_checkpoint(jp, target[1])
    with Journal.open(jp, readonly=True) as j, j.reader() as r:
        assert bytes(r.raw_record(target[0])) == values[target[0] - 1]
        assert [bytes(v) for _, v in r.raw_records()] == values
        for seq, data in content.items():
            assert r.read_content(seq) == data
    with Journal.open(jp, readonly=True) as j:  # a fresh process's verify, nothing read before
        v = j.verify()
        assert not v.ok and "checkpoint" in v.problem.what and "damaged" in v.problem.what, v.problem


def test_a_damaged_checkpoint_under_a_version_is_read_around(tmp_path):
    """A version whose list starts at a damaged checkpoint is rebuilt from
    the records (its content hash checks it); verify --full names the
    checkpoint."""
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        content = two_files(j, 120)  # records stay in changes: no compaction
        with j.reader() as r:
            cps = [seq for seq, _ in r.checkpoints()]
            assert cps
            later = [seq for seq in content if seq > cps[0]]
        assert (v := j.verify(full=True)).ok, v.problem
    _flip_checkpoint(jp, cps[0])
    with Journal.open(jp, readonly=True) as j:
        with j.reader() as r:
            for seq in later + [cps[0]]:
                assert r.read_content(seq) == content[seq]
        assert j.verify().ok  # the chain of records is intact
    with Journal.open(jp, readonly=True) as j:
        v = j.verify(full=True)
        assert not v.ok and f"checkpoint of record {cps[0]} is damaged" in v.problem.what, v.problem


def test_the_encoder_keeps_a_hash_it_cannot_give_back(tmp_path):
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        seqs, _ = edits(j, 40, size=30_000)
        values = chain_values(j)
        with j.reader() as r:
            first = 33
            good = S.encode_record_block(values[first - 1:], first, r.unchecked_list)
            assert good[:1] == b"U"
            assert S.decode_record_block(good, len(values) - first + 1, first, r.unchecked_list) == values[first - 1:]
            with pytest.raises(ValueError, match="needs the journal"):
                S.decode_record_block(good, len(values) - first + 1)
            # an outside list that is not the base's: no hash would come back right, so every hash
            # stays (a U block without holes, read without the journal)
            wrong = S.encode_record_block(values[first - 1:], first, lambda s: r.unchecked_list(s)[S.ENTRY_LEN:])
            assert wrong[:1] == b"U"
            assert S.decode_record_block(wrong, len(values) - first + 1) == values[first - 1:]


def test_a_format_11_journal_is_upgraded_its_s_blocks_read_and_new_blocks_are_t(tmp_path, monkeypatch):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        content = two_files(j, 80)
        real = S.encode_record_block
        monkeypatch.setattr(S, "encode_record_block", lambda v, *a: real(v))  # no ``outside``: format 11's S
        assert M.compact(j, ALL).records_archived >= 2 * JC.RECORD_BLOCK
        monkeypatch.undo()
        assert set(block_kinds(j)) == {b"S"}  # what format 11 wrote
        values = chain_values(j)
        with j.reader() as r:
            cps = dict(r.checkpoints())
    assert cps
    downgrade_to_format_11(jp)  # the checkpoints in a database of their own
    assert S.DB_CHECKPOINTS in named_dbs(jp)
    with pytest.raises(JournalFormatError, match="format version 11.*open it once for writing"):
        Journal.open(jp, readonly=True)
    with Journal.open(jp, clock=FakeClock()) as j:
        assert j.format_version == S.FORMAT_VERSION == 13
        with j.reader() as r:
            assert dict(r.checkpoints()) == cps  # moved into changes
            assert [bytes(v) for _, v in r.raw_records()] == values
            for seq, data in content.items():
                assert r.read_content(seq) == data
        content.update(two_files(j, 80))
        M.compact(j, ALL)
        kinds = block_kinds(j)
        assert b"S" in kinds and kinds[-1] == b"U", kinds  # old blocks stay, new ones are U (format 13)
        assert (v := j.verify(full=True)).ok, v.problem
        with j.reader() as r:
            for seq, data in content.items():
                assert r.read_content(seq) == data
    assert S.DB_CHECKPOINTS not in named_dbs(jp)



@pytest.mark.parametrize("at", [0.2, 0.4, 0.6, 0.8])
def test_a_damaged_t_block_is_reported_not_raised(tmp_path, at, kind):
    """Bytes flipped inside a T block: whatever they hit (a base, an edit, a
    hole's offset), verify names the damage and a read raises CorruptionError."""
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        two_files(j, 60)
        M.compact(j, ALL)
        assert block_kinds(j)[0] == kind
        with j.reader() as r:
            first, loc = next(r.record_blocks())
            pack, off, length, n = S.decode_block_loc(loc)
    flip(jp, pack, off + int(length * at))
    with Journal.open(jp, readonly=True) as j:
        assert not j.verify().ok
        with j.reader() as r, pytest.raises(CorruptionError):
            for s in range(first, first + n):
                r.record(s)


def test_only_a_flat_hash_is_left_out(tmp_path):
    """A tree hash (key 22) names a list of over 4,096 entries: the writer
    would rebuild it under the write lock only to keep the hash, so it never
    tries (readers put either kind back)."""
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        two_files(j, 3)
        body = chain_values(j)[0][32:]
    d = msgpack.unpackb(body, strict_map_key=False)
    assert isinstance(d[20], bytes)
    off, short = S._hash_hole(body)
    assert short[off - 1] == 20 and short[off:off + 1] == b"\xc0" and len(short) == len(body) - 33
    d[22] = d.pop(20)
    assert S._hash_hole(msgpack.packb(d, use_bin_type=True)) is None


def test_a_u_block_gives_back_every_hlc_and_mtime_byte_for_byte(tmp_path):
    """Format 13: HLCs a tick or minutes apart, mtimes going back and forth
    (and one of 0, one absent), a path holding the mtime's own bytes, a uint-64
    mtime found twice in a body: each body comes back byte for byte, and the
    block is smaller than a T block of the same records."""
    clock = FakeClock()
    rng = random.Random(3)
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=clock) as j:
        j.commit([Change(op="mkdir", file_id=1, path=b"d", mode=0o40755)])
        t = 1_796_655_654_313_431_792
        for i in range(150):
            clock.ns += rng.choice([0, 1, 10**6, 3 * 10**9, 600 * 10**9])
            t += rng.choice([-10**9, -1, 0, 1, 4_000_000_123, 10**12])
            mt = [t, 0, None, t][i % 4]
            path = b"d/f%d" % (i % 9)
            if i == 40:  # the mtime's bytes in the path too: found twice, so left whole
                path = b"d/\x0a\xcf" + t.to_bytes(8, "big").replace(b"/", b"-").replace(b"\0", b"1")
                mt = int.from_bytes(path[4:12], "big")
            j.commit([Change(op="setattr", file_id=2 + i % 9, path=path, mode=0o100600 | i % 64, mtime_ns=mt)])
        values = chain_values(j)
        assert j.archive_records() >= 128
        assert set(block_kinds(j)) == {b"U"}
        with j.reader() as r:
            assert [bytes(v) for _, v in r.raw_records()] == values
            first, loc = next(r.record_blocks())
            n = S.decode_block_loc(loc)[3]
            u = S.encode_record_block(values[:n], first, r.unchecked_list)
        assert u[:1] == b"U" and S.decode_record_block(u, n, first) == values[:n]
        real = S._squeeze
        try:
            S._squeeze = lambda bodies: None
            t_block = S.encode_record_block(values[:n], first, lambda s: b"")
        finally:
            S._squeeze = real
        assert t_block[:1] == b"S" and len(u) < len(t_block) - n, (len(u), len(t_block), n)
        offs, _ = S._squeeze([v[S.HASH_LEN:] for v in values[:n]])
        assert n // 3 < sum(map(bool, offs)) < n and not offs[41], offs  # mtimes of 0 or absent, and i == 40: whole
        assert j.verify(full=True).ok
    with Journal.open(jp, readonly=True) as j:  # a cold reader
        assert chain_values(j) == values


def test_a_block_whose_hlcs_do_not_squeeze_is_written_as_before():
    """A body without a 64-bit HLC at its head, or HLCs not increasing: no U block."""
    body = lambda h, extra=b"": msgpack.packb({0: 2, 1: h, 2: 5, 3: 77, 4: b"p" + extra})  # noqa: E731
    assert S._squeeze([body(1 << 40), body((1 << 40) + 1)]) is not None
    assert S._squeeze([body(1 << 40), body(1 << 40)]) is None  # not increasing
    assert S._squeeze([body(1000)]) is None  # an HLC under 2**32 is not a uint 64
    assert S._squeeze([msgpack.packb([2, 1 << 40])]) is None
    offs, out = S._squeeze([body(1 << 40), body((1 << 40) + 7, b"x")])
    assert S._unsqueeze(offs, out) == [body(1 << 40), body((1 << 40) + 7, b"x")]
