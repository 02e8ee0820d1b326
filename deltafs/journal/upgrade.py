"""Upgrading a journal written by an older deltafs, in place, at a writer's open.

Format 1 kept chunk values in LMDB (``chunks``: id -> value) and their
reference counts in ``refs``.  Format 2 appends the values to pack files and
keeps ``chunks`` as an index (docs/format.md, "Pack files").  Format 3
writes records v2, encodes the index values as varints and keeps
``history`` and ``pathlog`` as sorted duplicates (docs/format.md, "Format
log").  Each step is one LMDB write transaction: a crash before it commits
leaves the journal in the format it had (a pack written so far is cut away
at the next open).  Records and their hashes are never touched.
"""

from __future__ import annotations

import logging
import struct

import msgpack

from . import schema as S
from . import seqindex
from .packs import PackFiles
from .schema import TMP_DB, refill

log = logging.getLogger(__name__)

UPGRADABLE = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)  # formats a writer upgrades at open (a reader refuses them)

_LOC_V2 = struct.Struct(">IIIIB")  # format-2 index value: refs, pack, offset, length, depth


def upgrade(env, path: str, fmt: int) -> None:
    """Bring a journal of format ``fmt`` to the current one, step by step
    (formats 1-9 keep their meta data in a ``meta`` database, which the step
    to 10 moves into the main database; from 10 on it is the main database)."""
    meta = env.open_db(S.DB_META, create=False) if fmt < 10 else env.open_db(None)
    for step in _STEPS[fmt - 1:]:
        step(env, path, meta)


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def upgrade_1_to_2(env, path: str, meta) -> int:
    """Move every chunk value of a format-1 journal into a pack. -> chunks moved."""
    packs = PackFiles(path)
    packs.open_writer(0, 0)  # nothing committed in packs yet: stray files go
    try:
        with env.begin(write=True) as txn:
            old = env.open_db(S.DB_CHUNKS, txn=txn)
            refs = env.open_db(S.DB_REFS, txn=txn)
            tmp = env.open_db(TMP_DB, txn=txn)
            live: dict[int, int] = {}
            n = 0
            for cid, val in txn.cursor(db=old):
                depth = S.decode_chunk(val)[0]
                r = txn.get(cid, db=refs)
                pack, off = packs.append(bytes(val))
                txn.put(cid, _LOC_V2.pack(S.from_u64(r) if r else 0, pack, off, len(val), depth), db=tmp)
                live[pack] = live.get(pack, 0) + len(val)
                n += 1
            refill(txn, old, tmp)
            txn.drop(tmp, delete=True)
            txn.drop(refs, delete=True)
            for pack, nbytes in live.items():
                txn.put(S.pack_live_key(pack), _packb(nbytes), db=meta)
            pos = packs.sync()
            if pos is not None:
                txn.put(S.META_PACK_END, _packb(list(pos)), db=meta)
            txn.put(S.META_FORMAT, _packb(2), db=meta)
    finally:
        packs.close()
    log.warning("upgraded journal %s from format 1 to 2: %d chunk values moved to pack files", path, n)
    return n


def upgrade_2_to_3(env, path: str, meta) -> None:
    """Re-encode the chunk index; rebuild ``history`` and ``pathlog`` as sorted duplicates."""
    with env.begin(write=True) as txn:
        chunks = env.open_db(S.DB_CHUNKS, txn=txn)
        tmp = env.open_db(TMP_DB, txn=txn)
        n = 0
        for cid, loc in txn.cursor(db=chunks):
            txn.put(cid, S.encode_loc(*_LOC_V2.unpack(loc)), db=tmp, append=True)
            n += 1
        refill(txn, chunks, tmp)
        history = env.open_db(S.DB_HISTORY, txn=txn)
        for k, _ in txn.cursor(db=history):  # u64 file id || u64 seq -> empty
            txn.put(k, b"", db=tmp, append=True)
        txn.drop(history, delete=True)
        history = env.open_db(S.DB_HISTORY, txn=txn, dupsort=True, dupfixed=True)
        for k, _ in txn.cursor(db=tmp):
            if not txn.put(k[:8], k[8:], db=history, append=True):
                raise ValueError("format-2 history out of order")
        txn.drop(tmp, delete=False)
        pathlog = env.open_db(S.DB_PATHLOG, txn=txn)
        for k, _ in txn.cursor(db=pathlog):  # path key || u64 seq -> u64 file id
            txn.put(k, b"", db=tmp, append=True)
        txn.drop(pathlog, delete=True)
        pathlog = env.open_db(S.DB_PATHLOG, txn=txn, dupsort=True, dupfixed=True)
        for k, _ in txn.cursor(db=tmp):
            if not txn.put(k[:-8], k[-8:], db=pathlog, append=True):
                raise ValueError("format-2 pathlog out of order")
        txn.drop(tmp, delete=True)
        txn.put(S.META_FORMAT, _packb(3), db=meta)
    log.warning("upgraded journal %s from format 2 to 3: %d chunk index entries re-encoded", path, n)


