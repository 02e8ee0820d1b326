"""``history`` and ``pathlog``: the seqs of every record about a file id / a path.

Both live in the ``history`` database (``MDB_DUPSORT | MDB_DUPFIXED``,
docs/format.md "Named databases").  A new record's seq is appended as a
u64 duplicate under its *live key*: the u64 file id, and ``PATH_PREFIX ‖
path key`` for its path and path2 (``schema.index_record``).  Since format
13, once compaction has moved records into record blocks, their seqs move
out of the duplicates into *segments*: single values, one per key, holding
ascending seqs as unsigned LEB128 deltas, under

* ``u64 file id ‖ u64 first seq`` (16 bytes: after the file id's live key),
* ``SEGMENT_PATH_PREFIX ‖ path key ‖ u64 first seq`` (after every file id,
  before the live path keys),

the value being unsigned LEB128 varints: the number of seqs after the
first, then their deltas (``first + d1``, ``+ d2``, ...; every delta > 0),
at most ``SEGMENT_MAX`` bytes (a value of a dupsort database is at most
511 bytes, and LMDB refuses an empty one there).  An 8-byte duplicate
with its node share cost ~10 bytes a seq, a key of its own for the file
ids or paths with one record (24 + key bytes); a segment costs 1-3 bytes a
seq plus one node per key.  Every segment seq is below every live seq of
the same key (compaction packs the oldest first), so the seqs of a key are
its segments in key order, then its duplicates.

A seq is below 2**56 (as a record block's first seq), so a segment key's
byte after the prefix is 0, which no plain path key holds (paths have no
NUL) and past which no other key of the same prefix sorts.
"""

from __future__ import annotations

from . import schema as S
from deltafs.errors import CorruptionError

SEGMENT_PATH_PREFIX = b"\xfe"  # path segments: after every u64 file id (< 2**63), before PATH_PREFIX
SEGMENT_MAX = 480  # bytes of deltas in one segment value (LMDB: a dupsort value <= 511 bytes)
SEQ_LIMIT = 1 << 56


def history_keys(file_id: int) -> tuple[bytes, bytes]:
    """(live key, segment prefix) of a file id."""
    k = S.u64(file_id)
    return k, k


def pathlog_keys(path: bytes) -> tuple[bytes, bytes]:
    """(live key, segment prefix) of a path."""
    pk = S.path_key(path)
    return S.PATH_PREFIX + pk, SEGMENT_PATH_PREFIX + pk


def put_uvarint(n: int, out: bytearray) -> None:
    """Append ``n`` (>= 0) to ``out`` as an LEB128 varint."""
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def encode_segment(seqs: list[int]) -> bytes:
    """Segment value of ascending ``seqs`` (the first is in the key)."""
    out = bytearray()
    put_uvarint(len(seqs) - 1, out)
    for a, b in zip(seqs, seqs[1:]):
        if b <= a:
            raise ValueError(f"seqs out of order in an index segment ({b} after {a})")
        put_uvarint(b - a, out)
    return bytes(out)


def decode_segment(key: bytes, value: bytes, plen: int) -> list[int]:
    """The seqs of the segment stored as (``key``, ``value``), ``plen`` the prefix length."""
    if len(key) != plen + 8:
        raise CorruptionError(f"history segment key {bytes(key[:24]).hex()}... of bad length")
    s = S.from_u64(key[plen:])
    out = [s]
    n = None
    d = shift = 0
    for b in bytes(value):
        d |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
            continue
        if n is None:
            n = d
        elif d == 0:
            raise CorruptionError(f"history segment {bytes(key[:24]).hex()}...: a zero delta")
        else:
            s += d
            out.append(s)
        d = shift = 0
    if shift or n is None or n != len(out) - 1:
        raise CorruptionError(f"history segment {bytes(key[:24]).hex()}...: cut short")
    return out


def _fill(seqs: list[int], i: int, seg: list[int]) -> int:
    """Append ``seqs[i:]`` to ``seg`` while its value fits SEGMENT_MAX; -> the next i."""
    size = len(encode_segment(seg))
    while i < len(seqs):
        d = bytearray()
        put_uvarint(seqs[i] - seg[-1], d)
        grow = len(d) + (1 if len(seg) in (0x80, 0x4000) else 0)  # the count's varint may grow
        if size + grow > SEGMENT_MAX:
            break
        seg.append(seqs[i])
        size += grow
        i += 1
    return i


def _is_segment(key: bytes, prefix: bytes) -> bool:
    n = len(prefix)
    return len(key) == n + 8 and key[n] == 0 and key[:n] == prefix


def _last_segment(cur, prefix: bytes):
    """Position ``cur`` on the last segment of ``prefix``; -> its key, or None."""
    ok = cur.prev() if cur.set_range(prefix + b"\x01") else cur.last()
    if ok:
        k = bytes(cur.key())
        if _is_segment(k, prefix):
            return k
    return None


