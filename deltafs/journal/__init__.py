"""The journal: the only owner of LMDB (see docs/format.md for the bytes).

Public API: the names exported here.  Everything else in this package is
internal, and code outside it imports only from ``deltafs.journal``
(tests/unit/test_imports.py keeps it so)::

    from deltafs.journal import Journal, Change, NewChunk

    j = Journal.open(path, *, readonly=False, create=False, clock=None)
        # create=True makes the directory and environment.  Writers take an
        # exclusive flock on PATH/lock (pid inside): a second writer gets
        # JournalLockedError naming the pid.  Read-only openers never lock
        # and never block the writer.  Unknown format -> JournalFormatError.
        # clock: () -> wall time in ns (tests drive the HLC with it).
        # Every database is open once the journal is.
    j.path, j.journal_id (uuid str), j.format_version, j.readonly
    j.sync_count            # write transactions committed so far (each one fsync)
    j.data_size() -> int    # bytes allocated by data.mdb
    j.close()  /  with Journal.open(...) as j: ...   # close twice: no-op

    # writing (writer only)
    j.commit(changes: Sequence[Change]) -> list[int]     # one durable txn, seqs
    j.commit_many(groups) -> list[list[int] | Exception] # one durable txn; each
                                  # group nested, so a bad one fails alone
    j.put_chunks(chunks: Sequence[NewChunk]) -> int       # chunks ahead of their record
    j.spill_chunks(chunks) -> int   # the same, values appended now, index entries held
                                  # for the next write transaction (a large capture's
    j.flush_chunks()              # spills; 64 MiB at most); ... or this one
    j.set_setting(name: str, value)                 # msgpack-able value
    j.kv_put(db, key: str, value) / j.kv_delete(db, key)   # db: "snapshots" | "mirrors"
    j.append_raw(values, chunks, pruned=()) -> int  # clone: append stored records + chunk
                                                    # values verbatim (chain checked); -> head

    # compaction (writer only; decisions are deltafs.maintenance's)
    j.prune(seqs, retained, dry_run=False) -> PruneResult
    j.repack(dead_ratio=0.5) -> RepackResult
    j.archive_records(keep=1) -> int ; j.densify_index() -> int
    j.checkpoint_trees() -> int  # tree checkpoints due (format 7); all of them on a fresh upgrade
    j.vacuum() -> ((size, allocated) before, after)   # only opener; closes j
    j.data_bytes() -> int      # packs + LMDB pages in use (--journal-limit)
    j.defer_checkpoints = True ; j.urgent = () -> bool   # a mount's writer: chunk-list
                                  # checkpoints due in a commit are left to
    j.write_due_lists() -> int    # ... this, in their own transactions (-1: yielded
    j.lists_due() -> int          # to a waiting commit); due ones left
    with exact_reads(): ...       # this thread's pack reads fetch their range only

    # checking (any opener)
    j.verify(full=False) -> VerifyResult   # .ok, .problem (seq, path, chunk, what)

    # reading (any opener; one LMDB snapshot per `with`)
    with j.reader() as r:
        r.head_seq() -> int ; r.head_hash() -> bytes
        r.record(seq) -> Record                       # NotFoundError if absent
        r.records(start=1, end=None, reverse=False) -> Iterator[Record]  # inclusive
        r.seq_at_time(time_ns) -> int                 # last seq at or before, 0 if none
        r.file_id_at(path: bytes) -> int | None       # current tree
        r.file_state(file_id) -> FileState | None     # also for deleted files
        r.current_tree(prefix=b"") -> Iterator[(path, file_id, kind)]
        r.versions_of(file_id) -> list[int]           # newest first, all ops
        r.versions_under(path_prefix: bytes) -> list[int]  # by path or path2, newest first
        r.chunk_list(seq) -> list[(id, length)]       # content versions only
        r.has_chunk(id) -> bool ; r.chunk_info(id) -> ChunkInfo | None ; r.chunk_refs(id) -> int
        r.read_chunk(id) -> bytes                     # verified; CorruptionError names it
        r.raw_records(start=1, end=None) -> Iterator[(seq, stored value)]  # replication
        r.raw_chunk(id) -> bytes | None               # stored chunk value (replication)
        r.iter_content(seq) -> Iterator[bytes]        # chunk by chunk
        r.read_content(seq) -> bytes                  # small files / tests
        r.tree_at(seq=None, prefix=b"") -> dict[path, TreeEntry]   # nearest tree checkpoint
                                      # + the records after it (O(entries + records since))
        r.tree_changes(a, b, prefix=b"") -> (before, after)  # entries at a and at b of the
                                      # paths records a+1..b may have changed (diff)
        r.pruned_seqs() -> set[int] ; r.is_pruned(seq) ; r.pruned_info(seq) -> dict | None
        r.retained_content() -> Iterator[int] ; r.content_versions() -> Versions
        r.stats() -> dict  # records, chunks, files, stored_bytes, raw_bytes, data_file_bytes, data_file_allocated
        r.setting(name, default=None) ; r.kv_get(db, key, default=None) ; r.kv_items(db)

    An LMDB error inside a reader or a write is a JournalError (deltafs.errors).

Change (input, built by capture in worker threads; the writer assigns seq,
HLC, hashes): op in {create, mkdir, symlink, mknod, link, unlink, rmdir,
rename, setattr, setxattr, removexattr, write}; file_id (caller-chosen u64,
stable across renames); path (bytes relative to SRC, b"" = root); path2
(rename target / new link path); target (symlink); mode, uid, gid,
mtime_ns, size, rdev, flags (rename: RENAME_EXCHANGE); xattr_name,
xattr_value; and for op="write": cause in {write, fsync, preimage, scan,
restore, rename-over}, base_seq (the content version the edit was computed
against, 0 = none), edit = [(old_start, old_count, [(id, length), ...])]
(``chunking.Rechunk.edit_list(old)``), chunks = [NewChunk] (new chunks; known
ones are deduplicated).

Capture recipe for a content version (worker thread, no journal lock)::

    with j.reader() as r:
        old = r.chunk_list(base_seq) if base_seq else []
        # re-chunk around the dirty ranges; each new chunk is compressed
        # against the old chunk it replaces (chunking.BaseFinder)
        res, new_chunks = capture.capture_chunks(r, pread, new_size, old, dirty)
    j.commit_many([[Change(op="write", file_id=..., path=..., size=new_size,
                           cause="fsync", base_seq=base_seq, edit=res.edit_list(old),
                           chunks=new_chunks)]])

The codecs (``check_link``, ``decode_record``, ``decode_chunk``,
``ZERO_HASH``) are exported for mirrors, which ship stored records and
chunk values as they are.
"""