def upgrade_3_to_4(env, path: str, meta) -> None:
    """Format 4 stores nothing differently, but allows delta chains up to
    128 and chunk lists cut at aligned offsets: a format-3 deltafs would
    call the deep chains loops and re-record aligned files at every
    mount, so the number changes."""
    with env.begin(write=True) as txn:
        txn.put(S.META_FORMAT, _packb(4), db=meta)
    log.warning("upgraded journal %s from format 3 to 4 (no data rewritten)", path)



def upgrade_4_to_5(env, path: str, meta) -> None:
    """Format 5 stores nothing differently, but records may carry the
    content cause ``repair`` (index 6), which a format-4 deltafs cannot
    decode, so the number changes."""
    with env.begin(write=True) as txn:
        txn.put(S.META_FORMAT, _packb(5), db=meta)
    log.warning("upgraded journal %s from format 4 to 5 (no data rewritten)", path)


def recount_raw_bytes(env, path: str, meta, txn) -> tuple[int, int]:
    """``raw_bytes`` from the chunk values themselves.  -> (old, new).

    Before format 6 the chunks a large capture streamed ahead of its record
    added to ``stored_bytes`` but not to ``raw_bytes`` (status showed a
    ratio below 1).  Both count every value ever inserted, freed ones
    included, and a freed value's raw length is gone, so: the live values'
    raw and stored sums (each value's header holds its raw length) give
    the ratio, and ``raw_bytes`` becomes ``stored_bytes`` times it, never
    less than it was.  Exact when compaction never freed a value (then
    ``stored_bytes`` is the live sum)."""
    chunks = env.open_db(S.DB_CHUNKS, txn=txn)
    packs = PackFiles(path)
    live_raw = live_stored = 0
    try:
        for _, loc in txn.cursor(db=chunks):
            _, pack, off, length, _ = S.decode_loc(loc)
            live_raw += S.decode_chunk(packs.read(pack, off, min(length, S.CHUNK_HDR_MAX)))[1]
            live_stored += length
    finally:
        packs.close()
    old_raw = msgpack.unpackb(txn.get(S.META_RAW, db=meta) or _packb(0))
    stored = msgpack.unpackb(txn.get(S.META_STORED, db=meta) or _packb(0))
    new_raw = old_raw
    if live_stored:
        new_raw = max(old_raw, live_raw if stored == live_stored else round(stored * live_raw / live_stored))
    txn.put(S.META_RAW, _packb(new_raw), db=meta)
    return old_raw, new_raw


def upgrade_5_to_6(env, path: str, meta) -> None:
    """Format 6 compacts records into ``S`` blocks (two hashes per block,
    not one per record), which a format-5 deltafs cannot read, so the
    number changes; nothing already written is rewritten.  ``raw_bytes``
    is recounted (:func:`recount_raw_bytes`)."""
    with env.begin(write=True) as txn:
        old, new = recount_raw_bytes(env, path, meta, txn)
        txn.put(S.META_FORMAT, _packb(6), db=meta)
    log.warning("upgraded journal %s from format 5 to 6 (raw_bytes %d -> %d; nothing rewritten)",
                path, old, new)


def upgrade_6_to_7(env, path: str, meta) -> None:
    """Format 7 adds tree checkpoints (the ``trees`` database,
    docs/format.md "Tree checkpoints").  The step makes the database, empty:
    the checkpoints of the existing history are built lazily, by the first
    ``checkpoints.write_due`` (the mount's maintenance, ``deltafs compact``);
    until then ``tree_at`` replays from record 1 as before."""
    with env.begin(write=True) as txn:
        env.open_db(S.DB_TREES, txn=txn, create=True)
        txn.put(S.META_FORMAT, _packb(7), db=meta)
    log.warning("upgraded journal %s from format 6 to 7 (tree checkpoints; built lazily)", path)


