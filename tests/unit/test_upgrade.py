"""Journals written by an older deltafs are upgraded in place by their first writer.

Each test writes a journal with this deltafs, rewrites it byte for byte in
an older layout (docs/format.md, "Format log"), and opens it again.
"""

from __future__ import annotations

import hashlib
import os
import struct

import lmdb
import msgpack
import pytest

from deltafs.errors import JournalFormatError
from deltafs.journal import Journal
from deltafs.journal import packs as P
from deltafs.journal import schema as S
from deltafs.journal.records import _FIELDS

from oldformat import downgrade_to_format_9
from test_journal import FakeClock
from test_maintenance import stored_refs
from test_packs import edits, pack_files

LOC_V2 = struct.Struct(">IIIIB")


def encode_record_v1(rec, prev: bytes) -> bytes:
    """A record in version 1: string keys, seq and prev in the body, hash = blake2b(body)."""
    body = {"v": 1, "seq": rec.seq, "hlc": rec.hlc, "prev": prev}
    for attr, key in _FIELDS.items():
        v = getattr(rec, attr)
        if v is not None:
            body[key] = v
    if rec.edit is not None:
        body["e"] = [[s, c, S.pack_list(refs)] for s, c, refs in rec.edit]
    if rec.stored is not None:
        body["st"] = rec.stored
    if rec.content_hash is not None:
        body["ch"] = rec.content_hash
    raw = msgpack.packb(body, use_bin_type=True)
    return hashlib.blake2b(raw, digest_size=32).digest() + raw


def downgrade_to_format_2(jp) -> None:
    """Records v1, fixed-width index values, history and pathlog as plain keys."""
    with Journal.open(jp, readonly=True) as j, j.reader() as r:
        records = list(r.records())
    downgrade_to_format_9(jp)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        meta = env.open_db(S.DB_META, txn=txn)
        changes = env.open_db(S.DB_CHANGES, txn=txn)
        prev = bytes(32)
        for rec in records:
            value = encode_record_v1(rec, prev)
            txn.put(S.u64(rec.seq), value, db=changes)
            prev = value[:32]
        chunks = env.open_db(S.DB_CHUNKS, txn=txn)
        for cid, loc in [(bytes(k), S.decode_loc(v)) for k, v in txn.cursor(db=chunks)]:
            txn.put(cid, LOC_V2.pack(*loc), db=chunks)
        for name in (S.DB_HISTORY, S.DB_PATHLOG):
            txn.drop(env.open_db(name, txn=txn, dupsort=True, dupfixed=True), delete=True)
        history = env.open_db(S.DB_HISTORY, txn=txn)
        pathlog = env.open_db(S.DB_PATHLOG, txn=txn)
        for rec in records:
            txn.put(S.u64(rec.file_id) + S.u64(rec.seq), b"", db=history)
            for p in (rec.path, rec.path2):
                if p is not None:
                    txn.put(S.path_key(p) + S.u64(rec.seq), S.u64(rec.file_id), db=pathlog)
        txn.put(S.META_FORMAT, msgpack.packb(2), db=meta)
    env.close()


def downgrade_to_format_3(jp) -> None:
    """Format 3 stores exactly what format 4 does; only the number differs."""
    downgrade_to_format_9(jp, 3)


def downgrade_to_format_1(jp) -> None:
    """Format 2, then values into ``chunks`` and counts into ``refs``."""
    downgrade_to_format_2(jp)
    packs = P.PackFiles(str(jp))
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        meta = env.open_db(S.DB_META, txn=txn)
        chunks = env.open_db(S.DB_CHUNKS, txn=txn)
        refs = env.open_db(S.DB_REFS, txn=txn)
        index = [(bytes(k), LOC_V2.unpack(v)) for k, v in txn.cursor(db=chunks)]
        txn.drop(chunks, delete=False)
        for cid, (n, pack, off, length, _) in index:
            txn.put(cid, packs.read(pack, off, length), db=chunks)
            if n:
                txn.put(cid, S.u64(n), db=refs)
        for k in [bytes(k) for k in txn.cursor(db=meta).iternext(values=False)]:
            if k.startswith(S.META_PACK_LIVE_PREFIX) or k == S.META_PACK_END:
                txn.delete(k, db=meta)
        txn.put(S.META_FORMAT, msgpack.packb(1), db=meta)
    env.close()
    packs.close()
    for name in os.listdir(jp / "packs"):
        os.unlink(jp / "packs" / name)
    os.rmdir(jp / "packs")


def old_journal(tmp_path, downgrade):
    """-> (path, content by seq, refs, stored value of every record) of an older-format journal."""
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 8)
        refs = stored_refs(j)
    downgrade(jp)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, readonly=True)
    with env.begin() as txn:
        values = {S.from_u64(k): bytes(v) for k, v in txn.cursor(db=env.open_db(S.DB_CHANGES, txn=txn))}
    env.close()
    return jp, content, refs, values


@pytest.mark.parametrize("fmt,downgrade", [(1, downgrade_to_format_1), (2, downgrade_to_format_2),
                                           (3, downgrade_to_format_3)])
def test_an_older_journal_is_upgraded_by_its_first_writer(tmp_path, fmt, downgrade):
    jp, content, refs, values = old_journal(tmp_path, downgrade)
    with pytest.raises(JournalFormatError, match=f"format version {fmt}.*open it once for writing"):
        Journal.open(jp, readonly=True)
    with Journal.open(jp, clock=FakeClock()) as j:
        assert j.format_version == S.FORMAT_VERSION == 13
        assert stored_refs(j) == refs
        with j.reader() as r:
            assert dict(r.raw_records()) == values  # records untouched, still version 1
            for s, data in content.items():
                assert r.read_content(s) == data
            assert r.versions_of(7) == sorted(values, reverse=True)
            assert r.versions_under(b"f") == sorted(values, reverse=True)
        assert j.verify(full=True).ok
        more, more_content = edits(j, 2, fid=11)  # version-2 records continue the version-1 chain
    with Journal.open(jp, readonly=True) as j:
        assert j.verify(full=True).ok and list(pack_files(jp)) == [1]
        assert j.verify(full=True).records == len(values) + 2
        with j.reader() as r:
            assert r.read_content(more[-1]) == more_content[more[-1]]
            assert r.versions_of(11) == more[::-1]
            assert r.versions_under(b"f") == sorted(list(values) + more, reverse=True)


def test_an_altered_version_1_record_is_caught_after_the_upgrade(tmp_path):
    jp, _, _, values = old_journal(tmp_path, downgrade_to_format_2)
    with Journal.open(jp, clock=FakeClock()) as j:
        edits(j, 1, fid=11)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        v = bytearray(values[3])
        v[-1] ^= 1
        txn.put(S.u64(3), bytes(v), db=env.open_db(S.DB_CHANGES, txn=txn))
    env.close()
    with Journal.open(jp, readonly=True) as j:
        res = j.verify()
        assert not res.ok and res.problem.seq == 3 and "altered" in res.problem.what
