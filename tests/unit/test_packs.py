"""Pack files (journal format 2 on): durability at open, repacking."""

from __future__ import annotations

import os
import random

import pytest

from deltafs import maintenance as M
from deltafs.chunking import build_chunk
from deltafs.journal import Journal
from deltafs.journal import packs as P
from deltafs.journal import schema as S

from test_journal import FakeClock, version
from test_maintenance import recount_refs, stored_refs


def text(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"journal", b"chunk", b"pack", b"save"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:n])


def edits(j: Journal, n: int, size: int = 120_000, fid: int = 7) -> tuple[list[int], dict[int, bytes]]:
    """``n`` versions of one file, each a small edit of the last: -> (seqs, content by seq)."""
    data = bytearray(text(1, size))
    rng = random.Random(2)
    seqs, content, base = [], {}, 0
    for _ in range(n):
        at = rng.randrange(len(data) - 100)
        data[at : at + 10] = rng.randbytes(10)
        dirty = [(at, at + 10)] if base else None
        seq = j.commit([version(j, fid, b"f", bytes(data), base_seq=base, dirty=dirty)])[0]
        seqs.append(seq)
        content[seq] = bytes(data)
        base = seq
    return seqs, content


def pack_files(jpath) -> dict[int, int]:
    return P.PackFiles(str(jpath)).on_disk()


def test_chunk_values_are_in_pack_files_and_counted_in_journal_data(tmp_path):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 5)
        with j.reader() as r:
            stored = r.meta(S.META_STORED)
            for s in seqs:
                assert r.read_content(s) == content[s]
            # the LMDB index holds locations, not values
            for _, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS]):
                assert len(v) <= 12 and S.decode_loc(v)[1] == 1
        on_disk = pack_files(jp)
        assert list(on_disk) == [1]
        assert on_disk[1] == len(P.PACK_MAGIC) + stored  # values back to back, nothing else
        assert j.data_bytes() >= on_disk[1]


def test_bytes_of_an_uncommitted_transaction_are_cut_at_the_next_open(tmp_path):
    """A crash after the pack write but before the LMDB commit leaves a tail
    (and maybe a new pack) that no committed index entry names."""
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 3)
    committed = pack_files(jp)[1]
    with open(jp / "packs" / P.pack_name(1), "ab") as f:
        f.write(b"x" * 5000)  # a torn append
    (jp / "packs" / P.pack_name(2)).write_bytes(P.PACK_MAGIC + b"y" * 100)  # a pack never committed
    with Journal.open(jp, clock=FakeClock()) as j:
        assert pack_files(jp) == {1: committed}
        more, content2 = edits(j, 2, fid=8)
        assert j.verify(full=True).ok
        with j.reader() as r:
            for s, data in {**content, **content2}.items():
                assert r.read_content(s) == data


def test_a_pack_shorter_than_committed_is_refused(tmp_path):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        edits(j, 2)
    os.truncate(jp / "packs" / P.pack_name(1), 100)
    with pytest.raises(Exception, match="the journal committed"):
        Journal.open(jp, clock=FakeClock())


def test_packs_roll_at_their_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "PACK_MAX", 8_000)
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 6)
    assert len(pack_files(jp)) > 1 and all(n <= 8_000 + 70_000 for n in pack_files(jp).values())
    with Journal.open(jp, readonly=True) as j, j.reader() as r:
        for s, data in content.items():
            assert r.read_content(s) == data


def test_repack_reclaims_dead_bytes_but_keeps_old_packs_while_a_reader_needs_them(tmp_path):
    jp = tmp_path / "j"
    clock = FakeClock()
    with Journal.open(jp, create=True, clock=clock) as j:
        seqs, content = edits(j, 12)
        big = j.commit([version(j, 9, b"big", random.Random(5).randbytes(300_000))])[0]
        j._storage.packs.roll()  # close pack 1 (as 256 MiB of appends would)
        keep = edits(j, 1, fid=10)[0][0]
        before = j.data_bytes()
        with j.reader() as r:  # everything in pack 1 but `big` is about to die
            retained = [s for s in r.retained_content() if s != big]
        j.prune([big], retained)
        assert pack_files(jp).keys() == {1, 2}
        old_reader = j._storage.env.begin()  # a snapshot that still sees the old locations
        try:
            res = j.repack()
            assert res.packs_emptied == 1 and res.packs_deleted == 0
            assert 1 in pack_files(jp)  # kept: the reader may still read from it
            from deltafs.journal import Reader
            assert Reader(j._storage, old_reader).read_content(seqs[-1]) == content[seqs[-1]]
        finally:
            old_reader.abort()
        assert j.repack().packs_deleted == 1  # the next pass deletes it
        assert 1 not in pack_files(jp)
        assert j.data_bytes() < before - 250_000
        with j.reader() as r:
            for s, data in content.items():
                assert r.read_content(s) == data
            assert r.read_content(keep)
        assert stored_refs(j) == recount_refs(j)
        assert j.verify(full=True).ok


