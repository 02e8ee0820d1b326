"""Names and byte encodings of the journal's LMDB databases.

Everything that decides how bytes look on disk lives here, so that
docs/format.md and the code can be checked against each other in one file.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Callable, Iterable, Iterator, Sequence

import msgpack
import zstandard

FORMAT_VERSION = 13  # 2: chunk values in pack files; 3: records v2, dupsort history/pathlog, varint index;
# 4: delta chains up to 128 (chunking.MAX_DELTA_DEPTH), in-place files cut at aligned offsets;
# 5: content cause 6 = "repair" (a file recorded again after a merged history, issue 18);
# 6: record blocks "S" keep two hashes, not one per record; raw_bytes recounted (issue 20)
# 7: tree checkpoints (the ``trees`` database, journal/checkpoints.py)
# 8: content cause 7 = "sync" and record key 21 = origin (a sync group's "DEVICE:N", issue 25)
# 9: chunk values of value format 2, a delta against several bases (issue 20)
# 10: fewer LMDB databases (a small journal paid one 4 KiB page each): meta in the main database,
#     paths in files, pathlog in history, record blocks in changes, under keys that cannot collide
# 11: a chunk list over one tree page (TREE_PAGE entries) gets a two-level content hash, record
#     key 22 "content_tree", instead of the flat one (key 20): a small edit of a huge file rehashes
#     one page (issue 19)
# 12: record blocks "T" leave out the content hashes a block's own edits give back (issue 20)
# 13: history/pathlog seqs of records in record blocks packed as varint deltas, one value a key
#     (journal/seqindex.py, issue 20)
MAX_DBS = 32
CHECKPOINT_EVERY = 32  # a short chunk list never needs more than this many edits
CHECKPOINT_MAX = 256  # a long one (>= 8192 entries) may need up to this many (see checkpoint_every)


def checkpoint_every(entries: int) -> int:
    """Edits allowed between full lists: 32, growing with the list to 256.

    A full list of a 1 GiB file is 1.3 MB: written every 32 one-chunk edits
    it would cost 40 KiB per save; replaying a few hundred small edits of
    a packed list is a few hundred memcpys.
    """
    return max(CHECKPOINT_EVERY, min(CHECKPOINT_MAX, entries // 256))

# named databases (key -> value, see docs/format.md).  Since format 10 four
# of the logical databases share a physical one (each a key range of its
# own): ``meta`` is the main (unnamed) database, beside the names of the
# others; ``paths`` is in ``files``, ``pathlog`` in ``history`` (both under
# PATH_PREFIX, after every file id); ``record_blocks`` is in ``changes``
# (under BLOCK_PREFIX, before every record).  ``Storage.dbs`` maps each
# logical name to the handle of the database that holds it.
DB_META = b"meta"  # logical: the main database since format 10
DB_CHANGES = b"changes"
DB_FILES = b"files"
DB_PATHS = b"paths"  # logical: in ``files`` since format 10
DB_HISTORY = b"history"  # dupsort + dupfixed: u64 file id -> u64 seqs
DB_PATHLOG = b"pathlog"  # logical, in ``history`` since format 10: PATH_PREFIX + path key -> u64 seqs
DB_CHUNKS = b"chunks"  # chunk id -> location and refs (encode_loc); values in pack files
DB_REFS = b"refs"  # format 1 only (refs are in the chunk index since format 2)
DB_CHECKPOINTS = b"checkpoints"
DB_SNAPSHOTS = b"snapshots"
DB_MIRRORS = b"mirrors"
DB_RECORD_BLOCKS = b"record_blocks"  # logical, in ``changes`` since format 10: block_key(first seq) -> location
DB_TREES = b"trees"  # u64 seq -> tree checkpoint: the tree right after that record (format 6)
ALL_DBS = (  # the named databases of a journal (formats 12 and 13)
    DB_CHANGES, DB_FILES, DB_HISTORY, DB_CHUNKS, DB_SNAPSHOTS, DB_MIRRORS, DB_TREES,
)
SHARED_DBS = {DB_PATHS: DB_FILES, DB_PATHLOG: DB_HISTORY, DB_RECORD_BLOCKS: DB_CHANGES,  # logical -> physical
              DB_CHECKPOINTS: DB_CHANGES}  # checkpoints: a named database of its own in formats 1-11
OLD_DBS = (DB_META, DB_PATHS, DB_PATHLOG, DB_RECORD_BLOCKS)  # named databases of formats 1-9 (upgrade.py)
DB_PRUNED = b"pruned"  # u64 seq of a pruned content version -> msgpack {"hlc", "t"}
DB_GRAVEYARD = b"graveyard"  # chunk id -> u64 time freed || the freed chunk value
DB_PLAN = b"plan"  # compaction's planning state (journal/planstate.py), derived, rebuildable
# made (empty) by a writer when it opens the journal; a journal last written
# by an older deltafs may lack them (then nothing is pruned or freed yet)
WRITER_DBS = (DB_PRUNED, DB_GRAVEYARD, DB_PLAN)
TMP_DB = b"rewrite.tmp"  # scratch database of an in-place rewrite (emptied and dropped in its transaction)
DUP_DBS = frozenset({DB_HISTORY, DB_PATHLOG})  # opened dupsort=True, dupfixed=True since format 3
KV_DBS = {"snapshots": DB_SNAPSHOTS, "mirrors": DB_MIRRORS}

# key ranges of the shared databases (format 10)
PATH_PREFIX = b"\xff"  # paths in files, pathlog in history: after every u64 file id (< 2**63)
BLOCK_PREFIX = bytes(8)  # record blocks in changes: u64 0 || u64 first seq, before record 1
CHECKPOINT_PREFIX = bytes(8) + b"\xff"  # chunk-list checkpoints in changes (format 12): after every
# block key (a first seq < 2**56), before record 1
FILE_ID_LIMIT = 1 << 63  # file ids are below (capture draws 63 random bits): PATH_PREFIX stays free


def paths_key(path: bytes) -> bytes:
    """Key of ``path`` in the ``paths`` range of ``files`` and the ``pathlog`` range of ``history``."""
    return PATH_PREFIX + path_key(path)


def block_key(first: int) -> bytes:
    """Key of the record block starting at record ``first`` (``changes``)."""
    return BLOCK_PREFIX + _U64.pack(first)


def is_block_key(key: bytes) -> bool:
    return len(key) == 16


def is_record_key(key: bytes) -> bool:
    """A record's key in ``changes`` (u64 seq), not a block's or a checkpoint's."""
    return len(key) == 8


