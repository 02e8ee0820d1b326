"""Journal: records, hash chain, locking, format, HLC, group commit, content."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import lmdb
import msgpack
import pytest

from deltafs import chunking as C
from deltafs.capture import capture_chunks
from deltafs.errors import CorruptionError, JournalError, JournalFormatError, JournalLockedError, NotFoundError
from deltafs.journal import CHECKPOINT_EVERY, Change, Journal, check_link
from deltafs.journal import schema as S


class FakeClock:
    def __init__(self, ns: int = 1_700_000_000 * 10**9) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def jpath(tmp_path):
    return tmp_path / "journal"


@pytest.fixture
def journal(jpath):
    j = Journal.open(jpath, create=True, clock=FakeClock())
    yield j
    j.close()


def version(j: Journal, file_id: int, path: bytes, data: bytes, base_seq: int = 0, dirty=None, cause="write",
            aligned: bool = False) -> Change:
    """What the capture layer does: rechunk against the base, delta-compress."""
    with j.reader() as r:
        old = r.chunk_list(base_seq) if base_seq else []
        res, chunks = capture_chunks(r, lambda o, n: data[o : o + n], len(data), old,
                                     dirty or [(0, len(data))], aligned=aligned)
    return Change(op="write", file_id=file_id, path=path, size=len(data), cause=cause,
                  base_seq=base_seq, edit=res.edit_list(old), chunks=chunks)


def test_records_and_chain(journal):
    seqs = journal.commit([
        Change(op="mkdir", file_id=1, path=b"d", mode=0o40755),
        Change(op="create", file_id=2, path=b"d/f", mode=0o100644, uid=1000, gid=1000),
        Change(op="setxattr", file_id=2, path=b"d/f", xattr_name=b"user.k", xattr_value=b"v"),
    ])
    assert seqs == [1, 2, 3]
    with journal.reader() as r:
        assert r.head_seq() == 3
        recs = list(r.records())
        assert [x.seq for x in recs] == [1, 2, 3]
        assert [x.seq for x in r.records(2, reverse=True)] == [3, 2]
        assert [x.seq for x in r.records(1, 2, reverse=True)] == [2, 1]
        prev = bytes(32)
        for seq, value in r.raw_records():  # each record's hash covers the previous one's
            assert check_link(value, seq, prev) == (recs[seq - 1], None)
            assert check_link(value, seq, b"x" * 32)[1] is not None
            prev = recs[seq - 1].hash
        assert all(a.hlc < b.hlc for a, b in zip(recs, recs[1:]))
        assert r.record(2).uid == 1000 and r.record(2).path == b"d/f"
        assert journal.verify().records == 3
        assert r.file_state(2).xattrs == {b"user.k": b"v"}
        with pytest.raises(NotFoundError):
            r.record(99)


def test_tamper_one_byte_is_named(journal, jpath):
    journal.commit([Change(op="create", file_id=i, path=b"f%d" % i) for i in range(1, 6)])
    journal.close()
    env = lmdb.open(str(jpath), max_dbs=S.MAX_DBS)
    db = env.open_db(S.DB_CHANGES)
    with env.begin(write=True) as txn:
        v = bytearray(txn.get(S.u64(3), db=db))
        i = v.index(b"f3")
        v[i + 1] = ord("X")
        txn.put(S.u64(3), bytes(v), db=db)
    env.close()
    with Journal.open(jpath, readonly=True) as j:
        res = j.verify()
        assert not res.ok and res.problem.seq == 3 and "record 3 " in res.problem.what


def corrupt_chunk(journal_path, cid: bytes, at: int = -1) -> None:
    """Flip the byte ``at`` (from the end) of a stored chunk value, in its pack file."""
    env = lmdb.open(str(journal_path), max_dbs=S.MAX_DBS, map_size=1 << 40, readonly=True)
    with env.begin() as txn:
        _, pack, off, length, _ = S.decode_loc(txn.get(cid, db=env.open_db(S.DB_CHUNKS, txn=txn)))
    env.close()
    fd = os.open(os.path.join(journal_path, "packs", f"{pack:08x}.pack"), os.O_RDWR)
    try:
        pos = off + length + at if at < 0 else off + at
        os.pwrite(fd, bytes([os.pread(fd, 1, pos)[0] ^ 0xFF]), pos)
    finally:
        os.close(fd)


def test_corrupt_chunk_is_named(journal, jpath):
    data = random.Random(1).randbytes(50_000)
    seq = journal.commit([version(journal, 1, b"f", data)])[0]
    with journal.reader() as r:
        cid = r.chunk_list(seq)[0][0]
    journal.close()
    corrupt_chunk(jpath, cid)
    with Journal.open(jpath, readonly=True) as j:
        assert j.verify().ok  # the chain itself is fine
        res = j.verify(full=True)
        assert not res.ok and res.problem.chunk == cid.hex() and res.problem.seq == seq
        with j.reader() as r, pytest.raises(CorruptionError, match=cid.hex()):
            r.read_content(seq)


def test_lock_second_writer_refused_readers_fine(journal, jpath):
    with pytest.raises(JournalLockedError, match=str(os.getpid())):
        Journal.open(jpath)
    journal.commit([Change(op="create", file_id=1, path=b"a")])
    with Journal.open(jpath, readonly=True) as ro, ro.reader() as r:
        assert r.head_seq() == 1
        journal.commit([Change(op="create", file_id=2, path=b"b")])  # not blocked by the reader
        assert r.head_seq() == 1  # a snapshot
    # a reader in another process (the CLI's case) while the writer holds the lock
    code = (
        "import sys; from deltafs.journal import Journal\n"
        "with Journal.open(sys.argv[1], readonly=True) as j, j.reader() as r: print(r.head_seq())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(jpath)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"
    code = "import sys; from deltafs.journal import Journal\nJournal.open(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, str(jpath)], capture_output=True, text=True)
    assert out.returncode != 0 and f"pid {os.getpid()}" in out.stderr
    journal.close()
    Journal.open(jpath).close()  # lock released on close


def test_format_version_refused(journal, jpath):
    journal.close()
    env = lmdb.open(str(jpath), max_dbs=S.MAX_DBS)
    db = env.open_db(None)  # meta keys are in the main database since format 10
    with env.begin(write=True) as txn:
        txn.put(S.META_FORMAT, msgpack.packb(99), db=db)
    env.close()
    for ro in (True, False):
        with pytest.raises(JournalFormatError, match="format version 99"):
            Journal.open(jpath, readonly=ro)


def test_missing_journal(tmp_path):
    with pytest.raises(NotFoundError):
        Journal.open(tmp_path / "nope", readonly=True)


def test_hlc_monotonic_when_clock_goes_back(jpath):
    clock = FakeClock()
    with Journal.open(jpath, create=True, clock=clock) as j:
        j.commit([Change(op="create", file_id=1, path=b"a")])
        clock.ns += 7 * 86400 * 10**9  # a week later
        j.commit([Change(op="create", file_id=2, path=b"b")])
        clock.ns -= 30 * 86400 * 10**9  # the wall clock jumps a month back
        j.commit([Change(op="create", file_id=i, path=b"x%d" % i) for i in range(3, 10)])
    clock.ns -= 10**9
    with Journal.open(jpath, clock=clock) as j:  # the HLC survives a reopen
        j.commit([Change(op="create", file_id=10, path=b"z")])
        with j.reader() as r:
            hlcs = [x.hlc for x in r.records()]
            assert hlcs == sorted(hlcs) and len(set(hlcs)) == len(hlcs)
            assert r.seq_at_time(clock.ns + 40 * 86400 * 10**9) == 10
            assert r.seq_at_time(0) == 0
            assert j.verify().records == 10


def test_commit_many_one_sync_each_group_alone(journal):
    """What capture's committer relies on: many groups, one durable
    transaction, and a bad group fails alone (its error handed back)."""
    n = 200
    groups = [[Change(op="create", file_id=i + 1, path=b"f%d" % i)] for i in range(n)]
    groups.insert(100, [Change(op="bogus")])
    before = journal.sync_count
    results = journal.commit_many(groups)
    assert journal.sync_count == before + 1
    assert isinstance(results[100], ValueError)
    seqs = [s for r in results if isinstance(r, list) for s in r]
    assert seqs == list(range(1, n + 1))
    assert journal.verify().records == n


def test_batch_keeps_the_clock_of_its_last_committed_record(journal):
    """The writer puts the clock (META_HLC) once per batch, not once per record
    (issue 19): it must still be the clock of the last record that committed,
    also when the batch's last group fails, and the chain must link each
    record to the one before it within a batch."""
    clock = journal._hlc._clock
    groups = [[Change(op="create", file_id=i + 1, path=b"f%d" % i)] for i in range(5)]
    groups.append([Change(op="bogus")])
    results = journal.commit_many(groups)
    assert isinstance(results[-1], ValueError)
    clock.ns += 10**9
    assert journal.commit_many([[Change(op="bogus")]])[0].__class__ is ValueError
    with journal.reader() as r:
        recs = list(r.records())
        assert [x.seq for x in recs] == [1, 2, 3, 4, 5]
        assert r.meta(S.META_HLC) == recs[-1].hlc
        assert r.head() == (r.head_seq(), r.head_hash()) == (5, recs[-1].hash)
    assert journal.verify().records == 5


def test_one_byte_edit_stores_little(journal):
    data = bytearray(random.Random(2).randbytes(10 * 1024 * 1024))
    s1 = journal.commit([version(journal, 1, b"big", bytes(data))])[0]
    mid = len(data) // 2
    data[mid] ^= 0x55
    ch = version(journal, 1, b"big", bytes(data), base_seq=s1, dirty=[(mid, mid + 1)])
    s2 = journal.commit([ch])[0]
    with journal.reader() as r:
        rec = r.record(s2)
        assert rec.stored < 64 * 1024
        assert sum(len(refs) for _, _, refs in rec.edit) <= 3
        assert r.read_content(s2) == bytes(data)


def test_many_versions_round_trip_and_checkpoints(journal):
    rnd = random.Random(3)
    data = bytearray(rnd.randbytes(300_000))
    base = journal.commit([version(journal, 7, b"f", bytes(data), cause="preimage")])[0]
    expected = {base: bytes(data)}
    for i in range(CHECKPOINT_EVERY + 10):
        off = rnd.randrange(len(data))
        n = rnd.randint(1, 5000)
        data[off : off + n] = rnd.randbytes(n)
        dirty = [(off, off + n)]
        if i % 7 == 0:
            dirty.append((len(data), len(data) + 1000))
            data += rnd.randbytes(1000)
        base = journal.commit([version(journal, 7, b"f", bytes(data), base_seq=base, dirty=dirty)])[0]
        expected[base] = bytes(data)
    journal._clear_list_cache()
    with journal.reader() as r:
        for seq, content in expected.items():
            assert b"".join(r.iter_content(seq)) == content
            assert len(r.list_chain(seq)[1]) <= CHECKPOINT_EVERY
        assert r.versions_of(7) == sorted(expected, reverse=True)
        rep = journal.verify(full=True)
        assert rep.ok and rep.versions_checked == len(expected)
        assert r.file_state(7).content_seq == base
        st = r.stats()
        assert st["stored_bytes"] < st["raw_bytes"]


def test_dedup_identical_content(journal):
    data = random.Random(4).randbytes(100_000)
    s1 = journal.commit([version(journal, 1, b"a", data)])[0]
    ch = version(journal, 2, b"b", data)
    assert ch.chunks == []  # capture saw them all
    s2 = journal.commit([ch])[0]
    with journal.reader() as r:
        assert r.record(s2).stored == 0
        assert r.record(s1).content_hash == r.record(s2).content_hash
        cid = r.chunk_list(s1)[0][0]
        assert r.chunk_refs(cid) == 2


def test_bad_content_version_rejected(journal):
    with pytest.raises(ValueError, match="not stored"):
        journal.commit([Change(op="write", file_id=1, path=b"a", size=5, cause="write", base_seq=0,
                               edit=[(0, 0, [(b"x" * 16, 5)])])])
    with journal.reader() as r:
        assert r.head_seq() == 0


def test_settings_and_kv(journal, jpath):
    journal.set_setting("retention", {"daily": 90})
    journal.kv_put("snapshots", "before-upgrade", {"seq": 0})
    with Journal.open(jpath, readonly=True) as ro, ro.reader() as r:
        assert r.setting("retention") == {"daily": 90}
        assert r.kv_get("snapshots", "before-upgrade") == {"seq": 0}
        assert r.kv_items("mirrors") == []
    journal.kv_delete("snapshots", "before-upgrade")
    with journal.reader() as r:
        assert r.kv_get("snapshots", "before-upgrade") is None


def test_hot_chunk_chain_restarts_halfway_not_from_scratch(journal):
    """A region rewritten on every save (a database header page) reaches the
    longest delta chain; the next version is a delta against an ancestor
    halfway down the chain, not a full copy, and every version reads back."""
    rnd = random.Random(5)
    words = [rnd.randbytes(4).hex().encode() for _ in range(200)]
    data = bytearray(b" ".join(rnd.choice(words) for _ in range(2500)))
    journal.commit([Change(op="create", file_id=1, path=b"db")])
    seq, versions, sizes = 0, {}, []
    for i in range(C.MAX_DELTA_DEPTH + 8):
        data[100:108] = b"%08d" % i  # the same page, changed on every save
        blob = bytes(data)
        ch = version(journal, 1, b"db", blob, base_seq=seq, dirty=[(100, 108)])
        sizes.append(sum(len(c.payload) for c in ch.chunks))
        seq = journal.commit([ch])[0]
        versions[seq] = blob
    with journal.reader() as r:
        depths = [r.chunk_info(cid).depth for cid, _ in (r.chunk_list(s)[0] for s in versions)]
        assert max(depths) == C.MAX_DELTA_DEPTH
        assert C.SKIP_TO_DEPTH + 1 in depths[C.MAX_DELTA_DEPTH:]
        assert max(sizes[1:]) < 200, sizes  # no save stored the chunk in full again
        for s, blob in versions.items():
            assert r.read_content(s) == blob


def test_raw_cache_stops_chain_decoding_and_keeps_its_budget(journal):
    data = bytearray(random.Random(6).randbytes(4000) * 4)
    journal.commit([Change(op="create", file_id=1, path=b"f")])
    seq = 0
    for i in range(10):
        data[10:14] = b"%04d" % i
        seq = journal.commit([version(journal, 1, b"f", bytes(data), base_seq=seq, dirty=[(10, 14)])])[0]
    cache = C.RawCache(budget=8 * len(data))
    with journal.reader() as r:
        cid = r.chunk_list(seq)[0][0]
        assert r.chunk_info(cid).depth == 9
        assert r.read_chunk(cid, cache) == bytes(data)
        # only the chunk asked for is kept, not the 9 ancestors decoded on the way
        # (they would evict other files' bases)
        assert list(cache._d) == [cid] and cache.size == len(data)
        assert cache.get(cid) == bytes(data)
        for i in range(20):  # the budget holds
            cache.put(b"%016d" % i, bytes(len(data)))
        assert cache.size <= cache.budget and len(cache._d) == 8
        cache.discard(b"%016d" % 19)
        assert b"%016d" % 19 not in cache and cache.size == 7 * len(data)


def test_lmdb_errors_leave_the_journal_as_journal_errors(journal):
    """capture and the CLI catch JournalError, never lmdb's own: a reader
    past LMDB's reader table (a real limit, 510 slots) says so as one."""
    import contextlib

    journal.commit([Change(op="create", file_id=1, path=b"a")])
    with contextlib.ExitStack() as held, pytest.raises(JournalError, match="MDB_READERS_FULL"):
        for _ in range(600):
            held.enter_context(journal.reader())
    with journal.reader() as r:  # every slot is free again
        assert r.head_seq() == 1


