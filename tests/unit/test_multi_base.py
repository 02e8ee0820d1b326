"""Journal format 9 (issue 20): a chunk value may be a delta against several bases.

A database moves rows between pages (a page split, an index insert), so a
changed page's new bytes are often in *other* old pages of the same save;
no single base reaches them.  Value format 2 (docs/format.md, "Chunk
value") names up to four bases, whose raw bytes concatenated are the zstd
dictionary; its depth is the sum of (base depth + 1), so a read still
decodes at most MAX_DELTA_DEPTH + 1 values, and the reader enforces that
bound itself.
"""

from __future__ import annotations

import random
import struct

import lmdb
import msgpack
import pytest

from deltafs import chunking as C
from deltafs import maintenance as M
from deltafs.config import parse_retention
from deltafs.errors import CorruptionError, JournalFormatError
from deltafs.journal import Journal
from deltafs.journal import reader as reader_mod
from deltafs.journal import schema as S

from oldformat import downgrade_to_format_9
from test_capture_cache import Daemon
from test_journal import FakeClock, corrupt_chunk
from test_maintenance import recount_refs, stored_refs
from test_packs import edits

PAGE = C.ALIGNED_BLOCK
PAGES = 64
HDR = struct.Struct(">BBI")


def ID(n: int) -> bytes:
    return bytes([n]) * S.ID_LEN


def _text(rnd: random.Random, n: int) -> bytes:
    out, size = [], 0
    while size < n:
        line = b"%08d|%s|\n" % (size, rnd.randbytes(rnd.randint(20, 60)).hex().encode())
        out.append(line)
        size += len(line)
    return b"".join(out)[:n]


# --- the value format ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_chunk_values_round_trip_with_any_number_of_bases(n):
    bases = tuple(ID(i + 1) for i in range(n))
    depth = 3 * n
    v = S.encode_chunk(depth, 1000, bases, b"\x04payload")
    assert S.decode_chunk(v)[:3] == (depth, 1000, bases)
    assert bytes(S.decode_chunk(v)[3]) == b"\x04payload"
    assert v[0] == (S.CHUNK_FMT_MULTI if n > 1 else S.CHUNK_FMT)
    # the header a reader reads alone (chunk_info) is never longer than CHUNK_HDR_MAX
    assert len(v) - len(b"\x04payload") <= S.CHUNK_HDR_MAX


def test_value_format_1_is_written_as_before_format_9():
    assert S.encode_chunk(0, 5, None, b"\x03x") == HDR.pack(1, 0, 5) + b"\x03x"
    assert S.encode_chunk(7, 5, ID(1), b"\x04x") == HDR.pack(1, 7, 5) + ID(1) + b"\x04x"
    assert S.encode_chunk(2, 5, [ID(1), ID(2)], b"\x04x") == HDR.pack(2, 2, 5) + b"\x02" + ID(1) + ID(2) + b"\x04x"


@pytest.mark.parametrize("value,why", [
    (b"\x01\x00", "shorter than its header"),
    (HDR.pack(3, 1, 5) + b"x", "unknown chunk value format 3"),
    (HDR.pack(1, 1, 5) + ID(1)[:5], "cut inside its base id"),
    (HDR.pack(2, 1, 5) + b"\x01" + ID(1) + b"\x04x", "with 1 bases"),
    (HDR.pack(2, 5, 5) + b"\x05" + b"".join(ID(i) for i in range(5)) + b"\x04x", "with 5 bases"),
    (HDR.pack(2, 0, 5) + b"\x02" + ID(1) + ID(2) + b"\x04x", "at depth 0"),
    (HDR.pack(2, 2, 5) + b"\x02" + ID(1) + ID(1) + b"\x04x", "names a base twice"),
    (HDR.pack(2, 2, 5) + b"\x02" + ID(1) + ID(2)[:8], "cut inside its base ids"),
    (HDR.pack(2, 2, 5), "with 0 bases"),
])
def test_bad_chunk_headers_are_refused(value, why):
    with pytest.raises(ValueError, match=why):
        S.decode_chunk(value)


