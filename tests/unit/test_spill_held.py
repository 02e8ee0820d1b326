"""Issue 19: a big capture's spilled chunks are indexed in few transactions.

``Journal.spill_chunks`` (what a capture's 8 MiB spills call) appends the
chunk values to the pack at once and holds their index entries (refs 0, the
bases' increfs, pack_live, stored/raw) until HOLD_BYTES or HOLD_ENTRIES wait,
or the next write transaction: the record's commit at the latest.  These
tests hold it to what put_chunks guaranteed: a chunk stored once however
often and by whomever it is spilled, exact counts, a record never committed
without its chunks findable, compaction never losing or freeing a held value,
and a crash leaving only dead pack bytes that repacking drops.
"""

from __future__ import annotations

import os
import random

import pytest

from deltafs import chunking as C
from deltafs.capture import content as CC
from deltafs.journal import Change, Journal
from deltafs.journal import core as JC
from deltafs.journal import schema as S
from deltafs.journal.packs import PACK_MAGIC, pack_live

from test_capture_cache import Daemon
from test_journal import FakeClock
from test_multi_base import _chain


def _chunks(rnd: random.Random, n: int, size: int = 20_000) -> list[tuple[bytes, C.NewChunk]]:
    out = []
    for _ in range(n):
        raw = rnd.randbytes(size)
        out.append((raw, C.build_chunk(raw)))
    return out


def _write(path: bytes, chunks) -> Change:
    """A content version made of ``chunks`` (its new ones passed separately by the caller)."""
    size = sum(len(raw) for raw, _ in chunks)
    return Change(op="write", path=path, size=size, mode=0o100644, cause="write",
                  edit=[(0, 0, [(nc.id, len(raw)) for raw, nc in chunks])], chunks=[])


def _pack_end(j: Journal) -> int:
    return j._storage.packs.end or len(PACK_MAGIC)  # (no pack yet: the first value starts one)


def _indexed(j: Journal, cid: bytes) -> bool:
    with j.reader() as r:
        return r.has_chunk(cid)


def _refs(j: Journal, cid: bytes) -> int:
    with j.reader() as r:
        return r.chunk_refs(cid)


def _live_sums(j: Journal) -> tuple[dict[int, int], dict[int, int]]:
    """(pack_live from meta, the sum of the index's value lengths per pack)."""
    with j.reader() as r:
        meta = pack_live(r.txn, r.dbs)
        sums: dict[int, int] = {}
        for _, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]):
            _, pack, _, length, _ = S.decode_loc(v)
            sums[pack] = sums.get(pack, 0) + length
    return meta, sums


def _meta(j: Journal, key: bytes) -> int:
    with j.reader() as r:
        return r.meta(key, 0)


