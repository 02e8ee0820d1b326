"""Chunking: boundaries resynchronise, incremental == full, codecs round-trip."""

from __future__ import annotations

import random

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deltafs import chunking as C


def _content(seed: int, size: int) -> bytes:
    """Random bytes mixed with repetitive text, so cuts vary in both."""
    rnd = random.Random(seed)
    parts = []
    n = 0
    while n < size:
        if rnd.random() < 0.5:
            b = rnd.randbytes(rnd.randint(1, 40000))
        else:
            word = rnd.randbytes(rnd.randint(1, 12))
            b = word * rnd.randint(1, 3000)
        parts.append(b)
        n += len(b)
    return b"".join(parts)[:size]


def _pread(data: bytes):
    return lambda off, n: data[off : off + n]


def _offsets(refs):
    out, o = [], 0
    for _, n in refs:
        out.append(o)
        o += n
    return out


def test_chunk_sizes_within_bounds():
    data = _content(1, 1_000_000)
    refs = C.chunk_bytes(data)
    assert sum(n for _, n in refs) == len(data)
    assert all(C.MIN_SIZE <= n <= C.MAX_SIZE for _, n in refs[:-1])
    assert refs == [(C.chunk_id(data[o : o + n]), n) for o, (_, n) in zip(_offsets(refs), refs)]


def test_streaming_equals_one_buffer():
    """Small windows must give the same cuts as one big buffer."""
    data = _content(2, 3_000_000)
    spans = [s for s, _ in C.chunk_stream(_pread(data), len(data))]
    whole = [ch.length for ch in C._chunker().cut_buf(data)]
    assert [s.length for s in spans] == whole


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), at=st.floats(0, 1), ins=st.integers(1, 3000), delete=st.booleans())
@example(seed=837, at=0.0, ins=1, delete=False)  # 19 chunks, 7 of them one repeated 4,147-byte chunk
def test_boundaries_resynchronise_after_insert_or_delete(seed, at, ins, delete):
    data = _content(seed, 400_000)
    pos = int(at * len(data))
    new = data[:pos] + data[pos + ins :] if delete else data[:pos] + random.Random(seed).randbytes(ins) + data[pos:]
    old_refs, new_refs = C.chunk_bytes(data), C.chunk_bytes(new)
    shift = -ins if delete else ins
    old_after = sorted(o + shift for o in _offsets(old_refs) if o > pos + ins)
    new_after = [o for o in _offsets(new_refs) if o > pos + max(shift, 0)]
    # once one boundary past the edit is shared, every later one is: the cuts
    # resynchronise (a long run of repeated bytes has no natural cut, so
    # where that happens depends on the content, not on a fixed distance)
    common = sorted(set(old_after) & set(new_after))
    if len(data) - pos > 4 * C.MAX_SIZE:
        assert common, "no shared boundary after the edit"
    if common:
        assert [o for o in old_after if o >= common[0]] == [o for o in new_after if o >= common[0]]
    # and almost every distinct chunk is shared (repeated content gives equal
    # chunks, which count once on both sides)
    assert len(set(old_refs) & set(new_refs)) >= len(set(old_refs)) - 6


edit_ops = st.lists(
    st.tuples(st.sampled_from(["write", "append", "truncate", "extend"]), st.floats(0, 1), st.integers(1, 70000)),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), size=st.integers(0, 500_000), ops=edit_ops)
def test_incremental_equals_full(seed, size, ops):
    rnd = random.Random(seed)
    old = _content(seed, size)
    old_refs = C.chunk_bytes(old)
    new = bytearray(old)
    dirty = []
    for op, at, n in ops:
        if op == "write":
            off = int(at * len(new))
            new[off : off + n] = rnd.randbytes(n)[: max(0, len(new) - off)] if off + n > len(new) else rnd.randbytes(n)
            dirty.append((off, off + n))
        elif op == "append":
            dirty.append((len(new), len(new) + n))
            new += rnd.randbytes(n)
        elif op == "truncate":  # the mount reports a truncation as dirty to EOF
            dirty.append((int(at * len(new)), 1 << 62))
            del new[int(at * len(new)) :]
        else:  # extend with zeros (ftruncate up): the new zeros are dirty
            dirty.append((len(new), len(new) + n))
            new += bytes(n)
    new = bytes(new)
    seen = []
    res = C.rechunk(_pread(new), len(new), old_refs, dirty, on_chunk=lambda s, d: seen.append((s, bytes(d))))
    assert C.apply_edit(old_refs, res.edits) == C.chunk_bytes(new)
    assert C.edit_offsets(C.list_offsets(old_refs), res.edit_list()) == C.list_offsets(C.chunk_bytes(new))
    assert C.apply_edit(old_refs, res.edit_list()) == C.chunk_bytes(new)
    small = res.edit_list(old_refs)  # unchanged chunks taken out of each replacement
    assert C.apply_edit(old_refs, small) == C.chunk_bytes(new)
    assert C.edit_offsets(C.list_offsets(old_refs), small) == C.list_offsets(C.chunk_bytes(new))
    assert sum(len(r) for _, _, r in small) <= len(res.new_spans)
    assert [s for s, _ in seen] == res.new_spans
    assert all(C.chunk_id(d) == s.id and new[s.offset : s.offset + s.length] == d for s, d in seen)


