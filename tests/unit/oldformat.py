"""Rewrite a journal of this deltafs byte for byte in the layout of format 9,
11 or 12 (docs/format.md, "Format log"): the base of every older-format test.

Format 9 kept its meta data in a ``meta`` database and had ``paths``,
``pathlog`` and ``record_blocks`` as databases of their own; its ``files``
values always held every key of the state map.  Format 10 merged them
(journal/upgrade.py, ``upgrade_9_to_10``).
"""

from __future__ import annotations

import lmdb
import msgpack

from deltafs.journal import schema as S
from deltafs.journal import seqindex
from deltafs.journal.state import FileState


def v9_file_value(v: bytes) -> bytes:
    st = FileState.unpack(v)
    return msgpack.packb({
        "p": st.path, "k": st.kind, "n": st.links, "c": st.content_seq, "s": st.size, "m": st.mode,
        "u": st.uid, "g": st.gid, "t": st.mtime_ns, "rd": st.rdev, "tg": st.target, "x": st.xattrs,
        "d": st.deleted, "h": st.last_seq}, use_bin_type=True)


def downgrade_to_format_9(jp, fmt: int = 9) -> None:
    """A journal of this deltafs at ``jp`` in format 9's layout, with format number ``fmt``
    (format 11 differs from 10 only in records of lists over one tree page, key 22:
    the tests' small histories have none)."""
    downgrade_to_format_11(jp)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        main = env.open_db(None, txn=txn)
        names = set(S.ALL_DBS) | set(S.WRITER_DBS) | {S.DB_CHECKPOINTS}
        meta_items = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=main) if bytes(k) not in names]
        assert any(k == S.META_FORMAT for k, _ in meta_items)
        for k, _ in meta_items:
            txn.delete(k, db=main)
        meta = env.open_db(S.DB_META, txn=txn)
        for k, v in meta_items:
            if k not in (S.META_FILES, S.META_GUARD):
                txn.put(k, v, db=meta)
        txn.put(S.META_FORMAT, msgpack.packb(fmt), db=meta)
        files = env.open_db(S.DB_FILES, txn=txn)
        paths = env.open_db(S.DB_PATHS, txn=txn)
        for k, v in [(bytes(k), bytes(v)) for k, v in txn.cursor(db=files)]:
            txn.delete(k, db=files)
            if k.startswith(S.PATH_PREFIX):
                txn.put(k[1:], v, db=paths)
            else:
                txn.put(k, v9_file_value(v), db=files)
        history = env.open_db(S.DB_HISTORY, txn=txn, dupsort=True, dupfixed=True)
        pathlog = env.open_db(S.DB_PATHLOG, txn=txn, dupsort=True, dupfixed=True)
        moved = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=history) if bytes(k).startswith(S.PATH_PREFIX)]
        for k, v in moved:
            txn.delete(k, v, db=history)
            txn.put(k[1:], v, db=pathlog)
        changes = env.open_db(S.DB_CHANGES, txn=txn)
        blocks = env.open_db(S.DB_RECORD_BLOCKS, txn=txn)
        for k, v in [(bytes(k), bytes(v)) for k, v in txn.cursor(db=changes) if S.is_block_key(bytes(k))]:
            txn.delete(k, db=changes)
            txn.put(S.u64(S.block_first(k)), v, db=blocks)
    env.close()


def downgrade_to_format_12(jp) -> None:
    """Format 12's layout: every ``history`` and ``pathlog`` seq a u64
    duplicate under its file id / path key (format 13 packs the seqs of the
    records in record blocks into segments, journal/seqindex.py), format 12."""
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        main = env.open_db(None, txn=txn)
        history = env.open_db(S.DB_HISTORY, txn=txn, dupsort=True, dupfixed=True)
        entries = list(seqindex.all_entries(txn, history))
        txn.drop(history, delete=False)
        for kind, key, seq, _ in sorted(entries, key=lambda e: (e[0] == "pathlog", e[1], e[2])):
            k = S.u64(key) if kind == "history" else S.PATH_PREFIX + key
            txn.put(k, S.u64(seq), db=history)
        txn.put(S.META_FORMAT, msgpack.packb(12), db=main)
    env.close()


def downgrade_to_format_11(jp) -> None:
    """Format 11's layout: the chunk-list checkpoints in a ``checkpoints``
    database of their own (format 12 keeps them in ``changes``), format 11.
    (T record blocks stay: this deltafs reads them whatever the format.)"""
    downgrade_to_format_12(jp)
    env = lmdb.open(str(jp), max_dbs=S.MAX_DBS, map_size=1 << 30)
    with env.begin(write=True) as txn:
        main = env.open_db(None, txn=txn)
        changes = env.open_db(S.DB_CHANGES, txn=txn)
        cps = env.open_db(S.DB_CHECKPOINTS, txn=txn)
        for k, v in [(bytes(k), bytes(v)) for k, v in txn.cursor(db=changes) if S.is_checkpoint_key(bytes(k))]:
            txn.delete(k, db=changes)
            txn.put(S.u64(S.checkpoint_seq(k)), v, db=cps)
        txn.put(S.META_FORMAT, msgpack.packb(11), db=main)
    env.close()