def checkpoint_key(seq: int) -> bytes:
    """Key of the chunk-list checkpoint of content record ``seq`` (``changes``, format 12)."""
    return CHECKPOINT_PREFIX + _U64.pack(seq)


def is_checkpoint_key(key: bytes) -> bool:
    return len(key) == 17 and key[:9] == CHECKPOINT_PREFIX


def checkpoint_seq(key: bytes) -> int:
    return _U64.unpack(key[9:])[0]


def block_first(key: bytes) -> int:
    return _U64.unpack(key[8:])[0]


# meta keys
META_FORMAT = b"format"
META_JOURNAL_ID = b"journal_id"
META_CREATED = b"created_ns"
META_HLC = b"hlc"
META_CHUNKER = b"chunker"
META_STORED = b"stored_bytes"
META_RAW = b"raw_bytes"
META_SETTING_PREFIX = b"set:"
META_PACK_END = b"pack_end"  # [pack, length]: the committed end of the current pack
META_PACK_LIVE_PREFIX = b"pack_live:"  # + u32 pack: bytes of chunk values the index names in it
META_PRUNED_VERSIONS = b"pruned_versions"  # counter (compaction; journal/compact.py)
META_PACKS_RETIRED = b"packs_retired"  # [[pack, txnid], ...]: emptied packs to delete
META_GUARD = DB_META  # a plain key of the main database where formats 1-9 had ``meta``: an older
# deltafs fails to open it as a database (MDB_INCOMPATIBLE) instead of starting a new journal in it
META_GUARD_VALUE = b"deltafs journal format 10 or later: meta keys are in the main database"
META_FILES = b"file_count"  # since format 10: file ids in ``files`` (it holds ``paths`` too)

# meta keys live beside the names of the databases in the main database (format 10): never one of them
assert not {META_FORMAT, META_JOURNAL_ID, META_CREATED, META_HLC, META_CHUNKER, META_STORED, META_RAW,
            META_PACK_END, META_PRUNED_VERSIONS, META_PACKS_RETIRED, META_FILES, b"freed_chunks", b"freed_bytes",
            } & {*ALL_DBS, *WRITER_DBS, *OLD_DBS, DB_CHECKPOINTS, DB_REFS, TMP_DB}
assert not any(n.startswith((META_SETTING_PREFIX, META_PACK_LIVE_PREFIX)) for n in (*ALL_DBS, *WRITER_DBS, TMP_DB))


def pack_live_key(pack: int) -> bytes:
    return META_PACK_LIVE_PREFIX + pack.to_bytes(4, "big")

_U64 = struct.Struct(">Q")
_CHUNK_HDR = struct.Struct(">BBI")  # fmt, depth, raw_len
CHUNK_HDR = _CHUNK_HDR  # (Reader.read_chunks_from parses values where it guesses them)
RAW_VALUE_EXTRA = _CHUNK_HDR.size + 1  # a standalone raw chunk's value: header, codec byte, its bytes
_LOC_V2 = struct.Struct(">IIIIB")  # format-2 chunk index value (read by the upgrade only)
CHUNK_FMT = 1  # value format 1: standalone, or a delta against one base
CHUNK_FMT_MULTI = 2  # value format 2 (journal format 9): a delta against 2..MAX_BASES bases
MAX_BASES = 4
ID_LEN = 16
CHUNK_HDR_MAX = _CHUNK_HDR.size + 1 + MAX_BASES * ID_LEN  # the longest header: format 2, MAX_BASES ids
HASH_LEN = 32
ENTRY_LEN = ID_LEN + 4  # packed chunk-list entry: id || u32 length

# LMDB's default max key size is 511 bytes; paths can be 4095.
PATH_KEY_MAX = 480
PATH_KEY_PREFIX = 449


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def path_key(path: bytes) -> bytes:
    """Key of a path: itself if short, else a 449-byte prefix + blake2b-256.

    Hashed keys are 481 bytes long, so they never equal a plain key
    (<= 480 bytes); byte order still groups a directory's entries under
    its first 449 bytes, which keeps prefix scans possible.
    """
    if len(path) <= PATH_KEY_MAX:
        return path
    return path[:PATH_KEY_PREFIX] + hashlib.blake2b(path, digest_size=32).digest()


def path_key_is_hashed(key: bytes) -> bool:
    return len(key) > PATH_KEY_MAX


def index_record(txn, dbs, seq: int, file_id: int, paths) -> None:
    """Add record ``seq`` to ``history`` and ``pathlog``.

    Seqs only grow, so each goes at the end of its key's duplicates
    (MDB_APPENDDUP), which keeps those pages full.
    """
    if file_id >= FILE_ID_LIMIT:
        raise ValueError(f"file id {file_id:#x} out of range (1 .. 2**63-1)")
    if not txn.put(_U64.pack(file_id), _U64.pack(seq), db=dbs[DB_HISTORY], append=True):
        raise ValueError(f"history of file {file_id:016x} already goes past record {seq}")
    for key in {paths_key(p) for p in paths if p is not None}:
        if not txn.put(key, _U64.pack(seq), db=dbs[DB_PATHLOG], append=True):
            raise ValueError(f"pathlog of {key!r} already goes past record {seq}")