def test_one_byte_edit_reads_little():
    data = bytearray(_content(7, 10 * 1024 * 1024))
    old_refs = C.chunk_bytes(bytes(data))
    mid = len(data) // 2
    data[mid] ^= 0xFF
    res = C.rechunk(_pread(bytes(data)), len(data), old_refs, [(mid, mid + 1)])
    assert C.apply_edit(old_refs, res.edits) == C.chunk_bytes(bytes(data))
    assert len(res.new_spans) <= 3
    assert res.bytes_read <= 3 * C.MAX_SIZE
    assert sum(r.old_count for r in res.edits) <= 3


def test_no_change_no_edit():
    data = _content(3, 100_000)
    refs = C.chunk_bytes(data)
    assert C.rechunk(_pread(data), len(data), refs, []).edits == []
    assert C.rechunk(_pread(b""), 0, [], []).edits == []
    res = C.rechunk(_pread(b""), 0, refs, [])
    assert C.apply_edit(refs, res.edits) == []


@pytest.mark.parametrize("with_base", [False, True])
def test_compress_round_trip(with_base):
    base = _content(4, 60_000)
    raw = base[:30_000] + b"edited!" + base[30_007:]
    payload = C.compress_chunk(raw, base if with_base else None)
    assert C.decompress_chunk(payload, base if with_base else None) == raw
    if with_base:
        assert C.payload_needs_base(payload)
        assert len(payload) < 200
        with pytest.raises(ValueError):
            C.decompress_chunk(payload, None)

    # magicless frames: the payload is 4 bytes shorter than a framed zstd one
    assert payload[0] == (C.CODEC_ZSTD_DELTA if with_base else C.CODEC_ZSTD)
    assert payload[1:5] != (0xFD2FB528).to_bytes(4, "little")


@pytest.mark.parametrize("with_base", [False, True])
def test_payloads_of_journal_formats_1_and_2_still_decode(with_base):
    """Codecs 1 and 2 (zstd frames with their magic number) are in older journals and mirrors."""
    base = _content(4, 60_000)
    raw = base[:30_000] + b"edited!" + base[30_007:]
    if with_base:
        d = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        payload = bytes([C.CODEC_ZSTD_DELTA_V1]) + zstandard.ZstdCompressor(level=9, dict_data=d, write_dict_id=False).compress(raw)
        assert C.payload_needs_base(payload)
    else:
        payload = bytes([C.CODEC_ZSTD_V1]) + zstandard.ZstdCompressor(level=3).compress(raw)
    assert C.decompress_chunk(payload, base if with_base else None) == raw


def test_incompressible_stored_raw():
    raw = random.Random(5).randbytes(20_000)
    payload = C.compress_chunk(raw, None)
    assert payload[0] == C.CODEC_RAW and len(payload) == len(raw) + 1
    assert C.decompress_chunk(payload) == raw


def test_delta_probe_skips_unrelated_bases_only():
    """Overwriting with unrelated data tries no delta; an edit of incompressible data still gets one."""
    rnd = random.Random(7)
    base = rnd.randbytes(40_000)
    assert not C._shares_with(rnd.randbytes(30_000), base)
    payload = C.compress_chunk(rnd.randbytes(30_000), base)
    assert payload[0] == C.CODEC_RAW  # no delta, and random data stays raw
    edited = base[:20_000] + rnd.randbytes(50) + base[20_050:]
    assert C._shares_with(edited, base)
    payload = C.compress_chunk(edited, base)
    assert payload[0] == C.CODEC_ZSTD_DELTA and len(payload) < 300
    assert C.decompress_chunk(payload, base) == edited
    # shifted content (an insertion before the chunk) is found too
    shifted = b"inserted" + base[:30_000]
    assert C.compress_chunk(shifted, base)[0] == C.CODEC_ZSTD_DELTA
    # tiny chunks are not sampled: the delta decides
    assert C._shares_with(b"x" * 10, base)


