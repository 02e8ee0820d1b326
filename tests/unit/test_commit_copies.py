"""Committing a big version copies its packed chunk list once (issue 19, twelfth
session).  The 4 GiB write's RssAnon peak is at the commit of its record, and
the record was encoded in four copies of its 3.7 MB list alive at once: the
writer's own copy for its list cache, msgpack's buffer growing by reallocation
and the bytes made from it, then ``hash + body``.  Now the cache shares the
capture's buffer (read-only: the file's next version copies it before editing)
and the record is one join of its parts, the list's buffer among them as it is;
the stored bytes are those msgpack gives."""

from __future__ import annotations

import random
import tracemalloc

import msgpack

from deltafs.chunking import PackedRefs, build_chunk, chunk_id
from deltafs.journal import Change, Journal
from deltafs.journal import records as R
from deltafs.journal import schema as S

ENTRIES = 200_000  # a 4.6 GiB file's list at ~23 KiB a chunk: 4 MB packed
DISTINCT = 2_000  # chunks it names (many times each: the increfs are not what is measured)
CHUNK = 23 * 1024


def _journal_with_chunks(path, n: int = DISTINCT) -> tuple[Journal, list[bytes]]:
    rnd = random.Random(19)
    raws = [rnd.randbytes(16) * (CHUNK // 16) for _ in range(n)]  # compressible: a small journal
    ids = [chunk_id(raw) for raw in raws]
    j = Journal.open(str(path), create=True)
    j.put_chunks([build_chunk(raw, cid=cid) for raw, cid in zip(raws, ids)])
    j.commit([Change(op="create", path=b"big", mode=0o100644)])
    return j, ids


def _first_version(ids: list[bytes], entries: int = ENTRIES) -> Change:
    refs = PackedRefs()
    for i in range(entries):
        refs.add(ids[(i * 7919) % len(ids)], CHUNK)
    return Change(op="write", path=b"big", mode=0o100644, size=refs.total, cause="write", base_seq=0,
                  edit=[(0, 0, refs)])


def test_a_big_first_versions_commit_copies_its_packed_list_once(tmp_path):
    j, ids = _journal_with_chunks(tmp_path / "j")
    with j:
        ch = _first_version(ids)
        packed = ch.edit[0][2].packed
        tracemalloc.start()
        try:
            (seq,) = j.commit([ch])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # the record's one copy, plus one batch of ids sorted for the increfs (~0.9 MB);
        # before: 4 copies at msgpack's peak (the cache's, packb's buffer twice, its bytes)
        assert peak < 1.6 * len(packed), (peak, len(packed))
        with j.reader() as r:
            assert S.pack_list(r.chunk_list(seq)) == bytes(packed)
        assert j.verify(full=True).ok


def test_the_next_version_does_not_edit_the_captures_buffer(tmp_path):
    """The writer caches a first version's list as the capture's own buffer, read-only;
    the file's next version (here in the same transaction, and in the next one) copies
    it before editing it in place: the capture's list stays what it committed."""
    j, ids = _journal_with_chunks(tmp_path / "j", 64)
    with j:
        ch = _first_version(ids, 20_000)
        packed = ch.edit[0][2].packed
        before = bytes(packed)
        n = len(before) // S.ENTRY_LEN
        # with its next version in the same group: the second takes the first's cached list
        (seq1,) = j.commit([ch])
        nxt = Change(op="write", path=b"big", mode=0o100644, size=ch.size, cause="fsync", base_seq=seq1,
                     edit=[(5, 1, [(ids[1], CHUNK)]), (n - 1, 1, [(ids[2], CHUNK)])])
        third = Change(op="write", path=b"big", mode=0o100644, size=ch.size - CHUNK, cause="fsync",
                       base_seq=seq1 + 1, edit=[(0, 1, [])])
        seq2, seq3 = j.commit([nxt, third])
        assert bytes(packed) == before
        want2 = bytearray(before)
        want2[5 * S.ENTRY_LEN : 6 * S.ENTRY_LEN] = ids[1] + CHUNK.to_bytes(4, "big")
        want2[(n - 1) * S.ENTRY_LEN :] = ids[2] + CHUNK.to_bytes(4, "big")
        with j.reader() as r:
            assert S.pack_list(r.chunk_list(seq1)) == before
            assert S.pack_list(r.chunk_list(seq2)) == bytes(want2)
            assert S.pack_list(r.chunk_list(seq3)) == bytes(want2[S.ENTRY_LEN:])
        assert j.verify(full=True).ok


def test_a_record_in_parts_is_the_bytes_msgpack_gives():
    rnd = random.Random(20)
    for n in (0, 1, 255, 256, 65_535, 65_536, 65_537, 1 << 20):
        big = bytearray(rnd.randbytes(n))
        for body in ({0: 2, 1: 5, 18: [[0, 0, big]], 19: 7, 22: b"t" * 32},
                     {0: 2, **{k: k * 1000 for k in range(1, 18)}, 18: [[3, 4, b"abc"], [5, 0, big],
                                                                         [9, 1, bytes(70_000)]], 20: b"c" * 32}):
            assert b"".join(R._body_parts(body)) == msgpack.packb(body, use_bin_type=True)


def test_a_big_record_hashes_and_decodes_as_written():
    ids = [bytes([i]) * 16 for i in range(1, 50)]
    refs = PackedRefs()
    for i in range(10_000):  # 200 KB packed: over SPLIT_BYTES
        refs.add(ids[i % len(ids)], 100 + i)
    assert len(refs.packed) >= R.SPLIT_BYTES
    ch = Change(op="write", file_id=7, path=b"f", mode=0o100644, size=refs.total, cause="write", base_seq=0,
                edit=[(0, 0, refs)])
    prev = bytes(range(32))
    value, h = R.encode_record(12, 34, ch, prev, 99, None, b"x" * 32)
    body = {0: 2, 1: 34, 2: R.OP_CODES.index("write"), 3: 7, 4: b"f", 7: 0o100644, 11: refs.total,
            16: R.CAUSE_CODES.index("write"), 17: 0, 18: [[0, 0, bytes(refs.packed)]], 19: 99, 22: b"x" * 32}
    assert value == h + msgpack.packb(body, use_bin_type=True)
    rec, problem = R.check_link(value, 12, prev)
    assert problem is None
    assert rec.edit == [(0, 0, list(refs))] and rec.content_tree == b"x" * 32
