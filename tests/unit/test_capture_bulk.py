"""Issue 19 (capture CPU per GiB): the bulk capture path does less work per
chunk, and what it writes is byte for byte what the per-chunk path wrote.

``_journal_digest`` hashes everything a capture writes that does not depend
on the clock: the pack files (chunk values, in order), the chunk index
(id -> refs, pack, offset, length, depth) and the packs' live-byte counts.
``GOLDEN`` is that digest for the captures of ``_scenario`` made by the code
before this change (main at d5be276): a change to a value, its place in the
pack, its index entry or the accounting fails the test.
"""

from __future__ import annotations

import hashlib
import os
import random

from deltafs import chunking as C
from deltafs.capture import content as CC
from deltafs.journal import schema as S
from tests.unit.test_capture_cache import Daemon


def _text(rnd: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"journal", b"chunk", b"pack", b"save", b"%d"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:n])


def _scenario(tmp_path, monkeypatch) -> tuple[Daemon, list[int]]:
    """Captures of one file: fresh (random, text, a repeated block, random
    again), an overwrite that keeps some of it, an in-place edit, an append;
    spills every 1 MiB so put_chunks runs as well as the commit."""
    monkeypatch.setattr(CC, "CHUNK_FLUSH_BYTES", 1 << 20)
    rnd = random.Random(1919)
    d = Daemon(tmp_path)
    path = d.src / "f"
    block = rnd.randbytes(200_000)
    a = rnd.randbytes(3 << 20) + _text(rnd, 1 << 20) + block + block + rnd.randbytes(2 << 20)
    path.write_bytes(a)
    seqs = [d.capture(b"f")]
    b = rnd.randbytes(1 << 20) + a[1 << 20: 4 << 20] + _text(rnd, 512 << 10) + rnd.randbytes(2 << 20)
    path.write_bytes(b)
    seqs.append(d.capture(b"f", [(0, len(b))], seqs[-1]))
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"x" * 5000)
    seqs.append(d.capture(b"f", [(1 << 20, (1 << 20) + 5000)], seqs[-1]))
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(rnd.randbytes(300_000) + _text(rnd, 100_000))
    seqs.append(d.capture(b"f", [(size, path.stat().st_size)], seqs[-1]))
    return d, seqs


def _journal_digest(d: Daemon) -> str:
    h = hashlib.sha256()
    st = d.j._storage
    st.packs.sync()
    for pack, _ in sorted(st.packs.on_disk().items()):
        with open(st.packs.path(pack), "rb") as f:
            h.update(b"pack %d\n" % pack + f.read())
    with d.j.reader() as r:
        txn, dbs = r.txn, r.dbs
        for k, v in txn.cursor(db=dbs[S.DB_CHUNKS]):
            h.update(b"chunk " + k + repr(S.decode_loc(v)).encode() + v)
        cur = txn.cursor(db=dbs[S.DB_META])
        if cur.set_range(S.META_PACK_LIVE_PREFIX):
            for k, v in cur:
                if not k.startswith(S.META_PACK_LIVE_PREFIX):
                    break
                h.update(b"live " + k + v)
        for key in (S.META_STORED, S.META_RAW):
            h.update(b"meta " + key + (txn.get(key, db=dbs[S.DB_META]) or b""))
    return h.hexdigest()


GOLDEN = "9b638550d7d72b18e8117ba17d22624a7ee8a77c1b6bcecaa1ca808c2ac87651"


def test_the_bulk_path_writes_what_the_per_chunk_path_wrote(tmp_path, monkeypatch):
    d, seqs = _scenario(tmp_path, monkeypatch)
    with d.j.reader() as r:
        assert r.read_content(seqs[-1]) == (d.src / "f").read_bytes()
        kinds = set()
        for _, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]):
            _, pack, off, length, depth = S.decode_loc(v)
            value = d.j._storage.packs.read(pack, off, length)
            kinds.add("delta" if depth else ("raw" if value[S._CHUNK_HDR.size] == C.CODEC_RAW else "zstd"))
    assert kinds == {"delta", "raw", "zstd"}  # the scenario stores every kind of value
    digest = _journal_digest(d)
    d.j.close()
    assert digest == GOLDEN


def test_index_values_re_encode_as_before():
    """with_refs / loc_refs / encode_loc (the writer's per-chunk index work)
    agree with decode_loc and the plain varint encoding for every width."""
    def ref_encode(*fields):
        return b"".join(S._uvarint(n) for n in fields)

    rnd = random.Random(5)
    widths = [0, 1, 127, 128, 300, 16383, 16384, 1 << 21, (1 << 28) + 5, (1 << 35) + 7]
    for _ in range(300):
        fields = [rnd.choice(widths) + rnd.randint(0, 3) for _ in range(5)]
        v = S.encode_loc(*fields)
        assert v == ref_encode(*fields)
        assert S.decode_loc(v) == tuple(fields)
        assert S.loc_refs(v) == fields[0]
        n = rnd.choice(widths)
        assert S.with_refs(v, n) == ref_encode(n, *fields[1:])


def test_bulk_raw_chunks_skip_the_build_and_leave_the_raw_cache_to_hot_regions(tmp_path, monkeypatch):
    """A run of incompressible chunks (fresh random data, and an overwrite of it
    with unrelated data) goes through the bulk lane: build_chunk sees only the
    first RAW_RUN chunks of the run and the retries, and the raw cache, which
    keeps delta bases for hot regions, is not filled with the bulk data (it
    would push those bases out; a raw chunk reads back without decoding)."""
    built = []
    real = C.build_chunk

    def counted(raw, *a, **kw):
        built.append(len(raw))
        return real(raw, *a, **kw)

    monkeypatch.setattr(C, "build_chunk", counted)
    d = Daemon(tmp_path)
    cache = d.rec.content.raw_cache
    hot = random.Random(3).randbytes(4096)
    cache.put(b"h" * 16, hot)  # a hot region's base, cached by an earlier capture
    path = d.src / "f"
    data = random.Random(4).randbytes(12 << 20)
    path.write_bytes(data)
    seq = d.capture(b"f")
    n = len(d.depths(seq))
    assert n > 400
    assert len(built) <= CC.RAW_RUN + n // CC.RAW_RETRY + 2, (len(built), n)
    # only the chunks before the run was known to be raw: not the lane's retries either
    # (one in RAW_RETRY of a 4 GiB write churned 250 MiB through the 32 MiB cache)
    assert len(cache) <= 1 + CC.RAW_RUN + 1, (len(cache), n)
    new = random.Random(5).randbytes(12 << 20)
    path.write_bytes(new)
    built.clear()
    seq2 = d.capture(b"f", [(0, len(new))], seq)
    n2 = len(d.depths(seq2))
    assert len(built) <= CC.RAW_RUN + n2 // CC.RAW_RETRY + 20, (len(built), n2)
    assert b"h" * 16 in cache
    assert d.content(seq2) == new
    d.j.close()
