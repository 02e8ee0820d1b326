"""restore and rollback: writing a tree as it was, below a directory walked by descriptor."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from deltafs import chunking
from deltafs._syscalls import syncfs
from deltafs.errors import CorruptionError, NotFoundError, PartialError, UsageError
from deltafs.history.diff import entry_changes
from deltafs.history.format import human_size, show_path
from deltafs.history.query import (Thinned, missing_error, outcome_code, reading, resolve_point,
                                   retained_entry, root_entry)
from deltafs.journal import (KIND_DIR, KIND_FILE, KIND_SPECIAL, KIND_SYMLINK, Change, Journal, Reader,
                             TreeEntry, hash_matches, pack_list)
from deltafs.names import quote_name, show_name
from deltafs.when import Point

log = logging.getLogger(__name__)

TMP_PREFIX = b".deltafs-restore-"  # + b"PID-N.tmp": a restore's file before its rename
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + rb"(\d+)-\d+\.tmp\Z")


# --- restore --------------------------------------------------------------------------
@dataclass
class RestoreReport:
    path: str
    version: int
    destination: str
    mode: str  # "to" (--to DEST), "mount" (through the running mount), "src" (into SRC, journaled here)
    dry_run: bool = False
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    links: int = 0
    specials: int = 0
    removed: int = 0  # rollback: paths created after WHEN, removed
    bytes: int = 0
    seconds: float = 0.0
    records: list[int] = field(default_factory=list)  # seqs journaled (mode "src")
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    corrupt: bool = False
    failed: list[dict] = field(default_factory=list)  # {path, version, error, corrupt}: not restored
    thinned: list[Thinned] = field(default_factory=list)  # restored at an earlier retained version
    plan: list[dict] = field(default_factory=list)  # --dry-run

    def fail(self, path: bytes, version: int | None, why: str, corrupt: bool = False) -> None:
        """A path that was not restored (the rest goes on)."""
        self.corrupt |= corrupt
        at = f" (version {version})" if version else ""
        self.errors.append(f"{show_name(path)}{at}: {why}")
        self.failed.append({"path": show_path(path), "version": version or None, "error": why,
                            "corrupt": corrupt})

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("plan", "thinned")}
        d["thinned"] = [t.to_dict() for t in self.thinned]
        if self.dry_run:
            d["plan"] = self.plan
        return d

    def summary(self) -> str:
        verb = "would restore" if self.dry_run else "restored"
        s = (f"{verb} {quote_name(self.path)} at version {self.version} to {quote_name(self.destination)}: "
             f"{self.files} files ({human_size(self.bytes)}), {self.dirs} dirs, {self.symlinks} symlinks, "
             f"{self.links} hard links")
        if self.specials:
            s += f", {self.specials} special files"
        if self.removed:
            s += f"; {'would remove' if self.dry_run else 'removed'} {self.removed} newer paths"
        if not self.dry_run:
            s += f" in {self.seconds:.1f}s"
        if self.thinned:
            s += f"; {len(self.thinned)} at an earlier retained version"
        if self.errors:
            s += f"; {len(self.errors)} FAILED"
        return s


Progress = Callable[[int, int, int, int], None]  # files done, files total, bytes done, bytes total


class Refused(Exception):
    """A path the restore will not write through: a symlink or a file where a
    directory must be, or a directory moved while the restore ran."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _lstat_at(dfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _what(st: os.stat_result | None) -> str:
    if st is None:
        return "gone"
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    return "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"


class _Dirs:
    """Directory descriptors below the restore's anchor, each opened from its
    parent's descriptor with O_NOFOLLOW | O_DIRECTORY, so no path a restore
    writes through is ever redirected by a symlink (one swapped in for a
    directory by another user, say).  The anchor is the directory the user
    named (DEST's parent, or SRC/MNT for a restore in place).  At most
    ``limit`` stay open (least recently used closed first): a big tree does
    not hold a descriptor per directory; reopening walks again, each step
    O_NOFOLLOW."""

    def __init__(self, anchor_fd: int, anchor: bytes, limit: int = 64) -> None:
        self.anchor_fd = anchor_fd
        self.anchor = anchor
        self.limit = limit
        self.open: OrderedDict[tuple[bytes, ...], int] = OrderedDict()

    def path(self, parts: tuple[bytes, ...]) -> bytes:
        return os.path.join(self.anchor, *parts) if parts else self.anchor

    def show(self, parts: tuple[bytes, ...]) -> str:
        return quote_name(os.fsdecode(self.path(parts)))

    def fd(self, parts: tuple[bytes, ...]) -> int:
        """The directory at ``parts`` (valid until the next call)."""
        fd = self.open.get(parts) if parts else self.anchor_fd
        if fd is not None:
            if parts:
                self.open.move_to_end(parts)
            return fd
        k = len(parts) - 1
        while k > 0 and parts[:k] not in self.open:
            k -= 1
        fd = self.open[parts[:k]] if k else self.anchor_fd
        for i in range(k, len(parts)):
            try:
                fd = os.open(parts[i], _DIR_FLAGS, dir_fd=fd)
            except OSError as err:  # ENOTDIR: also what O_NOFOLLOW | O_DIRECTORY gives a symlink
                if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                st = _lstat_at(fd, parts[i])
                raise Refused(f"{self.show(parts[:i + 1])} is {_what(st)} now, not a directory; deltafs "
                              "does not restore through it (the tree changed under the restore?)") from None
            self.open[parts[: i + 1]] = fd
        while len(self.open) > self.limit:
            _, old = self.open.popitem(last=False)
            os.close(old)
        return self.open[parts]

    def forget(self, parts: tuple[bytes, ...]) -> None:
        """Close ``parts`` and everything below it (it is being replaced)."""
        n = len(parts)
        for k in [k for k in self.open if k[:n] == parts]:
            os.close(self.open.pop(k))

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


RESTORE_THREADS = 4  # files written at once (their syscalls overlap; Python work does not)
RESTORE_IN_FLIGHT = 128  # jobs submitted ahead of the one whose result is taken (each holds a descriptor)
RESTORE_BATCH = 16  # files a worker writes under one read snapshot, handed over as one task
# files replacing existing ones whose temp files are synced together (one syncfs) and
# then renamed into place: write_files, instead of an fsync per file.  Large, so that a
# restore of a directory creates its files before its renames free the old inodes: ext4
# without a journal skips inodes freed in the last 30-60 s, one lookup each, per create
RESTORE_SYNC_GROUP = 16384


