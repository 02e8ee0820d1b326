"""Format 13: the ``history`` and ``pathlog`` seqs of the records in record
blocks are packed into segments of varint deltas (journal/seqindex.py,
issue 20); every lookup answers as before, verify --full checks them, and a
format-12 journal is upgraded."""

from __future__ import annotations

import random

import lmdb
import msgpack
import pytest

from deltafs.errors import JournalFormatError
from deltafs.journal import Change, Journal
from deltafs.journal import compact as JC
from deltafs.journal import core as JCore
from deltafs.journal import schema as S
from deltafs.journal import seqindex as Q

from oldformat import downgrade_to_format_12
from test_journal import FakeClock
from test_packs import edits

pytestmark = pytest.mark.unit

LONG = b"dir/" + b"x" * 600  # a hashed path key (481 bytes)
N_FILES = 40


def mixed_history(j: Journal, rng: random.Random, rounds: int, start: int = 0) -> None:
    """Files created, changed, renamed (path2), linked, deleted, a long path;
    file 1 changes in every record batch (more seqs than one segment holds)."""
    for rnd in range(start, start + rounds):
        batch = []
        for fid in rng.sample(range(2, N_FILES + 2), 12):
            path = b"src/m%d.py" % fid
            if rnd == 0:
                batch.append(Change(op="create", file_id=fid, path=path, mode=0o100644))
            elif rnd % 7 == 3 and fid % 5 == 0:
                batch.append(Change(op="rename", file_id=fid, path=path, path2=b"src/old/m%d.py" % fid))
                batch.append(Change(op="rename", file_id=fid, path=b"src/old/m%d.py" % fid, path2=path))
            else:
                batch.append(Change(op="setattr", file_id=fid, path=path, mode=0o100600 | (rnd % 64)))
        for _ in range(40):
            batch.append(Change(op="setattr", file_id=1, path=b"hot", mode=0o100600 | rng.randrange(64)))
        if rnd == 0:
            batch.append(Change(op="create", file_id=1, path=b"hot", mode=0o100644))
            batch.append(Change(op="create", file_id=500, path=LONG, mode=0o100644))
        elif rnd % 4 == 1:
            batch.append(Change(op="setattr", file_id=500, path=LONG, mode=0o100600 | (rnd % 64)))
            batch.append(Change(op="link", file_id=500, path=LONG, path2=b"hard%d" % rnd))
        j.commit(batch)


def model(j: Journal) -> tuple[dict, dict]:
    """From the records alone: file id -> seqs, path -> seqs (newest first)."""
    by_id: dict[int, list[int]] = {}
    by_path: dict[bytes, list[int]] = {}
    with j.reader() as r:
        for rec in r.records():
            by_id.setdefault(rec.file_id, []).insert(0, rec.seq)
            for p in {rec.path, rec.path2} - {None}:
                by_path.setdefault(p, []).insert(0, rec.seq)
    return by_id, by_path


def under(by_path: dict, prefix: bytes) -> list[int]:
    return sorted({s for p, seqs in by_path.items() for s in seqs
                   if not prefix or p == prefix or p.startswith(prefix + b"/")}, reverse=True)


def answers(j: Journal, by_id: dict, by_path: dict) -> None:
    with j.reader() as r:
        for fid, seqs in by_id.items():
            assert r.versions_of(fid) == seqs, fid
        for p in [*by_path, b"", b"src", b"src/old", b"dir", b"nothing"]:
            assert r.versions_under(p) == under(by_path, p), p
        for p, seqs in by_path.items():  # the newest record naming a path, as the writer asks
            assert Q.last_seq(r.txn, r.dbs[S.DB_PATHLOG], *Q.pathlog_keys(p)) == seqs[0], p
        assert Q.last_seq(r.txn, r.dbs[S.DB_PATHLOG], *Q.pathlog_keys(b"nothing")) == 0


def layout(j: Journal) -> dict:
    """Segments and duplicates, each side of the last archived record."""
    out = {"segments": 0, "dups": 0, "seg_max": 0, "hot_segments": 0}
    with j.reader() as r:
        db, archived = r.dbs[S.DB_HISTORY], r.archived_upto()
        for kind, key, seq, packed in Q.all_entries(r.txn, db):
            assert packed == (seq <= archived), (kind, key, seq, archived)
        for k, v in r.txn.cursor(db=db):
            if len(k) == 16 or k[:1] == Q.SEGMENT_PATH_PREFIX:
                out["segments"] += 1
                out["seg_max"] = max(out["seg_max"], len(v))
                out["hot_segments"] += k[:8] == S.u64(1)
            else:
                out["dups"] += 1
    return out