def test_compact_under_a_size_limit_rewrites_the_current_pack(tmp_path):
    """Everything in one pack (a young journal): pruning must still shrink the
    journal data that --journal-limit counts."""
    jp = tmp_path / "j"
    clock = FakeClock()
    with Journal.open(jp, create=True, clock=clock) as j:
        for i in range(6):
            j.commit([version(j, 20 + i, b"r%d" % i, random.Random(i).randbytes(200_000))])
            clock.ns += 10**9
        j.commit([version(j, 20, b"r0", b"small now\n", base_seq=1)])
        clock.ns += 400 * 86400 * 10**9
        before = j.data_bytes()
        rep = M.compact_to_fit(j, M.RetentionPolicy(), limit=before - 150_000)
        assert rep.versions_pruned >= 1 and rep.packs_emptied >= 1
        assert j.data_bytes() <= before - 150_000
        assert j.verify(full=True).ok


def test_compaction_rewrites_a_sparse_chunk_index_in_key_order(tmp_path):
    """Random chunk ids leave index pages half empty; compaction packs them
    full, and every chunk is still found where it was."""
    jp = tmp_path / "j"
    rng = random.Random(9)
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        for _ in range(40):  # 40 commits of 100 new chunks: random inserts all over the B-tree
            j.put_chunks([build_chunk(rng.randbytes(64)) for _ in range(100)])
        with j.reader() as r:
            before = r.txn.stat(r.dbs[S.DB_CHUNKS])
            index = {bytes(k): bytes(v) for k, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS])}
        data_before = j.data_bytes()
        rep = M.compact(j)
        with j.reader() as r:
            after = r.txn.stat(r.dbs[S.DB_CHUNKS])
            ps = r.txn.stat(r.dbs[S.DB_PLAN])  # the pass wrote its planning state (one page)
            plan_bytes = (ps["leaf_pages"] + ps["branch_pages"] + ps["overflow_pages"]) * ps["psize"]
            assert {bytes(k): bytes(v) for k, v in r.txn.cursor(db=r.dbs[S.DB_CHUNKS])} == index
            for cid in list(index)[::97]:
                assert r.read_chunk(cid)
        assert after["entries"] == before["entries"] == 4000
        assert rep.index_pages_saved == before["leaf_pages"] + before["branch_pages"] \
            - after["leaf_pages"] - after["branch_pages"] > 0
        assert after["leaf_pages"] <= before["leaf_pages"] * 0.8
        assert j.data_bytes() == data_before - rep.index_pages_saved * after["psize"] + plan_bytes
        assert M.compact(j).index_pages_saved == 0  # already dense: left alone


