"""Upgrading a journal written by an older deltafs, in place, at a writer's open.

Format 1 kept chunk values in LMDB (``chunks``: id -> value) and their
reference counts in ``refs``.  Format 2 appends the values to pack files and
keeps ``chunks`` as an index (docs/format.md, "Pack files").  The upgrade is
one LMDB write transaction: a crash before it commits leaves the format-1
journal as it was (the pack written so far is cut away at the next open).
Records, their hashes and every other database are untouched.
"""

from __future__ import annotations

import logging

import msgpack

from . import schema as S
from .packs import PackFiles

log = logging.getLogger(__name__)

_TMP = b"chunks.v2"


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
            tmp = env.open_db(_TMP, txn=txn)
            live: dict[int, int] = {}
            n = 0
            for cid, val in txn.cursor(db=old):
                depth = S.decode_chunk(val)[0]
                r = txn.get(cid, db=refs)
                pack, off = packs.append(bytes(val))
                txn.put(cid, S.encode_loc(S.from_u64(r) if r else 0, pack, off, len(val), depth), db=tmp)
                live[pack] = live.get(pack, 0) + len(val)
                n += 1
            txn.drop(old, delete=False)
            for cid, loc in txn.cursor(db=tmp):
                txn.put(cid, loc, db=old, append=True)
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