def test_build_chunk_depth_bound():
    base_raw = _content(6, 30_000)
    raw = base_raw[:-10] + b"0123456789"
    nc = C.build_chunk(raw, C.Base(C.chunk_id(base_raw), base_raw, 2))
    assert nc.base_id == C.chunk_id(base_raw) and nc.depth == 3
    deep = C.build_chunk(raw, C.Base(C.chunk_id(base_raw), base_raw, C.MAX_DELTA_DEPTH))
    assert deep.base_id is None and deep.depth == 0
    assert C.decompress_chunk(deep.payload) == raw


def _doc(rnd: random.Random, nlines: int) -> list[bytes]:
    words = [rnd.randbytes(3).hex().encode() for _ in range(300)]
    return [b" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 14))) + b"\n"
            for _ in range(nlines)]


def _paired(old_data: bytes, new_data: bytes, dirty) -> list[tuple[C.Span, bytes, C.ChunkRef | None]]:
    old = C.chunk_bytes(old_data)
    got = []
    finder = C.BaseFinder(old, C.list_offsets(old), lambda s, raw, b: got.append((s, raw, b)))
    old_ids = {c for c, _ in old}
    C.rechunk(_pread(new_data), len(new_data), old, dirty,
              lambda s, d: finder.feed(s, None if s.id in old_ids else d))
    finder.finish()
    return got


@pytest.mark.parametrize("seed", range(6))
def test_base_finder_pairs_changed_chunks_with_the_text_they_replace(seed):
    """A whole-file rewrite that deletes and inserts lines early in the file
    shifts every later chunk; each changed chunk must still be paired with
    the old chunk holding its text, so its delta is small."""
    rnd = random.Random(seed)
    lines = _doc(rnd, 4000)
    old_data = b"".join(lines)
    for _ in range(4):
        i = rnd.randrange(len(lines) - 3)
        if rnd.random() < 0.5:
            del lines[i:i + rnd.randint(1, 3)]
        else:
            lines[i:i] = _doc(rnd, rnd.randint(1, 3))
    new_data = b"".join(lines)
    old_raw = {}
    pos = 0
    for cid, n in C.chunk_bytes(old_data):
        old_raw[cid] = old_data[pos:pos + n]
        pos += n
    got = _paired(old_data, new_data, [(0, len(new_data))])
    assert 1 <= len(got) <= 12
    for span, raw, base in got:
        assert base is not None
        nc = C.build_chunk(raw, C.Base(base[0], old_raw[base[0]], 0))
        assert nc.base_id == base[0] and len(nc.payload) < 1200, (span, len(nc.payload))


def test_edit_of_a_whole_file_rewrite_names_only_the_changed_chunks():
    """An editor rewrites the whole file; the record must not repeat the
    chunks that stayed the same."""
    rnd = random.Random(3)
    lines = _doc(rnd, 6000)
    old_data = b"".join(lines)
    lines[1000] = b"changed line\n"
    lines[5000:5001] = []
    new_data = b"".join(lines)
    old = C.chunk_bytes(old_data)
    res = C.rechunk(_pread(new_data), len(new_data), old, [(0, len(new_data))])
    edit = res.edit_list(old)
    assert len(res.new_spans) > 10 and 1 <= sum(len(r) for _, _, r in edit) <= 4
    assert C.apply_edit(old, edit) == C.chunk_bytes(new_data)
    assert C.apply_edit(old, res.edit_list()) == C.chunk_bytes(new_data)


def test_base_finder_new_file_has_no_bases_and_holds_nothing():
    data = _content(7, 300_000)
    got = []
    finder = C.BaseFinder([], [0], lambda s, raw, b: got.append((s, b)))
    C.rechunk(_pread(data), len(data), [], [(0, len(data))], finder.feed)
    assert not finder.pending
    finder.finish()
    assert got and all(b is None for _, b in got)
    assert sum(s.length for s, _ in got) == len(data)


