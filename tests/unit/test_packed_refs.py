"""Issue 19 (daemon memory while writing 4 GiB): a capture's new chunk list
stays packed (chunking.PackedRefs, the journal's 20-byte entries) from the
re-chunking through the commit, and the capture's ``seen`` set holds the ids
met since the last spill only."""

from __future__ import annotations

import os
import random

from deltafs import chunking as C
from deltafs.capture import content as CC
from deltafs.journal import schema as S
from tests.unit.test_capture_cache import Daemon


def _refs(n: int, seed: int = 1) -> list[tuple[bytes, int]]:
    rnd = random.Random(seed)
    return [(rnd.randbytes(16), rnd.randint(1, 1 << 20)) for _ in range(n)]


def test_packed_refs_read_as_the_list_of_pairs():
    refs = _refs(50)
    p = C.PackedRefs(refs)
    assert len(p) == 50 and p.total == sum(n for _, n in refs)
    assert list(p) == refs and p == refs and p == tuple(refs)
    assert p[0] == refs[0] and p[-1] == refs[-1] and p[17] == refs[17]
    assert isinstance(p[3:9], C.PackedRefs) and p[3:9] == refs[3:9] and p[3:9].total == sum(n for _, n in refs[3:9])
    assert p[9:3] == [] and p[::2] == refs[::2]
    assert p != refs[:-1] and p != refs[::-1]
    assert bytes(p.packed) == S.pack_list(refs) == S.pack_list(p)
    assert len(p.packed) == 50 * S.ENTRY_LEN


def test_the_packed_list_edits_as_the_list_does():
    old = _refs(40, 2)
    packed_old = S.pack_list(old)
    total = sum(n for _, n in old)
    edit_l = [(3, 2, _refs(5, 3)), (10, 0, _refs(2, 4)), (20, 7, []), (39, 1, _refs(3, 5))]
    edit_p = [(s, c, C.PackedRefs(r)) for s, c, r in edit_l]
    assert S.apply_edit_packed(packed_old, total, edit_p) == S.apply_edit_packed(packed_old, total, edit_l)
    a, b = bytearray(packed_old), bytearray(packed_old)
    assert S.apply_edit_packed_in_place(a, total, edit_p) == S.apply_edit_packed_in_place(b, total, edit_l)
    assert a == b
    assert C.apply_edit(old, edit_p, copy=False) == C.apply_edit(old, edit_l)
    refs, offs = list(old), C.list_offsets(old)
    C.apply_edit_in_place(refs, offs, edit_p)
    assert refs == C.apply_edit(old, edit_l) and offs == C.list_offsets(refs)


def test_a_large_capture_keeps_its_new_list_packed_through_the_commit(tmp_path):
    d = Daemon(tmp_path)
    data = random.Random(7).randbytes(3 << 20)
    (d.src / "big").write_bytes(data)
    fd = os.open(d.src / "big", os.O_RDONLY)
    try:
        ch, _ = d.rec.content.compute(fd, b"big", "write", CC.FULL, None)
    finally:
        os.close(fd)
    (s, c, refs), = ch.edit
    assert (s, c) == (0, 0) and type(refs) is C.PackedRefs and len(refs) > 50
    seq = d.j.commit([ch])[-1]
    assert type(ch.edit[0][2]) is C.PackedRefs  # the writer took it as it is, no tuples
    with d.j.reader() as r:
        assert r.chunk_list(seq) == list(refs)
        assert r.read_content(seq) == data
    d.j.close()


def test_a_chunk_repeated_across_a_spill_is_stored_once(tmp_path, monkeypatch):
    """``seen`` is cleared at each spill: a chunk met again after it is built
    again, and the journal keeps one copy (its refs count both names)."""
    monkeypatch.setattr(CC, "CHUNK_FLUSH_BYTES", 256 << 10)
    d = Daemon(tmp_path)
    part = random.Random(8).randbytes(1 << 20)
    data = part + part + part  # the same chunks 1 MiB apart: several spills between
    (d.src / "rep").write_bytes(data)
    spilled = []
    put = d.j.spill_chunks
    monkeypatch.setattr(d.j, "spill_chunks", lambda cs: spilled.append([nc.id for nc in cs]) or put(cs))
    seq = d.capture(b"rep")
    assert len(spilled) >= 6
    ids = [i for batch in spilled for i in batch]
    assert len(ids) > len(set(ids))  # built again after a spill: the bound on seen is real
    with d.j.reader() as r:
        assert r.read_content(seq) == data
        lst = r.chunk_list(seq)
        st = r.stats()
    assert st["raw_bytes"] == sum(n for _, n in dict(lst).items())  # each distinct chunk stored once
    d.j.close()


def test_increfs_in_batches_count_every_name(tmp_path, monkeypatch):
    """The writer sorts a content record's ids INCREF_BATCH at a time: an id
    named in several batches gets every reference counted."""
    from deltafs.journal import core

    monkeypatch.setattr(core, "INCREF_BATCH", 3)
    d = Daemon(tmp_path)
    block = random.Random(9).randbytes(64 << 10)
    other = random.Random(10).randbytes(64 << 10)
    data = (block + other) * 5  # each chunk named several times, across batches
    (d.src / "f").write_bytes(data)
    seq = d.capture(b"f")
    with d.j.reader() as r:
        lst = r.chunk_list(seq)
        assert r.read_content(seq) == data
        names = {}
        for cid, _ in lst:
            names[cid] = names.get(cid, 0) + 1
        assert max(names.values()) > 1 and len(lst) > 3
        for cid, n in names.items():
            assert r.chunk_refs(cid) >= n, (cid.hex(), r.chunk_refs(cid), n)
    d.j.close()


def test_a_packed_edit_encodes_to_the_same_record_bytes():
    """The on-disk record is unchanged: a PackedRefs edit is written as the
    list of pairs would be, and decodes back to it."""
    from deltafs.journal import Change
    from deltafs.journal import records as R

    refs = _refs(300, 11)
    kw = dict(op="write", path=b"f", size=sum(n for _, n in refs), mode=0o100644, uid=1, gid=1,
              mtime_ns=5, cause="write", base_seq=0)
    as_list = Change(edit=[(0, 0, refs)], **kw)
    as_packed = Change(edit=[(0, 0, C.PackedRefs(refs))], **kw)
    a = R.encode_record(7, 9, as_list, b"\0" * 32, 10, b"\1" * 32)
    b = R.encode_record(7, 9, as_packed, b"\0" * 32, 10, b"\1" * 32)
    assert a == b
    assert R.decode_record(a[0], 7).edit == [(0, 0, refs)]