def upgrade_7_to_8(env, path: str, meta) -> None:
    """Format 8 stores nothing differently, but records may carry the
    content cause ``sync`` (index 7) and the origin key 21 (a sync group's
    ``DEVICE:N``, docs/sync.md), which a format-7 deltafs cannot decode
    (cause) or would drop (origin), so the number changes."""
    with env.begin(write=True) as txn:
        txn.put(S.META_FORMAT, _packb(8), db=meta)
    log.warning("upgraded journal %s from format 7 to 8 (no data rewritten)", path)


def upgrade_8_to_9(env, path: str, meta) -> None:
    """Format 9 stores nothing differently, but new chunk values may be of
    value format 2, a delta against several bases (docs/format.md "Chunk
    value"), which a format-8 deltafs cannot decode, so the number changes.
    Every value already written stays valid as it is."""
    with env.begin(write=True) as txn:
        txn.put(S.META_FORMAT, _packb(9), db=meta)
    log.warning("upgraded journal %s from format 8 to 9 (no data rewritten)", path)


def _move_under_paths(txn, src, dst, what: str) -> int:
    """Append every entry of ``src`` to ``dst`` under S.PATH_PREFIX (after
    every file id key of ``dst``), then drop ``src``.  -> entries moved."""
    cur = txn.cursor(db=dst)
    if cur.last() and cur.key() >= S.PATH_PREFIX:
        raise ValueError(f"file id {cur.key().hex()} is not below 2**63: its key would be among the paths")
    n = 0
    for k, v in txn.cursor(db=src):
        if not txn.put(S.PATH_PREFIX + k, v, db=dst, append=True):
            raise ValueError(f"{what} {k!r} out of order")
        n += 1
    txn.drop(src, delete=True)
    return n


def upgrade_9_to_10(env, path: str, meta) -> dict[str, int]:
    """Format 10 merges four databases into others, so a small journal
    needs four LMDB pages fewer (docs/format.md, "Databases"): ``meta``'s
    keys go into the main database, ``paths`` into ``files`` and
    ``pathlog`` into ``history`` (under S.PATH_PREFIX, after every file
    id), ``record_blocks`` into ``changes`` (under S.BLOCK_PREFIX, before
    record 1); the meta counter ``file_count`` is set.  ``files`` values
    of format 9 stay as they are (FileState.unpack reads both).  Records,
    chunks and packs are not touched.  -> entries moved, by database."""
    main = env.open_db(None)
    moved = {}
    with env.begin(write=True) as txn:
        n = 0
        for k, v in txn.cursor(db=meta):
            if txn.get(k, db=main) is not None:
                raise ValueError(f"meta key {k!r} is the name of a database")
            txn.put(k, v, db=main)
            n += 1
        moved["meta"] = n
        files = env.open_db(S.DB_FILES, txn=txn)
        txn.put(S.META_FILES, _packb(txn.stat(files)["entries"]), db=main)
        moved["paths"] = _move_under_paths(txn, env.open_db(S.DB_PATHS, txn=txn), files, "path key")
        history = env.open_db(S.DB_HISTORY, txn=txn, dupsort=True, dupfixed=True)
        pathlog = env.open_db(S.DB_PATHLOG, txn=txn, dupsort=True, dupfixed=True)
        moved["pathlog"] = _move_under_paths(txn, pathlog, history, "pathlog entry")
        changes = env.open_db(S.DB_CHANGES, txn=txn)
        blocks = env.open_db(S.DB_RECORD_BLOCKS, txn=txn)
        n = 0
        for k, v in txn.cursor(db=blocks):
            txn.put(S.block_key(S.from_u64(k)), v, db=changes)
            n += 1
        txn.drop(blocks, delete=True)
        moved["record_blocks"] = n
        txn.drop(meta, delete=True)
        txn.put(S.META_GUARD, S.META_GUARD_VALUE, db=main)
        txn.put(S.META_FORMAT, _packb(10), db=main)
    log.warning("upgraded journal %s from format 9 to 10 (meta, paths, pathlog, record_blocks merged into "
                "other databases: %s entries moved)", path, moved)
    return moved


