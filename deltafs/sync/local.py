"""Applying states to SRC and journaling them (no mount: the journal writer is ours).

Every path is reached component by component with ``O_NOFOLLOW``, so a
symlink planted in SRC can never redirect a write out of the tree.  A file
is written to an ignored temp name in its directory, fsynced, given its
mode and mtime, and renamed over the path: a reader of SRC sees the old
content or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from deltafs import capture, chunking
from deltafs.journal import Change, Journal, packed_hash

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

TEMP_PREFIX = b".deltafs-sync-"  # + random + ".tmp": matches the built-in ignore pattern *.tmp
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class View:
    """What the journal's current tree says of one path (kind None: nothing there)."""

    kind: str | None = None  # f d l (n: special, never synced)
    seq: int = 0  # latest content version (files)
    chash: bytes | None = None
    size: int = 0
    mode: int = 0
    mtime_ns: int | None = None
    target: bytes | None = None
    hlc: int = 0


_FLAT: "OrderedDict[bytes, bytes]" = OrderedDict()  # record chain hash -> flat hash of its list
_FLAT_MAX = 256


def sync_hash(r, rec) -> bytes | None:
    """The content hash a sync group event names a version by: the flat hash
    (blake2b-256 of the packed list), whatever the record carries.  A format-11
    record of a list over one tree page carries the tree hash instead; its
    flat hash is computed from the list (O(file), cached per record), so that
    one content is named the same by every member, whether its record was
    written before format 11 or after, by this deltafs or an older one
    (docs/sync.md: a different name would be a spurious conflict)."""
    if rec.content_tree is None:
        return rec.content_hash
    if r.is_pruned(rec.seq):  # its list is gone: no flat name (None equals no event's hash)
        return None
    hit = _FLAT.get(rec.hash)
    if hit is None:
        packed, _ = r.packed_list(rec.seq)
        hit = _FLAT[rec.hash] = packed_hash(packed)
        while len(_FLAT) > _FLAT_MAX:
            _FLAT.popitem(last=False)
    return hit


def journal_view(r, path: bytes) -> View:
    fid = r.file_id_at(path)
    fs = r.file_state(fid) if fid else None
    if fs is None or fs.deleted or path not in fs.links:
        return View()
    v = View(kind=fs.kind, seq=fs.content_seq, size=fs.size, mode=(fs.mode or 0) & 0o7777,
             mtime_ns=fs.mtime_ns, target=fs.target)
    if fs.kind == "f" and fs.content_seq:
        rec = r.record(fs.content_seq)
        v.chash = sync_hash(r, rec)
    if fs.last_seq:
        v.hlc = r.record(fs.last_seq).hlc
    return v


def open_dir(root: bytes, rel: bytes, create: bool = False, created: list | None = None) -> int:
    """A descriptor of directory root/rel, walking it without following symlinks.

    ``create``: make missing directories (0755 before umask), appending each to ``created``."""
    fd = os.open(root, _DIR_FLAGS)
    done = b""
    try:
        for part in [p for p in rel.split(b"/") if p]:
            done = done + b"/" + part if done else part
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                if created is not None:
                    created.append(done)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def split_path(path: bytes) -> tuple[bytes, bytes]:
    head, _, name = path.rpartition(b"/")
    return head, name


def read_target(src: str, path: bytes) -> bytes | None:
    """The target of SRC's symlink at path (None: none there)."""
    head, name = split_path(path)
    try:
        dfd = open_dir(os.fsencode(src), head)
    except OSError:
        return None
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)


def lstat(src: str, path: bytes) -> os.stat_result | None:
    head, name = split_path(path)
    try:
        dfd = open_dir(os.fsencode(src), head)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)


def matches(st: os.stat_result | None, v: View) -> bool:
    """Does SRC's lstat agree with the journal's view (nothing changed unjournaled)?"""
    if v.kind is None:
        return st is None
    if st is None:
        return False
    if v.kind == "f":
        return stat.S_ISREG(st.st_mode) and st.st_size == v.size and (v.mtime_ns is None or st.st_mtime_ns == v.mtime_ns)
    if v.kind == "d":
        return stat.S_ISDIR(st.st_mode)
    if v.kind == "l":
        return stat.S_ISLNK(st.st_mode)
    return False