def test_a_reader_sees_what_a_writer_in_another_process_pruned(jpath):
    """Every database is open when the journal is: a read-only opener of a
    journal that has never been pruned (here: last written by a deltafs
    that made ``pruned`` on the first prune only) learns of the pruning a
    writer in another process does later, without reopening."""
    data = [random.Random(i).randbytes(30_000) for i in range(3)]
    with Journal.open(jpath, create=True, clock=FakeClock()) as j:
        seqs = [j.commit([version(j, 7, b"f", data[0])])[0]]
        for d in data[1:]:
            seqs.append(j.commit([version(j, 7, b"f", d, base_seq=seqs[-1])])[0])
    env = lmdb.open(str(jpath), max_dbs=S.MAX_DBS)
    with env.begin(write=True) as txn:  # as an older deltafs left it
        for name in S.WRITER_DBS:
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()
    with Journal.open(jpath, readonly=True) as ro:
        with ro.reader() as r:
            assert r.pruned_seqs() == set() and r.read_content(seqs[0]) == data[0]
        code = ("import sys; from deltafs.journal import Journal\n"
                "with Journal.open(sys.argv[1]) as j:\n"
                f"    assert j.prune([{seqs[0]}], {seqs[1:]}).versions_pruned == 1\n")
        subprocess.run([sys.executable, "-c", code, str(jpath)], check=True, capture_output=True)
        with ro.reader() as r:
            assert r.pruned_seqs() == {seqs[0]} and r.is_pruned(seqs[0])
            assert r.pruned_info(seqs[0])["t"] > 0
            assert r.read_content(seqs[2]) == data[2]


