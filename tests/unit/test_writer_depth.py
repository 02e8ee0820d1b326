"""The writer bounds a delta chain's depth when it writes a value (issue 20).

A value's depth (the sum of (depth + 1) over its bases) bounds the
decompressions a read needs; the reader refuses a read that needs more than
MAX_DELTA_DEPTH + 1.  The coders (one base, an appended chunk against its new
neighbour, several bases) count depths from the bases they built on, but a
base may be stored under another coding by the time the value is written:
two captures building the same chunk at once, the first one stored wins.  So
the journal's writer takes the depth from its bases' index entries, and
refuses a value that would be deeper than MAX_DELTA_DEPTH.
"""

from __future__ import annotations

import random

import pytest
import zstandard

from deltafs import chunking as C
from deltafs.journal import Change, Journal

from test_append_bases import _rows
from test_capture_cache import Daemon
from test_journal import FakeClock
from test_multi_base import _chain, _text


def _forced_delta(raw: bytes, base: C.Base, depth: int) -> C.NewChunk:
    """``raw`` coded against ``base`` whatever it saves, claiming ``depth``."""
    cctx = zstandard.ZstdCompressor(compression_params=C._params(C.ZSTD_DELTA_LEVEL), dict_data=C._dict(base.raw))
    payload = bytes([C.CODEC_ZSTD_DELTA]) + cctx.compress(raw)
    return C.NewChunk(C.chunk_id(raw), len(raw), payload, base.id, depth)


def _depth(j: Journal, cid: bytes) -> int:
    with j.reader() as r:
        return r.chunk_info(cid).depth


def test_a_value_is_written_at_the_depth_its_stored_bases_give(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(1)
    base = _chain(j, rnd, 5)  # depth 5
    raw = base.raw[:500] + b"changed" + base.raw[507:]
    low = _forced_delta(raw, base, 1)  # its coder miscounted
    j.put_chunks([low])
    assert _depth(j, low.id) == 6
    with j.reader() as r:
        assert r.read_chunk(low.id) == raw
    # several bases: 6 + 1 and 5 + 1
    other = base.raw[:900] + b"other" + base.raw[905:]
    multi = C.build_chunk_multi(other, [C.Base(low.id, raw, 6), base])
    assert multi is not None and multi.depth == 13
    j.commit([Change(op="write", path=b"f", size=len(other), edit=[(0, 0, [(multi.id, len(other))])],
                     chunks=[C.NewChunk(multi.id, multi.raw_len, multi.payload, multi.base_id, 2,
                                        multi.more_bases)], mode=0o100644, cause="write")])
    assert _depth(j, multi.id) == 13
    j.close()


def test_a_value_deeper_than_the_maximum_is_refused(tmp_path):
    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    rnd = random.Random(2)
    deep = _chain(j, rnd, C.MAX_DELTA_DEPTH)
    assert deep.depth == C.MAX_DELTA_DEPTH
    raw = deep.raw[:100] + b"x" + deep.raw[101:]
    assert C.build_chunk(raw, deep).base_id is None  # the one-base coder never makes it
    lie = _forced_delta(raw, deep, 3)
    with pytest.raises(ValueError, match="depth 129, over 128"):
        j.put_chunks([lie])
    with pytest.raises(ValueError, match="depth 129, over 128"):
        j.commit([Change(op="write", path=b"f", size=len(raw), edit=[(0, 0, [(lie.id, len(raw))])],
                         chunks=[lie], mode=0o100644, cause="write")])
    with j.reader() as r:
        assert not r.has_chunk(lie.id) and r.head_seq() == 0
    # several bases whose depths add up past the bound
    a, b = _chain(j, rnd, 70), _chain(j, rnd, 70)
    new = a.raw[:1000] + b.raw[1000:]
    payload = C.compress_chunk(new, a.raw + b.raw)
    with pytest.raises(ValueError, match="depth 142, over 128"):
        j.put_chunks([C.NewChunk(C.chunk_id(new), len(new), payload, b.id, 100, (a.id,))])
    j.close()


def test_a_capture_whose_base_was_stored_deeper_meanwhile_keeps_the_bound(tmp_path):
    """Appended chunks chain on their new neighbour.  If the neighbour was
    stored meanwhile under another, deeper coding (another capture of the same
    bytes), the chunks after it are written at their real depth."""
    d = Daemon(tmp_path)
    rnd = random.Random(20)
    path = d.src / "db"
    path.write_bytes(_rows(rnd, 1 << 20))
    seq = d.capture(b"db")
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(_rows(rnd, 300 << 10))
    fd = path.open("rb")
    try:
        ch, _ = d.rec.content.compute(fd.fileno(), b"db", "write", [(size, path.stat().st_size)], seq)
    finally:
        fd.close()
    ids = {nc.id for nc in ch.chunks}
    chained = [nc for nc in ch.chunks if nc.base_id in ids]
    assert chained, "no appended chunk was coded against its new neighbour"
    first = next(nc for nc in ch.chunks if nc.id == chained[0].base_id)
    with d.j.reader() as r:
        raw = C.decompress_chunk(first.payload, r.read_chunk(first.base_id) if first.base_id else None)
    # the same chunk, stored first by "another capture" against an unrelated deep chain
    deep = _chain(d.j, random.Random(5), 100)
    d.j.put_chunks([_forced_delta(raw, deep, 101)])
    seq2 = d.j.commit([ch])[-1]
    with d.j.reader() as r:
        assert r.chunk_info(first.id).depth == 101
        assert r.chunk_info(chained[0].id).depth == 102 > chained[0].depth
        for cid, _ in r.chunk_list(seq2):
            assert r.chunk_info(cid).depth <= C.MAX_DELTA_DEPTH
    assert d.content(seq2) == path.read_bytes()