def test_compaction_packs_the_archived_seqs_and_every_lookup_answers(tmp_path):
    rng = random.Random(13)
    with Journal.open(tmp_path / "j", create=True, clock=FakeClock()) as j:
        mixed_history(j, rng, 30)
        by_id, by_path = model(j)
        answers(j, by_id, by_path)
        assert layout(j)["segments"] == 0
        with j.reader() as r:
            pages = r.txn.stat(r.dbs[S.DB_HISTORY])
        assert j.archive_records() > 1000
        lay = layout(j)
        # file 1 has > 1,000 archived seqs: several segments, each full to SEGMENT_MAX
        assert lay["hot_segments"] >= 2 and lay["seg_max"] <= Q.SEGMENT_MAX, lay
        answers(j, by_id, by_path)
        assert j.verify(full=True).ok
        j.densify_index()
        with j.reader() as r:
            after = r.txn.stat(r.dbs[S.DB_HISTORY])
        assert after["leaf_pages"] * 3 < pages["leaf_pages"], (pages, after)
        # more records: new duplicates, then the next pass extends the last segments
        mixed_history(j, rng, 20, start=30)
        by_id, by_path = model(j)
        answers(j, by_id, by_path)
        assert j.archive_records() > 0
        answers(j, by_id, by_path)
        assert layout(j)["dups"] < 100
        assert j.verify(full=True).ok
    with Journal.open(tmp_path / "j", readonly=True) as j:
        answers(j, by_id, by_path)


def test_a_deleted_path_recreated_soon_keeps_its_identity_once_its_seqs_are_packed(tmp_path):
    """The writer's re-created-path rule reads the newest seq of the path:
    from a segment when every record naming it is in a block."""
    clock = FakeClock()
    with Journal.open(tmp_path / "j", create=True, clock=clock) as j:
        j.commit([Change(op="create", file_id=9, path=b"a.txt", mode=0o100644)])
        j.commit([Change(op="unlink", file_id=9, path=b"a.txt")])
        for i in range(80):
            j.commit([Change(op="setattr", file_id=1, path=b"other", mode=0o100600 | (i % 64))])
        j.archive_records()
        with j.reader() as r:
            assert r.archived_upto() >= 2
            db = r.dbs[S.DB_PATHLOG]
            live, prefix = Q.pathlog_keys(b"a.txt")
            assert not r.txn.cursor(db=db).set_key(live)  # no duplicate left: a segment only
            assert Q.last_seq(r.txn, db, live, prefix) == 2
        seq = j.commit([Change(op="create", file_id=0, path=b"a.txt", mode=0o100644)])[0]
        with j.reader() as r:
            assert r.record(seq).file_id == 9
            assert r.versions_of(9) == [seq, 2, 1]
        clock.ns += JCore.REUSE_WINDOW_NS + 1  # and past the window: a new identity
        j.commit([Change(op="unlink", file_id=9, path=b"a.txt")])
        clock.ns += JCore.REUSE_WINDOW_NS + 1
        seq = j.commit([Change(op="create", file_id=0, path=b"a.txt", mode=0o100644)])[0]
        with j.reader() as r:
            assert r.record(seq).file_id != 9


def _damage(jp, fn) -> None:
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        fn(txn, env.open_db(S.DB_HISTORY, txn=txn, dupsort=True, dupfixed=True))
    env.close()


def _segment(txn, db, fid: int):
    cur = txn.cursor(db=db)
    assert cur.set_range(S.u64(fid) + b"\0")
    k = bytes(cur.key())
    assert len(k) == 16 and k[:8] == S.u64(fid)
    return k, bytes(cur.value())


@pytest.mark.parametrize("how", ["lost seq", "extra seq", "zero delta", "cut short", "past the blocks",
                                 "a duplicate in a block"])