def test_spilled_entries_wait_for_the_commit_and_count_as_put_chunks_counts(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(1)
    a = _chunks(rnd, 6)
    stored0, syncs = _meta(j, S.META_STORED), j.sync_count
    end0 = _pack_end(j)
    n = j.spill_chunks([nc for _, nc in a[:3]])
    n += j.spill_chunks([nc for _, nc in a[3:]])
    assert _pack_end(j) - end0 == n > 6 * 20_000  # the values are in the pack now
    assert j.sync_count == syncs  # no transaction yet
    assert not any(_indexed(j, nc.id) for _, nc in a)  # held: no reader sees them
    assert len(j._storage.held) == 6
    (seq,) = j.commit([_write(b"f", a)])
    assert not j._storage.held and j.sync_count == syncs + 1  # indexed in the record's commit
    with j.reader() as r:
        assert r.read_content(seq) == b"".join(raw for raw, _ in a)
        assert all(r.chunk_refs(nc.id) == 1 for _, nc in a)
    assert _meta(j, S.META_STORED) - stored0 == n
    assert _meta(j, S.META_RAW) >= 6 * 20_000
    meta, sums = _live_sums(j)
    assert meta == sums
    assert j.verify(full=True).ok
    j.close()


def test_a_chunk_spilled_twice_or_stored_meanwhile_by_another_capture_is_stored_once(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(2)
    a = _chunks(rnd, 3)
    x = a[1]
    end0 = _pack_end(j)
    j.spill_chunks([nc for _, nc in a[:2]])
    one = _pack_end(j) - end0
    j.spill_chunks([x[1], a[2][1]])  # x again, in a later spill of the same capture
    two = _pack_end(j) - end0 - one
    assert two == len(S.chunk_header(20_000)) + len(a[2][1].payload)  # only the new one appended
    # another capture (another file) commits a version naming x, x among its new chunks:
    # x is the held value, indexed by this commit, not a second copy
    other = _chunks(rnd, 1) + [x]
    ch = _write(b"g", other)
    ch.chunks = [nc for _, nc in other]
    end1 = _pack_end(j)
    (s1,) = j.commit([ch])
    assert _pack_end(j) - end1 == len(S.chunk_header(20_000)) + len(other[0][1].payload)
    assert _refs(j, x[1].id) == 1
    (s2,) = j.commit([_write(b"f", a)])  # the first capture's record
    assert _refs(j, x[1].id) == 2 and _refs(j, a[0][1].id) == 1
    with j.reader() as r:
        assert r.read_content(s1) == b"".join(raw for raw, _ in other)
        assert r.read_content(s2) == b"".join(raw for raw, _ in a)
    meta, sums = _live_sums(j)
    assert meta == sums
    j.close()


def test_a_spilled_delta_counts_its_base_and_a_spilled_base_serves_a_later_spill(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(3)
    base = _chain(j, rnd, 3)  # depth 3, indexed
    refs0 = _refs(j, base.id)
    raw1 = base.raw[:100] + b"one" + base.raw[103:]
    d1 = C.build_chunk(raw1, base)
    assert d1.base_id == base.id
    j.spill_chunks([d1])
    raw2 = raw1[:300] + b"two" + raw1[303:]
    d2 = C.build_chunk(raw2, C.Base(d1.id, raw1, d1.depth))
    assert d2.base_id == d1.id
    j.spill_chunks([d2])  # its base is held, not indexed: the depth comes from the held entry
    assert _refs(j, base.id) == refs0  # nothing counted yet
    j.flush_chunks()
    with j.reader() as r:
        assert r.chunk_info(d1.id).depth == 4 and r.chunk_info(d2.id).depth == 5
        assert r.read_chunk(d2.id) == raw2
        assert r.chunk_refs(d1.id) == 1 and r.chunk_refs(d2.id) == 0
    assert _refs(j, base.id) == refs0 + 1
    j.close()


def test_too_deep_or_a_base_only_in_the_graveyard_goes_through_put_chunks(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(4)
    deep = _chain(j, rnd, C.MAX_DELTA_DEPTH)
    raw = deep.raw[:100] + b"x" + deep.raw[101:]
    from test_writer_depth import _forced_delta
    lie = _forced_delta(raw, deep, 3)
    with pytest.raises(ValueError, match="depth 129, over 128"):
        j.spill_chunks([lie])
    with j.reader() as r:
        assert not r.has_chunk(lie.id)
    # a base freed into the graveyard is brought back, as put_chunks does
    old = _chunks(rnd, 1)
    ch = _write(b"old", old)
    ch.chunks = [old[0][1]]
    (s,) = j.commit([ch])
    j.commit([Change(op="unlink", path=b"old")])
    j.prune([s], [])
    assert not _indexed(j, old[0][1].id)
    raw2 = old[0][0][:50] + b"new" + old[0][0][53:]
    d = C.build_chunk(raw2, C.Base(old[0][1].id, old[0][0], 0))
    assert d.base_id == old[0][1].id
    j.spill_chunks([d])
    with j.reader() as r:
        assert r.read_chunk(d.id) == raw2 and r.chunk_refs(old[0][1].id) == 1
    j.close()


def test_hold_bounds_flush_in_a_transaction_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(JC, "HOLD_BYTES", 40_000)
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    a = _chunks(random.Random(5), 5)
    syncs = j.sync_count
    j.spill_chunks([a[0][1], a[1][1]])
    assert not j._storage.held and j.sync_count == syncs + 1 and _indexed(j, a[0][1].id)
    monkeypatch.setattr(JC, "HOLD_BYTES", 1 << 30)
    monkeypatch.setattr(JC, "HOLD_ENTRIES", 3)
    j.spill_chunks([a[2][1], a[3][1]])
    assert len(j._storage.held) == 2
    j.spill_chunks([a[4][1]])
    assert not j._storage.held and j.sync_count == syncs + 2
    j.close()


def test_a_big_capture_indexes_its_spills_in_its_commit(tmp_path, monkeypatch):
    """A capture of 48 spills: one transaction (the commit), the journal as before."""
    monkeypatch.setattr(CC, "CHUNK_FLUSH_BYTES", 64 << 10)
    d = Daemon(tmp_path)
    path = d.src / "big"
    data = random.Random(6).randbytes(3 << 20)
    path.write_bytes(data)
    spills = []
    real = d.j.spill_chunks
    monkeypatch.setattr(d.j, "spill_chunks", lambda cs: spills.append(len(cs)) or real(cs))
    syncs = d.j.sync_count
    seq = d.capture(b"big")
    assert len(spills) >= 40 and d.j.sync_count == syncs + 1
    new = random.Random(7).randbytes(1 << 20)
    path.write_bytes(data[: 1 << 20] + new + data[2 << 20:])  # an overwrite of the middle
    seq2 = d.capture(b"big", [(0, 3 << 20)], seq)
    assert d.content(seq) == data and d.content(seq2) == path.read_bytes()
    meta, sums = _live_sums(d.j)
    assert meta == sums
    assert d.j.verify(full=True).ok
    d.j.close()


def test_compaction_never_frees_moves_or_deepens_under_a_held_value(tmp_path):
    """Repacking the pack a held value is in, and pruning the version its base
    belongs to: each indexes the held values first (Storage.write)."""
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(8)
    old = _chunks(rnd, 2)
    ch = _write(b"f", old)
    ch.chunks = [nc for _, nc in old]
    (s1,) = j.commit([ch])
    raw = old[0][0][:40] + b"edit" + old[0][0][44:]
    d = C.build_chunk(raw, C.Base(old[0][1].id, old[0][0], 0))
    assert d.base_id == old[0][1].id
    fresh = _chunks(rnd, 1)
    j.spill_chunks([d, fresh[0][1]])
    j.commit([Change(op="unlink", path=b"f")])
    j.prune([s1], [])  # frees old[1]; old[0] is the held delta's base: counted first, kept
    with j.reader() as r:
        assert r.chunk_refs(old[0][1].id) == 1 and not r.has_chunk(old[1][1].id)
    j.spill_chunks(_chunks(rnd, 1)[0][1:])  # held again, in the current pack
    held = next(iter(j._storage.held))
    res = j.repack(0.0)  # every pack with a dead byte: the current one too
    assert res.packs_emptied >= 1
    with j.reader() as r:
        assert r.has_chunk(held) and r.read_chunk(d.id) == raw
        assert r.read_chunk(fresh[0][1].id) == fresh[0][0]
    meta, sums = _live_sums(j)
    assert meta == sums
    j.close()


def _crash(j: Journal) -> None:
    """What a killed daemon leaves: no index for the held values, nothing else done."""
    j._storage.held.clear()
    j._storage.held_bytes = 0
    j.close()


def test_a_crash_leaves_the_held_values_dead_and_repacking_drops_them(tmp_path):
    p = tmp_path / "j"
    j = Journal.open(p, create=True, clock=FakeClock())
    rnd = random.Random(9)
    keep = _chunks(rnd, 2)
    ch = _write(b"keep", keep)
    ch.chunks = [nc for _, nc in keep]
    (s,) = j.commit([ch])
    lost = _chunks(rnd, 3)
    # 1. nothing synced past them: the next open cuts the pack back
    size0 = sum(j._storage.packs.on_disk().values())
    j.spill_chunks([nc for _, nc in lost])
    _crash(j)
    j = Journal.open(p, clock=FakeClock())
    assert sum(j._storage.packs.on_disk().values()) == size0
    assert not any(_indexed(j, nc.id) for _, nc in lost)
    # 2. a namespace commit (which indexes nothing) synced the pack past them: dead bytes
    n = j.spill_chunks([nc for _, nc in lost])
    j.commit([Change(op="mkdir", path=b"d", mode=0o40755)])
    _crash(j)
    j = Journal.open(p, clock=FakeClock())
    sizes = j._storage.packs.on_disk()
    meta, sums = _live_sums(j)
    assert meta == sums  # pack_live counts what the index names, the dead bytes not
    body = sum(sizes.values()) - len(PACK_MAGIC) * len(sizes)
    assert body - sum(meta.values()) == n
    assert not any(_indexed(j, nc.id) for _, nc in lost)
    res = j.verify(full=True)
    assert res.ok, res.problem
    rep = j.repack(0.0)
    assert rep.bytes_reclaimed == n + len(PACK_MAGIC)  # (the emptied pack's header too)
    with j.reader() as r:
        assert r.read_content(s) == b"".join(raw for raw, _ in keep)
    meta, sums = _live_sums(j)
    assert meta == sums
    j.close()


def test_close_indexes_what_is_held(tmp_path):
    p = tmp_path / "j"
    j = Journal.open(p, create=True, clock=FakeClock())
    a = _chunks(random.Random(10), 2)
    j.spill_chunks([nc for _, nc in a])
    j.close()
    j = Journal.open(p, clock=FakeClock())
    with j.reader() as r:
        assert all(r.has_chunk(nc.id) and r.chunk_refs(nc.id) == 0 for _, nc in a)
    j.close()


def test_held_entries_are_small():
    """A held entry (id, index entry, pack, length, depth, raw length, bases) is
    a few hundred bytes: HOLD_ENTRIES of them stay under 4 MiB."""
    import sys
    cid = os.urandom(16)
    entry = (S.encode_loc(0, 3, 200_000_000, 16_400, 0), 3, 16_400, 0, 16_384, ())
    one = sys.getsizeof(cid) + sys.getsizeof(entry) + sum(sys.getsizeof(x) for x in entry[:5]) + 100
    assert one * JC.HOLD_ENTRIES < 4 << 20
