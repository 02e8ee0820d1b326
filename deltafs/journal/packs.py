"""Append-only pack files: where a format-2 journal keeps its chunk values.

LMDB holds the index (``chunks``: chunk id -> refs, pack, offset, length,
depth); the values themselves are appended back to back to numbered files
in ``JOURNAL/packs/``.  A value never moves inside a file; compaction
copies the live values of a mostly dead pack to the current one and
deletes the old file once no LMDB reader can still see the old locations
(docs/format.md, "Pack files").

Why not LMDB values: a chunk value over ~2 KiB takes whole 4 KiB overflow
pages, and random 16-byte keys leave leaf pages 60-75 % full, so a
journal of small deltas spent 1.6-1.8x the bytes it stored.

Durability: the writer appends with ``pwrite`` (big flushes mostly with
O_DIRECT, see ``PackFiles._flush``: same bytes, same offsets) and, before the LMDB
transaction that names the new values commits, ``fdatasync``s every pack
it wrote to (and the directory when it created one); the committed end of
the current pack is kept in ``meta`` in the same transaction.  At open a
writer cuts the current pack back to that end and deletes newer packs, so
bytes of a transaction that never committed disappear.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import threading
import time

import msgpack

from deltafs.errors import CorruptionError

from . import schema as S

log = logging.getLogger(__name__)

PACK_DIR = "packs"
PACK_MAGIC = b"DFSJPK2\n"  # first 8 bytes of every pack file
PACK_MAX = 256 << 20  # a pack is closed once it holds this much
FLUSH_BYTES = 4 << 20  # appended values are written out in pieces of about this size
# a flush of at least DIRECT_MIN bytes writes its DIRECT_ALIGN-aligned middle with
# O_DIRECT: no page-cache copy (a buffered write of fresh pages costs the
# daemon 0.6-1.7 s of CPU per GiB here, O_DIRECT 0.1 s; docs/performance-notes.md)
DIRECT_ALIGN = 4096
DIRECT_MIN = 1 << 20
_BUF_CAPACITY = FLUSH_BYTES + (256 << 10)  # the write buffer's usual size (grown for a bigger value, then back)
FORGET_EVERY = 5.0  # seconds between a reader's checks for pack files deleted elsewhere
_NAME = re.compile(r"^([0-9a-f]{8})\.pack$")
_PAGE = mmap.PAGESIZE
# Reads from a pack's map fault its pages in, and the kernel reads around a
# faulting page up to the device's read-ahead (8 MiB on the bench machine's
# disk: a cold small edit's delta base cost 8 MiB of reads, ~4 ms).  A thread
# inside exact_reads() asks for exactly the range it slices (MADV_WILLNEED)
# first, so the fault finds its pages in the page cache and reads no more.
_exact = threading.local()


class exact_reads:
    """Within (this thread): pack map reads fetch their own range and no
    read-around (a capture's delta bases: a few random chunks, issue 19)."""

    def __enter__(self) -> None:
        self.prev = getattr(_exact, "on", False)
        _exact.on = True

    def __exit__(self, *exc) -> None:
        _exact.on = self.prev


def pack_name(n: int) -> str:
    return f"{n:08x}.pack"


class _WriteBuffer:
    """The writer's appended, not yet written bytes, in page-aligned memory
    placed so that a byte's address and its pack offset agree modulo
    DIRECT_ALIGN: the aligned middle of a flush goes to O_DIRECT straight
    from here (before: copied into a staging buffer first, one more copy of
    every stored byte, ~0.1 s of CPU per GiB; issue 19).  An anonymous map
    made once and reused: no reallocation as a bytearray grows and shrinks.

    ``lead`` bytes of the map come before byte 0 of the buffer (lead is
    the pack offset of byte 0 modulo DIRECT_ALIGN)."""

    def __init__(self) -> None:
        self.mem: mmap.mmap | None = None
        self.lead = 0
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def append(self, data) -> None:
        k = len(data)
        end = self.lead + self.n + k
        if self.mem is None or end > len(self.mem):
            self._grow(end)
        self.mem[self.lead + self.n : end] = data
        self.n += k

    def _grow(self, need: int) -> None:
        cap = max(_BUF_CAPACITY, -(-need // mmap.PAGESIZE) * mmap.PAGESIZE)
        mem = mmap.mmap(-1, cap)
        if self.mem is not None and self.n:
            mem[self.lead : self.lead + self.n] = self.mem[self.lead : self.lead + self.n]
        self.mem = mem  # the old map goes with its last view

    def read(self, o: int, length: int) -> bytes:
        """Bytes [o, o + length) of the buffer (clipped to what it holds)."""
        end = min(o + length, self.n)
        return self.mem[self.lead + o : self.lead + end] if end > o else b""

    def view(self, start: int, end: int) -> memoryview:
        """A view of bytes [start, end): release it (``with``) before the buffer changes."""
        return memoryview(self.mem)[self.lead + start : self.lead + end]

    def consume(self, k: int, at: int) -> None:
        """Drop the first ``k`` bytes; the rest starts at pack offset ``at``."""
        rest = self.n - k
        lead = at % DIRECT_ALIGN
        if rest:
            self.mem[lead : lead + rest] = self.mem[self.lead + k : self.lead + self.n]
        self.lead, self.n = lead, rest
        if rest == 0 and self.mem is not None and len(self.mem) > _BUF_CAPACITY:
            self.mem = None  # grown for a big value: back to the usual size at the next append

    def reset(self, at: int) -> None:
        self.lead, self.n = at % DIRECT_ALIGN, 0

    def release(self) -> None:
        self.mem, self.lead, self.n = None, 0, 0


class PackFiles:
    """The pack files of one journal in one process (shared by its openers)."""

    def __init__(self, journal_path: str) -> None:
        self.dir = os.path.join(journal_path, PACK_DIR)
        # read-only maps of the packs (reads are slices: no system call, so a
        # reader thread never hands the GIL to the busy FUSE thread mid-read)
        self._maps: dict[int, mmap.mmap] = {}
        self._forgot = time.monotonic()  # last forget_deleted pass
        self._lock = threading.Lock()
        self.current = 0  # writer: the pack being appended to (0: none yet)
        self.end = 0  # writer: its length, buffered bytes included
        self._written = 0  # writer: bytes of the current pack in the file (the rest in _buf)
        self._buf = _WriteBuffer()
        self._wfd: int | None = None
        self._dfd: int | None = None  # O_DIRECT descriptor of the current pack (None: not supported)
        self._direct_ok = hasattr(os, "O_DIRECT")
        self._unsynced: dict[int, int] = {}  # pack -> write fd with bytes not yet synced
        self._new_file = False  # a pack file created since the last sync (fsync the dir)

    # --- reading -----------------------------------------------------------------
    def path(self, pack: int) -> str:
        return os.path.join(self.dir, pack_name(pack))

    def read(self, pack: int, offset: int, length: int) -> bytes:
        if pack == self.current and offset >= self._written and self._wfd is not None:
            with self._lock:  # the writer's own transaction, not written out yet
                if offset >= self._written:
                    return self._buf.read(offset - self._written, length)
        m = self._maps.get(pack)
        if m is None or offset + length > len(m):
            m = self._map(pack, offset + length)
        if getattr(_exact, "on", False) and length:
            start = offset - offset % _PAGE
            try:
                m.madvise(mmap.MADV_WILLNEED, start, offset + length - start)
            except (OSError, ValueError):  # advice only
                pass
        return m[offset : offset + length]

    def pread(self, pack: int, offset: int, length: int, ahead: int = 0, exact: bool = True) -> bytes:
        """The bytes :meth:`read` gives, read with pread(2) on a descriptor of
        its own (opened and closed here: nothing outlives the call, a pack
        deleted meanwhile is simply missing) instead of sliced from the map.

        For long sequential reads (``Reader.read_chunks``: mount --at and the
        history view): the pages do not count in the reader's resident size
        as mapped ones do, and ``ahead`` > 0 asks the kernel to read that
        many bytes after the range in the background (POSIX_FADV_WILLNEED),
        so the disk works while the caller decodes what it got.  With
        ``exact`` False a range past the pack's end comes back short, not as
        a CorruptionError (a guessed range: Reader.read_chunks)."""
        if pack == self.current and self._wfd is not None and offset + length > self._written:
            return self.read(pack, offset, length)  # the writer's own unwritten bytes
        try:
            fd = os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptionError(f"pack file {self.path(pack)} is missing") from None
        try:
            data = os.pread(fd, length, offset)
            if ahead > 0:
                os.posix_fadvise(fd, offset + length, ahead, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        if len(data) != length and exact:
            raise CorruptionError(f"pack {self.path(pack)} is truncated: a chunk ends at {offset + length}")
        return data

    def _map(self, pack: int, need: int) -> mmap.mmap:
        """(Re)map a pack; a longer map when it grew since it was mapped."""
        with self._lock:
            m = self._maps.get(pack)
            if m is not None and need <= len(m):
                return m
            try:
                fd = os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptionError(f"pack file {self.path(pack)} is missing") from None
            try:
                size = os.fstat(fd).st_size
                if size < need:
                    raise CorruptionError(f"pack {self.path(pack)} is truncated: {size} bytes, "
                                          f"a chunk ends at {need}")
                m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._maps[pack] = m  # an old map stays valid for threads still slicing it
            return m

    def forget_deleted(self, every: float = FORGET_EVERY) -> int:
        """Drop the maps of pack files another process's compaction deleted
        (at most once per ``every`` seconds); -> maps dropped.

        A map keeps a deleted file's disk space allocated, so a long-lived
        reader (``deltafs log --watch``, a replication pass from another
        process) would otherwise hold every pack repacked while it runs.  No
        snapshot still names a deleted pack (the writer deletes a pack only
        once every older snapshot is gone), and a thread slicing a dropped
        map keeps it alive until it is done.
        """
        now = time.monotonic()
        if now - self._forgot < every:
            return 0
        self._forgot = now
        with self._lock:
            gone = [p for p in self._maps if not os.path.exists(self.path(p))]
            for p in gone:
                del self._maps[p]
        return len(gone)

    def on_disk(self) -> dict[int, int]:
        """pack number -> file size, of every pack file present."""
        out = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            m = _NAME.match(name)
            if m:
                try:
                    out[int(m.group(1), 16)] = os.stat(os.path.join(self.dir, name)).st_size
                except FileNotFoundError:
                    pass
        return out

    def total_bytes(self) -> int:
        return sum(self.on_disk().values())

    # --- writing (the journal's writer only, under its write lock) -----------------
    def open_writer(self, pack: int, end: int) -> None:
        """Resume appending at the committed position (``pack``, ``end``):
        cut the current pack back to ``end``, delete packs a crashed
        transaction created after it."""
        self.close_writer()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for p in self.on_disk():
            if p > pack:
                os.unlink(self.path(p))
        if pack:
            fd = os.open(self.path(pack), os.O_RDWR | os.O_CLOEXEC)
            size = os.fstat(fd).st_size
            if size < end:
                os.close(fd)
                raise CorruptionError(f"pack {self.path(pack)} holds {size} bytes, the journal committed {end}")
            if size > end:
                os.ftruncate(fd, end)
                os.fsync(fd)
            self._wfd, self.current, self.end, self._written = fd, pack, end, end
            self._buf.reset(end)
            self._open_direct()

    def append(self, value: bytes, more: bytes | memoryview = b"") -> tuple[int, int]:
        """Add ``value`` (then ``more``: a chunk value's header and its payload,
        never joined into one more copy of the chunk) at the end of the
        current pack (buffered until :meth:`sync`). -> (pack, offset)."""
        n = len(value) + len(more)
        if self._wfd is None or (self.end + n > PACK_MAX and self.end > len(PACK_MAGIC)):
            self.roll()
        off = self.end
        with self._lock:
            self._buf.append(value)
            if more:
                self._buf.append(more)
            self.end += n
        if len(self._buf) >= FLUSH_BYTES:
            self._flush(final=False)
        self._unsynced[self.current] = self._wfd
        return self.current, off

    def _flush(self, final: bool = True) -> None:
        """Write the buffered values out.  A big flush writes its aligned
        middle with O_DIRECT, the unaligned head (up to the next DIRECT_ALIGN
        boundary) buffered, and keeps the unaligned tail for the next flush
        unless ``final``: no page of a pack is ever written both ways, so
        the page cache (and the readers' maps) never hold a stale page."""
        if not self._buf:
            return
        total = len(self._buf)
        done = 0
        if self._dfd is not None and total >= DIRECT_MIN:
            head = -self._written % DIRECT_ALIGN
            body = (total - head) // DIRECT_ALIGN * DIRECT_ALIGN
            if body:
                self._pwrite(0, head)
                done = head + self._write_direct(head, head + body)
                if not final:
                    total = done
        if done < total:
            self._pwrite(done, total)
        with self._lock:
            self._buf.consume(total, self._written + total)
            self._written += total

    # Views of _buf live only inside these ``with`` blocks: a view kept alive
    # by a failed write's traceback would pin the buffer (BufferError on the
    # next append), and the journal must go on after a full disk.
    def _pwrite(self, start: int, end: int) -> None:
        """Write _buf[start:end] at its place in the current pack, through the page cache."""
        if end <= start:
            return
        with self._buf.view(start, end) as part:
            n = os.pwrite(self._wfd, part, self._written + start)
        if n != end - start:
            raise OSError(f"short write to {self.path(self.current)}")

    def _write_direct(self, start: int, end: int) -> int:
        """O_DIRECT-write _buf[start:end] (aligned offset and length) at its
        place; -> bytes written (0: O_DIRECT refused here, now turned off:
        the caller writes them buffered)."""
        pos = start
        while pos < end:
            n = min(end - pos, FLUSH_BYTES)
            with self._buf.view(pos, pos + n) as part:  # aligned: see _WriteBuffer
                try:
                    w = os.pwrite(self._dfd, part, self._written + pos)
                except OSError as e:
                    if e.errno != errno.EINVAL or pos != start:
                        raise
                    w = -1
            if w < 0:
                self._close_direct()
                self._direct_ok = False  # e.g. a file system that takes O_DIRECT opens only
                return 0
            if w != n:
                raise OSError(f"short write to {self.path(self.current)}")
            pos += n
        return end - start

    def _open_direct(self) -> None:
        self._close_direct()
        if self._direct_ok:
            try:
                self._dfd = os.open(self.path(self.current), os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:  # EINVAL: tmpfs and others without O_DIRECT
                self._direct_ok = False

    def _close_direct(self) -> None:
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None

    def roll(self) -> None:
        """Close the current pack; the next value starts a new one."""
        if self._wfd is not None:
            self._flush()
        pack = self.current + 1
        fd = os.open(self.path(pack), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask (journal/private.py)
        os.pwrite(fd, PACK_MAGIC, 0)
        old = self._wfd
        if old is not None and self.current not in self._unsynced:
            os.close(old)  # else closed by sync() after its fdatasync
        self._wfd, self.current, self.end, self._written = fd, pack, len(PACK_MAGIC), len(PACK_MAGIC)
        self._buf.reset(self._written)
        self._unsynced[pack] = fd
        self._new_file = True
        self._open_direct()

    def sync(self) -> tuple[int, int] | None:
        """Make every appended byte durable (call before the LMDB commit that
        names them).  -> the position to record in ``meta``, or None when
        nothing was appended since the last call."""
        if not self._unsynced:
            return None
        self._flush()
        for pack, fd in list(self._unsynced.items()):
            os.fdatasync(fd)
            if fd != self._wfd:
                os.close(fd)
        self._unsynced.clear()
        if self._new_file:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._new_file = False
        return self.current, self.end

    def delete(self, packs) -> None:
        """Remove pack files no reader can reach any more."""
        with self._lock:
            for p in packs:
                self._maps.pop(p, None)
                try:
                    os.unlink(self.path(p))
                except FileNotFoundError:
                    pass

    def close_writer(self) -> None:
        """Drop the write side (bytes not synced are of no committed transaction)."""
        for fd in set(self._unsynced.values()) | ({self._wfd} if self._wfd is not None else set()):
            os.close(fd)
        self._unsynced.clear()
        self._close_direct()
        self._wfd = None
        self.current = self.end = self._written = 0
        self._buf.release()

    def close(self) -> None:
        self.close_writer()
        with self._lock:
            self._maps.clear()  # each map is unmapped when its last user drops it


# --- the chunk index and pack accounting (inside the writer's transactions) ------------
def incref(txn, dbs, cid: bytes, n: int = 1) -> None:
    """Count ``n`` more references to a stored chunk (its index entry)."""
    db = dbs[S.DB_CHUNKS]
    v = txn.get(cid, db=db)
    if v is None:
        raise CorruptionError(f"chunk {cid.hex()} is named but not stored")
    txn.put(cid, S.add_refs(v, n), db=db)


def decref(txn, dbs, cid: bytes, zero: list[bytes], what: str) -> None:
    """Count one reference fewer to a chunk (never below 0); a chunk left at 0
    joins ``zero`` (the caller frees it).  ``what`` names what held the
    reference, for the warning a missing chunk or a count already at 0 gives."""
    db = dbs[S.DB_CHUNKS]
    v = txn.get(cid, db=db)
    if v is None:
        log.warning("chunk %s: %s names it but it is not stored", cid.hex(), what)
        return
    n = S.loc_refs(v)
    if n == 0:
        log.warning("chunk %s: reference count already 0 (%s)", cid.hex(), what)
    txn.put(cid, S.with_refs(v, max(0, n - 1)), db=db)
    if n <= 1:
        zero.append(cid)


def add_packs_live(txn, dbs, live: dict[int, int]) -> None:
    """:func:`add_pack_live` for each ``pack -> bytes`` of ``live`` (a writer
    transaction's new values counted once per pack, not once per chunk)."""
    for pack, n in live.items():
        if n:
            add_pack_live(txn, dbs, pack, n)


def add_pack_live(txn, dbs, pack: int, n: int) -> None:
    """Bytes of chunk values the index names in ``pack`` (+= n)."""
    key = S.pack_live_key(pack)
    v = txn.get(key, db=dbs[S.DB_META])
    live = (msgpack.unpackb(v) if v else 0) + n
    if live:
        txn.put(key, msgpack.packb(live), db=dbs[S.DB_META])
    else:
        txn.delete(key, db=dbs[S.DB_META])


def pack_live(txn, dbs) -> dict[int, int]:
    """pack -> live bytes, from ``meta``."""
    cur = txn.cursor(db=dbs[S.DB_META])
    out = {}
    if cur.set_range(S.META_PACK_LIVE_PREFIX):
        for k, v in cur:
            if not k.startswith(S.META_PACK_LIVE_PREFIX):
                break
            out[int.from_bytes(k[len(S.META_PACK_LIVE_PREFIX):], "big")] = msgpack.unpackb(v)
    return out


def oldest_reader_txn(env) -> int | None:
    """Snapshot (txn id) of the oldest active LMDB reader of any process, or None."""
    ids = []
    for line in env.readers().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            ids.append(int(parts[2]))
    return min(ids) if ids else None