def same_bytes(src: str, path: bytes, refs: list) -> bool:
    """Does SRC's file at path hold exactly the content of chunk list ``refs``?
    (hashed at the list's own boundaries; reads the file)"""
    head, name = split_path(path)
    try:
        dfd = open_dir(os.fsencode(src), head)
    except OSError:
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return False
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != sum(n for _, n in refs):
            return False
        if not refs:
            return True
        return not chunking.changed_ranges(lambda off, n: os.pread(fd, n, off), st.st_size, refs)
    finally:
        os.close(fd)


class LocalIO:
    """SRC writes plus journaling for an unmounted member (this process holds the writer)."""

    mounted = False

    def __init__(self, journal: Journal, src: str, cause: str = "sync") -> None:
        self.journal = journal
        self.src = src
        self.root = os.fsencode(src)
        self.cause = cause
        self.origins: dict[bytes, str] = {}  # path -> "DEVICE:N" being applied (journal format 8)

    def tag(self, path: bytes, origin: str) -> None:
        """The next records of ``path`` apply the group event ``origin`` (record key 21)."""
        self.origins[path] = origin

    def untag(self, path: bytes) -> None:
        self.origins.pop(path, None)

    # -- checks ------------------------------------------------------------------
    def settled(self, path: bytes, view: View) -> bool:
        """Does SRC hold what the journal last recorded at path (no save unjournaled)?"""
        st = lstat(self.src, path)
        if matches(st, view):
            return True
        if view.kind == "f" and st is not None and stat.S_ISREG(st.st_mode) and st.st_size == view.size:
            # same size, other mtime (the kernel's writeback cache sets mtime after the
            # capture, a touch): compare the bytes with the recorded version
            with self.journal.reader() as r:
                refs = r.chunk_list(view.seq) if view.seq else []
            return same_bytes(self.src, path, refs)
        return False

    def busy(self, path: bytes) -> bool:
        """Is the file open for writing? (Nothing is open without a mount.)"""
        return False

    # -- writes --------------------------------------------------------------------
    def write_file(self, path: bytes, pieces, mode: int, mtime_ns: int | None, created: list) -> None:
        head, name = split_path(path)
        dfd = open_dir(self.root, head, create=True, created=created)
        tmp = TEMP_PREFIX + uuid.uuid4().hex.encode() + b".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                off = 0
                for data in pieces:
                    if data.count(0) == len(data):  # keep holes holes
                        off += len(data)
                        continue
                    view = memoryview(data)
                    while view:
                        w = os.pwrite(fd, view, off)
                        off += w
                        view = view[w:]
                os.ftruncate(fd, off)
                os.fchmod(fd, mode & 0o7777 or 0o644)
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                _remove_tree(dfd, name)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            tmp = None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
            os.close(dfd)

    def write_symlink(self, path: bytes, target: bytes, created: list) -> None:
        head, name = split_path(path)
        dfd = open_dir(self.root, head, create=True, created=created)
        try:
            tmp = TEMP_PREFIX + uuid.uuid4().hex.encode() + b".tmp"
            os.symlink(target, tmp, dir_fd=dfd)
            st = _lstat_at(dfd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                _remove_tree(dfd, name)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)

    def make_dir(self, path: bytes, mode: int, created: list) -> None:
        head, name = split_path(path)
        dfd = open_dir(self.root, head, create=True, created=created)
        try:
            st = _lstat_at(dfd, name)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dfd)
                st = None
            if st is None:
                os.mkdir(name, 0o755, dir_fd=dfd)
            os.chmod(name, mode & 0o7777 or 0o755, dir_fd=dfd, follow_symlinks=False) if mode else None
        finally:
            os.close(dfd)

    def remove(self, path: bytes) -> bool:
        """Unlink a file or symlink, rmdir an empty directory; False if a non-empty
        directory stays (a delete never takes files it did not know)."""
        head, name = split_path(path)
        try:
            dfd = open_dir(self.root, head)
        except (FileNotFoundError, NotADirectoryError):
            return True
        try:
            st = _lstat_at(dfd, name)
            if st is None:
                return True
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.rmdir(name, dir_fd=dfd)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        return False
                    raise
            else:
                os.unlink(name, dir_fd=dfd)
            return True
        finally:
            os.close(dfd)

    def flush(self) -> None:
        """Make what the writes put in SRC durable (one syncfs for a batch, not an fsync per
        file): before the journal records it, so a crash never leaves a journaled version
        that SRC lost."""
        fd = os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    # -- journaling ----------------------------------------------------------------
    def record(self, paths) -> dict[bytes, int]:
        """Journal what SRC holds at ``paths`` now (parents before children); -> path: content seq."""
        changes = []
        for p in sorted(set(paths), key=lambda p: (p.count(b"/"), p)):
            origin = self.origins.pop(p, None)
            got = changes_for(self.journal, self.src, p, self.cause if origin else "restore")
            for ch in got:
                ch.origin = origin
            changes.extend(got)
        seqs: dict[bytes, int] = {}
        if changes:
            done = self.journal.commit(changes)
            for ch, seq in zip(changes, done):
                if ch.op == "write":
                    seqs[ch.path] = seq
        return seqs


