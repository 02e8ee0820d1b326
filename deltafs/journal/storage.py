"""The ground floor of the journal: an open journal directory.

:class:`Storage` is the LMDB environment with every database open, the
pack files and the write lock of one journal in one process
(docs/format.md, "Environment", "Named databases", "Pack files").  The
writer (core.py), the reader (reader.py) and compaction (compact.py) all
stand on it and use only its public methods; nothing above the journal
package sees it.  It is also the only place that imports ``lmdb``: an
LMDB error that leaves a transaction here is a :class:`JournalError`.

python-lmdb refuses to open one environment twice in a process, so a
read-only opener in the writer's process (history tools run in-process,
tests) shares the writer's Storage (:meth:`Storage.share`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

import lmdb
import msgpack

from deltafs import child_env
from deltafs.chunking import CHUNKER_PARAMS
from deltafs.errors import JournalError, JournalFormatError, JournalLockedError

from . import private
from . import schema as S
from .packs import PackFiles, add_pack_live, oldest_reader_txn
from .upgrade import UPGRADABLE, upgrade

log = logging.getLogger(__name__)

MAP_SIZE = (1 << 40) if sys.maxsize > 2**32 else (1 << 30)
APART_TIMEOUT_S = 1800.0  # seconds a child of Storage.run_apart may take
BLOCKS_CHECKED_KEPT = 16_384  # record blocks remembered as checked
RECORDS_CACHED = 4096  # records of decoded record blocks kept per journal (~500 KB; blocks of 32-512)

_SHARED: dict[str, "Storage"] = {}  # path -> the Storage open on it in this process
_SHARED_LOCK = threading.Lock()


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


class Storage:
    """One journal directory open in this process (see the module docstring)."""

    def __init__(self, path: str, env: lmdb.Environment, dbs: dict[bytes, object], readonly: bool) -> None:
        self.path = path
        self.env: lmdb.Environment | None = env
        self.dbs = dbs  # every database of S.ALL_DBS and S.WRITER_DBS (the latter once they exist)
        self.readonly = readonly  # the environment's mode (a read-only Journal may share a writer's)
        self.packs = PackFiles(path)
        self.wlock = threading.Lock()  # one write transaction at a time (never wait inside LMDB)
        self.users = 1
        # decoded record blocks (immutable: a repack moves their bytes, not what they hold)
        self._blocks: OrderedDict[int, list[bytes]] = OrderedDict()
        self._blocks_records = 0  # records in _blocks
        self._blocks_lock = threading.Lock()
        self.damaged_checkpoints: set[str] = set()  # note_damaged_checkpoint
        self._blocks_checked: set[tuple[int, int, int]] = set()  # (first seq, pack, offset)
        self._watchers: list[set[bytes]] = []  # watch_values
        # Values appended to the packs whose index entries wait (Journal.spill_chunks):
        # id -> (index entry, pack, length, depth, raw length, base ids).  Touched only
        # under the write lock; the next write transaction indexes them first
        # (``index_held``, the writer's, called by :meth:`write` and by the writer's
        # own transactions), so a chunk is found once any record names it, and no
        # compaction frees, re-codes or moves anything while entries wait
        self.held: dict[bytes, tuple[bytes, int, int, int, int, tuple[bytes, ...]]] = {}
        self.held_bytes = 0
        self.index_held: Callable[[object], None] | None = None

    # --- opening and closing ----------------------------------------------------
    @classmethod
    def share(cls, path: str, readonly: bool) -> "Storage":
        """The Storage of ``path`` in this process, opened now if it is not yet."""
        with _SHARED_LOCK:
            st = _SHARED.get(path)
            if st is not None:
                if st.readonly and not readonly:
                    raise JournalError(f"journal {path} is already open read-only in this process")
                st.users += 1
                return st
            try:
                env = lmdb.open(
                    path, map_size=MAP_SIZE, max_dbs=S.MAX_DBS, readonly=readonly, lock=True,
                    sync=True, metasync=True, readahead=False, max_readers=510, subdir=True,
                    mode=private.FILE_MODE,
                )
            except lmdb.Error as exc:
                raise JournalError(f"cannot open journal {path}: {exc}") from exc
            try:
                dbs = _open_dbs(env, path, readonly)
            except BaseException:
                env.close()
                raise
            st = _SHARED[path] = cls(path, env, dbs, readonly)
            return st

    def release(self) -> None:
        """One user fewer; the last one closes the environment and the packs."""
        with _SHARED_LOCK:
            self.users -= 1
            if self.users == 0:
                del _SHARED[self.path]
                self.packs.close()
                self.env.close()
                self.env = None

    def only_user(self) -> bool:
        """Nothing else in this process has the journal open."""
        return self.users == 1

    def open_new_dbs(self) -> None:
        """A read-only opener: open the databases a writer created since."""
        if all(n in self.dbs for n in S.WRITER_DBS):
            return
        with self.wlock:  # never two opens at once (LMDB opens a database in a transaction)
            with self.env.begin() as txn:  # names of named dbs are keys of the main db
                new = [n for n in S.WRITER_DBS if n not in self.dbs and txn.get(n) is not None]
            for name in new:
                self.dbs[name] = self.env.open_db(name, create=False)

    # --- transactions -------------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (a snapshot; never blocks the writer)."""
        with translated(self.path):
            txn = self.env.begin(write=False)
            try:
                yield txn
            finally:
                txn.abort()

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction under the write lock, committed at the end of
        the block (pack bytes it names synced first: :meth:`seal`), aborted
        on an exception."""
        with translated(self.path), self.wlock:
            txn = self.env.begin(write=True)
            try:
                if self.held and self.index_held is not None:
                    self.index_held(txn)
                yield txn
                self.seal(txn)
            except BaseException:
                txn.abort()
                raise
            txn.commit()

    def seal(self, txn) -> None:
        """Before a commit: make the pack bytes it names durable and record
        the pack's committed end (docs/format.md, "Pack files")."""
        pos = self.packs.sync()
        if pos is not None:
            txn.put(S.META_PACK_END, _packb(list(pos)), db=self.dbs[S.DB_META])

    def put_value(self, txn, cid: bytes, val: bytes, depth: int, payload: bytes | memoryview = b"",
                  live: dict[int, int] | None = None) -> bool:
        """Append a chunk value to the pack and index it (refs 0), unless the
        chunk is stored already.  -> whether it was stored now.

        ``payload``: the value is ``val + payload`` (its header and its
        payload, appended one after the other: no joined copy).  ``live``:
        the pack's bytes are added to this ``pack -> bytes`` dict, for the
        caller to count once per pack (:func:`packs.add_packs_live`) before
        its transaction commits, instead of a read and a write of the pack's
        entry per chunk."""
        if txn.get(cid, db=self.dbs[S.DB_CHUNKS]) is not None:
            return False
        n = len(val) + len(payload)
        pack, off = self.packs.append(val, payload)
        self.index_value(txn, cid, S.encode_loc(0, pack, off, n, depth), pack, n, depth, live)
        return True

    def index_value(self, txn, cid: bytes, loc: bytes, pack: int, n: int, depth: int,
                    live: dict[int, int] | None = None) -> None:
        """The index entry ``loc`` of a value appended to ``pack`` (``n`` bytes):
        put, its bytes counted live (see :meth:`put_value`), watchers told."""
        txn.put(cid, loc, db=self.dbs[S.DB_CHUNKS])
        if live is None:
            add_pack_live(txn, self.dbs, pack, n)
        else:
            live[pack] = live.get(pack, 0) + n
        if depth:
            for w in self._watchers:
                w.add(cid)

    def watch_values(self) -> set[bytes]:
        """From now on, the ids of values with a base stored by :meth:`put_value`
        (any thread) are added to the returned set, until :meth:`unwatch_values`.
        The re-coding pass (recode.py) learns so of values built on a chunk after
        its snapshot; read it under the write lock to have them all."""
        w: set[bytes] = set()
        self._watchers.append(w)
        return w

    def unwatch_values(self, w: set[bytes]) -> None:
        self._watchers.remove(w)

    def rewrite_in_key_order(self, txn, db) -> int:
        """Copy ``db`` out and append it back in key order (every page full); -> pages saved."""
        return S.rewrite_in_key_order(self.env, txn, db)

    def run_apart(self, entry: str, args: list[str], timeout: float = APART_TIMEOUT_S) -> bytes:
        """Run ``entry`` ("module:function", called with ``[journal path, *args]``)
        in a child process while this process holds the write lock; -> what
        the child printed after its "ready" line.

        The child opens the environment (:func:`open_env`), prints "ready",
        waits for "go" on stdin, writes, prints its answer and exits.  Why a
        child: LMDB keeps every page a write transaction dirtied in a pool of
        the environment for later transactions and never gives it back
        (``me_dpages``, freed only when the environment closes), so a
        transaction that dirties a whole database (a rewrite in key order)
        would leave the daemon that much bigger for good
        (docs/performance-notes.md, "The soak's memory").  The child's pool
        goes when it exits.  It holds LMDB's own writer lock while it writes;
        this process holds the write lock from the child's "ready" to its
        answer, so no thread of it waits inside LMDB meanwhile."""
        mod, fn = entry.split(":")
        cmd = [sys.executable, "-c", f"import sys; from {mod} import {fn}; sys.exit({fn}(sys.argv[1:]))",
               self.path, *args]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=child_env(), close_fds=True) as child:
            try:
                ready = child.stdout.readline()
                if ready.strip() != b"ready":
                    child.kill()
                    err = child.stderr.read().decode(errors="replace").strip().splitlines()
                    raise JournalError(f"{entry} on {self.path} in a child process did not start: "
                                       f"{err[-1] if err else ready!r}")
                with self.wlock:
                    child.stdin.write(b"go\n")
                    child.stdin.flush()
                    out, err = child.communicate(timeout=timeout)
            except BaseException:
                child.kill()
                raise
        if child.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise JournalError(f"{entry} on {self.path} in a child process failed: "
                               f"{lines[-1] if lines else child.returncode}")
        return out

    # --- record blocks --------------------------------------------------------------
    def record_block(self, first: int, loc: tuple[int, int, int, int],
                     outside: Callable[[int], bytes] | None = None) -> list[bytes]:
        """The stored values of the record block starting at ``first`` (a few
        kept decoded; ``outside``: for a ``T`` block, S.decode_record_block)."""
        with self._blocks_lock:
            values = self._blocks.get(first)
            if values is not None:
                self._blocks.move_to_end(first)
                return values
        pack, off, length, count = loc
        values = S.decode_record_block(self.packs.read(pack, off, length), count, first, outside)
        with self._blocks_lock:
            if first not in self._blocks:
                self._blocks_records += len(values)
            self._blocks[first] = values
            while self._blocks_records > RECORDS_CACHED and len(self._blocks) > 1:
                self._blocks_records -= len(self._blocks.popitem(last=False)[1])
        return values

    def forget_block(self, first: int) -> None:
        """Drop the decoded values of the block starting at ``first`` (they
        did not pass the chain check: read again, another way)."""
        with self._blocks_lock:
            values = self._blocks.pop(first, None)
            if values is not None:
                self._blocks_records -= len(values)

    def note_damaged_checkpoint(self, where: str) -> None:
        """A chunk-list checkpoint did not give back what the records give:
        reads went around it (Reader); verify reports it."""
        with self._blocks_lock:
            if where not in self.damaged_checkpoints:
                log.warning("journal %s: %s; read from the records instead (deltafs verify "
                            "reports it)", self.path, where)
            if len(self.damaged_checkpoints) < 64:
                self.damaged_checkpoints.add(where)

    def record_block_last_hash(self, first: int, loc: tuple[int, int, int, int]) -> bytes:
        """The stored hash of a block's last record (S.record_block_last_hash;
        from the decoded cache when there)."""
        with self._blocks_lock:
            values = self._blocks.get(first)
        if values is not None:
            return bytes(values[-1][:S.HASH_LEN])
        pack, off, length, count = loc
        return S.record_block_last_hash(self.packs.read(pack, off, length), count)

    def record_block_bodies(self, first: int, loc: tuple[int, int, int, int]) -> list[bytes]:
        """The record bodies of a block, a ``T`` block's content hashes left
        out (S.record_block_bodies; from the decoded cache when there)."""
        with self._blocks_lock:
            values = self._blocks.get(first)
        if values is not None:
            return [v[S.HASH_LEN:] for v in values]
        pack, off, length, count = loc
        return S.record_block_bodies(self.packs.read(pack, off, length), count)

    def block_checked(self, key: tuple[int, int, int]) -> bool:
        """Has the chain through the block (first seq, pack, offset) been checked?"""
        return key in self._blocks_checked

    def mark_block_checked(self, key: tuple[int, int, int]) -> None:
        if len(self._blocks_checked) >= BLOCKS_CHECKED_KEPT:  # bounded: checking again only costs
            self._blocks_checked.clear()
        self._blocks_checked.add(key)

    # --- pack files and the data file -----------------------------------------------
    def delete_retired_packs(self) -> list[int]:
        """Delete packs emptied by compaction once no LMDB reader (in any
        process) holds a snapshot older than the move.  -> packs deleted."""
        with self.read() as txn:
            v = txn.get(S.META_PACKS_RETIRED, db=self.dbs[S.DB_META])
        retired = msgpack.unpackb(v) if v else []
        if not retired:
            return []
        self.env.reader_check()  # forget slots of dead processes
        oldest = oldest_reader_txn(self.env)
        done = [p for p, t in retired if oldest is None or oldest >= t]
        if not done:
            return []
        with self.write() as txn:
            v = txn.get(S.META_PACKS_RETIRED, db=self.dbs[S.DB_META])
            left = [[p, t] for p, t in (msgpack.unpackb(v) if v else []) if p not in done]
            self.packs.delete(done)
            if left:
                txn.put(S.META_PACKS_RETIRED, _packb(left), db=self.dbs[S.DB_META])
            else:
                txn.delete(S.META_PACKS_RETIRED, db=self.dbs[S.DB_META])
        log.info("deleted %d emptied pack file(s)", len(done))
        return done

    def page_bytes(self, skip: frozenset[bytes] = frozenset()) -> int:
        """Bytes of the LMDB pages in use by every database but ``skip``
        (data.mdb minus its free pages)."""
        with self.read() as txn:
            psize = self.env.stat()["psize"]
            st = self.env.stat()  # the main db: names of the databases
            pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            for db in {h for name, h in self.dbs.items() if name not in skip and name != S.DB_META}:
                st = txn.stat(db)
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages * psize

    def copy_compacted(self, dest: str) -> None:
        """Write a compacted copy of data.mdb into the directory ``dest``, synced, mode 0600."""
        with translated(self.path):
            self.env.copy(dest, compact=True)
        fd = os.open(os.path.join(dest, "data.mdb"), os.O_RDONLY)
        try:
            os.fchmod(fd, 0o600)  # LMDB's copy is created 0666 less the umask: the journal's is 0600
            os.fsync(fd)
        finally:
            os.close(fd)


