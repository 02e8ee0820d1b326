"""Issue 18, part 4: a capture costs O(change), however long the history.

What a capture needs of the previous version (its chunk list, the raw bytes
of the chunks it replaces) is cached in the daemon: in the Recorder (chunk
lists by version, the RawCache of bases) and in the writer (packed lists by
version).  These tests drive the real capture code (``ContentCapture.compute``,
what a worker thread runs) against a real journal and count the expensive
reads by wrapping the reader's functions (counting, not replacing them):

* warm captures of a file appended to many times rebuild no chunk list from
  records and decode no delta chain;
* delta chains stay bounded, and a cold capture (a fresh daemon) decodes at
  most CAPTURE_DECODE_MAX deltas for a base;
* no cache serves data compaction made stale: a cached list of a version
  compaction pruned is not used, and the writer's cache keeps only lists of
  versions that still exist.
"""

from __future__ import annotations

import os
import random

from deltafs import chunking as C
from deltafs.capture import FULL, Recorder
from deltafs.journal import Journal
from deltafs.journal import reader as reader_mod


class Counts:
    """Wraps Reader.chunk_list / list_chain and the reader's decompress_chunk to count calls."""

    def __init__(self, monkeypatch) -> None:
        self.lists = self.chains = self.decodes = 0
        chunk_list, list_chain, decompress = (reader_mod.Reader.chunk_list, reader_mod.Reader.list_chain,
                                              reader_mod.decompress_chunk)

        def counted_list(r, seq):
            self.lists += 1
            return chunk_list(r, seq)

        def counted_chain(r, seq):
            self.chains += 1
            return list_chain(r, seq)

        def counted_decompress(payload, base_raw=None):
            if base_raw is not None:
                self.decodes += 1
            return decompress(payload, base_raw)

        monkeypatch.setattr(reader_mod.Reader, "chunk_list", counted_list)
        monkeypatch.setattr(reader_mod.Reader, "list_chain", counted_chain)
        monkeypatch.setattr(reader_mod, "decompress_chunk", counted_decompress)

    def reset(self) -> None:
        self.lists = self.chains = self.decodes = 0


class Daemon:
    """A journal and a Recorder on SRC; capture() does what a release does:
    compute the version in the worker's code, commit it, run the bookkeeping."""

    def __init__(self, tmp_path, journal: Journal | None = None) -> None:
        self.src = tmp_path / "src"
        self.src.mkdir(exist_ok=True)
        self.j = journal or Journal.open(tmp_path / "journal", create=True)
        self.rec = Recorder(self.j, str(self.src))

    def capture(self, name: bytes, dirty=FULL, base: int | None = None, cause: str = "write") -> int:
        fd = os.open(os.path.join(os.fsencode(self.src), name), os.O_RDONLY)
        try:
            ch, list_cache = self.rec.content.compute(fd, name, cause, dirty, base)
        finally:
            os.close(fd)
        seq = self.j.commit([ch])[-1]
        if list_cache is not None:
            self.rec.content.remember_list(seq, *list_cache)
        return seq

    def content(self, seq: int) -> bytes:
        with self.j.reader() as r:
            return r.read_content(seq)

    def depths(self, seq: int) -> list[int]:
        with self.j.reader() as r:
            return [r.chunk_info(cid).depth for cid, _ in r.chunk_list(seq)]


def _line(rnd: random.Random, i: int) -> bytes:
    return b"%06d %s\n" % (i, rnd.randbytes(rnd.randint(10, 30)).hex().encode())


def test_appends_are_o_change_and_chains_stay_bounded(tmp_path, monkeypatch):
    d = Daemon(tmp_path)
    rnd = random.Random(18)
    path = d.src / "app.log"
    path.write_bytes(b"".join(_line(rnd, i) for i in range(20)))
    seq = d.capture(b"app.log")
    counts = Counts(monkeypatch)
    appends = C.MAX_DELTA_DEPTH * 2 + 20
    decodes = []
    for i in range(appends):
        size = path.stat().st_size
        with open(path, "ab") as f:
            f.write(_line(rnd, 100 + i))
        counts.reset()
        seq = d.capture(b"app.log", [(size, path.stat().st_size)], seq)
        # warm: the previous list and the base being replaced come from the caches
        assert (counts.lists, counts.chains) == (0, 0)
        decodes.append(counts.decodes)
    # no capture decodes a chain, except where a chain at MAX_DELTA_DEPTH restarts
    # from an ancestor (at most CAPTURE_DECODE_MAX deltas, once per restart)
    assert max(decodes) <= C.CAPTURE_DECODE_MAX
    restarts = appends // (C.MAX_DELTA_DEPTH - C.SKIP_TO_DEPTH) + 1
    assert sum(1 for n in decodes if n) <= restarts, decodes
    depths = d.depths(seq)
    assert max(depths) <= C.MAX_DELTA_DEPTH
    assert max(depths) > C.CAPTURE_DECODE_MAX  # the chain did grow long: the cold case below is real
    assert d.content(seq) == path.read_bytes()

    # a fresh daemon (nothing cached) decodes at most CAPTURE_DECODE_MAX deltas for a base
    cold = Daemon(tmp_path, d.j)
    counts.reset()
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(_line(rnd, 9999))
    seq2 = cold.capture(b"app.log", [(size, path.stat().st_size)], seq)
    assert counts.decodes <= C.CAPTURE_DECODE_MAX
    assert cold.content(seq2) == path.read_bytes()
    # and it started a fresh chain where the old one was too long to decode
    assert max(cold.depths(seq2)[-1:]) <= C.CAPTURE_DECODE_MAX + 1
    d.j.close()


