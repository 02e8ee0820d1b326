"""Tree checkpoints (format 7): the tree state every few thousand records.

``Reader.tree_at(seq)`` used to replay every record from 1.  A tree
checkpoint is the replay state (the ``paths`` and ``files`` dicts of
:class:`~deltafs.journal.state.MemStore`) right after one record, stored in
the ``trees`` database, so a tree is built from the nearest checkpoint at
or before ``seq`` plus the records after it: O(entries + records since the
checkpoint).  A checkpoint is *full* (the whole state) or a *delta* (what
changed since the checkpoint before it); a reader applies a full one and
the deltas after it.  The bytes are in docs/format.md, "Tree checkpoints".

Checkpoints are derived data: a record is never rewritten or deleted
(pruning only marks content versions), so the state after record S is
fixed once S is written and a checkpoint never goes stale.  A checkpoint
that fails its check is ignored (a warning, then a replay from an earlier
checkpoint or from record 1): it can make a tree slower, never wrong.

Written by :func:`write_due` (the writer: compaction and the mount's
maintenance ticks), one short write transaction per few checkpoints, the
state computed in a read snapshot first.  Old journals get them lazily:
the first call after the upgrade builds them over the whole history.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import logging
import struct
import sys
import threading
from array import array
from contextlib import contextmanager

import msgpack
import zstandard

from . import schema as S
from .records import decode_record, split_value
from .state import FileState, MemStore, TreeEntry

log = logging.getLogger(__name__)

DB_TREES = S.DB_TREES  # u64 seq -> tree checkpoint (docs/format.md, "Tree checkpoints")
EVERY_RECORDS = 4096  # a checkpoint after at most this many records ...
EVERY_BYTES = 8 << 20  # ... or this many bytes of stored records since the last one
MAX_DELTAS = 32  # deltas after a full checkpoint before the next full one
GONE_AFTER = 2  # a file deleted this many checkpoint intervals before a full one is only "gone" in it
ZSTD_LEVEL = 3

MAGIC = b"T"
FULL, DELTA = b"F", b"D"
_HDR = struct.Struct(">cc Q 32s")  # magic, type, base seq, check
HDR_LEN = _HDR.size


@contextmanager
def gc_paused():
    """No cyclic GC inside the block: building a tree makes a few objects per
    entry and none of them cycles, but each gen-2 collection triggered on the
    way walks every one made so far (measured: half the time of a 100k tree)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# --- the replay state ---------------------------------------------------------------------
def _state_list(st: FileState) -> list:
    """The checkpoint form of a file state: ``n`` nil for ``[p]``, ``x`` nil for
    ``{}`` (the usual case, and two objects fewer per entry to decode)."""
    links = None if st.links == [st.path] else st.links
    return [st.path, st.kind, links, st.content_seq, st.size, st.mode, st.uid, st.gid,
            st.mtime_ns, st.rdev, st.target, st.xattrs or None, st.deleted, st.last_seq]


def _state_of(v) -> FileState:
    if isinstance(v, FileState):
        return v
    return FileState(v[0], v[1], [v[0]] if v[2] is None else list(v[2]), v[3], v[4], v[5], v[6], v[7],
                     v[8], v[9], v[10], dict(v[11] or {}), v[12], v[13])