# --- errors ---------------------------------------------------------------------------
def translate(e: BaseException, path: str) -> BaseException:
    """An LMDB error (or a full disk) as the JournalError a caller can report."""
    if isinstance(e, lmdb.MapFullError):
        return JournalError(f"journal {path} is full (LMDB map size reached)")
    if isinstance(e, lmdb.DiskError) or (isinstance(e, OSError) and e.errno == errno.ENOSPC):
        return JournalError(f"journal {path}: disk full or I/O error: {e}")
    if isinstance(e, lmdb.Error):
        return JournalError(f"journal {path}: {e}")
    return e


@contextmanager
def translated(path: str) -> Iterator[None]:
    """LMDB errors raised in the block leave it as JournalError."""
    try:
        yield
    except lmdb.Error as e:
        raise translate(e, path) from e


# --- child processes (Storage.run_apart) ---------------------------------------------------
def open_env(path: str) -> lmdb.Environment:
    """The journal's environment, opened as a writer opens it (a child of :meth:`Storage.run_apart`)."""
    return lmdb.open(path, map_size=MAP_SIZE, max_dbs=S.MAX_DBS, lock=True, sync=True, metasync=True,
                     readahead=False, max_readers=510, subdir=True, mode=private.FILE_MODE)


# --- the writer's lock file -------------------------------------------------------------
def take_lock(path: str) -> int:
    lock_path = os.path.join(path, "lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, private.FILE_MODE)
    except OSError as e:
        raise JournalError(f"cannot open the journal {path} for writing: {private.reason(e, path)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise JournalLockedError(f"journal {path} is locked by another writer (pid {pid})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the only fd drops the flock


# --- opening the databases ---------------------------------------------------------------
def _open_dbs(env: lmdb.Environment, path: str, readonly: bool) -> dict:
    """Every logical database's handle (S.SHARED_DBS share one; ``meta`` is
    the main database), after creating or upgrading the journal."""
    dbs = {}
    meta = env.open_db(None)  # the main database: meta keys since format 10
    upgrade_from = None
    with env.begin(write=not readonly) as txn:
        fmt = txn.get(S.META_FORMAT, db=meta)
        chunker = txn.get(S.META_CHUNKER, db=meta)
        if fmt is None and txn.get(S.DB_META, db=meta) is not None:  # formats 1-9: a ``meta`` database
            old_meta = env.open_db(S.DB_META, txn=txn, create=False)
            fmt = txn.get(S.META_FORMAT, db=old_meta)
            chunker = txn.get(S.META_CHUNKER, db=old_meta)
            if fmt is None:
                raise JournalFormatError(f"{path} is not an initialised deltafs journal")
        if fmt is None and readonly:
            raise JournalFormatError(f"{path} is not a deltafs journal (no format in its meta data)")
        if fmt is not None and msgpack.unpackb(fmt) in UPGRADABLE and not readonly:
            upgrade_from = msgpack.unpackb(fmt)  # after this transaction (see upgrade.py)
        elif fmt is not None:
            _check_format(path, msgpack.unpackb(fmt), chunker)
        else:
            if txn.stat(meta)["entries"]:
                raise JournalFormatError(f"{path} is not a deltafs journal (an LMDB environment of something else)")
            txn.put(S.META_FORMAT, _packb(S.FORMAT_VERSION), db=meta)
            txn.put(S.META_JOURNAL_ID, _packb(str(uuid.uuid4())), db=meta)
            txn.put(S.META_CREATED, _packb(time.time_ns()), db=meta)
            txn.put(S.META_CHUNKER, _packb(CHUNKER_PARAMS), db=meta)
            txn.put(S.META_HLC, _packb(0), db=meta)
            txn.put(S.META_FILES, _packb(0), db=meta)
            txn.put(S.META_GUARD, S.META_GUARD_VALUE, db=meta)
            log.info("created journal %s", path)
    if upgrade_from is not None:
        _check_chunker(path, chunker)
        upgrade(env, path, upgrade_from)
    for name in S.ALL_DBS:
        dup = name in S.DUP_DBS
        try:
            dbs[name] = env.open_db(name, create=not readonly, dupsort=dup, dupfixed=dup)
        except lmdb.NotFoundError:
            raise JournalFormatError(f"journal {path} lacks database {name.decode()}: damaged or of another format") from None
    dbs[S.DB_META] = meta
    for name, physical in S.SHARED_DBS.items():
        dbs[name] = dbs[physical]
    for name in S.WRITER_DBS:  # a writer makes them; a reader of a journal without them has none yet
        try:
            dbs[name] = env.open_db(name, create=not readonly)
        except lmdb.NotFoundError:
            pass
    return dbs


def _check_format(path: str, fmt, chunker: bytes | None) -> None:
    if fmt in UPGRADABLE:
        raise JournalFormatError(
            f"journal {path} has format version {fmt}; open it once for writing (deltafs mount, or "
            f"deltafs compact --journal {path}) to upgrade it to format {S.FORMAT_VERSION}")
    if fmt != S.FORMAT_VERSION:
        raise JournalFormatError(
            f"journal {path} has format version {fmt}; this deltafs reads format version {S.FORMAT_VERSION}"
        )
    _check_chunker(path, chunker)


def _check_chunker(path: str, chunker: bytes | None) -> None:
    if chunker is None or msgpack.unpackb(chunker, raw=False) != CHUNKER_PARAMS:
        raise JournalFormatError(f"journal {path} was chunked with other parameters than this deltafs uses")