def test_overwrite_with_unrelated_data_stops_reading_bases(journal):
    """A whole file rewritten with unrelated data reads only a few old chunks back
    (each would cost as much as the chunk); an edit still gets its delta."""
    rnd = random.Random(11)
    old_data = rnd.randbytes(4 << 20)
    seq = journal.commit([version(journal, 1, b"f", old_data)])[0]
    reads = []
    with journal.reader() as r:
        orig = r.read_chunk
        r.read_chunk = lambda cid, *a: reads.append(cid) or orig(cid, *a)
        old = r.chunk_list(seq)
        new_data = rnd.randbytes(4 << 20)
        res, chunks = capture_chunks(r, lambda o, n: new_data[o:o + n], len(new_data), old,
                                     [(0, len(new_data))])
        assert len(res.edits) and len(chunks) > 100
        assert all(c.base_id is None for c in chunks)
        assert len(reads) < 8 + len(chunks) // 16 + 2
        reads.clear()
        edited = old_data[:1 << 20] + b"edit" + old_data[(1 << 20) + 4:]
        res, chunks = capture_chunks(r, lambda o, n: edited[o:o + n], len(edited), old,
                                     [(1 << 20, (1 << 20) + 4)])
        assert chunks and all(c.base_id is not None for c in chunks)


