"""Read access to a journal: one LMDB read snapshot per ``Reader``.

Works in read-only openers (CLI history tools, other processes) and inside
the writer and compaction (they hand it their write transaction).  It
stands on :class:`~deltafs.journal.storage.Storage` (databases, packs,
the record-block cache) and on nothing else of the journal.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator

import msgpack
import zstandard

from deltafs.chunking import CODEC_RAW, MAX_DELTA_DEPTH, chunk_id, decompress_chunk
from deltafs.errors import CorruptionError, NotFoundError

from . import checkpoints
from . import schema as S
from . import seqindex
from .records import HASH_LEN, ZERO_HASH, Record, check_link, decode_record, split_value
from .state import FileState, TreeEntry, children_prefix, tree_entry

log = logging.getLogger(__name__)

_ENTRY_LENGTH = struct.Struct(f">{S.ID_LEN}xI")  # the chunk length in one packed chunk-list entry
_RUN_MAX = 4 << 20  # read_chunks: the longest run of chunk values read with one pread


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    raw_len: int
    stored_len: int  # bytes of the stored chunk value in its pack (header + payload)
    bases: tuple[bytes, ...]  # base ids in dictionary order; empty: standalone
    depth: int

    @property
    def base_id(self) -> bytes | None:
        """The last base (the only one before format 9; the writer puts the
        chunk at the same offset there), or None."""
        return self.bases[-1] if self.bases else None


@dataclass
class Versions:
    """Retained content versions by file id, oldest first: [(seq, hlc)]."""

    by_file: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    head_hlc: int = 0  # the journal's time: HLC of the newest record
    head_seq: int = 0


class LmdbStore:
    """The ``paths``/``files`` indexes of one transaction, as a state.Store
    (one database since format 10: ``paths`` under S.PATH_PREFIX)."""

    def __init__(self, txn, dbs) -> None:
        self.txn = txn
        self.dbs = dbs

    def get_path(self, path):
        v = self.txn.get(S.paths_key(path), db=self.dbs[S.DB_PATHS])
        if v is None:
            return None
        fid, kind, *_ = msgpack.unpackb(v)
        return fid, kind

    def put_path(self, path, file_id, kind):
        key = S.path_key(path)
        val = [file_id, kind, path] if S.path_key_is_hashed(key) else [file_id, kind]
        self.txn.put(S.PATH_PREFIX + key, msgpack.packb(val, use_bin_type=True), db=self.dbs[S.DB_PATHS])

    def del_path(self, path):
        self.txn.delete(S.paths_key(path), db=self.dbs[S.DB_PATHS])

    def iter_paths(self, prefix: bytes = b"") -> Iterator[tuple[bytes, int, str]]:
        """(path, file id, kind) of every path starting with ``prefix``, in key order."""
        scan = S.PATH_PREFIX + prefix[: S.PATH_KEY_PREFIX]
        cur = self.txn.cursor(db=self.dbs[S.DB_PATHS])
        if not cur.set_range(scan):
            return
        for key, v in cur:
            if not key.startswith(scan):
                break
            fid, kind, *rest = msgpack.unpackb(v)
            path = rest[0] if rest else key[1:]
            if path.startswith(prefix):
                yield path, fid, kind

    def paths_under(self, dir_path):
        return [p for p, _, _ in self.iter_paths(children_prefix(dir_path)) if p != dir_path]

    def get_file(self, file_id):
        v = self.txn.get(S.u64(file_id), db=self.dbs[S.DB_FILES])
        return FileState.unpack(v) if v is not None else None

    def put_file(self, file_id, st):
        if self.txn.replace(S.u64(file_id), st.pack(), db=self.dbs[S.DB_FILES]) is None:
            count_file(self.txn, self.dbs)


def count_file(txn, dbs, n: int = 1) -> None:
    """``files`` holds ``paths`` too since format 10: the meta counter
    ``file_count`` (a new file id: += 1) keeps ``stats()['files']`` O(1)."""
    m = dbs[S.DB_META]
    v = txn.get(S.META_FILES, db=m)
    txn.put(S.META_FILES, msgpack.packb((msgpack.unpackb(v) if v else 0) + n), db=m)


class Reader:
    """A consistent view of the journal (see the package docstring for the API)."""

    def __init__(self, storage, txn) -> None:
        self._st = storage
        self.txn = txn
        self.dbs = storage.dbs
        self.store = LmdbStore(txn, self.dbs)

    # --- records -----------------------------------------------------------
    def head_seq(self) -> int:
        cur = self.txn.cursor(db=self.dbs[S.DB_CHANGES])
        return S.from_u64(cur.key()) if cur.last() and S.is_record_key(cur.key()) else 0

    def head_hash(self) -> bytes:
        cur = self.txn.cursor(db=self.dbs[S.DB_CHANGES])
        return split_value(cur.value())[0] if cur.last() and S.is_record_key(cur.key()) else ZERO_HASH

    def head(self) -> tuple[int, bytes]:
        """(head_seq(), head_hash()) from one cursor (the writer, once per record)."""
        cur = self.txn.cursor(db=self.dbs[S.DB_CHANGES])
        if cur.last() and S.is_record_key(cur.key()):
            return S.from_u64(cur.key()), bytes(cur.value()[:HASH_LEN])
        return 0, ZERO_HASH

    def archived_upto(self) -> int:
        """The last seq moved into a record block by compaction (0: none).

        Records ``1..archived_upto()`` are in ``record_blocks`` (the keys
        before record 1 in ``changes``), the rest in ``changes``; the newest
        records always stay in ``changes``."""
        cur = self.txn.cursor(db=self.dbs[S.DB_RECORD_BLOCKS])
        # blocks, then checkpoints (format 12), then records: the key before the checkpoints
        if not (cur.prev() if cur.set_range(S.CHECKPOINT_PREFIX) else cur.last()) or not S.is_block_key(cur.key()):
            return 0
        return S.block_first(cur.key()) + S.decode_block_loc(cur.value())[3] - 1

    def record_blocks(self) -> Iterator[tuple[int, bytes]]:
        """(first seq, location value) of every record block, in order (the
        keys before record 1 in ``changes``, docs/format.md)."""
        cur = self.txn.cursor(db=self.dbs[S.DB_RECORD_BLOCKS])
        if cur.set_range(S.BLOCK_PREFIX):
            for k, v in cur:
                if not S.is_block_key(k):
                    break
                yield S.block_first(k), v

    def _block_at(self, seq: int, check: bool = True) -> tuple[int, list[bytes]] | None:
        """(first seq, stored values) of the record block holding ``seq``.

        A block is checked the first time it is decoded (``check``): every
        record in it must hash right and continue the chain from the record
        before the block, so bytes flipped in a block (zstd frames carry no
        checksum) are caught instead of read as other records."""
        cur = self.txn.cursor(db=self.dbs[S.DB_RECORD_BLOCKS])
        if not (cur.prev() if cur.set_range(S.block_key(seq + 1)) else cur.last()) \
                or not S.is_block_key(cur.key()):
            return None
        first = S.block_first(cur.key())
        try:
            loc = S.decode_block_loc(cur.value())
            if not first <= seq < first + loc[3]:
                return None
            bodies: dict[int, list[bytes]] = {}  # blocks read for this one's lists, shared by its records
            values = self._st.record_block(first, loc, lambda s: self.unchecked_list(s, bodies))
        except (ValueError, zstandard.ZstdError) as e:
            err = CorruptionError(f"the record block of records {first}.. cannot be read: {e}")
            return first, self._block_around_checkpoints(first, loc, err)
        if check and not self._st.block_checked((first, loc[0], loc[1])):
            try:
                self._check_block(first, values)
            except CorruptionError as e:
                values = self._block_around_checkpoints(first, loc, e)
            self._st.mark_block_checked((first, loc[0], loc[1]))
        return first, values

    def _block_around_checkpoints(self, first: int, loc: tuple[int, int, int, int],
                                  err: CorruptionError) -> list[bytes]:
        """The values of a ``T`` or ``U`` block whose first decoding failed or did not
        pass the chain check, decoded again with every list it puts a content
        hash back from rebuilt from the records alone: a damaged chunk-list
        checkpoint (derived data, "repairable") must not make up to
        RECORD_BLOCK_MAX records unreadable.  The block is checked again;
        if that fails too, ``err`` is raised (the block itself is damaged)."""
        self._st.forget_block(first)
        pack, off, length, _ = loc
        try:
            if bytes(self._st.packs.read(pack, off, 1)) not in (S.DERIVED_BLOCK_MAGIC, S.DELTA_BLOCK_MAGIC):
                raise err  # no list was rebuilt for it: nothing to go around
            bodies: dict[int, list[bytes]] = {}
            values = self._st.record_block(
                first, loc, lambda s: self.unchecked_list(s, bodies, checkpoints=False))
            self._check_block(first, values)
        except (ValueError, zstandard.ZstdError, CorruptionError):
            self._st.forget_block(first)
            raise err from None
        self._st.note_damaged_checkpoint(
            f"a chunk-list checkpoint under the record block of records {first}..{first + len(values) - 1} "
            "is damaged")
        return values

    def _check_block(self, first: int, values: list[bytes]) -> None:
        prev: bytes | None = ZERO_HASH
        if first > 1:
            before = self._changes_get(first - 1)
            if before is None:
                prev = self._last_hash_of_block_before(first)
            else:
                prev = split_value(before)[0]
        last = first + len(values) - 1
        for i, v in enumerate(values):
            if prev is None:  # the record before cannot be read: the first link goes unchecked
                prev = split_value(v)[0]
                continue
            r, problem = check_link(v, first + i, prev)
            if problem:
                raise CorruptionError(f"the record block of records {first}..{last} is damaged: "
                                      f"record {first + i} {problem}")
            prev = r.hash

    def unchecked_list(self, seq: int, bodies: dict[int, list[bytes]] | None = None,
                       checkpoints: bool = True) -> bytes:
        """The packed full chunk list of content version ``seq``, rebuilt from
        its checkpoint or the bodies of the records it builds on, checked
        against nothing: what a ``T`` record block puts its left-out content
        hashes back from (a damaged list gives a wrong hash, which the
        block's chain check then catches).  Reads bodies only, never puts a
        block's hashes back, so decoding one block never decodes others'
        hashes.  ``bodies`` (first seq -> bodies): the blocks read so far,
        which a caller may keep across calls; ``checkpoints=False``: from the
        bodies alone, back to the version's first full list (around a damaged
        checkpoint).  ValueError if the chain cannot be followed."""
        chain: list = []
        if bodies is None:
            bodies = {}
        s = seq
        while True:
            cp = self.txn.get(S.checkpoint_key(s), db=self.dbs[S.DB_CHECKPOINTS]) if checkpoints else None
            if cp is not None:
                start = bytes(cp)
                break
            body = self._unchecked_body(s, bodies)
            try:
                rec = decode_record(bytes(HASH_LEN) + body, s)
            except Exception as e:  # noqa: BLE001 - any decode failure is damage
                raise ValueError(f"record {s} cannot be decoded: {e}") from e
            if not rec.is_content:
                raise ValueError(f"record {s} is a {rec.op}, not a content version")
            chain.append(rec.edit or [])
            if not rec.base_seq:
                start = b""
                break
            if (checkpoints and len(chain) > S.CHECKPOINT_MAX + 10) or rec.base_seq >= s:
                raise ValueError(f"chunk list of record {seq}: edit chain too long or looping at record {s}")
            s = rec.base_seq
        if len(start) % S.ENTRY_LEN:
            raise ValueError("a packed chunk list of bad length")
        packed, total = start, sum(n for (n,) in _ENTRY_LENGTH.iter_unpack(start))
        for edit in reversed(chain):
            packed, total = S.apply_edit_packed(packed, total, edit)
        return packed

    def _unchecked_body(self, seq: int, bodies: dict[int, list[bytes]]) -> bytes:
        v = self._changes_get(seq)
        if v is not None:
            return bytes(v[HASH_LEN:])
        for first, got in bodies.items():
            if first <= seq < first + len(got):
                return got[seq - first]
        cur = self.txn.cursor(db=self.dbs[S.DB_RECORD_BLOCKS])
        if not (cur.prev() if cur.set_range(S.block_key(seq + 1)) else cur.last()) \
                or not S.is_block_key(cur.key()):
            raise ValueError(f"no record {seq}")
        first = S.block_first(cur.key())
        loc = S.decode_block_loc(cur.value())
        if not first <= seq < first + loc[3]:
            raise ValueError(f"no record {seq}")
        got = bodies[first] = self._st.record_block_bodies(first, loc)
        return got[seq - first]

    def damaged_checkpoints(self) -> list[str]:
        """What reads went around so far: chunk-list checkpoints that did not
        give back what the records give (Storage.note_damaged_checkpoint)."""
        return sorted(self._st.damaged_checkpoints)

    def checkpoints(self) -> Iterator[tuple[int, bytes]]:
        """(seq, packed full chunk list) of every chunk-list checkpoint, in seq
        order (keys S.checkpoint_key in ``changes`` since format 12)."""
        cur = self.txn.cursor(db=self.dbs[S.DB_CHECKPOINTS])
        if cur.set_range(S.CHECKPOINT_PREFIX):
            for k, v in cur:
                if not S.is_checkpoint_key(k):
                    break
                yield S.checkpoint_seq(k), bytes(v)

    def _last_hash_of_block_before(self, first: int) -> bytes | None:
        """The stored hash of record ``first - 1``, the last of the block
        before (an ``S`` or ``T`` block keeps it in its frame's first 64
        bytes: no need to decode, or put back the hashes of, a whole block
        of up to RECORD_BLOCK_MAX records); None if that block is damaged
        (it says so when read): the first link goes unchecked."""
        cur = self.txn.cursor(db=self.dbs[S.DB_RECORD_BLOCKS])
        if not (cur.prev() if cur.set_range(S.block_key(first)) else cur.last()) \
                or not S.is_block_key(cur.key()):
            return None
        bfirst = S.block_first(cur.key())
        try:
            loc = S.decode_block_loc(cur.value())
            if bfirst + loc[3] != first:
                return None
            return self._st.record_block_last_hash(bfirst, loc)
        except (ValueError, zstandard.ZstdError):
            return None

    def _changes_get(self, seq: int) -> bytes | None:
        return self.txn.get(S.u64(seq), db=self.dbs[S.DB_CHANGES])

    def raw_record(self, seq: int) -> bytes | None:
        """The stored value ``hash || body`` of record ``seq``, or None."""
        v = self._changes_get(seq)
        if v is not None or seq < 1:
            return v
        blk = self._block_at(seq)
        return blk[1][seq - blk[0]] if blk else None

    def record(self, seq: int) -> Record:
        v = self.raw_record(seq)
        if v is None:
            raise NotFoundError(f"no record {seq} in the journal (head is {self.head_seq()})")
        try:
            return decode_record(v, seq)
        except Exception as e:
            raise CorruptionError(f"record {seq} cannot be decoded: {e}") from e

    def records(self, start: int = 1, end: int | None = None, reverse: bool = False) -> Iterator[Record]:
        """Records with ``start <= seq <= end`` (end None: to the head)."""
        for seq, v in self.raw_records(start, end, reverse):
            try:
                rec = decode_record(v, seq)
            except Exception as e:  # noqa: BLE001 - any decode failure is damage
                raise CorruptionError(f"record {seq} cannot be decoded: {e}") from e
            yield rec

    def raw_records(self, start: int = 1, end: int | None = None,
                    reverse: bool = False, check: bool = True) -> Iterator[tuple[int, bytes]]:
        """(seq, stored value ``hash || body``) for ``start <= seq <= end``,
        exactly as stored (replication ships these bytes so the chain
        verifies): from record blocks, then from ``changes``.  ``check=False``
        leaves record blocks unchecked (for verify, which checks every link
        itself and names the first broken record)."""
        start = max(start, 1)
        archived = self.archived_upto()
        if reverse:
            yield from self._changes(max(start, archived + 1), end, True)
            top = archived if end is None else min(end, archived)
            seq = top
            while seq >= start:
                blk = self._block_at(seq, check)
                if blk is None:
                    raise CorruptionError(f"record {seq} is in no record block")
                first, values = blk
                for s in range(seq, max(first, start) - 1, -1):
                    yield s, values[s - first]
                seq = first - 1
            return
        seq = start
        while seq <= archived and (end is None or seq <= end):
            blk = self._block_at(seq, check)
            if blk is None:
                raise CorruptionError(f"record {seq} is in no record block")
            first, values = blk
            for s in range(seq, first + len(values)):
                if end is not None and s > end:
                    return
                yield s, values[s - first]
            seq = first + len(values)
        yield from self._changes(max(start, archived + 1), end, False)

    def _changes(self, start: int, end: int | None, reverse: bool) -> Iterator[tuple[int, bytes]]:
        cur = self.txn.cursor(db=self.dbs[S.DB_CHANGES])
        if not reverse:
            if not cur.set_range(S.u64(start)):
                return
            for k, v in cur:
                seq = S.from_u64(k)
                if end is not None and seq > end:
                    break
                yield seq, bytes(v)
            return
        if end is None:
            positioned = cur.last()
        else:
            positioned = cur.prev() if cur.set_range(S.u64(end + 1)) else cur.last()
        if not positioned:
            return
        for k, v in cur.iterprev():
            if not S.is_record_key(k):  # a checkpoint's or a block's: no record before it
                break
            seq = S.from_u64(k)
            if seq < start:
                break
            yield seq, bytes(v)

    def seq_at_time(self, time_ns: int) -> int:
        """The last seq whose HLC time is <= ``time_ns`` (0 if none)."""
        hlc = (time_ns // 1_000_000 + 1) << 16
        lo, hi = 0, self.head_seq()
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.record(mid).hlc < hlc:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # --- indexes -----------------------------------------------------------
    def file_id_at(self, path: bytes) -> int | None:
        e = self.store.get_path(path)
        return e[0] if e else None

    def file_state(self, file_id: int) -> FileState | None:
        return self.store.get_file(file_id)

    def current_tree(self, prefix: bytes = b"") -> Iterator[tuple[bytes, int, str]]:
        """(path, file id, kind) of the current tree, from the ``paths`` index."""
        return self.store.iter_paths(prefix)

    def versions_of(self, file_id: int) -> list[int]:
        """Seqs of every record about ``file_id``, newest first."""
        out = seqindex.seqs(self.txn, self.dbs[S.DB_HISTORY], *seqindex.history_keys(file_id))
        out.reverse()
        return out

    def versions_under(self, prefix: bytes) -> list[int]:
        """Seqs of every record whose path or path2 is ``prefix`` or below it
        (deleted and renamed-away files included), newest first; b'' = all."""
        seqs = set()
        for pk, seq in seqindex.iter_path_seqs(self.txn, self.dbs[S.DB_PATHLOG], prefix[: S.PATH_KEY_PREFIX]):
            if S.path_key_is_hashed(pk) or len(prefix) > S.PATH_KEY_PREFIX:
                r = self.record(seq)
                paths = [r.path, r.path2]
            else:
                paths = [pk]
            if any(p is not None and (not prefix or p == prefix or p.startswith(prefix + b"/")) for p in paths):
                seqs.add(seq)
        return sorted(seqs, reverse=True)

    # --- chunk lists -------------------------------------------------------
    def _content_record(self, seq: int, base_of: int | None = None) -> Record:
        r = self.record(seq)
        if not r.is_content:
            if base_of is not None:  # the chain of a version names a record that is not one
                raise CorruptionError(f"record {base_of} builds on record {seq}, a {r.op}, "
                                      "not a content version")
            raise NotFoundError(f"record {seq} is a {r.op}, not a content version")
        return r

    def list_chain(self, seq: int) -> tuple[list[tuple[bytes, int]], list[Record]]:
        """-> (starting full list, edits to apply oldest first).

        The start is a checkpoint, or empty when the oldest record of the
        chain has ``base_seq == 0`` (its edit is a full list).
        """
        start, chain = self._packed_chain(seq)
        try:
            return S.unpack_list(start), chain
        except ValueError as e:
            raise CorruptionError(f"the checkpoint of record {chain[0].base_seq if chain else seq} "
                                  f"cannot be read: {e}") from e

    def _packed_chain(self, seq: int, checkpoints: bool = True) -> tuple[bytes, list[Record]]:
        """(packed starting list, edits oldest first) of content version
        ``seq``; ``checkpoints=False``: from the records alone, back to the
        version's first full list."""
        chain: list[Record] = []
        s = seq
        while True:
            cp = self.txn.get(S.checkpoint_key(s), db=self.dbs[S.DB_CHECKPOINTS]) if checkpoints else None
            if cp is not None:
                return bytes(cp), chain[::-1]
            r = self._content_record(s, chain[-1].seq if chain else None)
            chain.append(r)
            if not r.base_seq:
                return b"", chain[::-1]
            if (checkpoints and len(chain) > S.CHECKPOINT_MAX + 10) or r.base_seq >= s:
                raise CorruptionError(f"chunk list of record {seq}: edit chain too long or looping "
                                      f"at record {s}")
            s = r.base_seq

    def chunk_list(self, seq: int) -> list[tuple[bytes, int]]:
        """Full chunk list [(id, length)] of content version ``seq``.

        Checked against the version's size and content hash, which cover
        every record and checkpoint it was rebuilt from: one hash over the
        packed list.  A mismatch is a CorruptionError naming the file and
        version; a list is never returned unchecked."""
        packed, rec = self.packed_list(seq)
        try:
            return S.unpack_list(packed)
        except ValueError as e:  # the hash matched, so this is not reachable from stored bytes
            raise CorruptionError(f"its chunk list cannot be read: {e}", rec.path, seq) from e

    def packed_list(self, seq: int) -> tuple[bytes, Record]:
        """-> (packed full chunk list, the content record) of version ``seq``, checked.

        A list that does not check out and was built from a chunk-list
        checkpoint is rebuilt from the records alone: a damaged checkpoint
        (derived data) costs a longer read, not the version."""
        start, chain = self._packed_chain(seq)
        try:
            return self._checked_list(seq, start, chain)
        except CorruptionError as e:
            first = chain[0].base_seq if chain else seq
            if not first:  # the chain starts at a full list (base 0), not at a checkpoint
                raise
            try:
                got = self._checked_list(seq, *self._packed_chain(seq, checkpoints=False))
            except CorruptionError:
                raise e from None
            self._st.note_damaged_checkpoint(f"the chunk-list checkpoint of record {first} is damaged")
            return got

    def _checked_list(self, seq: int, start: bytes, chain: list[Record]) -> tuple[bytes, Record]:
        rec = chain[-1] if chain else self._content_record(seq)
        try:
            if len(start) % S.ENTRY_LEN:
                raise ValueError("a packed chunk list of bad length")
            packed = start
            total = sum(n for (n,) in _ENTRY_LENGTH.iter_unpack(start))
            for r in chain:
                packed, total = S.apply_edit_packed(packed, total, r.edit or [])
        except (ValueError, TypeError, OverflowError) as e:
            raise CorruptionError(f"its chunk list cannot be rebuilt: {e} (record {rec.seq} or a "
                                  "record or checkpoint it builds on is damaged)", rec.path, seq) from e
        if rec.size is not None and total != rec.size:
            raise CorruptionError(f"its chunk list adds up to {total} bytes but the version has "
                                  f"{rec.size}: record {seq} or a record or checkpoint it builds on "
                                  "is damaged", rec.path, seq)
        if not S.hash_matches(rec, packed):  # the flat hash (key 20) or the tree hash (key 22)
            raise CorruptionError(f"its chunk list does not match its content hash: record {seq} or "
                                  "a record or checkpoint it builds on is damaged", rec.path, seq)
        return packed, rec

    # --- chunks ------------------------------------------------------------
    def has_chunk(self, cid: bytes) -> bool:
        return self.txn.get(cid, db=self.dbs[S.DB_CHUNKS]) is not None

    def chunk_info(self, cid: bytes) -> ChunkInfo | None:
        v = self.txn.get(cid, db=self.dbs[S.DB_CHUNKS])
        if v is None:
            return None
        _, pack, off, length, _ = S.decode_loc(v)
        try:
            depth, raw_len, bases, _ = S.decode_chunk(self._st.packs.read(pack, off, min(length, S.CHUNK_HDR_MAX)))
        except ValueError as e:
            raise CorruptionError(f"chunk {cid.hex()} has a bad header: {e}") from e
        return ChunkInfo(raw_len, length, bases, depth)

    def raw_chunk(self, cid: bytes) -> bytes | None:
        """The stored chunk value (header, base id, payload) as in docs/format.md, or None."""
        v = self.txn.get(cid, db=self.dbs[S.DB_CHUNKS])
        if v is None:
            return None
        _, pack, off, length, _ = S.decode_loc(v)
        return self._st.packs.read(pack, off, length)

    def chunk_refs(self, cid: bytes) -> int:
        v = self.txn.get(cid, db=self.dbs[S.DB_CHUNKS])
        return S.loc_refs(v) if v else 0

    def read_chunk(self, cid: bytes, cache=None) -> bytes:
        """Raw bytes of a chunk, verified against its id.

        ``cache`` (a :class:`deltafs.chunking.RawCache`) is asked first at
        every step of a delta chain, so a chain is decoded only down to the
        first chunk already known.  Only the chunk asked for is kept in it,
        not the ancestors decoded on the way: a capture's next base is the
        chunk it asks for (or its successor), never an ancestor, and up to
        MAX_DELTA_DEPTH ancestors would evict the other files' bases.
        A read decompresses at most MAX_DELTA_DEPTH + 1 values, whatever
        the values say (:meth:`_decoded`).
        """
        return self._read(cid, cache, MAX_DELTA_DEPTH, top=True)[0]

    def _read(self, cid: bytes, cache, limit: int, top: bool = False) -> tuple[bytes, int]:
        """-> (raw bytes of ``cid``, values decompressed), at most ``limit`` + 1."""
        if cache is not None:
            raw = cache.get(cid)
            if raw is not None:
                return raw, 0
        v = self.raw_chunk(cid)
        if v is None:
            raise CorruptionError(f"chunk {cid.hex()} is missing from the journal")
        return self._decoded_n(cid, v, cache, limit, top=top)

    def read_chunks_from(self, cids: list[bytes], lens: list[int], where: tuple[int, int] | None,
                         cache=None, ahead: int = 0) -> tuple[list, tuple[int, int] | None]:
        """:meth:`read_chunks` for consecutive chunks of one file, ``lens``
        their lengths (the chunk list's), ``where`` the (pack, offset) at which
        the first one's value probably starts: what the previous call for the
        chunks before them returned, or None.

        A file's chunk values are written back to back, and a raw
        (incompressible) chunk's value is its header, the codec byte and
        its bytes, so where one ends the next probably starts: from
        ``where`` the values are read with one pread and no index lookup
        (on a cold cache each lookup of a chunk id is a random read of the
        index; a large file has ~50 chunks per MiB).  A guessed value is
        taken only if it is a standalone raw value of that length whose
        bytes have the chunk's id, the same check as a value the index
        points to gets.  From the first chunk that is not where guessed,
        :meth:`read_chunks` looks them up.  -> (the chunks as
        :meth:`read_chunks` gives them, (pack, offset) just after the last
        one's value if it was a raw one, else None)."""
        out: list = []
        i, n = 0, len(cids)
        if where is not None:
            pack, start = where
            hdr, extra = S.CHUNK_HDR, S.RAW_VALUE_EXTRA
            end = start
            for ln in lens:
                if end > start and end - start + extra + ln > _RUN_MAX:
                    break
                end += extra + ln
            try:
                buf = memoryview(self._st.packs.pread(pack, start, end - start,
                                                      ahead if end - start >= sum(lens) else 0, exact=False))
            except CorruptionError:  # the pack is gone (compacted away): look them up
                buf = memoryview(b"")
            pos = 0
            get = cache.get if cache is not None else None
            while i < n:
                ln = lens[i]
                v = buf[pos: pos + extra + ln]
                if len(v) != extra + ln or (get is not None and get(cids[i]) is not None):
                    break
                fmt, depth, raw_len = hdr.unpack_from(v)
                if fmt != S.CHUNK_FMT or depth or raw_len != ln or v[hdr.size] != CODEC_RAW:
                    break
                raw = v[extra:]
                if chunk_id(raw) != cids[i]:
                    break
                out.append(raw)
                pos += extra + ln
                i += 1
            if i == n:
                return out, (pack, start + pos)
        last: list = []
        out += self.read_chunks(cids[i:], cache, ahead, last)
        return out, (last[0], last[1]) if last else None

    def read_chunks(self, cids: list[bytes], cache=None, ahead: int = 0, last: list | None = None) -> list:
        """Raw bytes of several chunks, each verified against its id as
        :meth:`read_chunk` verifies it: the sequential reader's path (mount
        --at, the history view).

        Chunks whose values lie back to back in one pack (a file's chunks, as
        written) are read with one pread (``PackFiles.pread``; ``ahead``: bytes
        after the last run the kernel may read ahead meanwhile).  A chunk
        stored raw (incompressible) comes back as a memoryview of that read,
        not copied and not put in ``cache``: reading it again costs no
        decoding.  Compressed and delta chunks are decoded as read_chunk
        decodes them, and kept in ``cache``.  ``last``, if given, gets
        [pack, offset just after the value] of the last chunk if it was
        read from a pack and is a raw one (read_chunks_from).
        -> bytes-like objects, in order."""
        out: list = [None] * len(cids)
        todo = []  # (index, pack, offset, length) of the chunks not in the cache
        get, db = self.txn.get, self.dbs[S.DB_CHUNKS]
        for i, cid in enumerate(cids):
            if cache is not None:
                raw = cache.get(cid)
                if raw is not None:
                    out[i] = raw
                    continue
            v = get(cid, db=db)
            if v is None:
                raise CorruptionError(f"chunk {cid.hex()} is missing from the journal")
            _, pack, off, length, _ = S.decode_loc(v)
            todo.append((i, pack, off, length))
        j = 0
        while j < len(todo):
            _, pack, start, length = todo[j]
            end, k = start + length, j + 1
            while k < len(todo) and todo[k][1] == pack and todo[k][2] == end and end - start < _RUN_MAX:
                end += todo[k][3]
                k += 1
            buf = memoryview(self._st.packs.pread(pack, start, end - start, ahead if k == len(todo) else 0))
            for i, _, off, length in todo[j:k]:
                out[i] = self._decoded(cids[i], buf[off - start: off - start + length], cache, views=True)
            j = k
        if last is not None and todo and todo[-1][0] == len(cids) - 1 and isinstance(out[-1], memoryview):
            _, pack, off, length = todo[-1]
            last[:] = [pack, off + length]
        return out

    def _decoded(self, cid: bytes, v, cache, views: bool = False):
        """One chunk value -> its raw bytes, verified against ``cid``; a delta's
        bases are read through :meth:`_read`.  With ``views``, a raw
        (incompressible) chunk comes back as a memoryview of ``v``
        (read_chunks: not copied, not cached)."""
        return self._decoded_n(cid, v, cache, MAX_DELTA_DEPTH, views, top=True)[0]

    def _decoded_n(self, cid: bytes, v, cache, limit: int, views: bool = False,
                   top: bool = False) -> tuple[bytes, int]:
        """:meth:`_decoded` bounded: -> (raw, values decompressed), at most
        ``limit`` + 1 of them (each base gets what the ones before it left),
        else CorruptionError.  A valid value at depth D needs at most D + 1
        <= MAX_DELTA_DEPTH + 1 (docs/format.md, "Chunk value"), so a chain
        that loops, or bases that need more, are an error, never unbounded work."""
        n = 1
        try:
            depth, raw_len, bases, payload = S.decode_chunk(v)
            if depth > MAX_DELTA_DEPTH:
                raise ValueError(f"depth {depth} is over {MAX_DELTA_DEPTH}")
            if views and len(payload) and payload[0] == CODEC_RAW:  # (a base is not needed then)
                raw = payload[1:]
            else:
                dict_raw = None
                if bases:
                    parts = []
                    left = limit  # decompressions the bases may take together
                    for b in bases:
                        if left < 1:
                            raise ValueError(f"its delta chain needs more than {MAX_DELTA_DEPTH + 1} "
                                             "decompressions (it loops, or its bases are deeper than allowed)")
                        braw, used = self._read(b, cache, left - 1)
                        left -= used
                        n += used
                        parts.append(braw)
                    dict_raw = parts[0] if len(parts) == 1 else b"".join(parts)
                raw = decompress_chunk(payload, dict_raw)
        except CorruptionError:
            raise
        except Exception as e:
            raise CorruptionError(f"chunk {cid.hex()} cannot be decoded: {e}") from e
        if len(raw) != raw_len or chunk_id(raw) != cid:
            raise CorruptionError(f"chunk {cid.hex()} is corrupt: its content does not match its id")
        if cache is not None and top and not isinstance(raw, memoryview):
            cache.put(cid, raw)
        return raw, n

    def iter_content(self, seq: int) -> Iterator[bytes]:
        """The bytes of content version ``seq``, one chunk at a time.

        Nothing unverified is ever yielded: the chunk list is checked against
        the version's size and content hash before the first chunk, and each
        chunk against its id and its length in the list before it is yielded.
        A CorruptionError names the file and version."""
        packed, rec = self.packed_list(seq)
        for o in range(0, len(packed), S.ENTRY_LEN):
            cid = packed[o : o + S.ID_LEN]
            try:
                raw = self.read_chunk(cid)
            except CorruptionError as e:
                raise CorruptionError(e.detail, rec.path, seq) from e
            n = int.from_bytes(packed[o + S.ID_LEN : o + S.ENTRY_LEN], "big")
            if len(raw) != n:
                raise CorruptionError(f"chunk {cid.hex()} holds {len(raw)} bytes, its chunk list says {n}",
                                      rec.path, seq)
            yield raw

    def read_content(self, seq: int) -> bytes:
        """Whole content of a version (small files and tests only)."""
        return b"".join(self.iter_content(seq))

    # --- trees -------------------------------------------------------------
    def tree_at(self, seq: int | None = None, prefix: bytes = b"") -> dict[bytes, TreeEntry]:
        """The tree right after record ``seq`` (None: head).

        Built from the nearest tree checkpoint at or before ``seq`` and the
        records after it (journal/checkpoints.py): O(entries + records since
        that checkpoint); a journal without checkpoints replays from 1.
        """
        if seq is None:
            seq = self.head_seq()
        with checkpoints.gc_paused():
            return checkpoints.state_at(self, seq).tree(prefix)

    def entry_at(self, seq: int, path: bytes) -> TreeEntry | None:
        """The entry of one path right after record ``seq`` (None: nothing there).

        When no record after ``seq`` names the path, one of its ancestors
        (a rename or removal of a directory names the directory) or the file
        now at the path, the current indexes hold the answer: a few lookups.
        Otherwise it is the tree state at ``seq`` (tree checkpoint + records)."""
        if path and self._untouched_since(seq, path):
            fid = self.file_id_at(path)
            if fid is None:
                return None
            st = self.file_state(fid)
            if st is not None and (not st.last_seq or st.last_seq <= seq):
                return tree_entry(path, fid, st)
        with checkpoints.gc_paused():
            st = checkpoints.state_at(self, seq)
        return st.entry(path) if path in st.paths else None

    def _untouched_since(self, seq: int, path: bytes) -> bool:
        """No record after ``seq`` names ``path`` or a directory above it."""
        db = self.dbs[S.DB_PATHLOG]
        p = path
        while p:
            if seqindex.last_seq(self.txn, db, *seqindex.pathlog_keys(p)) > seq:
                return False
            p = p.rpartition(b"/")[0]
        return True

    def tree_changes(self, a: int, b: int, prefix: bytes = b""
                     ) -> tuple[dict[bytes, TreeEntry], dict[bytes, TreeEntry]]:
        """(before, after): the entries at ``a`` and at ``b`` (a <= b) of every
        path below ``prefix`` that records ``a+1 .. b`` may have changed; every
        other path is the same at both.  One tree state (at ``a``, from its
        checkpoint) and the records in between: O(entries + b - a), not two
        trees."""
        with checkpoints.gc_paused():
            st = checkpoints.state_at(self, a)
        st.mark(keep_orig=True)
        checkpoints.replay(self, st, a + 1, b)
        fids = st.dirty_files
        sub = prefix + b"/"

        def under(p: bytes) -> bool:
            return not prefix or p == prefix or p.startswith(sub)

        touched = set(st.dirty_paths)
        touched.update(p for p, v in st.paths.items() if v[0] in fids)
        touched.update(p for p, v in st.orig_paths.items() if v is not None and v[0] in fids)
        files_before = {fid: st.orig_files[fid] if fid in st.orig_files else st.files.get(fid)
                        for fid in {v[0] for v in st.orig_paths.values() if v is not None} | fids}
        before, after = {}, {}
        for p in sorted(touched):
            if not under(p):
                continue
            was = st.orig_paths[p] if p in st.orig_paths else st.paths.get(p)
            if was is not None:
                fb = files_before.get(was[0], st.files.get(was[0]))
                if fb is not None:
                    before[p] = st.entry(p, was, {was[0]: fb})
            now = st.paths.get(p)
            if now is not None:
                after[p] = st.entry(p, now)
        return before, after

    # --- pruned versions (docs/format.md, "Compaction and retention") -------------
    def pruned_seqs(self) -> set[int]:
        """Seqs of every content version compaction pruned."""
        db = self.dbs.get(S.DB_PRUNED)
        if db is None:
            return set()
        return {S.from_u64(k) for k in self.txn.cursor(db=db).iternext(values=False)}

    def is_pruned(self, seq: int) -> bool:
        db = self.dbs.get(S.DB_PRUNED)
        return db is not None and self.txn.get(S.u64(seq), db=db) is not None

    def pruned_info(self, seq: int) -> dict | None:
        """The ``pruned`` value of ``seq`` (``{"hlc", "t"}``; ``t``: wall time ns of
        the prune, missing in entries written before it was recorded), or None."""
        db = self.dbs.get(S.DB_PRUNED)
        v = self.txn.get(S.u64(seq), db=db) if db is not None else None
        return None if v is None else msgpack.unpackb(v, raw=False)

    def retained_content(self) -> Iterator[int]:
        """Seqs of every content version not pruned, oldest first."""
        pruned = self.pruned_seqs()
        for seq, v in self.raw_records():
            if seq not in pruned and decode_record(v, seq).is_content:
                yield seq

    def content_versions(self) -> Versions:
        """Every content version not pruned, grouped by file id (one scan of the records)."""
        out = Versions(head_hlc=self.meta(S.META_HLC, 0), head_seq=self.head_seq())
        pruned = self.pruned_seqs()
        for seq, v in self.raw_records():
            if seq in pruned:
                continue
            rec = decode_record(v, seq)
            if rec.is_content:
                out.by_file.setdefault(rec.file_id, []).append((seq, rec.hlc))
        return out

    # --- stats and small key/value stores -------------------------------------
    def meta(self, key: bytes, default=None):
        v = self.txn.get(key, db=self.dbs[S.DB_META])
        return msgpack.unpackb(v, raw=False) if v is not None else default

    def stats(self) -> dict:
        data = os.path.join(self._st.path, "data.mdb")
        return {
            "records": self.head_seq(),
            "chunks": self.txn.stat(self.dbs[S.DB_CHUNKS])["entries"],
            "files": self.meta(S.META_FILES, 0),
            "stored_bytes": self.meta(S.META_STORED, 0),
            "raw_bytes": self.meta(S.META_RAW, 0),
            "data_file_bytes": os.stat(data).st_size,
            "data_file_allocated": os.stat(data).st_blocks * 512,
            "pack_bytes": self._st.packs.total_bytes(),
        }

    def setting(self, name: str, default=None):
        return self.meta(S.META_SETTING_PREFIX + name.encode(), default)

    def kv_get(self, db: str, key: str, default=None):
        """Value of ``key`` in the generic store ``db`` ("snapshots", "mirrors")."""
        v = self.txn.get(key.encode(), db=self.dbs[S.KV_DBS[db]])
        return msgpack.unpackb(v, raw=False) if v is not None else default

    def kv_items(self, db: str) -> list[tuple[str, object]]:
        cur = self.txn.cursor(db=self.dbs[S.KV_DBS[db]])
        return [(k.decode(), msgpack.unpackb(v, raw=False)) for k, v in cur]