def test_base_finder_bounds_what_it_holds():
    old_data = _content(8, 400_000)
    new_data = bytes(b ^ 0x5A for b in old_data)  # every chunk changes: no anchor at all
    old = C.chunk_bytes(old_data)
    got = []
    finder = C.BaseFinder(old, C.list_offsets(old), lambda s, raw, b: got.append(b), hold=64 << 10)
    peak = 0

    def feed(span, data):
        nonlocal peak
        finder.feed(span, data)
        peak = max(peak, finder.held)

    C.rechunk(_pread(new_data), len(new_data), old, [(0, len(new_data))], feed)
    finder.finish()
    assert peak < (64 << 10) + C.MAX_SIZE
    assert len(got) == len(C.chunk_bytes(new_data)) and all(b is not None for b in got)




# --- in-place writes: aligned re-chunking -------------------------------------------


def _check_list(refs, data: bytes) -> None:
    """``refs`` is a correct chunk list of ``data`` (whatever its cuts)."""
    offs = C.list_offsets(refs)
    assert offs[-1] == len(data)
    for (cid, n), o in zip(refs, offs):
        assert 0 < n <= C.MAX_SIZE and C.chunk_id(data[o : o + n]) == cid


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), pages=st.lists(st.integers(0, 10_000), min_size=1, max_size=8),
       grow=st.integers(0, 3))
def test_in_place_page_writes_are_cut_at_aligned_offsets(seed, pages, grow):
    old_data = _content(seed, 300_000)
    old = C.chunk_bytes(old_data)
    new = bytearray(old_data)
    rnd = random.Random(seed)
    dirty = []
    for p in pages:  # 4 KiB database pages rewritten where they are
        off = (p * 4096) % len(old_data) // 4096 * 4096
        n = min(4096, len(old_data) - off)
        new[off : off + n] = rnd.randbytes(n)
        dirty.append((off, off + n))
    new += rnd.randbytes(grow * 4096)  # the database grew by a few pages
    new = bytes(new)
    seen = []
    res = C.rechunk(_pread(new), len(new), old, dirty, lambda s, d: seen.append(s), aligned=True)
    assert C.prefers_aligned(len(old_data), len(new), C.normalize_dirty(dirty, len(old_data), len(new)))
    got = C.apply_edit(old, res.edit_list(old))
    _check_list(got, new)
    assert C.edit_offsets(C.list_offsets(old), res.edit_list(old)) == C.list_offsets(got)
    assert seen == res.new_spans
    for r in res.edits:  # inner cuts of a replacement sit on ALIGNED_BLOCK multiples
        assert all(s.offset % C.ALIGNED_BLOCK == 0 for s in r.new[1:])
    # old chunks whose bytes no write touched are all still there
    untouched = [ref for ref, o in zip(old, C.list_offsets(old))
                 if not any(a < o + ref[1] and o < b for a, b in dirty)]
    assert set(untouched) <= set(got)
    # the next write to one of those pages replaces one block, reading little
    off = (pages[0] * 4096) % len(old_data) // 4096 * 4096
    newer = bytearray(new)
    newer[off + 10] ^= 0xFF
    newer = bytes(newer)
    res2 = C.rechunk(_pread(newer), len(newer), got, [(off + 10, off + 11)], aligned=True)
    _check_list(C.apply_edit(got, res2.edit_list(got)), newer)
    piece = C.ALIGNED_BLOCK + 2 * C.MIN_SIZE  # a block and two short ends joined to it, at most
    assert len(res2.new_spans) == 1 and res2.new_spans[0].length < piece
    assert res2.bytes_read <= 2 * piece


def test_what_is_not_an_in_place_write_stays_content_defined():
    data = _content(5, 400_000)
    old = C.chunk_bytes(data)
    n = len(data)
    assert not C.prefers_aligned(n, n, [(0, n)])  # a rewrite
    assert not C.prefers_aligned(n, n - 10, [(100, 200), (n - 10, n + 1)])  # it shrank
    assert not C.prefers_aligned(40_000, 40_000, [(100, 200)])  # a small file
    assert not C.prefers_aligned(n, n + 50, [(n, n + 51)])  # an append
    # an append whose last page the kernel's writeback cache rewrote whole:
    # the old bytes are unchanged, so it is chunked by content like any append
    more = data + _content(6, 3000)
    page = n // 4096 * 4096
    res = C.rechunk(_pread(more), len(more), old, [(page, len(more))], aligned=True)
    assert C.apply_edit(old, res.edits) == C.chunk_bytes(more)