def _maps_pack(pid: int, pack: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(P.pack_name(pack) in line for line in f)


def _maps_deleted_pack(pid: int, pack: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(P.pack_name(pack) in line and "(deleted)" in line for line in f)


@pytest.mark.timeout(60)
def test_a_long_lived_reader_lets_go_of_packs_compaction_deleted(tmp_path):
    """`deltafs log --watch` in another process maps the packs it read; once
    compaction deletes one, the follower drops its map, so the disk space
    really comes back (a map keeps a deleted file allocated)."""
    import subprocess
    import sys
    import time

    from fusetools import DELTAFS

    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        edits(j, 40)
        big = j.commit([version(j, 9, b"big", random.Random(5).randbytes(300_000))])[0]
        assert j.archive_records() > 0  # record blocks in pack 1: the follower reads them
        j._storage.packs.roll()
        edits(j, 1, fid=10)
        out = open(tmp_path / "follow.jsonl", "wb")
        follower = subprocess.Popen([*DELTAFS, "log", "--records", "--watch", "--json", "--journal", str(jp)],
                                    stdout=out, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not _maps_pack(follower.pid, 1):  # it has read the records in pack 1
                assert time.monotonic() < deadline, "the follower never read pack 1"
                time.sleep(0.05)
            with j.reader() as r:
                retained = [s for s in r.retained_content() if s != big]
            j.prune([big], retained)
            assert j.repack().packs_emptied >= 1
            while 1 in pack_files(jp):  # deleted at once, or once no snapshot needs it
                j.repack()
                assert time.monotonic() < deadline, "pack 1 was never deleted"
                time.sleep(0.05)
            while _maps_deleted_pack(follower.pid, 1):
                assert time.monotonic() < deadline, "the follower still maps the deleted pack 1"
                time.sleep(0.1)
            assert follower.poll() is None  # and it is still following
        finally:
            follower.kill()
            follower.wait()
            out.close()


def test_big_flushes_write_around_the_page_cache_and_read_back_exactly(tmp_path, monkeypatch):
    """Flushes of DIRECT_MIN bytes or more go out with O_DIRECT (aligned middle),
    small syncs leave unaligned tails written through the page cache: every
    value reads back exactly, from the writer, from a reader that mapped the
    pack while it was shorter, and from a fresh reader."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    monkeypatch.setattr(P, "PACK_MAX", 24 << 20)  # roll once or twice too
    writes = []
    real_open = os.open

    def counting_open(path, flags, *a):
        if flags & os.O_DIRECT:
            writes.append(path)
        return real_open(path, flags, *a)

    monkeypatch.setattr(P.os, "open", counting_open)
    jdir = str(tmp_path / "j")
    w = P.PackFiles(jdir)
    w.open_writer(0, 0)
    early = P.PackFiles(jdir)
    rng = random.Random(19)
    placed = []
    for i in range(1500):
        val = rng.randbytes(rng.choice((17, 4096, 20_000, 65_000)))
        placed.append((*w.append(val), val))
        if rng.random() < 0.03:
            w.sync()
            pack, off, v = placed[rng.randrange(len(placed))]
            assert early.read(pack, off, len(v)) == v  # maps the pack as it is now
        if i % 97 == 0:
            pack, off, v = placed[-1]
            assert w.read(pack, off, len(v)) == v  # maybe still buffered
    w.sync()
    assert writes and w._direct_ok, "O_DIRECT was not used"
    fresh = P.PackFiles(jdir)
    for pack, off, v in placed:
        assert early.read(pack, off, len(v)) == v
        assert fresh.read(pack, off, len(v)) == v
    w.close()


@pytest.mark.parametrize("size", [1000, 3 << 20])  # a buffered flush, an O_DIRECT one
def test_a_failed_pack_write_does_not_stop_later_appends(tmp_path, monkeypatch, size):
    """A write that fails (a full disk: simulated, os.pwrite raising ENOSPC once,
    since filling a real disk here is not possible) leaves the writer able
    to append and sync once space is back: nothing of the failed flush
    pins the buffer (a view kept alive by the traceback would make every
    later append fail with BufferError)."""
    w = P.PackFiles(str(tmp_path / "j"))
    w.open_writer(0, 0)
    real = os.pwrite
    failed = []

    def full_once(fd, data, offset):
        if not failed:
            failed.append(fd)
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    vals = [os.urandom(size) for _ in range(3)]
    placed = [(*w.append(vals[0]), vals[0])]
    monkeypatch.setattr(P.os, "pwrite", full_once)
    with pytest.raises(OSError) as err:
        w.sync()
    kept = err.value  # the traceback stays referenced, as a logged error does
    monkeypatch.setattr(P.os, "pwrite", real)
    for v in vals[1:]:
        placed.append((*w.append(v), v))
    w.sync()
    assert failed and kept is not None
    fresh = P.PackFiles(str(tmp_path / "j"))
    for pack, off, v in placed:
        assert fresh.read(pack, off, len(v)) == v


def test_read_chunks_gives_what_read_chunk_gives_and_checks_it(tmp_path):
    """Reader.read_chunks (mount --at's path): delta-coded, compressed and raw
    chunks, runs read with one pread, a cache; a damaged value is a CorruptionError."""
    from deltafs.errors import CorruptionError
    from deltafs.pastfs import ChunkCache

    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 4)  # delta chains
        raw = j.commit([version(j, 9, b"r", random.Random(3).randbytes(200_000))])[0]  # stored raw
        cache = ChunkCache(1 << 20)
        with j.reader() as r:
            for s in seqs + [raw]:
                cids = [cid for cid, _ in r.chunk_list(s)]
                want = [r.read_chunk(c) for c in cids]
                for c in (None, cache, cache):  # without a cache, filling it, from it
                    assert [bytes(x) for x in r.read_chunks(cids, c, ahead=1 << 20)] == want
                assert b"".join(bytes(x) for x in r.read_chunks(cids)) == r.read_content(s)
            cids = [cid for cid, _ in r.chunk_list(raw)]
            _, pack, off, length, _ = S.decode_loc(r.txn.get(cids[1], db=r.dbs[S.DB_CHUNKS]))
    with open(P.PackFiles(str(jp)).path(pack), "r+b") as f:  # one byte of the second chunk flipped
        f.seek(off + length - 1)
        b = f.read(1)
        f.seek(off + length - 1)
        f.write(bytes([b[0] ^ 1]))
    with Journal.open(jp, readonly=True) as j, j.reader() as r:
        assert bytes(r.read_chunks(cids[:1])[0]) == r.read_chunk(cids[0])
        with pytest.raises(CorruptionError, match="does not match its id"):
            r.read_chunks(cids)


def test_a_sequential_read_of_a_raw_file_looks_its_chunks_up_only_once(tmp_path, monkeypatch):
    """mount --at's FileStream: a raw (incompressible) file read front to back
    finds each next chunk value right after the last one, so only the first
    request looks chunks up in the index; files whose values are not back to
    back (shared chunks, compressed ones) and a wrong guess read the same
    bytes through the index; a damaged value is still an error, never served."""
    import errno

    from deltafs.journal.reader import Reader
    from deltafs.pastfs import RAW_VALUE_EXTRA, ChunkCache, FileStream

    assert RAW_VALUE_EXTRA == S.RAW_VALUE_EXTRA

    rnd = random.Random(5)
    a, b = rnd.randbytes(3 << 20), rnd.randbytes(1 << 20)
    files = {b"raw": a, b"mixed": b + text(4, 500_000) + a[: 1 << 20], b"text": text(6, 2 << 20)}
    jp = tmp_path / "j"
    looked_up = []
    real = Reader.read_chunks
    monkeypatch.setattr(Reader, "read_chunks",
                        lambda self, cids, *a, **k: (looked_up.append(len(cids)), real(self, cids, *a, **k))[1])
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs = {p: j.commit([version(j, 10 + i, p, data)])[0] for i, (p, data) in enumerate(files.items())}
        for p, data in files.items():
            for step in (1 << 20, 100_000):
                looked_up.clear()
                fs = FileStream(j, seqs[p], len(data), p)
                got = b"".join(fs.read(j, ChunkCache(1 << 20), o, step) for o in range(0, len(data), step))
                assert got == data, (p, step)
                if p == b"raw":
                    first = sum(1 for o in fs.offs if o < step)  # the chunks of the first request
                    assert sum(looked_up) <= first + 1, (step, looked_up)
                elif p == b"text":
                    assert sum(looked_up) >= len(fs.cids)  # compressed: nothing to guess
        fs = FileStream(j, seqs[b"raw"], len(a), b"raw")
        fs.read(j, None, 0, 1 << 20)
        k, pack, off = fs.where
        fs.where = (k, pack, off + 1)  # a wrong guess: looked up instead
        assert fs.read(j, None, fs.offs[k], 1 << 20) == a[fs.offs[k]: fs.offs[k] + (1 << 20)]
        fs.where = (k, pack, off)
        with j.reader() as r:
            _, pack2, off2, length2, _ = S.decode_loc(r.txn.get(fs.cids[k + 3], db=r.dbs[S.DB_CHUNKS]))
    with open(P.PackFiles(str(jp)).path(pack2), "r+b") as f:  # a byte of a chunk the next read guesses
        f.seek(off2 + length2 - 1)
        c = f.read(1)
        f.seek(off2 + length2 - 1)
        f.write(bytes([c[0] ^ 1]))
    with Journal.open(jp, readonly=True) as j:
        with pytest.raises(OSError) as e:
            fs.read(j, None, fs.offs[k], 1 << 20)
        assert e.value.errno == errno.EIO


def test_o_direct_writes_go_out_of_the_write_buffer_itself_aligned(tmp_path, monkeypatch):
    """The aligned middle of a big flush is written with O_DIRECT straight from
    the writer's buffer (no staging copy, issue 19): every such write gets
    page-aligned memory at a page-aligned offset, also after syncs left
    unaligned tails, and O_DIRECT is never given up; values read back exactly."""
    import ctypes

    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    jdir = str(tmp_path / "j")
    w = P.PackFiles(jdir)
    w.open_writer(0, 0)
    real = os.pwrite
    direct = []

    def checked(fd, data, offset):
        if fd == w._dfd:
            mv = memoryview(data)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
            assert mv.obj is w._buf.mem  # the buffer itself, not a copy
            assert addr % P.DIRECT_ALIGN == 0 and offset % P.DIRECT_ALIGN == 0 and len(mv) % P.DIRECT_ALIGN == 0
            direct.append(len(mv))
            mv.release()
        return real(fd, data, offset)

    monkeypatch.setattr(P.os, "pwrite", checked)
    rng = random.Random(7)
    placed = []
    for i in range(600):
        val = rng.randbytes(rng.choice((1, 333, 16_390, 65_541)))
        placed.append((*w.append(val), val))
        if rng.random() < 0.05:
            w.sync()  # an unaligned tail written through the page cache
    big = rng.randbytes(9 << 20)  # bigger than the buffer's usual size
    placed.append((*w.append(big), big))
    w.sync()
    assert direct and w._direct_ok
    fresh = P.PackFiles(jdir)
    for pack, off, v in placed:
        assert fresh.read(pack, off, len(v)) == v
    w.close()
