"""Issue 19: a capture does no work that cannot pay off.

Drives the real capture code (``ContentCapture.compute``) against a real
journal, and counts the expensive steps by wrapping them (counting, not
replacing them):

* incompressible data (fresh random bytes) is not compressed chunk after
  chunk: after a run of chunks that did not shrink, standalone compression
  is tried only now and then, and a compressible region after it is still
  found and compressed;
* an overwrite with unrelated data does not read the old version's chunks
  back as delta bases, after a few that gave nothing.
"""

from __future__ import annotations

import os
import random

from deltafs import chunking as C
from deltafs.capture import content as CC
from deltafs.journal import reader as reader_mod

from test_capture_cache import Daemon


def _text(n: int) -> bytes:
    rnd = random.Random(7)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"journal", b"chunk", b"pack", b"save"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choice(words) for _ in range(10)) + b"\n"
    return bytes(out[:n])


def test_runs_of_incompressible_chunks_are_not_compressed_but_text_after_them_is(tmp_path, monkeypatch):
    compressed = []
    real = C._compressible

    def counted(raw):
        compressed.append(len(raw))
        return real(raw)

    monkeypatch.setattr(C, "_compressible", counted)
    d = Daemon(tmp_path)
    noise, text = random.Random(19).randbytes(16 << 20), _text(4 << 20)
    (d.src / "f").write_bytes(noise + text)
    seq = d.capture(b"f")
    n_chunks = len(d.depths(seq))
    with d.j.reader() as r:
        refs = r.chunk_list(seq)
        payloads = [r.raw_chunk(cid) for cid, _ in refs]
    # the random part: probed about once every RAW_RETRY chunks after the first RAW_RUN
    assert len(compressed) < n_chunks // 2, (len(compressed), n_chunks)
    # the text part still compressed (a retry found it): the journal holds far less than 20 MiB
    stored = sum(len(p) for p in payloads)
    assert stored < len(noise) + len(text) // 2
    assert d.content(seq) == noise + text


def test_an_overwrite_with_unrelated_data_reads_few_old_chunks_back(tmp_path, monkeypatch):
    d = Daemon(tmp_path)
    path = d.src / "f"
    path.write_bytes(random.Random(1).randbytes(24 << 20))
    seq = d.capture(b"f")
    d.rec.content.raw_cache = C.RawCache(1 << 20)  # the old chunks are not cached any more
    reads = []
    real = reader_mod.Reader.read_chunk

    def counted(r, cid, cache=None):  # a chunk asked for (its bases are decoded inside)
        reads.append(cid)
        return real(r, cid, cache)

    monkeypatch.setattr(reader_mod.Reader, "read_chunk", counted)
    new = random.Random(2).randbytes(24 << 20)
    path.write_bytes(new)
    seq2 = d.capture(b"f", [(0, len(new))], seq)
    n_chunks = len(d.depths(seq2))
    # BASE_MISSES, then every BASE_RETRY, doubling: a few dozen, not one per 16 chunks
    assert len(reads) <= CC.BASE_MISSES + 12, (len(reads), n_chunks)
    assert n_chunks > 1000
    assert d.content(seq2) == new