def test_verify_full_names_a_damaged_history_index(tmp_path, how):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        mixed_history(j, random.Random(5), 8)
        j.archive_records()
        assert j.verify(full=True).ok
        with j.reader() as r:
            archived, head = r.archived_upto(), r.head_seq()

    def damage(txn, db):
        k, v = _segment(txn, db, 1)
        seqs = Q.decode_segment(k, v, 8)
        txn.delete(k, db=db)
        if how == "lost seq":
            txn.put(k, Q.encode_segment(seqs[:-1]), db=db)
        elif how == "extra seq":
            txn.put(k, Q.encode_segment(sorted({*seqs, seqs[-1] - 1} if seqs[-1] - 1 not in seqs
                                               else {*seqs, 1})), db=db)
        elif how == "zero delta":
            txn.put(k, v[:1] + b"\0" + v[2:], db=db)
        elif how == "cut short":
            txn.put(k, v[:-1] + bytes([v[-1] | 0x80]), db=db)
        elif how == "past the blocks":  # the record after the blocks, in a segment of another file
            txn.put(k, v, db=db)
            txn.put(S.u64(123456) + S.u64(archived + 1), Q.encode_segment([archived + 1]), db=db)
        else:  # a seq in a block left as a duplicate
            txn.put(k, Q.encode_segment(seqs[:-1]), db=db)
            txn.put(S.u64(1), S.u64(seqs[-1]), db=db)
            assert seqs[-1] <= archived < head

    _damage(jp, damage)
    with Journal.open(jp, readonly=True) as j:
        assert j.verify(full=False).ok  # the chain is whole: only the full check reads the index
        res = j.verify(full=True)
    assert not res.ok and "history index" in res.problem.what, res.to_dict()


def test_a_format_12_journal_is_upgraded_and_reads_every_version_back(tmp_path):
    jp = tmp_path / "j"
    rng = random.Random(12)
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 40)  # content versions, a checkpoint, T blocks
        mixed_history(j, rng, 12)
        j.archive_records()
        by_id, by_path = model(j)
        with j.reader() as r:
            tree = list(r.current_tree())
            archived = r.archived_upto()
    assert archived > 500
    downgrade_to_format_12(jp)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, readonly=True)
    with env.begin() as txn:  # what format 12 stored: duplicates only
        assert msgpack.unpackb(txn.get(S.META_FORMAT)) == 12
        history = env.open_db(S.DB_HISTORY, txn=txn, dupsort=True, dupfixed=True)
        assert all(len(v) == 8 for _, v in txn.cursor(db=history))
        assert txn.stat(history)["entries"] == sum(map(len, by_id.values())) + sum(map(len, by_path.values()))
    env.close()
    with pytest.raises(JournalFormatError, match="format version 12"):
        Journal.open(jp, readonly=True)
    with Journal.open(jp, clock=FakeClock()) as j:
        assert j.format_version == S.FORMAT_VERSION == 13
        lay = layout(j)
        assert lay["segments"] > N_FILES and lay["dups"] < 20, lay
        answers(j, by_id, by_path)
        with j.reader() as r:
            assert list(r.current_tree()) == tree
            for s in seqs:
                assert r.read_content(s) == content[s]
        assert j.verify(full=True).ok
        mixed_history(j, rng, 6, start=12)  # and it goes on
        j.archive_records()
        by_id, by_path = model(j)
        answers(j, by_id, by_path)
    with Journal.open(jp, clock=FakeClock()) as j:  # upgraded once: a second open changes nothing
        assert j.format_version == 13 and j.verify(full=True).ok


def test_segment_values_round_trip_and_stay_under_the_dupsort_limit():
    rng = random.Random(1)
    seqs = sorted(rng.sample(range(1, 1 << 40), 3000))
    for a in (seqs[:1], seqs[:2], seqs[:200]):
        assert Q.decode_segment(S.u64(a[0]), Q.encode_segment(a), 0) == a
    seg = [seqs[0]]
    i = JC.__dict__ and Q._fill(seqs, 1, seg)
    assert 1 < i < len(seqs) and len(Q.encode_segment(seg)) <= Q.SEGMENT_MAX < 511
    small = list(range(1, 600))  # deltas of 1: the count's varint grows at 128 seqs
    seg = [small[0]]
    i = Q._fill(small, 1, seg)
    assert len(Q.encode_segment(seg)) == Q.SEGMENT_MAX and seg == small[:i]