def test_a_cached_list_of_a_pruned_version_is_not_used(tmp_path):
    """The Recorder caches v2's chunk list (the inode's base); compaction then
    prunes v2 and frees its chunks.  The next capture relative to v2 must not
    build on the stale cached list (the writer would refuse it, or worse name
    freed chunks): it captures the whole file against the latest version."""
    d = Daemon(tmp_path)
    rnd = random.Random(7)
    path = d.src / "f.txt"
    data = bytearray(b"".join(_line(rnd, i) for i in range(400)))
    path.write_bytes(data)
    v1 = d.capture(b"f.txt")
    data[100:110] = b"0123456789"
    path.write_bytes(data)
    v2 = d.capture(b"f.txt", [(100, 110)], v1)
    assert v2 in d.rec.content.lists  # the inode's base is cached
    # another route records v3 (a scan after the mount, a rename over it) ...
    data[5000:5010] = b"abcdefghij"
    path.write_bytes(data)
    other = Recorder(d.j, str(d.src))
    fd = os.open(path, os.O_RDONLY)
    try:
        ch, _ = other.content.compute(fd, b"f.txt", "write", FULL, None)
    finally:
        os.close(fd)
    v3 = d.j.commit([ch])[-1]
    # ... and compaction prunes v1 and v2 (v3 is the newest: retained)
    res = d.j.prune([v1, v2], [v3])
    assert res.versions_pruned == 2
    with d.j.reader() as r:
        assert r.is_pruned(v2)
    assert v2 not in d.j._lists and v1 not in d.j._lists  # the writer's cache dropped them
    assert v2 in d.rec.content.lists  # still cached here: the capture must notice by itself
    data[200:204] = b"WXYZ"
    path.write_bytes(data)
    v4 = d.capture(b"f.txt", [(200, 204)], v2)  # the inode still thinks v2 is its base
    assert d.content(v4) == bytes(data)
    with d.j.reader() as r:
        assert r.record(v4).base_seq == v3
    d.j.close()


def test_writer_list_cache_survives_compaction_and_stays_per_file(tmp_path, monkeypatch):
    d = Daemon(tmp_path)
    rnd = random.Random(9)
    files = [b"a.txt", b"b.txt", b"c.txt"]
    datas = {n: bytearray(b"".join(_line(rnd, i) for i in range(300))) for n in files}
    heads = {}
    all_seqs = {n: [] for n in files}
    for n in files:
        (d.src / n.decode()).write_bytes(datas[n])
        heads[n] = d.capture(n)
        all_seqs[n].append(heads[n])
    for k in range(40):
        for n in files:
            at = rnd.randrange(len(datas[n]) - 10)
            datas[n][at:at + 6] = b"%06d" % k
            (d.src / n.decode()).write_bytes(datas[n])
            heads[n] = d.capture(n, [(at, at + 6)], heads[n])
            all_seqs[n].append(heads[n])
    # one cached list per file, in the Recorder and in the writer (not one per save)
    assert set(d.rec.content.lists) == set(heads.values())
    assert set(d.j._lists) == set(heads.values())
    doomed = [s for n in files for s in all_seqs[n][1:-1]]
    kept = [s for n in files for s in (all_seqs[n][0], all_seqs[n][-1])]
    d.j.prune(doomed, kept)
    assert set(d.j._lists) == set(heads.values())  # still valid: kept, not cleared
    counts = Counts(monkeypatch)
    for n in files:
        datas[n][:4] = b"HEAD"
        (d.src / n.decode()).write_bytes(datas[n])
        heads[n] = d.capture(n, [(0, 4)], heads[n])
    assert counts.lists == counts.chains == 0  # both caches served the lists after the pass
    for n in files:
        assert d.content(heads[n]) == bytes(datas[n])
        for s in all_seqs[n][:1] + all_seqs[n][-1:]:
            d.content(s)  # the retained versions still read (and verify)
    d.j.close()


def test_list_caches_are_bounded_and_a_miss_reads_the_journal(tmp_path, monkeypatch):
    from deltafs.capture import content as capture  # where the cache bounds are read
    from deltafs.journal import core
    monkeypatch.setattr(capture, "LIST_CACHE_VERSIONS", 5)
    monkeypatch.setattr(core, "LIST_CACHE_VERSIONS", 5)
    d = Daemon(tmp_path)
    rnd = random.Random(3)
    heads, datas = {}, {}
    for i in range(20):  # 20 files, e.g. created then deleted: their lists age out
        n = b"f%02d.txt" % i
        datas[n] = bytearray(b"".join(_line(rnd, k) for k in range(50)))
        (d.src / n.decode()).write_bytes(datas[n])
        heads[n] = d.capture(n)
    assert len(d.rec.content.lists) <= 5 and len(d.j._lists) <= 5
    counts = Counts(monkeypatch)
    n = b"f00.txt"  # long evicted: its next capture rebuilds the list from the records
    datas[n][:3] = b"new"
    (d.src / n.decode()).write_bytes(datas[n])
    seq = d.capture(n, [(0, 3)], heads[n])
    assert counts.lists == 1
    assert d.content(seq) == bytes(datas[n])
    d.j.close()