def test_a_block_made_of_two_old_blocks_is_a_small_delta_against_both():
    rnd = random.Random(5)
    a, b = _text(rnd, PAGE), _text(rnd, PAGE)
    new = bytearray(a[PAGE // 2:] + b[:PAGE // 2])  # a page split: half of a, half of b
    new[100:116] = b"0123456789abcdef"
    new = bytes(new)
    A, B = C.Base(C.chunk_id(a), a, 0), C.Base(C.chunk_id(b), b, 6)
    one = C.build_chunk(new, A)  # the old block at the same offset only
    two = C.build_chunk_multi(new, [B, A])
    assert two.bases == (B.id, A.id) and two.base_id == A.id and two.more_bases == (B.id,)
    assert two.depth == (6 + 1) + (0 + 1)
    assert C.decompress_chunk(two.payload, b + a) == new  # the dictionary: the bases in order
    assert len(two.payload) * 10 < len(one.payload), (len(two.payload), len(one.payload))
    # refused: fewer than two bases, a base twice, the chunk itself, too deep together
    assert C.build_chunk_multi(new, [A]) is None
    assert C.build_chunk_multi(new, [A, A]) is None
    assert C.build_chunk_multi(new, [A, C.Base(C.chunk_id(new), new, 0)]) is None
    assert C.build_chunk_multi(new, [B._replace(depth=100), A._replace(depth=27)]) is None  # 101 + 28 > 128
    assert C.build_chunk_multi(new, [B._replace(depth=100), A._replace(depth=26)]).depth == 128


# --- capture: rows moved between pages ------------------------------------------------------------

MOVED = list(range(4, 60, 4))  # 14 of 64 pages: an in-place save


def _split_pages(data: bytearray, rnd: random.Random) -> list[tuple[int, int]]:
    """Each page of MOVED: its second half moves to its front and the first
    half of the next page of MOVED follows (rows moved between pages); plus
    a 16-byte edit.  -> dirty ranges."""
    old = bytes(data)
    for i, p in enumerate(MOVED):
        q = MOVED[(i + 1) % len(MOVED)]
        page = bytearray(old[p * PAGE + PAGE // 2:(p + 1) * PAGE] + old[q * PAGE:q * PAGE + PAGE // 2])
        at = rnd.randrange(PAGE - 16)
        page[at:at + 16] = rnd.randbytes(8).hex().encode()
        data[p * PAGE:(p + 1) * PAGE] = page
    return [(p * PAGE, (p + 1) * PAGE) for p in MOVED]


def _history(tmp_path, saves: int = 3, journal: Journal | None = None) -> tuple[Daemon, int, bytes, list[int]]:
    """A 1 MiB file of text pages, then ``saves`` saves moving rows between
    pages.  -> (daemon, last version, its content, stored bytes per save)."""
    d = Daemon(tmp_path, journal)
    rnd = random.Random(9)
    data = bytearray(_text(rnd, PAGE * PAGES))
    path = d.src / "db"
    path.write_bytes(data)
    seq = d.capture(b"db")
    costs = []
    for _ in range(saves):
        dirty = _split_pages(data, rnd)
        with open(path, "r+b") as f:
            for a, b in dirty:
                f.seek(a)
                f.write(data[a:b])
        with d.j.reader() as r:
            before = r.stats()["stored_bytes"]
        seq = d.capture(b"db", dirty, seq)
        with d.j.reader() as r:
            costs.append(r.stats()["stored_bytes"] - before)
    return d, seq, bytes(data), costs


def test_rows_moved_between_pages_are_stored_against_several_bases(tmp_path):
    d, seq, data, costs = _history(tmp_path)
    assert d.content(seq) == data
    with d.j.reader() as r:
        infos = {cid: r.chunk_info(cid) for cid, _ in r.chunk_list(seq)}
        multi = [i for i in infos.values() if len(i.bases) > 1]
        assert len(multi) >= len(MOVED) // 2, [len(i.bases) for i in infos.values()]
        for i in multi:
            assert 2 <= len(i.bases) <= S.MAX_BASES
            assert i.depth == sum(r.chunk_info(b).depth + 1 for b in i.bases) <= C.MAX_DELTA_DEPTH
    # half of each moved page is new to its own old page: against that page alone
    # each costs about half a page compressed; against the page its rows came from, ~nothing
    half = len(C.compress_chunk(data[:PAGE // 2]))
    print("per save", costs, "one base would cost about", len(MOVED) * half)
    for cost in costs:
        assert cost < len(MOVED) * half / 4, (costs, half)
    assert stored_refs(d.j) == recount_refs(d.j)  # each base counts the value once
    assert (v := d.j.verify(full=True)).ok, v.problem
    d.j.close()


def test_a_corrupt_value_with_several_bases_is_an_error(tmp_path):
    d, seq, data, _ = _history(tmp_path, saves=1)
    with d.j.reader() as r:
        cid = next(cid for cid, _ in r.chunk_list(seq) if len(r.chunk_info(cid).bases) > 1)
        victim = r.chunk_info(cid).bases[0]
    d.j.close()
    jp = tmp_path / "journal"
    corrupt_chunk(jp, cid)  # the payload's last byte
    with Journal.open(jp, readonly=True) as j:
        with j.reader() as r, pytest.raises(CorruptionError, match=cid.hex()):
            r.read_content(seq)
        assert not j.verify(full=True).ok
    corrupt_chunk(jp, cid)  # repaired; now one of its bases
    corrupt_chunk(jp, victim)
    with Journal.open(jp, readonly=True) as j:
        with j.reader() as r, pytest.raises(CorruptionError):
            r.read_content(seq)
        assert not j.verify(full=True).ok


def test_compaction_frees_values_with_several_bases_and_keeps_their_bases(tmp_path):
    d, seq, data, _ = _history(tmp_path, saves=4)
    rep = M.compact(d.j, parse_retention("*:none"))  # every version but the newest
    assert rep.versions_pruned == 4 and rep.chunks_freed > 0
    with d.j.reader() as r:
        assert r.read_content(seq) == data
        assert any(len(r.chunk_info(cid).bases) > 1 for cid, _ in r.chunk_list(seq))
    refs = recount_refs(d.j)
    assert stored_refs(d.j) == refs
    with d.j.reader() as r:  # everything unreferenced was freed
        assert set(r.txn.cursor(db=r.dbs[S.DB_CHUNKS]).iternext(values=False)) == set(refs)
    assert (v := d.j.verify(full=True)).ok, v.problem
    d.j.close()


# --- the reader's bound ---------------------------------------------------------------------------

def _chain(j: Journal, rnd: random.Random, n: int) -> C.Base:
    """A delta chain of n + 1 small values, stored ahead of any record: -> its last."""
    raw = _text(rnd, 2000)
    first = C.build_chunk(raw)
    j.put_chunks([first])
    base = C.Base(first.id, raw, 0)
    for k in range(n):
        at = (37 * k) % 1900
        raw = raw[:at] + b"#%04d" % k + raw[at + 5:]
        nc = C.build_chunk(raw, base)
        assert nc.base_id == base.id
        j.put_chunks([nc])
        base = C.Base(nc.id, raw, nc.depth)
    return base


def test_a_read_decodes_at_most_129_values_whatever_the_depths_say(tmp_path, monkeypatch):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(3)
    a, b = _chain(j, rnd, 70), _chain(j, rnd, 70)
    new = a.raw[:1000] + b.raw[1000:]
    assert C.build_chunk_multi(new, [a, b]) is None  # 71 + 71 > 128: the writer never makes it
    payload = C.compress_chunk(new, a.raw + b.raw)
    lie = C.NewChunk(C.chunk_id(new), len(new), payload, b.id, 128, (a.id,))  # says 128, needs 143
    loop_raw = _text(rnd, 3000)
    loop = C.NewChunk(C.chunk_id(loop_raw), len(loop_raw), C.compress_chunk(loop_raw, loop_raw),
                      C.chunk_id(loop_raw), 1)  # its own base
    # the writer refuses both (Journal._stored_depth): store them as another program might
    j.append_raw([], {nc.id: S.encode_chunk(nc.depth, nc.raw_len, nc.bases, nc.payload) for nc in (lie, loop)})
    calls = []
    real = reader_mod.decompress_chunk
    monkeypatch.setattr(reader_mod, "decompress_chunk", lambda p, b=None: calls.append(1) or real(p, b))
    with j.reader() as r:
        with pytest.raises(CorruptionError, match="more than 129 decompressions"):
            r.read_chunk(lie.id)
        assert len(calls) <= C.MAX_DELTA_DEPTH + 1
        with pytest.raises(CorruptionError, match="loops"):
            r.read_chunk(loop.id)
        # a value within the bound reads: bases from chains of 40 and 50
        calls.clear()
        a2, b2 = _chain(j, rnd, 40), _chain(j, rnd, 50)
        mid = a2.raw[:1500] + b2.raw[1500:]
        ok = C.build_chunk_multi(mid, [a2, b2])
        assert ok is not None and ok.depth == 41 + 51
    j.put_chunks([ok])
    with j.reader() as r:
        calls.clear()
        assert r.read_chunk(ok.id) == mid
        assert len(calls) == 41 + 51 + 1
    j.close()


# --- upgrade ----------------------------------------------------------------------------------------

def test_a_format_8_journal_is_upgraded_and_takes_values_with_several_bases(tmp_path):
    jp = tmp_path / "journal"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 6)
    downgrade_to_format_9(jp, 8)
    with pytest.raises(JournalFormatError, match="format version 8.*open it once for writing"):
        Journal.open(jp, readonly=True)
    j = Journal.open(jp, clock=FakeClock())
    assert j.format_version == S.FORMAT_VERSION == 13
    with j.reader() as r:
        for s, data in content.items():  # format-8 values read as they are
            assert r.read_content(s) == data
    # and the upgraded journal takes new values with several bases
    d, seq, data, _ = _history(tmp_path, saves=1, journal=j)
    with j.reader() as r:
        assert r.read_content(seq) == data
        assert any(len(r.chunk_info(cid).bases) > 1 for cid, _ in r.chunk_list(seq))
    assert (v := j.verify(full=True)).ok, v.problem
    j.close()
    with Journal.open(jp, readonly=True) as j2:
        assert j2.format_version == S.FORMAT_VERSION