def refill(txn, db, tmp) -> None:
    """Replace ``db``'s entries by ``tmp``'s, appended in key order (full
    pages: LMDB splits an appending page at its end), and empty ``tmp``."""
    txn.drop(db, delete=False)
    for k, v in txn.cursor(db=tmp):
        txn.put(k, v, db=db, append=True)
    txn.drop(tmp, delete=False)


def rewrite_in_key_order(env, txn, db) -> int:
    """Copy ``db`` out and append it back in key order (every page full); -> pages saved."""
    st = txn.stat(db)
    before = st["leaf_pages"] + st["branch_pages"] + st["overflow_pages"]
    tmp = env.open_db(TMP_DB, txn=txn)
    for k, v in txn.cursor(db=db):
        txn.put(k, v, db=tmp, append=True)
    refill(txn, db, tmp)
    txn.drop(tmp, delete=True)
    st = txn.stat(db)
    return before - st["leaf_pages"] - st["branch_pages"] - st["overflow_pages"]


def dup_pages_needed(txn, db) -> int:
    """Leaf pages a ``DUP_DBS`` database (u64 duplicates) needs when packed full.

    An LMDB leaf node of a key with one value is node header 8 + key + 8;
    with a few duplicates, node header + key + a sub-page (header 16 + 8
    per duplicate, grown 4 slots at a time); one whose sub-page would pass
    half a page holds a sub-database instead (node 8 + key + 48, its own
    pages)."""
    psize = txn.stat(db)["psize"] - 16
    used = pages = 0
    cur = txn.cursor(db=db)
    ok = cur.first()
    while ok:
        n = cur.count()
        sub = len(cur.value()) if n == 1 else 16 + 8 * -(-n // 4) * 4  # one: a seq, or a segment (format 13)
        node = 8 + len(cur.key()) + (sub if sub <= psize // 2 else 48)
        used += (node + 1) // 2 * 2 + 2
        if sub > psize // 2:
            pages += -(-8 * n // psize)
        ok = cur.next_nodup()
    return pages + -(-used // psize)


def rewrite_dups_in_key_order(txn, db) -> int:
    """Put a ``DUP_DBS`` database back in key order; -> pages saved.

    ``index_record`` appends each record's seq under its file id / path: the
    keys are all over the tree, every page split leaves two half-full pages
    (60-75 % full); written in key order every page fills."""
    st = txn.stat(db)
    before = st["leaf_pages"] + st["branch_pages"] + st["overflow_pages"]
    pairs = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
    txn.drop(db, delete=False)
    cur = txn.cursor(db=db)
    for k, v in pairs:
        if not cur.put(k, v, append=True):
            raise ValueError(f"{k!r} out of order while rewriting")
    st = txn.stat(db)
    return before - st["leaf_pages"] - st["branch_pages"] - st["overflow_pages"]


def pack_list(refs: Iterable[tuple[bytes, int]]) -> bytes:
    """Packed chunk list: for each chunk, id (16 bytes) || length (u32 BE).
    A :class:`deltafs.chunking.PackedRefs` is this form already: its bytes."""
    packed = getattr(refs, "packed", None)
    if packed is not None:
        return bytes(packed)
    return b"".join(i + n.to_bytes(4, "big") for i, n in refs)


def _refs_total(refs) -> int:
    """Sum of the lengths of ``refs`` (a PackedRefs knows it)."""
    total = getattr(refs, "total", None)
    return total if total is not None else sum(int(n) for _, n in refs)


def unpack_list(b: bytes) -> list[tuple[bytes, int]]:
    if len(b) % ENTRY_LEN:
        raise ValueError("packed chunk list of bad length")
    mv = bytes(b)
    return [(mv[o : o + ID_LEN], int.from_bytes(mv[o + ID_LEN : o + ENTRY_LEN], "big")) for o in range(0, len(mv), ENTRY_LEN)]


def apply_edit_packed(old: bytes, total: int, edits) -> tuple[bytes, int]:
    """Apply ``[(old_start, old_count, [(id, len), ...])]`` to a packed list.

    -> (new packed list, new total length).  Work is proportional to the
    edit plus one memcpy of the list, so a small edit of a huge file's list
    stays cheap (the Python list form would cost O(entries) interpreted).
    """
    parts: list[bytes] = []
    cur = 0
    n = len(old) // ENTRY_LEN
    for start, count, refs in edits:
        if start < cur or start + count > n:
            raise ValueError(f"edit ({start}, {count}) out of order or beyond {n} chunks")
        parts.append(old[cur * ENTRY_LEN : start * ENTRY_LEN])
        for o in range(start * ENTRY_LEN, (start + count) * ENTRY_LEN, ENTRY_LEN):
            total -= int.from_bytes(old[o + ID_LEN : o + ENTRY_LEN], "big")
        if hasattr(refs, "packed"):  # a capture's PackedRefs: its bytes as they are
            parts.append(refs.packed)
            total += refs.total
            cur = start + count
            continue
        for cid, length in refs:
            parts.append(bytes(cid) + int(length).to_bytes(4, "big"))
            total += int(length)
        cur = start + count
    parts.append(old[cur * ENTRY_LEN :])
    return b"".join(parts), total


def apply_edit_packed_in_place(buf: bytearray, total: int, edits) -> int:
    """:func:`apply_edit_packed` on a list the caller owns, in place; -> the new total.

    A same-count replacement is a slice write; a count change one memmove
    of the tail: no rebuilt copy of a huge file's list (1.25 MiB for a
    1 GiB file, ~1.8 ms to concatenate on the bench machine, issue 19)."""
    n = len(buf) // ENTRY_LEN
    cur = 0
    for start, count, _ in edits:
        if start < cur or start + count > n:
            raise ValueError(f"edit ({start}, {count}) out of order or beyond {n} chunks")
        cur = start + count
    for start, count, refs in reversed(edits):  # from the end: earlier indices hold
        for o in range(start * ENTRY_LEN, (start + count) * ENTRY_LEN, ENTRY_LEN):
            total -= int.from_bytes(buf[o + ID_LEN : o + ENTRY_LEN], "big")
        packed = getattr(refs, "packed", None)  # a capture's PackedRefs: its bytes as they are
        buf[start * ENTRY_LEN : (start + count) * ENTRY_LEN] = packed if packed is not None else b"".join(
            bytes(cid) + int(length).to_bytes(4, "big") for cid, length in refs)
        total += _refs_total(refs)
    return total


def packed_hash(packed: bytes) -> bytes:
    """The content hash of a packed full chunk list (see :func:`content_hash`)."""
    return hashlib.blake2b(packed, digest_size=HASH_LEN).digest()


def content_hash(refs: Sequence[tuple[bytes, int]]) -> bytes:
    """blake2b-256 of the packed full chunk list (defines a version's content)."""
    return hashlib.blake2b(pack_list(refs), digest_size=HASH_LEN).digest()


# --- the two-level content hash (format 11, docs/format.md "Content hash") ---------------------
TREE_PAGE = 4096  # chunk-list entries per page of the tree hash
TREE_PAGE_BYTES = TREE_PAGE * ENTRY_LEN  # 81,920 bytes of packed list


def uses_tree(packed_len: int) -> bool:
    """Does a packed list of ``packed_len`` bytes get the tree hash (more than one page)?
    A list of one page or less keeps the flat hash: the same bytes as before format 11."""
    return packed_len > TREE_PAGE_BYTES


def page_hashes(packed, old: list[bytes] | None = None, dirty: Iterable[int] = (),
                tail: int | None = None) -> list[bytes]:
    """blake2b-256 of each TREE_PAGE-entry page of ``packed`` (the last may be shorter).

    ``old``: the page hashes of the list before an edit, reused except for
    the pages in ``dirty`` and every page from ``tail`` on (see
    :func:`edited_pages`)."""
    n = (len(packed) + TREE_PAGE_BYTES - 1) // TREE_PAGE_BYTES
    dirty = set(dirty)
    keep = 0 if old is None else min(len(old), n if tail is None else tail)
    out = []
    with memoryview(packed) as mv:  # released at once: the writer resizes its list in place later
        for i in range(n):
            if i < keep and i not in dirty:
                out.append(old[i])
            else:
                with mv[i * TREE_PAGE_BYTES : (i + 1) * TREE_PAGE_BYTES] as page:
                    out.append(hashlib.blake2b(page, digest_size=HASH_LEN).digest())
    return out


def tree_root(pages: Sequence[bytes]) -> bytes:
    """The tree hash from the page hashes: blake2b-256(u32 BE TREE_PAGE || page hashes in order)."""
    h = hashlib.blake2b(TREE_PAGE.to_bytes(4, "big"), digest_size=HASH_LEN)
    for ph in pages:
        h.update(ph)
    return h.digest()


def tree_hash(packed) -> bytes:
    """The two-level content hash of a packed full chunk list, from scratch."""
    return tree_root(page_hashes(packed))


def edited_pages(edits) -> tuple[set[int], int | None]:
    """Which pages of the new list an edit ``[(old_start, old_count, refs)]`` changed:
    (pages rewritten in place, first page of a tail that moved or None).
    A same-count replacement changes the pages it covers; the first edit
    that changes the count moves every entry after it."""
    dirty: set[int] = set()
    for start, count, refs in edits:
        k = len(refs)
        if k != count:
            return dirty, start // TREE_PAGE
        if k:
            dirty.update(range(start // TREE_PAGE, (start + k - 1) // TREE_PAGE + 1))
    return dirty, None


def version_hash(packed, pages: list[bytes] | None = None) -> tuple[bool, bytes]:
    """-> (tree?, hash) of a version's packed list as a format-11 writer records it:
    the flat hash (record key 20) up to one page, else the tree hash (key 22).
    ``pages``: the list's page hashes, when the caller has them."""
    if not uses_tree(len(packed)):
        return False, packed_hash(packed)
    return True, tree_root(pages if pages is not None else page_hashes(packed))


def hash_matches(rec, packed) -> bool:
    """Does ``packed`` match the content hash ``rec`` carries (either kind; True if none)?"""
    if getattr(rec, "content_tree", None) is not None:
        return tree_hash(packed) == rec.content_tree
    return rec.content_hash is None or packed_hash(packed) == rec.content_hash


def chunk_header(raw_len: int) -> bytes:
    """The header of a standalone chunk value: ``encode_chunk(0, raw_len, None, p)`` is ``chunk_header(raw_len) + p``."""
    return _CHUNK_HDR.pack(CHUNK_FMT, 0, raw_len)


def encode_chunk(depth: int, raw_len: int, bases: Sequence[bytes] | bytes | None, payload: bytes) -> bytes:
    """A chunk value (docs/format.md "Chunk value").  ``bases``: the base ids
    in dictionary order (one id, a sequence of ids, or None/empty for a
    standalone value); two or more make a value of format 2."""
    if isinstance(bases, (bytes, bytearray)):
        bases = (bytes(bases),)
    bases = tuple(bases or ())
    if not bases:
        return _CHUNK_HDR.pack(CHUNK_FMT, 0, raw_len) + payload
    assert 0 < depth <= 255 and all(len(b) == ID_LEN for b in bases)
    if len(bases) == 1:
        return _CHUNK_HDR.pack(CHUNK_FMT, depth, raw_len) + bases[0] + payload
    assert len(bases) <= MAX_BASES and len(set(bases)) == len(bases)
    return _CHUNK_HDR.pack(CHUNK_FMT_MULTI, depth, raw_len) + bytes((len(bases),)) + b"".join(bases) + payload


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _uvarint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]  # most fields of a chunk index entry (once per chunk stored)
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _uvarints(v: bytes, count: int, what: str) -> list[int]:
    out = []
    n = shift = 0
    for b in bytes(v):
        n |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
        else:
            out.append(n)
            n = shift = 0
    if len(out) != count or shift:
        raise ValueError(f"bad {what}")
    return out


def encode_loc(refs: int, pack: int, offset: int, length: int, depth: int) -> bytes:
    """The ``chunks`` index value: where the chunk value is and who names it.

    Five unsigned LEB128 varints (refs, pack, offset, length, depth): 8-11
    bytes for a usual entry where fixed u32 fields took 17.
    """
    out = bytearray()  # inline LEB128: ~0.6 us against ~1 us for a join of _uvarint (once per chunk stored)
    for n in (refs, pack, offset, length, depth):
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
    return bytes(out)


def decode_loc(v: bytes) -> tuple[int, int, int, int, int]:
    """-> (refs, pack, offset, length, depth)."""
    refs, pack, offset, length, depth = _uvarints(v, 5, "chunk index value")
    return refs, pack, offset, length, depth


# --- record blocks: compacted records, zstd-compressed in packs ------------------------
RECORD_BLOCK_MAGIC = b"R"  # first byte of a block in a pack (a chunk value starts with 1)
CHAINED_BLOCK_MAGIC = b"S"  # since format 6: a block that keeps two hashes, not one per record
DERIVED_BLOCK_MAGIC = b"T"  # since format 12: an S block whose content hashes are left out where derived
DELTA_BLOCK_MAGIC = b"U"  # since format 13: a T block whose bodies hold their HLC and mtime as deltas
_BLOCK_MAGICS = (RECORD_BLOCK_MAGIC, CHAINED_BLOCK_MAGIC, DERIVED_BLOCK_MAGIC, DELTA_BLOCK_MAGIC)
RECORD_BLOCK_LEVEL = 19


def encode_block_loc(pack: int, offset: int, length: int, count: int) -> bytes:
    """The ``record_blocks`` value: four varints (pack, offset, length, records)."""
    return b"".join(map(_uvarint, (pack, offset, length, count)))


def decode_block_loc(v: bytes) -> tuple[int, int, int, int]:
    """-> (pack, offset, length, number of records)."""
    pack, offset, length, count = _uvarints(v, 4, "record block location")
    return pack, offset, length, count


def _chain_hash(prev: bytes, body: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=HASH_LEN)
    h.update(prev)
    h.update(body)
    return h.digest()


def _zstd(body: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        RECORD_BLOCK_LEVEL, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(body)


def encode_record_block(values: Sequence[bytes], first: int = 0,
                        outside: Callable[[int], bytes] | None = None) -> bytes:
    """A block of consecutive stored record values (``hash || body``), the
    records ``first, first + 1, ...``.

    With ``outside`` (the packed full chunk list of a content version
    before ``first``, unchecked: :meth:`Reader.unchecked_list`) a ``T``
    block (format 12) when it leaves out at least one content hash: each
    content record's hash value (key 20 or 22) is replaced by nil where the
    chunk list rebuilt from the block's own edits (and ``outside`` for bases
    before it) gives that hash back, which saves ~33 of the ~100 bytes a
    compressed record takes.  The block is decoded again here and kept only
    if it gives back ``values`` byte for byte; else an ``S`` block.

    ``S`` block (format 6): when every record after the first has ``hash =
    blake2b-256(previous hash || body)`` (records v2), one magicless zstd frame
    of ``first hash || last hash || (varint length || body)...``: the hashes
    in between are recomputed when the block is read, which saves 32 of the
    ~70 bytes a compressed record takes.  Else (records v1 in the block) an
    ``R`` block: ``R`` then one frame of ``(varint length || stored value)...``.
    """
    values = [bytes(v) for v in values]
    hashes = [v[:HASH_LEN] for v in values]
    bodies = [v[HASH_LEN:] for v in values]
    if values and all(_chain_hash(hashes[i - 1], bodies[i]) == hashes[i] for i in range(1, len(values))):
        if outside is not None and first > 0:
            blob = _derived_block(hashes, bodies, first, outside)
            if blob is not None:
                return blob
        body = hashes[0] + hashes[-1] + b"".join(_uvarint(len(b)) + b for b in bodies)
        return CHAINED_BLOCK_MAGIC + _zstd(body)
    return encode_r_block(values)


_HASH_KEYS = (20, 22)  # record v2 keys of the content hash: flat, tree (format 11)
_BIN32 = b"\xc4\x20"  # msgpack bin 8 of 32 bytes
_NIL = b"\xc0"


def _hash_hole(body: bytes) -> tuple[int, bytes] | None:
    """(offset of the flat content hash's msgpack value in ``body``, the body
    with that value replaced by nil), or None: no flat hash, or not one place
    it can only be.  A tree hash (key 22: a list over TREE_PAGE entries) is
    never left out: the writer would rebuild a huge list, under the write
    lock, only to keep the hash (readers put either kind back)."""
    try:
        d = msgpack.unpackb(body, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not a record v2 body: left whole
        return None
    if not isinstance(d, dict) or d.get(0) != 2:
        return None
    h = d.get(20)
    if not isinstance(h, bytes) or len(h) != HASH_LEN:
        return None
    pat = b"\x14" + _BIN32 + h
    at = body.find(pat)
    if at < 0 or body.find(pat, at + 1) >= 0:
        return None
    off = at + 1
    return off, body[:off] + _NIL + body[off + 2 + HASH_LEN:]


class _Packed:
    """A packed new list of an edit as apply_edit_packed takes it."""
    __slots__ = ("packed", "total")

    def __init__(self, packed: bytes) -> None:
        if len(packed) % ENTRY_LEN:
            raise ValueError("a packed chunk list of bad length")
        self.packed = packed
        self.total = _packed_total(packed)


def _packed_total(packed: bytes) -> int:
    return sum(int.from_bytes(packed[o + ID_LEN : o + ENTRY_LEN], "big")
               for o in range(0, len(packed), ENTRY_LEN))


def _block_lists(bodies: list[bytes], first: int, wanted: Iterable[int],
                 outside: Callable[[int], bytes]) -> Iterator[tuple[int, bytes]]:
    """(index, packed full chunk list) of each ``wanted`` record of a block,
    in order: its base's list (in the block: rebuilt from the bodies; before
    it: ``outside``; base 0: empty) with its edit applied.  A list is kept
    only while a later record of the block still builds on it."""
    wanted = sorted(set(wanted))
    parsed: dict[int, tuple[int, list]] = {}
    need, todo = set(), list(wanted)
    while todo:  # the wanted records and the ones in the block they build on
        i = todo.pop()
        if i in need:
            continue
        if not 0 <= i < len(bodies):
            raise ValueError(f"record {first + i} is not in the block")
        d = msgpack.unpackb(bodies[i], strict_map_key=False)
        base = d.get(17) or 0
        if not isinstance(base, int) or not 0 <= base < first + i:
            raise ValueError(f"record {first + i} builds on record {base}")
        parsed[i] = base, d.get(18) or []
        need.add(i)
        if base >= first:
            todo.append(base - first)
    uses: dict[int, int] = {}
    for i in need:
        base = parsed[i][0]
        if base >= first:
            uses[base - first] = uses.get(base - first, 0) + 1
    kept: dict[int, tuple[bytes, int]] = {}
    want = set(wanted)
    for i in sorted(need):
        base, edit = parsed[i]
        if not base:
            start, total = b"", 0
        elif base < first:
            start = bytes(outside(base))
            if len(start) % ENTRY_LEN:
                raise ValueError("a packed chunk list of bad length")
            total = _packed_total(start)
        else:
            start, total = kept[base - first]
            uses[base - first] -= 1
            if not uses[base - first]:
                del kept[base - first]
        got = apply_edit_packed(start, total, [(s, c, _Packed(bytes(p))) for s, c, p in edit])
        if uses.get(i):
            kept[i] = got
        if i in want:
            yield i, got[0]


def _fill_hashes(bodies: list[bytes], holes: list[int], first: int,
                 outside: Callable[[int], bytes]) -> list[bytes]:
    """The bodies of a ``T`` block with every left-out content hash put back:
    the hash of the version's list (:func:`_block_lists`), flat for key 20,
    the tree hash for key 22, back in place of the nil."""
    out = list(bodies)
    for i, packed in _block_lists(bodies, first, [i for i, h in enumerate(holes) if h], outside):
        b, off = bodies[i], holes[i] - 1
        if b[off : off + 1] != _NIL or off < 1 or b[off - 1] not in _HASH_KEYS:
            raise ValueError(f"record {first + i}: no left-out content hash at {off}")
        h = tree_hash(packed) if b[off - 1] == 22 else packed_hash(packed)
        out[i] = b[:off] + _BIN32 + h + b[off + 1:]
    return out


def _derived_block(hashes: list[bytes], bodies: list[bytes], first: int,
                   outside: Callable[[int], bytes]) -> bytes | None:
    """A ``U`` block of these records (format 13), else a ``T`` block, or
    None (no hash left out and no HLC to squeeze, or the block would not
    give them back).  A hash is left out only for a list of up to
    TREE_PAGE entries: a reader rebuilds and hashes every list whose hash
    it puts back, and a huge file's (1.25 MB for 1 GiB) costs more than its
    32 bytes are worth."""
    holes, short = [0] * len(bodies), list(bodies)
    cand = {}
    for i, b in enumerate(bodies):
        hh = _hash_hole(b)
        if hh:
            cand[i] = hh
    try:
        if cand:
            for i, packed in _block_lists(bodies, first, cand, outside):
                if len(packed) <= TREE_PAGE_BYTES:
                    holes[i], short[i] = cand[i][0] + 1, cand[i][1]
            if any(holes) and _fill_hashes(short, holes, first, outside) != bodies:
                holes, short = [0] * len(bodies), list(bodies)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error):
        holes, short = [0] * len(bodies), list(bodies)
    head = hashes[0] + hashes[-1]
    sq = _squeeze(short)
    if sq is not None:
        frame = head + b"".join(_uvarint(h) + _uvarint(t) + _uvarint(len(b)) + b
                                for h, t, b in zip(holes, *sq))
        blob = DELTA_BLOCK_MAGIC + _zstd(frame)
        try:
            if decode_record_block(blob, len(bodies), first, outside) == [h + b for h, b in zip(hashes, bodies)]:
                return blob
        except ValueError:
            pass
    if not any(holes):
        return None
    frame = head + b"".join(_uvarint(h) + _uvarint(len(b)) + b for h, b in zip(holes, short))
    return DERIVED_BLOCK_MAGIC + _zstd(frame)


_HLC_AT = b"\x00\x02\x01\xcf"  # a record v2 body: map, 0: 2, 1: hlc as a msgpack uint 64
_MTIME_KEY = b"\x0a\xcf"  # key 10 (mtime) and a msgpack uint 64


def _squeeze(bodies: list[bytes]) -> tuple[list[int], list[bytes]] | None:
    """(mtime offsets, bodies) of a ``U`` block, or None (a body that is not
    a record v2 body with a 64-bit HLC, or HLCs not increasing).

    Each body's HLC (key 1, at offset 4 of every record v2 body of an HLC
    >= 2**32) becomes the uvarint of its difference to the previous body's
    (the first: to 0); then its mtime (key 10), where it is a uint 64 found
    once in the body, the zigzag uvarint of its difference to the previous
    mtime so replaced (0 at first); the offset + 1 of that varint (0: none)
    goes beside the body.  Consecutive records are a few HLC ticks apart,
    and a file's saves a few seconds: zstd finds neither repeat in 8 bytes."""
    offs, out = [], []
    prev_h = prev_t = 0
    for b in bodies:
        if len(b) < 13 or not 0x80 <= b[0] <= 0x8F or b[1:5] != _HLC_AT:
            return None
        h = _U64.unpack_from(b, 5)[0]
        if h <= prev_h:
            return None
        b = b[:4] + _uvarint(h - prev_h) + b[13:]
        prev_h = h
        off = 0
        at = b.find(_MTIME_KEY)
        if at > 0 and b.find(_MTIME_KEY, at + 1) < 0 and at + 10 <= len(b):
            try:
                d = msgpack.unpackb(bodies[len(out)], strict_map_key=False)
            except Exception:  # noqa: BLE001 - not a map: left whole
                d = None
            t = _U64.unpack_from(b, at + 2)[0]
            if isinstance(d, dict) and d.get(10) == t:
                z = t - prev_t
                b = b[:at + 1] + _uvarint(z << 1 if z >= 0 else ((-z) << 1) - 1) + b[at + 10:]
                prev_t, off = t, at + 2
        offs.append(off)
        out.append(b)
    return offs, out


def _unsqueeze(offs: list[int], bodies: list[bytes]) -> list[bytes]:
    """The bodies of a ``U`` block as :func:`_squeeze` took them (one pass,
    one join per body: this is on every cold read of a block)."""
    try:
        return _unsqueezed(offs, bodies)
    except struct.error as e:  # an HLC or mtime out of the uint 64 range
        raise ValueError(f"a U block's HLC or mtime out of range: {e}") from e


def _unsqueezed(offs: list[int], bodies: list[bytes]) -> list[bytes]:
    out = []
    prev_h = prev_t = 0
    pack = _U64.pack
    for off, b in zip(offs, bodies):
        if len(b) < 5 or b[1:4] != b"\x00\x02\x01":
            raise ValueError("a U block's body is not a record v2 body")
        d = b[4]
        e = 5
        if d & 0x80:
            d, e = _read_uvarint(b, 4)
        if not d:
            raise ValueError("a U block's HLC does not increase")
        prev_h += d
        if not off:
            out.append(b"".join((b[:4], b"\xcf", pack(prev_h), b[e:])))
            continue
        if off - 1 < e:
            raise ValueError("a U block's mtime offset inside its HLC")
        z = b[off - 1]
        f = off
        if z & 0x80:
            z, f = _read_uvarint(b, off - 1)
        prev_t += (z >> 1) if not z & 1 else -((z + 1) >> 1)
        out.append(b"".join((b[:4], b"\xcf", pack(prev_h), b[e:off - 1], b"\xcf", pack(prev_t), b[f:])))
    return out


def encode_r_block(values: Sequence[bytes]) -> bytes:
    """An ``R`` block (formats 3-5): every stored value whole."""
    return RECORD_BLOCK_MAGIC + _zstd(b"".join(_uvarint(len(v)) + bytes(v) for v in values))


def record_block_bodies(blob: bytes, count: int) -> list[bytes]:
    """The record bodies of a block as stored: a ``T`` block's with nil where
    a content hash was left out (enough to rebuild chunk lists: base and
    edit are there).  ValueError if it is not a block of ``count``."""
    magic = blob[:1]
    if magic not in _BLOCK_MAGICS:
        raise ValueError("not a record block")
    body = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS).decompress(blob[1:])
    if magic == RECORD_BLOCK_MAGIC:
        out = [v[HASH_LEN:] for v in _split_varint_items(body, 0)]
    elif magic == CHAINED_BLOCK_MAGIC:
        out = _split_varint_items(body, 2 * HASH_LEN)
    elif magic == DERIVED_BLOCK_MAGIC:
        out = _split_holed_items(body, 2 * HASH_LEN)[1]
    else:
        _, offs, out = _split_holed_items(body, 2 * HASH_LEN, True)
        out = _unsqueeze(offs, out)
    if len(out) != count:
        raise ValueError(f"record block holds {len(out)} records, its index says {count}")
    return out


def record_block_last_hash(blob: bytes, count: int) -> bytes:
    """The stored hash of a block's last record: of an ``S`` or ``T`` block
    the frame's second 32 bytes (the rest left compressed), of an ``R`` block
    its last value's.  ValueError if it is not a block."""
    magic = blob[:1]
    if magic in (CHAINED_BLOCK_MAGIC, DERIVED_BLOCK_MAGIC, DELTA_BLOCK_MAGIC):
        dz = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        with dz.stream_reader(blob[1:]) as rd:
            head = rd.read(2 * HASH_LEN)
        if len(head) < 2 * HASH_LEN:
            raise ValueError("record block too short for its hashes")
        return bytes(head[HASH_LEN:])
    values = decode_record_block(blob, count)
    return bytes(values[-1][:HASH_LEN])


def _read_uvarint(body: bytes, o: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if o >= len(body):
            raise ValueError("record block ends inside a varint")
        b = body[o]
        o += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, o
        shift += 7


def _split_holed_items(body: bytes, o: int, squeezed: bool = False):
    """A ``T`` block's ``(uvarint hole, uvarint length, body)...`` -> (holes,
    bodies); ``squeezed``: a ``U`` block's ``(uvarint hole, uvarint mtime
    offset, uvarint length, body)...`` -> (holes, offsets, bodies)."""
    holes, offs, out = [], [], []
    while o < len(body):
        hole, o = _read_uvarint(body, o)
        if squeezed:
            off, o = _read_uvarint(body, o)
            offs.append(off)
        n, o = _read_uvarint(body, o)
        if o + n > len(body) or (hole > n and not squeezed):
            raise ValueError("record block ends inside a record")
        holes.append(hole)
        out.append(body[o : o + n])
        o += n
    return (holes, offs, out) if squeezed else (holes, out)


def _split_varint_items(body: bytes, o: int) -> list[bytes]:
    out = []
    while o < len(body):
        n = shift = 0
        while True:
            b = body[o]
            o += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
        if o + n > len(body):
            raise ValueError("record block ends inside a record")
        out.append(body[o : o + n])
        o += n
    return out


def decode_record_block(blob: bytes, count: int, first: int = 0,
                        outside: Callable[[int], bytes] | None = None) -> list[bytes]:
    """The ``count`` stored record values of a block (ValueError if it is not one).

    A ``T`` block (format 12) needs ``first`` (its first record's seq) and
    ``outside`` (see :func:`encode_record_block`) to put its left-out
    content hashes back; the hashes of a damaged list come out wrong, and
    the chain check of the block (the reader's) then fails.

    Of an ``S`` block, the first record gets the block's first hash, the
    last its last hash, and each one between the hash recomputed from its
    predecessor's: a body altered inside the block then shows as the last
    record not continuing the chain, when the reader checks the block.
    """
    magic = blob[:1]
    if magic not in _BLOCK_MAGICS:
        raise ValueError("not a record block")
    body = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS).decompress(blob[1:])
    if magic == RECORD_BLOCK_MAGIC:
        out = _split_varint_items(body, 0)
    else:
        if len(body) < 2 * HASH_LEN:
            raise ValueError("record block too short for its hashes")
        fh, last = body[:HASH_LEN], body[HASH_LEN : 2 * HASH_LEN]
        if magic in (DERIVED_BLOCK_MAGIC, DELTA_BLOCK_MAGIC):
            if magic == DERIVED_BLOCK_MAGIC:
                holes, bodies = _split_holed_items(body, 2 * HASH_LEN)
            else:
                holes, offs, bodies = _split_holed_items(body, 2 * HASH_LEN, True)
                bodies = _unsqueeze(offs, bodies)
                if any(h > len(b) for h, b in zip(holes, bodies)):
                    raise ValueError("record block ends inside a record")
            if any(holes):
                if outside is None or first < 1:
                    raise ValueError("a T or U record block needs the journal to put its content hashes back")
                try:
                    bodies = _fill_hashes(bodies, holes, first, outside)
                except (TypeError, KeyError, IndexError, OverflowError, struct.error) as e:  # damage
                    raise ValueError(f"a content hash of the block cannot be put back: {e}") from e
        else:
            bodies = _split_varint_items(body, 2 * HASH_LEN)
        out, h = [], fh
        for i, b in enumerate(bodies):
            if i:
                h = last if i == len(bodies) - 1 else _chain_hash(h, b)
            out.append(h + b)
        if len(bodies) == 1 and last != fh:
            raise ValueError("record block of one record with two hashes")
    if len(out) != count:
        raise ValueError(f"record block holds {len(out)} records, its index says {count}")
    return out


def decode_loc_v2(v: bytes) -> tuple[int, int, int, int, int]:
    """A format-2 index value (fixed u32 refs, pack, offset, length, u8 depth)."""
    return _LOC_V2.unpack(v)


def _refs_end(v: bytes) -> int:
    """Length of the first varint (refs) of an index value."""
    i = 0
    while v[i] & 0x80:
        i += 1
    return i + 1


def with_refs(v: bytes, refs: int) -> bytes:
    """``v`` with its reference count replaced: the first varint re-encoded,
    the other four kept byte for byte (an incref per chunk of every capture:
    ~0.3 us instead of a decode and an encode of all five, ~3.4 us)."""
    try:
        return _uvarint(refs) + v[_refs_end(v):]
    except IndexError:
        raise ValueError("bad chunk index value") from None


_LOW_BYTES = bytes(range(0x80))  # the last byte of each varint


def add_refs(v: bytes, n: int) -> bytes:
    """``with_refs(v, loc_refs(v) + n)``, without decoding the other four
    fields: the refs varint replaced, the rest copied (a checkpoint of a
    1 GiB file counts ~65,000 entries in one commit; issue 19).  Checks the
    value as :func:`decode_loc` does (five varints, the last one ended)."""
    if not isinstance(v, bytes):
        v = bytes(v)
    if len(v) - len(v.translate(None, _LOW_BYTES)) != 5 or v[-1] >= 0x80:
        raise ValueError("bad chunk index value")
    b = v[0]
    if b < 0x80:
        refs, i = b, 1
    else:
        refs = shift = i = 0
        while True:
            b = v[i]
            refs |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                break
            shift += 7
    refs += n
    if refs < 0:
        raise ValueError("chunk reference count below zero")
    return _uvarint(refs) + v[i:]


def loc_refs(v: bytes) -> int:
    try:
        end = _refs_end(v)
    except IndexError:
        raise ValueError("bad chunk index value") from None
    if end == 1:
        return v[0]
    n = 0
    for k in range(end - 1, -1, -1):
        n = n << 7 | v[k] & 0x7F
    return n


def decode_chunk(value: bytes) -> tuple[int, int, tuple[bytes, ...], memoryview]:
    """-> (depth, raw_len, base ids in dictionary order (empty: standalone), payload).
    Raises ValueError on a header that is not one of docs/format.md's."""
    mv = memoryview(value)
    if len(mv) < _CHUNK_HDR.size:
        raise ValueError("chunk value shorter than its header")
    fmt, depth, raw_len = _CHUNK_HDR.unpack_from(mv)
    o = _CHUNK_HDR.size
    if fmt == CHUNK_FMT:
        if not depth:
            return 0, raw_len, (), mv[o:]
        if len(mv) < o + ID_LEN:
            raise ValueError("chunk value cut inside its base id")
        return depth, raw_len, (bytes(mv[o : o + ID_LEN]),), mv[o + ID_LEN :]
    if fmt == CHUNK_FMT_MULTI:
        n = mv[o] if len(mv) > o else 0
        if not 2 <= n <= MAX_BASES or not depth:
            raise ValueError(f"chunk value of format 2 with {n} bases at depth {depth}")
        o += 1
        if len(mv) < o + n * ID_LEN:
            raise ValueError("chunk value cut inside its base ids")
        bases = tuple(bytes(mv[o + i * ID_LEN : o + (i + 1) * ID_LEN]) for i in range(n))
        if len(set(bases)) != n:
            raise ValueError("chunk value names a base twice")
        return depth, raw_len, bases, mv[o + n * ID_LEN :]
    raise ValueError(f"unknown chunk value format {fmt}")