def test_changed_ranges_compares_at_the_lists_own_boundaries():
    data = _content(8, 200_000)
    refs = C.chunk_bytes(data)
    offs = C.list_offsets(refs)
    assert C.changed_ranges(_pread(data), len(data), refs) == []
    changed = bytearray(data)
    changed[offs[2] + 5] ^= 1
    assert C.changed_ranges(_pread(bytes(changed)), len(data), refs) == [(offs[2], offs[3])]
    longer = data + b"x" * 100
    assert C.changed_ranges(_pread(longer), len(longer), refs) == [(len(data), len(longer))]
    shorter = data[: offs[1] + 7]
    assert C.changed_ranges(_pread(shorter), len(shorter), refs) == [(offs[1], offs[1] + 7)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000),
       ops=st.lists(st.sampled_from(["pages", "pages", "append", "shrink", "insert", "same"]),
                    min_size=1, max_size=8))
def test_aligned_and_content_defined_captures_mix(seed, ops):
    """However in-place writes, appends, truncations and rewrites follow
    each other, each capture's list is a correct list of the content."""
    rnd = random.Random(seed)
    data = bytearray(_content(seed, 200_000))
    refs = C.chunk_bytes(bytes(data))
    for op in ops:
        old_size = len(data)
        if op == "pages":
            dirty = []
            for _ in range(rnd.randint(1, 4)):
                off = rnd.randrange(max(len(data) // 4096, 1)) * 4096
                chunk = rnd.randbytes(min(4096, len(data) - off))
                data[off : off + len(chunk)] = chunk
                dirty.append((off, off + len(chunk)))
        elif op == "append":
            data += _content(rnd.randrange(1000), rnd.randint(1, 30_000))
            dirty = [(old_size // 4096 * 4096, len(data))]  # writeback: the last page again
        elif op == "shrink":
            del data[rnd.randint(len(data) // 2, len(data)) :]
            dirty = [(len(data), 1 << 62)]
        elif op == "insert":
            at = rnd.randrange(len(data) + 1)
            data[at:at] = rnd.randbytes(rnd.randint(1, 500))
            dirty = [(0, len(data))]  # a whole-file save
        else:  # pages rewritten with the bytes they had
            off = rnd.randrange(max(len(data) // 4096, 1)) * 4096
            dirty = [(off, min(off + 4096, len(data)))]
        cur = bytes(data)
        res = C.rechunk(_pread(cur), len(cur), refs, dirty, aligned=True)
        edit = res.edit_list(refs)
        assert C.edit_offsets(C.list_offsets(refs), edit) == C.list_offsets(C.apply_edit(refs, edit))
        refs = C.apply_edit(refs, edit)
        _check_list(refs, cur)
        if op == "same" and C.prefers_aligned(old_size, len(cur), C.normalize_dirty(dirty, old_size, len(cur))):
            # unchanged bytes: nothing replaced (a file under 64 KiB is cut by
            # content, which may re-cut pieces an earlier in-place write left)
            assert edit == []


def _sparse(layout: list[tuple[str, int]]) -> tuple[bytes, list[tuple[int, int]]]:
    """Content from ("data", n) / ("hole", n) pieces, and its holes as a file would report them."""
    rnd = random.Random(7)
    out, holes, pos = [], [], 0
    for kind, n in layout:
        out.append(bytes(n) if kind == "hole" else rnd.randbytes(n))
        if kind == "hole":
            holes.append((pos, pos + n))
        pos += n
    return b"".join(out), holes


def _holes_fn(holes: list[tuple[int, int]], size: int):
    def holes_at(off: int) -> tuple[int, int]:
        for s, e in holes:
            if e > off:
                return max(s, off), e
        return size, size
    return holes_at


@pytest.mark.parametrize("layout", [
    [("hole", 10 * C.MAX_SIZE + 123)],
    [("data", 5000), ("hole", 40 * C.MAX_SIZE), ("data", 1)],
    [("hole", 3 * C.MAX_SIZE), ("data", 70000), ("hole", C.MAX_SIZE + 1), ("data", 3), ("hole", 9 * C.MAX_SIZE)],
    [("data", 100), ("hole", C.MAX_SIZE - 1), ("data", 100)],  # too short to skip
])
def test_holes_are_skipped_and_cut_exactly_as_if_read(layout):
    """A sparse file's holes are not read, and its chunk list is the one reading every byte gives."""
    data, holes = _sparse(layout)
    read: list[tuple[int, int]] = []

    def pread(off, n):
        read.append((off, n))
        return memoryview(data)[off : off + n]

    fast = C.rechunk(pread, len(data), [], [(0, len(data))], holes=_holes_fn(holes, len(data)))
    slow = C.rechunk(C._buffer_pread(data), len(data), [], [(0, len(data))])
    assert [(s.id, s.offset, s.length) for s in fast.new_spans] == \
           [(s.id, s.offset, s.length) for s in slow.new_spans]
    hole_bytes = sum(e - s for s, e in holes)
    if hole_bytes > 4 * C.MAX_SIZE:
        assert sum(n for _, n in read) < len(data) - hole_bytes + 8 * C.MAX_SIZE
    # a later capture that compares against this list skips the holes too
    old = [(s.id, s.length) for s in slow.new_spans]
    read.clear()
    assert C.changed_ranges(pread, len(data), old, holes=_holes_fn(holes, len(data))) == []
    if hole_bytes > 4 * C.MAX_SIZE:
        assert sum(n for _, n in read) < len(data) - hole_bytes + 8 * C.MAX_SIZE


def test_zero_chunks_are_max_size_and_one_id():
    refs = C.chunk_bytes(bytes(20 * C.MAX_SIZE))
    assert {n for _, n in refs} == {C.MAX_SIZE} and {i for i, _ in refs} == {C.ZERO_ID}
    assert C.zero_id(100) == C.chunk_id(bytes(100)) and C.zero_id(C.MAX_SIZE) == C.ZERO_ID


def test_apply_edit_in_place_matches_apply_edit_and_edit_offsets():
    """The capture's in-place list edit (issue 19) equals the copying pair on
    random edits: replacements, inserts, deletes, size changes, at the ends."""
    import random as _random

    rnd = _random.Random(19)
    for _ in range(2000):
        n = rnd.randint(0, 30)
        old = [(bytes([rnd.randrange(256)]) * 16, rnd.randint(1, 40)) for _ in range(n)]
        offsets = C.list_offsets(old)
        edits, cur = [], 0
        while cur <= n and rnd.random() < 0.7:
            start = rnd.randint(cur, n)
            count = rnd.randint(0, n - start)
            new = [(bytes([rnd.randrange(256)]) * 16, rnd.choice([16, rnd.randint(1, 40)]))
                   for _ in range(rnd.randint(0, 3))]
            if count or new:
                edits.append((start, count, new))
            cur = start + count + 1
        refs, offs = list(old), list(offsets)
        C.apply_edit_in_place(refs, offs, edits)
        want = C.apply_edit(old, edits, copy=False)
        assert refs == want, (old, edits)
        assert offs == C.edit_offsets(offsets, edits) == C.list_offsets(want)


def test_apply_edit_in_place_of_a_big_list_touches_only_the_edit():
    """A same-size edit in the middle of a 1 GiB file's list (65,536 entries)
    leaves every other entry object where it was: no copy of the list."""
    old = [(i.to_bytes(16, "big"), 16384) for i in range(65536)]
    offsets = C.list_offsets(old)
    refs, offs = old, offsets
    before = [refs[0], refs[-1]]
    tail_offset = offs[-1]
    C.apply_edit_in_place(refs, offs, [(30000, 1, [(b"a" * 16, 8192), (b"b" * 16, 8192)])])
    assert refs is old and offs is offsets and len(refs) == 65537
    assert refs[0] is before[0] and refs[-1] is before[1] and offs[-1] == tail_offset
    assert offs[30001] == offs[30000] + 8192


def test_apply_edit_packed_in_place_matches_apply_edit_packed():
    """The journal writer's in-place edit of a packed chunk list (issue 19)
    equals the rebuilding one, inserts at one index included."""
    import os as _os
    import random as _random

    from deltafs.journal import schema as S

    rnd = _random.Random(20)
    for _ in range(2000):
        n = rnd.randint(0, 20)
        old = [(_os.urandom(16), rnd.randint(1, 100)) for _ in range(n)]
        packed, total = S.pack_list(old), sum(x for _, x in old)
        edits, cur = [], 0
        while cur <= n and rnd.random() < 0.7:
            start = rnd.randint(cur, n)
            count = rnd.randint(0, n - start)
            new = [(_os.urandom(16), rnd.randint(1, 100)) for _ in range(rnd.randint(0, 3))]
            if count or new:
                edits.append((start, count, new))
            cur = start + count + rnd.randint(0, 1)
        want, want_total = S.apply_edit_packed(packed, total, edits)
        buf = bytearray(packed)
        assert S.apply_edit_packed_in_place(buf, total, edits) == want_total
        assert bytes(buf) == want
    with pytest.raises(ValueError):
        S.apply_edit_packed_in_place(bytearray(S.pack_list([(b"a" * 16, 1)])), 1, [(0, 2, [])])