def test_applied_record_is_the_decoded_record(journal):
    """The writer applies to the tree state a Record built from the Change
    (records.record_of), not a decode of the bytes it just encoded: every
    field must equal what decoding the stored value gives."""
    from deltafs.journal.records import decode_record, encode_record, record_of

    prev = bytes(range(32))
    changes = [
        Change(op="create", file_id=7, path=b"a/b", mode=0o100644, uid=1, gid=2, mtime_ns=123),
        Change(op="setattr", file_id=7, path=b"a/b", mtime_ns=456, size=10),
        Change(op="setxattr", file_id=7, path=b"a/b", xattr_name=bytearray(b"user.x"),
               xattr_value=memoryview(b"\x00v")),
        Change(op="removexattr", file_id=7, path=b"a/b", xattr_name=b"user.x"),
        Change(op="symlink", file_id=8, path=b"l", target=b"a/b", mode=0o120777),
        Change(op="mknod", file_id=9, path=b"n", mode=0o20644, rdev=0x0501),
        Change(op="rename", file_id=7, path=b"a/b", path2=b"c", flags=2),
        Change(op="link", file_id=7, path=b"c", path2=b"d"),
        Change(op="unlink", file_id=7, path=b"d"),
        Change(op="write", file_id=7, path=b"c", size=5, cause="fsync", base_seq=3,
               edit=[(0, 1, [(b"\x01" * 16, 5)])], origin="dev:4"),
    ]
    for i, ch in enumerate(changes):
        stored = 5 if ch.op == "write" else None
        chash = b"\x02" * 32 if i % 2 else None
        ctree = None if chash else (b"\x03" * 32 if ch.op == "write" else None)
        value, h = encode_record(i + 1, 1000 + i, ch, prev, stored, chash, ctree)
        built = record_of(i + 1, 1000 + i, ch, h, stored, chash, ctree)
        decoded = decode_record(value, i + 1, lists=False)
        assert built == decoded, ch.op
        for name in ("path", "path2", "target", "xattr_name", "xattr_value"):
            assert type(getattr(built, name)) is type(getattr(decoded, name)), name
    # and through the writer: the tree state is what the records say
    journal.commit([Change(op="create", file_id=11, path=b"f", mode=0o100600, mtime_ns=5)])
    journal.commit([Change(op="setxattr", file_id=11, path=b"f", xattr_name=b"user.k",
                           xattr_value=bytearray(b"val"))])
    with journal.reader() as rd:
        st = rd.file_state(11)
        assert st.path == b"f" and st.mode == 0o100600 and st.mtime_ns == 5
        assert st.xattrs == {b"user.k": b"val"} and type(st.xattrs[b"user.k"]) is bytes