def _lstat_at(dfd: int, name: bytes):
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_tree(dfd: int, name: bytes) -> None:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    try:
        for entry in os.listdir(fd):
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(fd, entry)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dfd)


def changes_for(journal: Journal, src: str, path: bytes, cause: str) -> list[Change]:
    """The records that make the journal's view of ``path`` what SRC holds (a one-path scan)."""
    st = lstat(src, path)
    with journal.reader() as r:
        v = journal_view(r, path)
        out: list[Change] = []
        if st is None:
            if v.kind is not None:
                if v.kind == "d":
                    for p, _, kind in sorted(r.current_tree(path + b"/"), reverse=True):
                        out.append(Change(op="rmdir" if kind == "d" else "unlink", path=p))
                out.append(Change(op="rmdir" if v.kind == "d" else "unlink", path=path))
            return out
        kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else \
            "f" if stat.S_ISREG(st.st_mode) else None
        if kind is None:
            return out
        if v.kind is not None and v.kind != kind:
            if v.kind == "d":
                for p, _, k in sorted(r.current_tree(path + b"/"), reverse=True):
                    out.append(Change(op="rmdir" if k == "d" else "unlink", path=p))
            out.append(Change(op="rmdir" if v.kind == "d" else "unlink", path=path))
            v = View()
        if kind == "d":
            if v.kind is None:
                out.append(Change(op="mkdir", path=path, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                                  mtime_ns=st.st_mtime_ns))
            elif v.mode != st.st_mode & 0o7777:
                out.append(Change(op="setattr", path=path, mode=st.st_mode))
            return out
        if kind == "l":
            head, name = split_path(path)
            dfd = open_dir(os.fsencode(src), head)
            try:
                target = os.readlink(name, dir_fd=dfd)
            finally:
                os.close(dfd)
            if v.kind == "l" and v.target == target:
                return out
            if v.kind == "l":
                out.append(Change(op="unlink", path=path))
            out.append(Change(op="symlink", path=path, target=target, mode=st.st_mode, uid=st.st_uid,
                              gid=st.st_gid, mtime_ns=st.st_mtime_ns))
            return out
        # a regular file: a content version against the path's latest one
        head, name = split_path(path)
        dfd = open_dir(os.fsencode(src), head)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            size = st.st_size
            base = v.seq if v.kind == "f" else 0
            old = r.chunk_list(base) if base else []
            offsets = chunking.list_offsets(old)
            pread = lambda off, n: os.pread(fd, n, off)  # noqa: E731
            holes = capture.file_holes(fd, size)
            dirty = chunking.changed_ranges(pread, size, old, offsets, holes) if old else [(0, max(size, 1))]
            if base and not dirty and size == sum(n for _, n in old):
                if v.mode != st.st_mode & 0o7777:
                    out.append(Change(op="setattr", path=path, mode=st.st_mode, mtime_ns=st.st_mtime_ns))
                elif v.mtime_ns != st.st_mtime_ns:
                    out.append(Change(op="setattr", path=path, mtime_ns=st.st_mtime_ns))
                return out
            res, new = capture.capture_chunks(r, pread, size, old, dirty, offsets, journal.spill_chunks,
                                              None, aligned=False, holes=holes)
            out.append(Change(op="write", path=path, size=size, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                              mtime_ns=st.st_mtime_ns, cause=cause, base_seq=base or 0,
                              edit=res.edit_list(old), chunks=new))
            return out
        finally:
            os.close(fd)