def upgrade_10_to_11(env, path: str, meta) -> None:
    """Format 11 gives a version whose chunk list is over one tree page
    (S.TREE_PAGE entries) the two-level content hash, under record key 22
    (docs/format.md "Content hash").  Nothing is rewritten: a record's body
    is covered by the hash chain, so a version written before keeps its
    flat hash under key 20, and every reader checks the key a record has.
    The number changes because a format-10 deltafs ignores key 22: it would
    read a new big version as one without a content hash (unchecked, and
    named by sync as the empty file's hash)."""
    del meta  # the step to 10 dropped the ``meta`` database: meta keys are in the main one
    main = env.open_db(None)
    with env.begin(write=True) as txn:
        txn.put(S.META_FORMAT, _packb(11), db=main)
    log.warning("upgraded journal %s from format 10 to 11 (no data rewritten)", path)


def upgrade_11_to_12(env, path: str, meta) -> int:
    """Format 12 moves the chunk-list checkpoints into ``changes`` (keys
    S.checkpoint_key, between the record blocks and record 1: LMDB gives the
    ``checkpoints`` database a page of its own, and a branch page once it
    has two) and drops the ``checkpoints`` database; compaction may write
    record blocks of kind ``T``, which leave out the content hashes the
    block's edits give back (docs/format.md "Record blocks").  Records and
    blocks already written stay as they are.  One transaction. -> checkpoints moved."""
    del meta
    main = env.open_db(None)
    with env.begin(write=True) as txn:
        changes = env.open_db(S.DB_CHANGES, txn=txn)
        n = 0
        if txn.get(S.DB_CHECKPOINTS, db=main) is not None:  # a journal made by format 11 has it
            old = env.open_db(S.DB_CHECKPOINTS, txn=txn, create=False)
            for k, v in txn.cursor(db=old):
                txn.put(S.checkpoint_key(S.from_u64(k)), bytes(v), db=changes)
                n += 1
            txn.drop(old, delete=True)
        txn.put(S.META_FORMAT, _packb(12), db=main)
    log.warning("upgraded journal %s from format 11 to 12 (%d chunk-list checkpoints moved into changes)",
                path, n)
    return n


def upgrade_12_to_13(env, path: str, meta) -> int:
    """Format 13 keeps the ``history`` and ``pathlog`` seqs of the records in
    record blocks as segments of varint deltas, one value per key, instead
    of a u64 duplicate each (journal/seqindex.py, docs/format.md "Named
    databases"); the newer seqs stay duplicates.  A format-12 deltafs would
    miss the segments (a ``log`` without the older versions), hence the
    number.  One transaction: every key's seqs up to the last archived
    record are packed.  -> seqs moved."""
    del meta
    main = env.open_db(None)
    with env.begin(write=True) as txn:
        changes = env.open_db(S.DB_CHANGES, txn=txn)
        history = env.open_db(S.DB_HISTORY, txn=txn, dupsort=True, dupfixed=True)
        cur = txn.cursor(db=changes)  # the last record block: blocks, then checkpoints, then records
        upto = 0
        if (cur.prev() if cur.set_range(S.CHECKPOINT_PREFIX) else cur.last()) and S.is_block_key(cur.key()):
            upto = S.block_first(cur.key()) + S.decode_block_loc(cur.value())[3] - 1
        n = seqindex.pack_all(txn, history, upto) if upto else 0
        if n:
            S.rewrite_dups_in_key_order(txn, history)
        txn.put(S.META_FORMAT, _packb(13), db=main)
    log.warning("upgraded journal %s from format 12 to 13 (%d history and pathlog seqs packed)", path, n)
    return n


# upgrade_N_to_N+1 at index N-1: a new format appends its step here (and to UPGRADABLE)
_STEPS = (upgrade_1_to_2, upgrade_2_to_3, upgrade_3_to_4, upgrade_4_to_5, upgrade_5_to_6, upgrade_6_to_7,
          upgrade_7_to_8, upgrade_8_to_9, upgrade_9_to_10, upgrade_10_to_11,
          upgrade_11_to_12, upgrade_12_to_13)
assert len(_STEPS) == len(UPGRADABLE) == S.FORMAT_VERSION - 1