from deltafs.chunking import NewChunk

from .checkpoints import gc_paused
from .compact import REPACK_DEAD_RATIO, PruneResult, RepackResult
from .core import Journal
from .hlc import hlc_to_ns, ns_to_hlc
from .packs import exact_reads
from .private import make_dir as make_journal_dir, reason as access_problem
from .reader import ChunkInfo, Reader, Versions
from .records import CAUSES, OPS, RENAME_EXCHANGE, ZERO_HASH, Change, Record, check_link, decode_record
from .schema import (CHECKPOINT_EVERY, FORMAT_VERSION, RAW_VALUE_EXTRA, content_hash, decode_chunk, hash_matches,
                     pack_list, packed_hash)
from .state import KIND_DIR, KIND_FILE, KIND_SPECIAL, KIND_SYMLINK, FileState, MemStore, TreeEntry, apply_record, \
    tree_entry
from .storage import MAP_SIZE
from .upgrade import UPGRADABLE
from .verify import Problem, VerifyResult

__all__ = [
    "CAUSES", "CHECKPOINT_EVERY", "FORMAT_VERSION", "RAW_VALUE_EXTRA", "KIND_DIR", "KIND_FILE", "KIND_SPECIAL",
    "KIND_SYMLINK", "MAP_SIZE", "OPS", "RENAME_EXCHANGE", "REPACK_DEAD_RATIO", "UPGRADABLE", "ZERO_HASH", "Change",
    "ChunkInfo", "FileState", "Journal", "MemStore", "NewChunk", "Problem", "PruneResult", "Reader",
    "Record", "RepackResult", "TreeEntry", "VerifyResult", "Versions", "access_problem",
    "apply_record", "check_link", "content_hash", "decode_chunk", "decode_record", "exact_reads", "gc_paused", "hash_matches",
    "hlc_to_ns", "make_journal_dir", "ns_to_hlc", "pack_list", "packed_hash", "tree_entry",
]