@dataclass
class _FileJob:
    entry: TreeEntry
    parts: tuple[bytes, ...]
    dfd: int  # the job's own descriptor of the file's directory
    name: bytes
    tmp: bytes
    sync: bool  # fsync before the rename
    fresh: bool = False  # its directory was made by this restore (0700, only its files)
    owned: bool = False  # the new file gets the entry's owner by itself (no fchown)
    defer: bool = False  # replaces a file: its temp is synced with others' and renamed later (write_files)


def restored_file_id(old: int | None, taken: bool, used: set[int]) -> int:
    """capture.identity.restored_file_id, imported when a journaled restore
    first needs it: importing deltafs.capture loads the capture pipeline
    and trio, a third of ``restore --to``'s start-up, for nothing."""
    from deltafs.capture.identity import restored_file_id as fid

    return fid(old, taken, used)


class _Restorer:
    """Writes entries below ``dirs`` (see _Dirs): every directory is reached by
    descriptor, every name created with O_EXCL or replaced by rename/unlink at
    that descriptor, and nothing is followed."""

    def __init__(self, r: Reader, rep: RestoreReport, dirs: _Dirs | None, prefix: tuple[bytes, ...],
                 anchor: bytes, rel: bytes, progress: Progress | None, journaling: bool,
                 through_mount: bool, open_reader=None) -> None:
        self.r = r
        self.open_reader = open_reader  # () -> a Reader context (a worker thread's own); None: one by one
        self.rep = rep
        self.dirs = dirs  # None: a dry run
        self.prefix = prefix  # where rel goes, below the anchor
        self.anchor = anchor
        self.rel = rel
        self.progress = progress
        self.journaling = journaling  # "src" mode: build Change records as we go
        self.through_mount = through_mount
        self.changes: list[Change] = []
        self.root = os.geteuid() == 0
        self.files_total = self.bytes_total = self.files_done = self.bytes_done = 0
        self.done: dict[int, tuple[bytes, ...]] = {}  # link group -> parts of the first restored path
        self.made: dict[tuple[bytes, ...], tuple[int, int]] = {}  # dir parts -> (st_dev, st_ino)
        self.new_fids: dict[int, int] = {}  # old file id -> file id used for the restored path
        self.used_fids: set[int] = set()
        self.group_fid: dict[int, tuple[bytes, int]] = {}  # link group -> (first path, file id)
        self.seq_counter = 0
        self.pid = os.getpid()  # in every temp name: looked up once, not per file
        # files in a directory this restore made are written unnamed (O_TMPFILE) and
        # linked into place when whole (_write_job); False once the filesystem refuses
        self.tmpfile = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
        self.swept: set[tuple[bytes, ...]] = set()  # directories cleared of stale temp files
        self.fresh: set[tuple[bytes, ...]] = set()  # directories this restore created (empty then)
        self.owners: dict[tuple[bytes, ...], tuple[int, int]] = {}  # dir parts -> owner of a new file there
        self.gone: set[bytes] = set()  # paths a rollback removed (journaled as such already)
        # rollback through a mount (see rollback): no fsync per file, nothing looked up per
        # file before its job (rollback_plan already cleared what was in the way); the
        # filesystem under the mount (SRC, open as sync_fd) is synced once at the end
        self.batched = False
        self.sync_fd: int | None = None

    # where an entry goes
    def parts(self, p: bytes) -> tuple[bytes, ...]:
        sub = p[len(self.rel):].lstrip(b"/") if self.rel else p
        return self.prefix + (tuple(sub.split(b"/")) if sub else ())

    def target(self, p: bytes) -> bytes:
        parts = self.parts(p)
        return os.path.join(self.anchor, *parts) if parts else self.anchor

    def _parent(self, parts: tuple[bytes, ...]) -> tuple[int, bytes]:
        return self.dirs.fd(parts[:-1]), parts[-1]

    def tick(self, nbytes: int = 0, file_done: bool = False) -> None:
        self.bytes_done += nbytes
        self.files_done += file_done
        if self.progress:
            self.progress(self.files_done, self.files_total, self.bytes_done, self.bytes_total)

    # ---- journal bookkeeping (mode "src") ----
    def _cur(self, p: bytes) -> tuple[int, object] | None:
        fid = self.r.file_id_at(p) if p and p not in self.gone else None
        return (fid, self.r.file_state(fid)) if fid is not None else None

    def _fid_for(self, e: TreeEntry, p: bytes) -> tuple[int, bool]:
        """-> (file id for path p, whether a create record is needed)."""
        cur = self._cur(p)
        if cur is not None and cur[1].kind == e.kind and e.kind in (KIND_FILE, KIND_DIR):
            return cur[0], False
        if e.file_id in self.new_fids:
            return self.new_fids[e.file_id], True
        st = self.r.file_state(e.file_id)
        fid = restored_file_id(e.file_id, st is not None and not st.deleted, self.used_fids)
        self.new_fids[e.file_id] = fid
        return fid, True

    def _drop_existing(self, p: bytes, kind: str) -> None:
        cur = self._cur(p)
        if cur is not None and cur[1].kind != kind:
            self.changes.append(Change(op="rmdir" if cur[1].kind == KIND_DIR else "unlink",
                                       file_id=cur[0], path=p))

    def _attrs(self, e: TreeEntry) -> dict:
        return dict(mode=e.mode, uid=e.uid if self.root else None, gid=e.gid if self.root else None,
                    mtime_ns=e.mtime_ns)

    def _xattr_changes(self, fid: int, p: bytes, e: TreeEntry, old: dict) -> None:
        for k, v in e.xattrs.items():
            if old.get(k) != v:
                self.changes.append(Change(op="setxattr", file_id=fid, path=p, xattr_name=k, xattr_value=v))
        for k in old:
            if k not in e.xattrs:
                self.changes.append(Change(op="removexattr", file_id=fid, path=p, xattr_name=k))

    def _preimage(self, p: bytes, dfd: int, name: bytes) -> None:
        """SRC's file at p differs from the journal's latest version (changed
        behind deltafs' back): journal it first so the restore loses nothing."""
        st = _lstat_at(dfd, name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        pread = lambda o, n: os.pread(fd, n, o)  # noqa: E731
        cur = self._cur(p)
        try:
            st = os.fstat(fd)
            if cur is not None and cur[1].kind == KIND_FILE and cur[1].content_seq:
                # compare at the journal's boundaries (an in-place file's
                # list is not what a fresh chunking would cut)
                try:
                    known = self.r.chunk_list(cur[1].content_seq)
                except CorruptionError:  # that version is damaged: compare by content hash below
                    known = None
                if known is not None and sum(n for _, n in known) == st.st_size and \
                        not chunking.changed_ranges(pread, st.st_size, known):
                    return
            refs, new, seen = [], [], set()
            for span, data in chunking.chunk_stream(pread, st.st_size):
                refs.append((span.id, span.length))
                if span.id not in seen and not self.r.has_chunk(span.id):
                    seen.add(span.id)
                    new.append(chunking.build_chunk(data))
        finally:
            os.close(fd)
        if cur is not None and cur[1].kind == KIND_FILE:
            known = self.r.record(cur[1].content_seq) if cur[1].content_seq else None
            if (not refs) if known is None else \
                    (known.version_hash is not None and hash_matches(known, pack_list(refs))):
                return  # (by the hash the record has: flat, or since format 11 the tree hash)
            fid = cur[0]
        else:
            fid = restored_file_id(None, False, self.used_fids)
            self.changes.append(Change(op="create", file_id=fid, path=p, mode=st.st_mode,
                                       uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns))
        self.changes.append(Change(op="write", file_id=fid, path=p, size=st.st_size, cause="scan",
                                   base_seq=0, edit=[(0, 0, refs)], chunks=new))
        self.rep.warnings.append(f"{show_name(p)} had changed outside deltafs; that content was "
                                 "journaled (cause scan) before the restore")

    # ---- filesystem work ----
    def _warn_meta(self, e: TreeEntry, what: str, err: OSError) -> None:
        self.rep.warnings.append(f"{show_name(e.path)}: cannot set {what}: {err.strerror}")

    def _owner(self, e: TreeEntry, chown: Callable[[int, int], None]) -> None:
        if self.root and e.uid is not None and e.gid is not None:
            try:
                chown(e.uid, e.gid)
            except OSError as err:
                self._warn_meta(e, "owner", err)

    def _mode_xattrs(self, target: int | str, e: TreeEntry) -> None:
        """Mode and xattrs on ``target``: a descriptor, or /proc/self/fd/N of one."""
        if e.mode is not None:
            os.chmod(target, stat.S_IMODE(e.mode))
        for k, v in e.xattrs.items():
            try:
                os.setxattr(target, k, v)
            except OSError as err:
                self._warn_meta(e, f"xattr {os.fsdecode(k)}", err)

    def _meta_fd(self, fd: int, e: TreeEntry, owned: bool = False) -> None:
        """Owner (unless ``owned``: it has it already), mode, xattrs and mtime of
        ``e`` on an open file or directory."""
        if not owned:
            self._owner(e, lambda u, g: os.fchown(fd, u, g))
        self._mode_xattrs(fd, e)
        if e.mtime_ns is not None:
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _meta_at(self, dfd: int, name: bytes, e: TreeEntry) -> None:
        """The same on ``name`` in directory ``dfd``, never following it: a
        symlink gets owner and mtime; anything else is reached through an
        O_PATH descriptor of that very inode (/proc/self/fd/N)."""
        self._owner(e, lambda u, g: os.chown(name, u, g, dir_fd=dfd, follow_symlinks=False))
        if e.kind != KIND_SYMLINK and (e.mode is not None or e.xattrs):
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise Refused(f"{show_name(e.path)} became a symlink while it was restored")
                self._mode_xattrs(f"/proc/self/fd/{fd}", e)
            finally:
                os.close(fd)
        if e.mtime_ns is not None:
            os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _clear(self, parts: tuple[bytes, ...]) -> None:
        """Remove what is at ``parts`` (never a directory) so something else can take its place."""
        dfd, name = self._parent(parts)
        st = _lstat_at(dfd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", os.fsdecode(self.dirs.path(parts)))
        os.unlink(name, dir_fd=dfd)

    def _sweep(self, dparts: tuple[bytes, ...]) -> None:
        """Remove temp files a killed restore left in a directory (once per directory).

        Stale: its flock (held while it is written) is free and its PID is not
        alive here.  A live restore's file is left alone, whatever its age."""
        if dparts in self.swept:
            return
        self.swept.add(dparts)
        dfd = self.dirs.fd(dparts)
        try:
            names = [n for n in os.listdir(dfd) if n.startswith(os.fsdecode(TMP_PREFIX))]
        except OSError:
            return
        for name in map(os.fsencode, names):
            m = _TMP_NAME.match(name)
            if m is None or int(m.group(1)) == self.pid or _pid_alive(int(m.group(1))):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue  # not ours to judge (another user's, a symlink, or gone)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue  # being written
                os.unlink(name, dir_fd=dfd)
                self.rep.warnings.append(f"removed {self.dirs.show(dparts + (name,))}, left by an "
                                         "interrupted restore")
            except OSError as err:
                log.debug("cannot remove stale %r: %s", name, err)
            finally:
                os.close(fd)

    def _tmp_name(self, dparts: tuple[bytes, ...]) -> bytes:
        self._sweep(dparts)
        self.seq_counter += 1
        return TMP_PREFIX + b"%d-%d.tmp" % (self.pid, self.seq_counter)

    # A file is written in three steps, so that many can be in flight (run):
    # _prepare_file (this thread: checks, pre-image, temp name, a descriptor of
    # its directory of its own), _write_job (any thread: the temp file, its
    # content and metadata, the rename; nothing shared but the journal) and
    # _finish_file (this thread again, in entry order: counts and records).
    def _prepare_file(self, e: TreeEntry) -> "_FileJob":
        parts = self.parts(e.path)
        dfd, name = self._parent(parts)
        # a directory this restore made (0700 while it fills) holds only what it put there
        st = None if parts[:-1] in self.fresh or self.batched else _lstat_at(dfd, name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", os.fsdecode(self.dirs.path(parts)))
        if self.journaling:
            self._preimage(e.path, dfd, name)
        tmp = self._tmp_name(parts[:-1])
        # the job's own descriptor of the directory: the _Dirs cache may close its
        # one meanwhile; a dup is the same open directory, reached without following
        dfd = os.dup(self.dirs.fd(parts[:-1]))
        # fsync before the rename only where it replaces something (old or new
        # content, never an empty file, after a crash) or where an fsync is what
        # makes the mount journal the file; new names are synced once (syncfs) at the end
        fresh = parts[:-1] in self.fresh
        return _FileJob(e, parts, dfd, name, tmp, sync=not self.batched and (st is not None or self.through_mount),
                        fresh=fresh,
                        owned=fresh and (e.uid, e.gid) == self._new_owner(parts[:-1], dfd))

    def _new_owner(self, dparts: tuple[bytes, ...], dfd: int) -> tuple[int, int]:
        """(uid, gid) a file created in that directory gets (its group if the
        directory is setgid), looked up once per directory."""
        own = self.owners.get(dparts)
        if own is None:
            st = os.fstat(dfd)
            own = self.owners[dparts] = (os.geteuid(), st.st_gid if st.st_mode & stat.S_ISGID else os.getegid())
        return own

    def _write_job(self, job: "_FileJob", r: Reader) -> None:
        """The temp file, written and renamed into place (any thread)."""
        e, dfd, tmp = job.entry, job.dfd, job.tmp
        if job.defer and self._kept(job, r):
            job.defer = False  # the file there has this content already: nothing to rename
            return
        if job.fresh and not job.sync and self.tmpfile:
            try:
                fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self.tmpfile = False  # not on this filesystem: named temp files, renamed
            else:
                # an unnamed file in the directory, linked under its name once whole (one
                # directory insertion, no temp name to create, look up and remove: in a
                # directory without an index each of those scans every entry); a crash
                # leaves nothing.  linkat never follows or replaces the name it makes.
                try:
                    if e.content_seq:
                        write_content(r, e.content_seq, fd)
                    self._meta_fd(fd, e, owned=job.owned)
                    os.link(f"/proc/self/fd/{fd}", job.name, dst_dir_fd=dfd, follow_symlinks=True)
                finally:
                    os.close(fd)
                return
        # O_EXCL: never follows, never reuses; the content is verified chunk by
        # chunk as it is written, and the file gets its name only once whole
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            try:
                if not job.fresh:  # (a directory this restore made is swept by nobody)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written" (see _sweep)
                    except OSError:
                        pass  # no flock here: _sweep goes by the PID alone
                if e.content_seq:
                    write_content(r, e.content_seq, fd)
                self._meta_fd(fd, e, owned=job.owned)
                if job.sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if job.defer:
                return  # whole, not yet durable: write_files syncs it, then renames it
            os.rename(tmp, job.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        if self.through_mount and not self.batched:  # the daemon journals attributes set on the real path
            self._meta_at(dfd, job.name, e)

    def _kept(self, job: "_FileJob", r: Reader) -> bool:
        """If the file a deferred job would replace already holds the entry's
        content, give it the entry's owner, mode and mtime in place and -> True
        (no new inode, no rename).  Only a regular file with one link (a link
        shared with another path is replaced, as ever), owned by this user
        unless root sets the entry's owner (a new file would be ours), of the entry's size,
        whose xattrs are exactly the entry's, and whose bytes, read in the
        chunk list's pieces, hash to the chunk ids (the first that does not
        ends the check).  Opened without following a symlink, never written."""
        e = job.entry
        try:
            fd = os.open(job.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=job.dfd)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != (e.size or 0):
                return False
            owner = self.root and e.uid is not None and e.gid is not None  # the entry's, set below
            if not owner and st.st_uid != os.geteuid():
                return False  # a new file would be ours: another user's keeps nothing
            if {os.fsencode(k): os.getxattr(fd, k) for k in os.listxattr(fd)} != e.xattrs:
                return False
            pos = 0
            for cid, n in r.chunk_list(e.content_seq) if e.content_seq else ():
                data = os.pread(fd, n, pos)
                if len(data) != n or chunking.chunk_id(data) != cid:
                    return False
                pos += n
            if pos != st.st_size:
                return False
            if owner and (st.st_uid, st.st_gid) != (e.uid, e.gid):
                self._owner(e, lambda u, g: os.fchown(fd, u, g))
            if e.mode is not None and stat.S_IMODE(st.st_mode) != stat.S_IMODE(e.mode):
                os.chmod(fd, stat.S_IMODE(e.mode))
            if e.mtime_ns is None:  # as a new file would have: now
                os.utime(fd)
            elif st.st_mtime_ns != e.mtime_ns:
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _finish_file(self, job: "_FileJob") -> None:
        e = job.entry
        self.rep.files += 1
        self.rep.bytes += e.size
        self.tick(e.size, file_done=True)
        if e.link_group is not None:
            self.done[e.link_group] = job.parts
        if self.journaling:
            fid, create = self._fid_for(e, e.path)
            cur = self._cur(e.path)
            old_x = {} if create or cur is None else dict(cur[1].xattrs)
            if create:
                self._drop_existing(e.path, KIND_FILE)
                self.changes.append(Change(op="create", file_id=fid, path=e.path, **self._attrs(e)))
            refs = self.r.chunk_list(e.content_seq) if e.content_seq else []
            self.changes.append(Change(op="write", file_id=fid, path=e.path, size=e.size, cause="restore",
                                       base_seq=0, edit=[(0, 0, refs)], mode=e.mode, mtime_ns=e.mtime_ns))
            if not create:
                self.changes.append(Change(op="setattr", file_id=fid, path=e.path, **self._attrs(e)))
            self._xattr_changes(fid, e.path, e, old_x)
            if e.link_group is not None:
                self.group_fid[e.link_group] = (e.path, fid)

    def write_file(self, e: TreeEntry) -> None:
        """One file, start to end, in this thread."""
        job = self._prepare_file(e)
        try:
            self._write_job(job, self.r)
        finally:
            os.close(job.dfd)
        self._finish_file(job)

    def write_files(self, files: list[TreeEntry]) -> None:
        """Many files, up to RESTORE_THREADS written at once (``open_reader``
        gives each job a read snapshot of its own: an LMDB transaction belongs
        to one thread); results are taken in entry order, so the records of a
        journaled restore come in the same order as one by one.

        A file that replaces an existing one (``restore --to DEST --force``
        into a tree that has it, or in place without a mount) must be durable
        before its rename, or a crash could leave neither version.  Instead of
        an fsync per file, its temp file is written whole and left under its
        temp name; every RESTORE_SYNC_GROUP of them (and at the end) one
        syncfs makes them all durable, then the writer threads rename them
        into place, and they are finished in entry order.  Each file is still
        atomic: a crash before its rename leaves the old file and a temp file
        the next restore sweeps away.  A file there that already holds the
        entry's bytes is kept instead (``_kept``)."""
        if self.open_reader is None or len(files) < 2 or RESTORE_THREADS < 2:
            for e in files:
                self._do(e, self.write_file)
            return
        from concurrent.futures import ThreadPoolExecutor

        def work(batch: list[_FileJob]) -> list[BaseException | None]:
            """A batch of jobs under one read snapshot: -> each job's error or None."""
            out: list[BaseException | None] = []
            try:
                with self.open_reader() as r:
                    for job in batch:
                        try:
                            self._write_job(job, r)
                            out.append(None)
                        except (CorruptionError, Refused, OSError) as err:
                            out.append(err)
            finally:
                for job in batch:
                    os.close(job.dfd)
            return out

        def finish(job: _FileJob, err: BaseException | None) -> None:
            if err is not None:
                raise err
            self._finish_file(job)

        ready: deque = deque()  # (job, error or None) written, in entry order, not finished yet
        deferred = 0  # of them, written temp files waiting for the group's sync and their rename

        def flush() -> None:
            nonlocal deferred
            renamed: dict[int, BaseException | None] = {}
            if deferred:
                sync_err = None
                try:
                    syncfs(self.dirs.anchor_fd)
                except OSError as err:
                    sync_err = err
                # renamed by the workers: a rename over a file frees its blocks, and on a
                # filesystem mounted with discard (without a journal: at once) each waits
                # for the disk; the order does not matter, each file stands alone
                todo = [job for job, err in ready if job.defer and err is None]
                for k in range(0, len(todo), RESTORE_IN_FLIGHT):
                    part = todo[k: k + RESTORE_IN_FLIGHT]
                    fds: dict = {}  # directory parts -> a descriptor of our own (or the error)
                    try:
                        for job in part:
                            dparts = job.parts[:-1]
                            if dparts not in fds:
                                try:
                                    fds[dparts] = os.dup(self.dirs.fd(dparts))
                                except (OSError, Refused) as err:
                                    fds[dparts] = err

                        def rename(job: _FileJob) -> BaseException | None:
                            dfd = fds[job.parts[:-1]]
                            return dfd if isinstance(dfd, BaseException) else self._rename_deferred(job, dfd, sync_err)

                        for job, err in zip(part, pool.map(rename, part)):
                            renamed[id(job)] = err
                    finally:
                        for dfd in fds.values():
                            if isinstance(dfd, int):
                                os.close(dfd)
            while ready:
                job, err = ready.popleft()
                if job.defer and err is None:
                    err = renamed[id(job)]
                self._do(job.entry, lambda e, job=job, err=err: finish(job, err))
            deferred = 0

        def taken(job: _FileJob, err: BaseException | None) -> None:
            nonlocal deferred
            ready.append((job, err))
            deferred += job.defer and err is None
            if not deferred or deferred >= RESTORE_SYNC_GROUP:
                flush()

        pending: deque = deque()  # (batch, future), oldest first
        batch: list[_FileJob] = []
        in_flight = 0
        with ThreadPoolExecutor(RESTORE_THREADS, thread_name_prefix="restore") as pool:
            def take_one() -> int:
                jobs, fut = pending.popleft()
                try:
                    errs = fut.result()
                except BaseException as err:  # LMDB trouble opening the snapshot: none of them was written
                    errs = [err] * len(jobs)
                for job, err in zip(jobs, errs):
                    taken(job, err)
                return len(jobs)

            def submit() -> None:
                nonlocal batch, in_flight
                pending.append((batch, pool.submit(work, batch)))
                in_flight += len(batch)
                batch = []
                while in_flight > RESTORE_IN_FLIGHT:
                    in_flight -= take_one()

            for e in files:
                try:
                    job = self._prepare_file(e)
                except (CorruptionError, Refused, OSError) as err:
                    self._failed(e, err)
                    continue
                if job.sync and not self.through_mount:
                    job.sync, job.defer = False, True
                batch.append(job)
                if len(batch) >= RESTORE_BATCH:
                    submit()
            if batch:
                submit()
            while pending:
                take_one()
            flush()

    def _rename_deferred(self, job: _FileJob, dfd: int, sync_err: OSError | None) -> BaseException | None:
        """A deferred job's temp file in directory ``dfd``, synced (or not:
        ``sync_err``), renamed into place (or removed): -> its error or None (any thread)."""
        err: BaseException | None = sync_err
        if err is None:
            try:
                os.rename(job.tmp, job.name, src_dir_fd=dfd, dst_dir_fd=dfd)
                return None
            except OSError as e:
                err = e
        try:
            os.unlink(job.tmp, dir_fd=dfd)
        except OSError:
            pass
        return err

    def make_link(self, e: TreeEntry) -> None:
        parts = self.parts(e.path)
        first = self.done[e.link_group]
        self._clear(parts)
        src_fd = os.dup(self.dirs.fd(first[:-1]))  # the next fd() may close a cached one
        try:
            dfd, name = self._parent(parts)
            os.link(first[-1], name, src_dir_fd=src_fd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(src_fd)
        self.rep.links += 1
        self.tick(file_done=True)
        if self.journaling:
            primary, fid = self.group_fid[e.link_group]
            self._drop_existing(e.path, "")
            self.changes.append(Change(op="link", file_id=fid, path=primary, path2=e.path))

    def make_dir(self, e: TreeEntry) -> None:
        parts = self.parts(e.path)
        existed = True
        if parts:
            dfd, name = self._parent(parts)
            st = _lstat_at(dfd, name)
            if st is not None and not stat.S_ISDIR(st.st_mode):  # a file or a symlink is in the way
                self.dirs.forget(parts)
                os.unlink(name, dir_fd=dfd)
                st = None
            existed = st is not None
            if not existed:
                os.mkdir(name, 0o700, dir_fd=dfd)
                self.fresh.add(parts)
                self.swept.add(parts)  # nothing stale in a directory made just now
        fd = self.dirs.fd(parts)
        if not existed and e.mode is not None:
            os.fchmod(fd, 0o700)  # writable while filling; the real mode is set at the end
        st = os.fstat(fd)
        self.made[parts] = (st.st_dev, st.st_ino)
        self.rep.dirs += 1
        if self.journaling and e.path:
            fid, create = self._fid_for(e, e.path)
            if create:
                self._drop_existing(e.path, KIND_DIR)
                self.changes.append(Change(op="mkdir", file_id=fid, path=e.path, **self._attrs(e)))

    def finish_dir(self, e: TreeEntry) -> None:
        parts = self.parts(e.path)
        # still the directory make_dir made or opened, and still at its path?
        now = _lstat_at(self.dirs.fd(parts[:-1]), parts[-1]) if parts else None
        fd = self.dirs.fd(parts)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.made.get(parts) or \
                (parts and (now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino))):
            raise Refused(f"{self.dirs.show(parts)} was moved or replaced while the restore ran (the tree "
                          "changed under it): what it holds may not be where it belongs; its mode and "
                          "times were not restored")
        self._meta_fd(fd, e)
        if self.journaling and e.path:
            cur = self._cur(e.path)
            fid = self.new_fids.get(e.file_id, cur[0] if cur else e.file_id)
            self.changes.append(Change(op="setattr", file_id=fid, path=e.path, **self._attrs(e)))
            self._xattr_changes(fid, e.path, e, dict(cur[1].xattrs) if cur and cur[0] == fid else {})

    def make_symlink(self, e: TreeEntry) -> None:
        parts = self.parts(e.path)
        self._clear(parts)
        dfd, name = self._parent(parts)
        os.symlink(e.target or b"", name, dir_fd=dfd)
        self._meta_at(dfd, name, e)
        self.rep.symlinks += 1
        self.tick(file_done=True)
        if self.journaling:
            fid, _ = self._fid_for(e, e.path)
            cur = self._cur(e.path)
            if cur is not None:
                self.changes.append(Change(op="rmdir" if cur[1].kind == KIND_DIR else "unlink",
                                           file_id=cur[0], path=e.path))
            self.changes.append(Change(op="symlink", file_id=fid, path=e.path, target=e.target, **self._attrs(e)))

    def make_special(self, e: TreeEntry) -> None:
        parts = self.parts(e.path)
        self._clear(parts)
        dfd, name = self._parent(parts)
        os.mknod(name, e.mode or (stat.S_IFIFO | 0o600), e.rdev or 0, dir_fd=dfd)
        self._meta_at(dfd, name, e)
        self.rep.specials += 1
        self.tick(file_done=True)
        if self.journaling:
            fid, _ = self._fid_for(e, e.path)
            self._drop_existing(e.path, KIND_SPECIAL)
            self.changes.append(Change(op="mknod", file_id=fid, path=e.path, rdev=e.rdev, **self._attrs(e)))

    def remove(self, entries: list[TreeEntry]) -> None:
        """Rollback: remove these paths (children before their directory), by
        descriptor, never following; journaled as unlink/rmdir in mode "src"."""
        for e in entries:
            if self._do(e, self._remove_one):
                self.rep.removed += 1

    def _remove_one(self, e: TreeEntry) -> None:
        parts = self.parts(e.path)
        dfd, name = self._parent(parts)
        st = _lstat_at(dfd, name)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                self.dirs.forget(parts)
                os.rmdir(name, dir_fd=dfd)
            else:
                os.unlink(name, dir_fd=dfd)
        if self.journaling:
            cur = self._cur(e.path)
            if cur is not None:
                self.changes.append(Change(op="rmdir" if cur[1].kind == KIND_DIR else "unlink",
                                           file_id=cur[0], path=e.path))
            self.gone.add(e.path)

    def run(self, entries: list[TreeEntry], dry_run: bool) -> None:
        dirs = [e for e in entries if e.kind == KIND_DIR]
        others = [e for e in entries if e.kind != KIND_DIR]
        primaries, links, seen_groups = [], [], set()
        for e in others:
            if e.kind == KIND_FILE and e.link_group is not None:
                if e.link_group in seen_groups:
                    links.append(e)
                    continue
                seen_groups.add(e.link_group)
            primaries.append(e)
        self.files_total = len(others)
        self.bytes_total = sum(e.size for e in primaries if e.kind == KIND_FILE)
        if dry_run:
            for e in dirs + primaries + links:
                act = {KIND_DIR: "mkdir", KIND_FILE: "write", KIND_SYMLINK: "symlink",
                       KIND_SPECIAL: "mknod"}[e.kind]
                if e in links:
                    act = "link"
                self.rep.plan.append({"action": act, "path": show_path(e.path),
                                      "target": os.fsdecode(self.target(e.path)),
                                      "version": e.content_seq, "size": e.size})
                counter = {"mkdir": "dirs", "write": "files", "symlink": "symlinks", "mknod": "specials",
                           "link": "links"}[act]
                setattr(self.rep, counter, getattr(self.rep, counter) + 1)
                if act == "write":
                    self.rep.bytes += e.size
            return
        made_dirs = []
        for e in sorted(dirs, key=lambda e: e.path):
            if self._do(e, self.make_dir):
                made_dirs.append(e)
        for e in primaries:
            if e.kind != KIND_FILE:
                self._do(e, {KIND_SYMLINK: self.make_symlink, KIND_SPECIAL: self.make_special}[e.kind])
        self.write_files([e for e in primaries if e.kind == KIND_FILE])
        for e in links:
            if e.link_group not in self.done:
                self.rep.fail(e.path, None, "not linked, its first path failed")
                continue
            self._do(e, self.make_link)
        for e in sorted(made_dirs, key=lambda e: e.path, reverse=True):
            self._do(e, self.finish_dir)
        if self.through_mount:
            if self.sync_fd is not None:  # first the files' data, in one sync of SRC's filesystem
                try:
                    syncfs(self.sync_fd)
                except OSError as err:
                    self.rep.warnings.append(f"cannot sync the restored files to disk: {err.strerror}")
            # fsyncdir returns once the daemon journaled everything queued about the
            # directory (in queue order: the files renamed into it, captured at their close)
            for parts in {self.parts(e.path)[:-1] for e in entries if self.parts(e.path)}:
                try:
                    os.fsync(self.dirs.fd(parts))
                except (OSError, Refused):
                    pass
        else:  # one sync of the filesystem for every new file and directory entry (before
            # a journaled restore's records are committed), not an fsync per file
            try:
                syncfs(self.dirs.anchor_fd)
            except OSError as err:
                self.rep.warnings.append(f"cannot sync the restored files to disk: {err.strerror}")

    def _do(self, e: TreeEntry, fn) -> bool:
        try:
            fn(e)
            return True
        except (CorruptionError, Refused, OSError) as err:
            self._failed(e, err)
        return False

    def _failed(self, e: TreeEntry, err: Exception) -> None:
        if isinstance(err, CorruptionError):
            self.rep.fail(e.path, e.content_seq, err.detail, corrupt=True)
        elif isinstance(err, Refused):
            self.rep.fail(e.path, None, f"not restored: {err}")
        else:
            self.rep.fail(e.path, None, err.strerror or str(err))


def write_content(r: Reader, seq: int, fd: int, tick=None) -> None:
    """Write content version ``seq`` into the empty file open as fd, keeping it sparse.

    An all-zero chunk (the id of zeros of its length: a hole when it was
    captured, or zeros written) is neither read nor written: the file
    gets a hole there, and its size from ftruncate at the end.  The id is
    the hash of the content, so knowing it is knowing the bytes.
    """
    pos = end = 0  # end: where the written bytes end (the file's size so far)
    for cid, n in r.chunk_list(seq):
        if cid != chunking.zero_id(n):
            mv = memoryview(r.read_chunk(cid))
            at = pos
            while mv:
                k = os.pwrite(fd, mv, at)
                mv, at = mv[k:], at + k
            end = at
        pos += n
        if tick is not None:
            tick(n)
    if end != pos:  # it ends in a hole
        os.ftruncate(fd, pos)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def restore(journal_dir: str, rel: bytes, *, at: str | None = None, version: str | None = None,
            dest: str | None = None, mnt: str | None = None, src: str | None = None,
            force: bool = False, dry_run: bool = False, progress: Progress | None = None,
            now_ns: int | None = None) -> RestoreReport:
    """Restore PATH (file, directory or root) as it was at --at/--version.

    * ``dest``: write it there (refused if it exists, unless ``force``:
      then a file is replaced and a directory is merged into).
    * else ``mnt`` (a running mount): write through MNT so the daemon
      journals the restore as new versions.
    * else ``src``: write into SRC and journal the restore here (takes the
      journal's write lock; JournalLockedError if a mount holds it).

    In place, paths created after WHEN are left alone (nothing is deleted).
    Below DEST's parent (or SRC/MNT in place) every directory is walked by
    descriptor and no symlink is followed (_Dirs).  Per-item failures (a
    corrupt chunk, an unwritable path, a tree that changed under the restore)
    are collected in ``report.failed``/``report.errors`` and the rest is
    restored.  A file whose version retention pruned is restored at the
    latest retained version before it, listed in ``report.thinned``.
    """
    t0 = time.monotonic()
    if dest is not None:
        mode, base = "to", os.fsencode(os.path.abspath(dest))
        anchor, prefix = os.path.dirname(base), (os.path.basename(base),)
        if not prefix[0]:
            raise UsageError(f"cannot restore to {dest}: name a directory below it")
        if os.path.lexists(base) and not force:
            raise UsageError(f"{dest} exists (use --force to overwrite it)")
    elif mnt is not None or src is not None:
        mode, anchor, prefix, base = _in_place(rel, mnt, src)
    else:
        raise UsageError("this journal's SRC is unknown: give --to DEST")
    with _restore_session(journal_dir, rel, mode, base, dry_run, at, version, now_ns) as s:
        r, point, rep = s.r, s.point, s.rep
        with reading(rel, point.seq):
            entries = _restore_entries(r, rel, point, rep)
        top = entries[rel]
        if mode == "to" and force and top.kind == KIND_DIR and os.path.lexists(base) \
                and not (os.path.isdir(base) and not os.path.islink(base)):
            what = "a symlink (not followed)" if os.path.islink(base) else "not a directory"
            raise UsageError(f"{dest} exists and is {what}")
        if not dry_run:
            s.dirs = _open_anchor(mode, anchor, prefix)
        rs = _Restorer(r, rep, s.dirs, prefix, anchor, rel, progress, journaling=(mode == "src"),
                       through_mount=(mode == "mount"), open_reader=s.journal.reader)
        rs.run(list(entries.values()), dry_run)
        s.changes = rs.changes
    rep.seconds = time.monotonic() - t0
    return rep


class _Session:
    """What a restore or rollback has open while it runs (:func:`_restore_session`)."""

    def __init__(self, r: Reader, point: Point, rep: RestoreReport, journal: Journal | None = None) -> None:
        self.r = r
        self.journal = journal
        self.point = point
        self.rep = rep
        self.dirs: _Dirs | None = None  # set once the anchor is open (not in a dry run)
        self.changes: list[Change] = []  # journaled when the session ends (mode "src")


@contextmanager
def _restore_session(journal_dir: str, rel: bytes, mode: str, base: bytes, dry_run: bool,
                     at: str | None, version: str | None, now_ns: int | None) -> Iterator[_Session]:
    """The set-up restore and rollback share: the journal open (writable only
    to journal a restore into SRC), the point resolved, the report begun; at
    the end ``changes`` committed (after the reader is closed), the anchor's
    descriptors closed and the journal closed, also on failure."""
    journal = Journal.open(journal_dir, readonly=(mode != "src" or dry_run))
    s = None
    try:
        with journal.reader() as r:
            with reading(rel):
                point = resolve_point(r, at, version, now_ns)
            s = _Session(r, point, RestoreReport(show_path(rel), point.seq, os.fsdecode(base), mode, dry_run),
                         journal)
            yield s
        if s.changes and not dry_run:
            rep = s.rep
            rep.records = journal.commit(s.changes)
            log.info("restore of %s journaled as records %s..%s", rep.path, rep.records[0], rep.records[-1])
    finally:
        if s is not None and s.dirs is not None:
            s.dirs.close()
            os.close(s.dirs.anchor_fd)
        journal.close()


def _restore_entries(r: Reader, rel: bytes, point: Point, rep: RestoreReport) -> dict[bytes, TreeEntry]:
    """The entries to restore, pruned versions resolved (into ``rep.thinned``);
    a file with no retained version at or before is a failure of its own."""
    entries = r.tree_at(point.seq, prefix=rel)
    if rel not in entries:
        if rel != b"":
            raise missing_error(r, rel, point.seq)
        entries[b""] = root_entry()
    top = entries[rel]
    if top.kind != KIND_DIR:
        entries = {rel: replace(top, link_group=None)}  # one path of a hard-linked file
    for p, e in list(entries.items()):
        try:
            entries[p] = retained_entry(r, p, e, rep.thinned)
        except NotFoundError as err:
            if p == rel:
                raise
            rep.fail(p, None, str(err))
            del entries[p]
    return entries


def _open_anchor(mode: str, anchor: bytes, prefix: tuple[bytes, ...]) -> _Dirs:
    """The directory the restore starts from (DEST's parent, made if missing,
    or SRC/MNT: paths the user named, so they are followed), and the
    directory that will hold PATH, reached without following anything."""
    if mode == "to":
        os.makedirs(anchor, exist_ok=True)
    dirs = _Dirs(os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), anchor)
    try:
        dirs.fd(prefix[:-1])
    except FileNotFoundError:
        dirs.close()
        os.close(dirs.anchor_fd)
        raise UsageError(f"{os.fsdecode(os.path.join(anchor, *prefix[:-1]))} does not exist: restore the "
                         "directory that contains it, or give --to DEST") from None
    except Refused as e:
        dirs.close()
        os.close(dirs.anchor_fd)
        raise PartialError(f"nothing restored: {e}") from None
    return dirs


def restore_exit_code(rep: RestoreReport, nearest: bool = False) -> int:
    """3 (journal) when a chunk or list was corrupt; 1 (partial) for other
    failures, or for files restored at an earlier retained version than
    asked unless ``nearest``; else 0."""
    return outcome_code(corrupt=rep.corrupt, failed=bool(rep.errors), thinned=bool(rep.thinned),
                        nearest=nearest)


# --- rollback: restore in place, and remove what came later ----------------------------

ROLLBACK_PREFIX = "rollback-"  # + UTC time: the snapshot taken right before a rollback


def snapshot_name(prefix: str, now_ns: int | None = None) -> str:
    """``<prefix>YYYYMMDDTHHMMSS.ffffffZ``: a snapshot name no WHEN parser reads as a time."""
    ns = time.time_ns() if now_ns is None else now_ns
    t = time.gmtime(ns // 10**9)
    return prefix + time.strftime("%Y%m%dT%H%M%S", t) + ".%06dZ" % ((ns // 1000) % 10**6)


def _ancestors(p: bytes, rel: bytes) -> Iterator[bytes]:
    while p != rel:
        p = p.rpartition(b"/")[0]
        yield p


def rollback_plan(r: Reader, rel: bytes, point: Point, rep: RestoreReport
                  ) -> tuple[list[TreeEntry], list[TreeEntry]]:
    """-> (entries to remove, deepest first; entries to restore) so that the
    tree below ``rel`` becomes what it was at ``point``: paths that exist now
    but not then are removed (or are in the way of another kind), paths that
    differ or are missing are restored, and directories above a change get
    their attributes back once it is done."""
    target = _restore_entries(r, rel, point, rep)
    now = r.tree_at(r.head_seq(), prefix=rel)
    if target[rel].kind != KIND_DIR:
        now = {rel: now[rel]} if rel in now else {}
    # a path of another kind then is replaced by the restore itself, except a
    # directory in the way of a file, which must be emptied and removed first
    remove = [e for p, e in now.items() if p != rel and (
        p not in target or (target[p].kind != e.kind and KIND_DIR in (e.kind, target[p].kind)))]
    gone = {e.path for e in remove}
    for p, e in now.items():  # what is below a removed directory goes with it
        if p not in gone and any(a in gone for a in _ancestors(p, rel)):
            remove.append(e)
    remove.sort(key=lambda e: e.path.count(b"/"), reverse=True)
    restore: dict[bytes, TreeEntry] = {}
    for p, e in target.items():
        cur = now.get(p)
        if cur is None or cur.kind != e.kind or entry_changes(r, cur, e) or \
                (e.kind != KIND_DIR and cur.mtime_ns != e.mtime_ns):
            restore[p] = e
    groups = {e.link_group for e in restore.values() if e.link_group is not None}
    for p, e in target.items():  # a hard link is restored with all its paths
        if e.link_group in groups:
            restore[p] = e
    changed = set(restore) | {e.path for e in remove}
    for p in list(changed):
        for a in _ancestors(p, rel):
            if a in target and target[a].kind == KIND_DIR:
                restore[a] = target[a]
    return remove, list(restore.values())


def _in_place(rel: bytes, mnt: str | None, src: str | None) -> tuple[str, bytes, tuple, bytes]:
    """``(mode, anchor, prefix, base)`` of a restore in place: through MNT when
    mounted (the daemon journals it), else into SRC (journaled here)."""
    mode = "mount" if mnt is not None else "src"
    anchor = os.fsencode(mnt if mnt is not None else src)
    prefix = tuple(rel.split(b"/")) if rel else ()
    return mode, anchor, prefix, (os.path.join(anchor, rel) if rel else anchor)


def rollback(journal_dir: str, rel: bytes, *, at: str, mnt: str | None = None, src: str | None = None,
             dry_run: bool = False, progress: Progress | None = None,
             now_ns: int | None = None) -> RestoreReport:
    """Return PATH (a file, a directory, or the root ``b""``) to WHEN, in place.

    :func:`restore` in place (the same _Restorer, through MNT when mounted so
    the daemon journals it, else into SRC journaled here) plus the cleanup
    of whatever came later: paths created since are removed, deleted ones
    come back, a renamed one is written back at its old path and removed
    from its new one.  Only what differs is written.  The caller takes the
    ``rollback-<time>`` snapshot before (the daemon's, when mounted), so the
    rollback itself can be undone by rolling back to it.
    """
    t0 = time.monotonic()
    if mnt is None and src is None:
        raise UsageError("this journal's SRC is unknown: rollback works in place only")
    mode, anchor, prefix, base = _in_place(rel, mnt, src)
    with _restore_session(journal_dir, rel, mode, base, dry_run, at, None, now_ns) as s:
        r, point, rep = s.r, s.point, s.rep
        with reading(rel, point.seq):
            remove, entries = rollback_plan(r, rel, point, rep)
        if dry_run:
            for e in remove:
                rep.plan.append({"action": "remove", "path": show_path(e.path),
                                 "target": os.fsdecode(os.path.join(anchor, e.path)),
                                 "version": None, "size": e.size})
            rep.removed = len(remove)
        else:
            s.dirs = _open_anchor(mode, anchor, prefix)
        rs = _Restorer(r, rep, s.dirs, prefix, anchor, rel, progress, journaling=(mode == "src"),
                       through_mount=(mode == "mount"), open_reader=s.journal.reader)
        if mode == "mount" and not dry_run:
            # docs/guard.md "Rollback": no fsync per file; SRC synced once, then the journal
            rs.batched = True
            if src is not None:
                try:
                    rs.sync_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as err:
                    rep.warnings.append(f"cannot open {src} to sync it: {err.strerror}")
        try:
            if not dry_run:
                rs.remove(remove)
            rs.run(entries, dry_run)
        finally:
            if rs.sync_fd is not None:
                os.close(rs.sync_fd)
        s.changes = rs.changes
    rep.seconds = time.monotonic() - t0
    return rep