class TreeState(MemStore):
    """A :class:`MemStore` whose file states may be raw lists (as decoded from
    a checkpoint, turned into a FileState only when a record touches them),
    remembering what changed since :meth:`mark` (for deltas and diffs)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[int, object] = {}
        self.dirty_paths: set[bytes] = set()
        self.dirty_files: set[int] = set()
        self.orig_paths: dict[bytes, object] = {}  # value before the first change since mark()
        self.orig_files: dict[int, object] = {}
        self.keep_orig = False
        # file ids deleted long ago (sorted): only "it was deleted" is kept of them
        # (a later record may still name one: a write to a file unlinked while open)
        self.gone = array("Q")

    def mark(self, keep_orig: bool = False) -> None:
        self.dirty_paths, self.dirty_files = set(), set()
        self.orig_paths, self.orig_files = {}, {}
        self.keep_orig = keep_orig

    def put_path(self, path, file_id, kind):
        if self.keep_orig and path not in self.dirty_paths:
            self.orig_paths[path] = self.paths.get(path)
        self.dirty_paths.add(path)
        super().put_path(path, file_id, kind)

    def del_path(self, path):
        if self.keep_orig and path not in self.dirty_paths:
            self.orig_paths[path] = self.paths.get(path)
        self.dirty_paths.add(path)
        super().del_path(path)

    def get_file(self, file_id):
        v = self.files.get(file_id)
        if v is None:
            g = self.gone
            i = bisect.bisect_left(g, file_id)
            if i < len(g) and g[i] == file_id:
                return FileState(path=b"", links=[], deleted=True)
            return None
        return v.copy() if isinstance(v, FileState) else _state_of(v)

    def retire_deleted(self, before_seq: int) -> None:
        """Move the files deleted before record ``before_seq`` from ``files`` to ``gone``."""
        old = [fid for fid, v in self.files.items()
               if (v.deleted and v.last_seq < before_seq if isinstance(v, FileState)
                   else v[12] and v[13] < before_seq)]
        if not old:
            return
        for fid in old:
            del self.files[fid]
        merged = sorted(set(self.gone).union(old))
        self.gone = array("Q", merged)

    def put_file(self, file_id, st):
        if self.keep_orig and file_id not in self.dirty_files:
            self.orig_files[file_id] = self.files.get(file_id)
        self.dirty_files.add(file_id)
        self.files[file_id] = st

    def entry(self, path: bytes, value=None, files=None) -> TreeEntry:
        """The TreeEntry of ``path`` (``value``: its (file id, kind), default the current one)."""
        fid = (value or self.paths[path])[0]
        v = (files if files is not None else self.files)[fid]
        if v.__class__ is list:  # as decoded: nothing mutates it (a record's change makes a FileState)
            return TreeEntry(path, v[1], fid, v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11] or {},
                             fid if v[2] and len(v[2]) > 1 else None)
        return TreeEntry(path, v.kind, fid, v.content_seq, v.size, v.mode, v.uid, v.gid, v.mtime_ns,
                         v.rdev, v.target, dict(v.xattrs), fid if len(v.links) > 1 else None)

    def tree(self, prefix: bytes = b"") -> dict[bytes, TreeEntry]:
        """Every path below ``prefix`` (b"": all), in path order."""
        files, out = self.files, {}
        sub = prefix + b"/"
        for p in sorted(self.paths):
            if prefix and not (p == prefix or p.startswith(sub)):
                continue
            fid = self.paths[p][0]
            v = files[fid]
            if v.__class__ is list:
                out[p] = TreeEntry(p, v[1], fid, v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10],
                                   v[11] or {}, fid if v[2] and len(v[2]) > 1 else None)
            else:
                out[p] = self.entry(p)
        return out


def _files_map(files: dict, fids) -> dict:
    out = {}
    for fid in fids:
        v = files[fid]
        out[fid] = _state_list(v) if isinstance(v, FileState) else v
    return out


# --- encoding -----------------------------------------------------------------------------
def _check(record_hash: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(record_hash + body, digest_size=32).digest()


def encode(kind: bytes, base: int, record_hash: bytes, payload) -> bytes:
    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(msgpack.packb(payload, use_bin_type=True))
    return _HDR.pack(MAGIC, kind, base, _check(record_hash, body)) + body


def encode_full(state: TreeState, record_hash: bytes, retire_before: int = 0) -> bytes:
    """A full checkpoint of ``state``; files deleted before record
    ``retire_before`` go into its ``gone`` ids (and out of ``state.files``:
    a long history of deleted files costs 8 bytes each)."""
    if retire_before > 0:
        state.retire_deleted(retire_before)
    paths = {p: list(v) for p, v in state.paths.items()}
    return encode(FULL, 0, record_hash, [paths, _files_map(state.files, state.files), _gone_bytes(state.gone)])


def _gone_bytes(gone: array) -> bytes:
    """The ``gone`` ids as stored: u64 little-endian each, ascending."""
    if sys.byteorder == "big":
        gone = array("Q", gone)
        gone.byteswap()
    return gone.tobytes()


def _gone_ids(b: bytes) -> array:
    if len(b) % 8:
        raise ValueError("gone ids: length not a multiple of 8")
    out = array("Q")
    out.frombytes(b)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def encode_delta(state: TreeState, base: int, record_hash: bytes) -> bytes:
    put = {p: list(state.paths[p]) for p in state.dirty_paths if p in state.paths}
    gone = sorted(p for p in state.dirty_paths if p not in state.paths)
    return encode(DELTA, base, record_hash, [put, gone, _files_map(state.files, state.dirty_files)])


def decode(value: bytes, record_hash: bytes) -> tuple[bytes, int, list]:
    """-> (type, base seq, payload); ValueError if it is not a checkpoint of that record."""
    if len(value) < HDR_LEN:
        raise ValueError("too short")
    magic, kind, base, check = _HDR.unpack_from(value)
    body = bytes(value[HDR_LEN:])
    if magic != MAGIC or kind not in (FULL, DELTA):
        raise ValueError("not a tree checkpoint")
    if _check(record_hash, body) != check:
        raise ValueError("its check does not match (damaged, or not of this record)")
    payload = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(body), raw=False, strict_map_key=False)
    if kind == FULL and (base or not isinstance(payload, list) or len(payload) not in (2, 3)):
        raise ValueError("bad full checkpoint")
    if kind == DELTA and (not isinstance(payload, list) or len(payload) != 3):
        raise ValueError("bad delta checkpoint")
    return kind, base, payload


# --- reading ------------------------------------------------------------------------------
def _db(r):
    return r.dbs.get(DB_TREES)


def nearest(r, seq: int) -> int:
    """The seq of the last checkpoint at or before ``seq`` (0: none)."""
    db = _db(r)
    if db is None or seq <= 0:
        return 0
    cur = r.txn.cursor(db=db)
    if cur.set_range(S.u64(seq + 1)):
        ok = cur.prev()
    else:
        ok = cur.last()
    return S.from_u64(cur.key()) if ok else 0


def seqs(r) -> list[int]:
    db = _db(r)
    if db is None:
        return []
    return [S.from_u64(k) for k in r.txn.cursor(db=db).iternext(values=False)]


def _record_hash(r, seq: int) -> bytes:
    for _, v in r.raw_records(seq, seq):
        return split_value(v)[0]
    raise ValueError(f"record {seq} is missing")


def load(r, seq: int) -> tuple[TreeState, int, int, int]:
    """The state of the checkpoint at ``seq``.  -> (state, deltas since the
    full one, entries in those deltas, entries in the full one).  ValueError
    if it or one it builds on is damaged."""
    db = _db(r)
    chain = []
    s = seq
    while True:
        v = r.txn.get(S.u64(s), db=db)
        if v is None:
            raise ValueError(f"tree checkpoint {s} is missing" + (f" (checkpoint {seq} builds on it)"
                                                                 if s != seq else ""))
        try:
            kind, base, payload = decode(v, _record_hash(r, s))
        except (ValueError, zstandard.ZstdError, msgpack.UnpackException) as e:
            raise ValueError(f"tree checkpoint {s}: {e}") from e
        chain.append(payload)
        if kind == FULL:
            break
        if not 0 < base < s or len(chain) > MAX_DELTAS + 1:
            raise ValueError(f"tree checkpoint {s}: bad base {base}")
        s = base
    st = TreeState()
    full = chain.pop()
    try:
        st.paths = full[0]  # path -> [file id, kind] (a list serves as the tuple MemStore keeps)
        st.files = full[1]
        if len(full) > 2 and full[2]:
            st.gone = _gone_ids(full[2])
        nfull = len(st.paths) + len(st.files)
        ndelta = 0
        for put, gone, files in reversed(chain):
            st.paths.update(put)
            for p in gone:
                st.paths.pop(p, None)
            st.files.update(files)
            ndelta += len(put) + len(gone) + len(files)
    except (TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"tree checkpoint {seq}: bad payload ({e})") from e
    return st, len(chain), ndelta, nfull


def state_at(r, seq: int) -> TreeState:
    """The replay state right after record ``seq``: the nearest checkpoint,
    then the records after it."""
    st, start = None, nearest(r, seq)
    while start:
        try:
            st = load(r, start)[0]
            break
        except ValueError as e:
            log.warning("ignoring %s; replaying from an earlier one", e)
            start = nearest(r, start - 1)
    if st is None:
        st = TreeState()
    replay(r, st, start + 1, seq)
    return st


def replay(r, st: TreeState, start: int, end: int) -> None:
    from .state import apply_record

    if end < start:
        return
    for rec in r.records(start, end):
        apply_record(st, rec)


# --- writing ------------------------------------------------------------------------------
_WRITING = threading.Lock()  # one builder at a time (compaction and a maintenance tick)


def write_due(storage, reader_factory, every_records: int = EVERY_RECORDS,
              every_bytes: int = EVERY_BYTES) -> int:
    with _WRITING:
        return _write_due(storage, reader_factory, every_records, every_bytes)


def _write_due(storage, reader_factory, every_records: int, every_bytes: int) -> int:
    """Write the checkpoints due after the last one (all of them for a journal
    without any).  ``reader_factory()``: a context manager giving a Reader
    on a fresh read snapshot.  -> checkpoints written."""
    written = 0
    with reader_factory() as r:
        db = _db(r)
        if db is None:
            return 0
        head = r.head_seq()
        last = nearest(r, head)
        if head - last < every_records and \
                sum(len(v) for _, v in r.raw_records(last + 1, head)) < every_bytes:
            return 0
        st = None
        if last:
            try:
                st, deltas, ndelta, nfull = load(r, last)
            except ValueError as e:
                log.warning("%s; the next tree checkpoint will be a full one", e)
        if st is None:
            st, deltas, ndelta, nfull = TreeState(), MAX_DELTAS, 0, 0
            if last:
                st = state_at(r, last)
        st.mark()
        from .state import apply_record

        pending: list[tuple[int, bytes]] = []
        count = nbytes = 0
        for seq, v in r.raw_records(last + 1, head):
            # lists=False: the tree state needs no edit, and a 4 GiB file's decodes to ~27 MiB of
            # Python objects, resident after the write (issue 19, eleventh session)
            apply_record(st, decode_record(v, seq, lists=False))
            count += 1
            nbytes += len(v)
            if count < every_records and nbytes < every_bytes:
                continue
            size = len(st.dirty_paths) + len(st.dirty_files)
            h = split_value(v)[0]
            if not last or deltas >= MAX_DELTAS or ndelta + size > max(nfull, 4 * every_records):
                val = encode_full(st, h, seq - GONE_AFTER * every_records)
                deltas, ndelta, nfull = 0, 0, len(st.paths) + len(st.files)
            else:
                val = encode_delta(st, last, h)
                deltas, ndelta = deltas + 1, ndelta + size
            pending.append((seq, val))
            last, count, nbytes = seq, 0, 0
            st.mark()
            if sum(len(x) for _, x in pending) > (32 << 20):
                written += _put(storage, db, pending)
                pending = []
        written += _put(storage, db, pending)
    if written:
        log.info("wrote %d tree checkpoint(s), the last after record %d", written, last)
    return written


def _put(storage, db, pending) -> int:
    if not pending:
        return 0
    n = 0
    with storage.write() as txn:
        for seq, val in pending:
            if txn.put(S.u64(seq), val, db=db, overwrite=False):
                n += 1
    return n