def seqs(txn, db, live: bytes, prefix: bytes) -> list[int]:
    """Every seq of a key, oldest first: its segments, then its duplicates."""
    out: list[int] = []
    cur = txn.cursor(db=db)
    if cur.set_range(prefix + b"\x00"):
        for k, v in cur.iternext():
            if not _is_segment(k, prefix):
                break
            out += decode_segment(k, v, len(prefix))
    if cur.set_key(live):
        out += [S.from_u64(v) for v in cur.iternext_dup(keys=False)]
    return out


def last_seq(txn, db, live: bytes, prefix: bytes) -> int:
    """The newest seq of a key (0: none)."""
    cur = txn.cursor(db=db)
    if cur.set_key(live) and cur.last_dup():
        return S.from_u64(cur.value())
    k = _last_segment(cur, prefix)
    return decode_segment(k, cur.value(), len(prefix))[-1] if k else 0


def iter_path_seqs(txn, db, scan: bytes):
    """(path key, seq) of every pathlog entry whose path key starts with
    ``scan`` (a path key prefix): segments, then duplicates, each in key order."""
    cur = txn.cursor(db=db)
    for pre in (SEGMENT_PATH_PREFIX, S.PATH_PREFIX):
        if not cur.set_range(pre + scan):
            continue
        for k, v in cur.iternext():
            if not k.startswith(pre + scan):
                break
            if pre == S.PATH_PREFIX:
                yield bytes(k[1:]), S.from_u64(v)
            else:
                k = bytes(k)
                for s in decode_segment(k, v, len(k) - 8):
                    yield k[1:-8], s


def pack_key(txn, db, live: bytes, prefix: bytes, upto: int) -> int:
    """Move the duplicates ``<= upto`` of ``live`` into segments; -> seqs moved."""
    cur = txn.cursor(db=db)
    if not cur.set_key(live):
        return 0
    moving = []
    for v in cur.iternext_dup(keys=False):
        s = S.from_u64(v)
        if s > upto:
            break
        moving.append(s)
    if not moving:
        return 0
    if upto >= SEQ_LIMIT:
        raise ValueError(f"record {upto} is past the seqs an index segment can name")
    cur.set_key(live)
    for _ in moving:
        cur.delete()  # the first duplicate; the cursor moves to the next
    i = 0
    k = _last_segment(cur, prefix)
    if k is not None:  # extend the last segment while it has room
        seg = decode_segment(k, cur.value(), len(prefix))
        if seg[-1] >= moving[0]:
            raise CorruptionError(f"history segment {k[:24].hex()}... goes past record {moving[0]}")
        i = _fill(moving, 0, seg)
        if i:
            txn.delete(k, db=db)
            txn.put(k, encode_segment(seg), db=db)
    while i < len(moving):  # new segments
        seg = [moving[i]]
        i = _fill(moving, i + 1, seg)
        if not txn.put(prefix + S.u64(seg[0]), encode_segment(seg), db=db, overwrite=False):
            raise CorruptionError(f"a history segment already starts at record {seg[0]}")
    return len(moving)


def pack_records(txn, db, upto: int, records) -> int:
    """Pack the seqs ``<= upto`` of the keys of ``records`` ((file id, path,
    path2) each); -> seqs moved."""
    keys = set()
    for fid, path, path2 in records:
        keys.add(history_keys(fid))
        for p in (path, path2):
            if p is not None:
                keys.add(pathlog_keys(p))
    return sum(pack_key(txn, db, live, prefix, upto) for live, prefix in sorted(keys))


def pack_all(txn, db, upto: int) -> int:
    """Pack the seqs ``<= upto`` of every key (the upgrade to format 13); -> seqs moved."""
    todo = []
    cur = txn.cursor(db=db)
    ok = cur.first()
    while ok:
        k = bytes(cur.key())
        if S.from_u64(cur.value()) <= upto and (len(k) == 8 or k[:1] == S.PATH_PREFIX):
            todo.append((k, k if len(k) == 8 else SEGMENT_PATH_PREFIX + k[1:]))
        ok = cur.next_nodup()
    return sum(pack_key(txn, db, live, prefix, upto) for live, prefix in todo)


def all_entries(txn, db):
    """(kind, logical key, seq, in a segment) of every entry: kind "history"
    (key: file id) or "pathlog" (key: path key), segments decoded."""
    for k, v in txn.cursor(db=db):
        k = bytes(k)
        if k[:1] == S.PATH_PREFIX:
            yield "pathlog", k[1:], S.from_u64(v), False
        elif k[:1] == SEGMENT_PATH_PREFIX:
            for s in decode_segment(k, v, len(k) - 8):
                yield "pathlog", k[1:-8], s, True
        elif len(k) == 8:
            yield "history", S.from_u64(k), S.from_u64(v), False
        elif len(k) == 16:
            for s in decode_segment(k, v, 8):
                yield "history", S.from_u64(k[:8]), s, True
        else:
            raise CorruptionError(f"history: a key of {len(k)} bytes ({k[:24].hex()}...)")
