"""file:// mirrors: a plain directory (local disk, NFS, USB drive).

Objects are files under the mirror directory; '/' in a name is a
subdirectory.  Every write goes to a temp file in the object's own
directory (``.deltafs-tmp-<random>``), is fsynced, then renamed (or
hard-linked, for ``put_if_absent``) to its final name, and the directory
is fsynced, so a crash leaves either the old object, the new one, or a
stray temp file that :meth:`list` never shows (and :meth:`clean_temp`
removes) -- never a half-written object under a real name.

Directory policy: the mirror directory itself is created (mode 0700) if
missing, but its parent must exist.  That way a typo in a deep path or an
unplugged drive (``/media/usb`` missing) fails loudly instead of silently
building a tree somewhere else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

from deltafs.errors import MirrorError

from .base import (
    TEMP_PREFIX,
    Mirror,
    MirrorAccessDenied,
    MirrorNotFound,
    MirrorObjectMissing,
    check_range,
    validate_name,
    validate_prefix,
)

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
_AT_FDCWD = -100

# How put_if_absent creates without replacing, tried in this order; the
# first that the filesystem supports is remembered per mirror.
_LINK, _RENAME_NOREPLACE, _CHECK_THEN_RENAME = "link", "renameat2", "check-then-rename"

_libc = None
_libc_lock = threading.Lock()


def _renameat2_noreplace(src: str, dst: str) -> None:
    """rename(src, dst) failing with EEXIST if dst exists (Linux renameat2)."""
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst)


def _oserror(err: OSError, what: str) -> MirrorError:
    """An OSError met on a mirror directory as a one-line MirrorError."""
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MirrorAccessDenied(f"{what}: {reason}")
    if err.errno == errno.ENOSPC:
        return MirrorError(f"{what}: no space left on the mirror's device")
    return MirrorError(f"{what}: {reason}")


class FileMirror(Mirror):
    """A mirror in a local or network directory."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        root = os.path.abspath(os.fspath(root))
        self.root = root
        self._put_if_absent_mode: str | None = None
        if not os.path.isdir(root):
            if os.path.lexists(root):
                raise MirrorError(f"mirror path {root} exists but is not a directory")
            parent = os.path.dirname(root)
            if not os.path.isdir(parent):
                raise MirrorNotFound(
                    f"mirror directory {root} cannot be created: its parent {parent} does not exist"
                    " (is the drive mounted?)"
                )
            if not create:
                raise MirrorNotFound(f"mirror directory {root} does not exist")
            try:
                os.mkdir(root, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise _oserror(e, f"cannot create mirror directory {root}") from None
            self._fsync_dir(parent)
            log.info("created mirror directory %s", root)

    @property
    def url(self) -> str:
        return "file://" + quote(self.root)

    # -- paths --------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *validate_name(name).split("/"))

    def _ensure_dir(self, directory: str) -> None:
        """mkdir -p below root, fsyncing the parent of each new directory."""
        if os.path.isdir(directory):
            return
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
            if len(d) < len(self.root):  # root vanished (unplugged drive?)
                raise MirrorNotFound(f"mirror directory {self.root} does not exist any more")
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise MirrorError(f"cannot create directory {d} in mirror {self.url}: a file is in the way") from None
                continue
            self._fsync_dir(os.path.dirname(d))

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError as e:  # some network/FUSE filesystems refuse fsync on dirs
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
        finally:
            os.close(fd)

    def _write_temp(self, directory: str, data: bytes) -> str:
        """Write data to a fresh, fsynced temp file in directory; return its path."""
        self._ensure_dir(directory)
        tmp = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        return tmp

    # -- Mirror -------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        try:
            tmp = self._write_temp(directory, data)
            try:
                os.rename(tmp, path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            self._fsync_dir(directory)
        except OSError as e:
            raise _oserror(e, f"cannot write {name} to mirror {self.url}") from None

    def put_if_absent(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        directory = os.path.dirname(path)
        try:
            if os.path.lexists(path):  # cheap early out, avoids writing a temp
                return False
            tmp = self._write_temp(directory, data)
            try:
                created = self._create_noreplace(tmp, path)
            finally:
                _unlink_quietly(tmp)  # link mode leaves it; rename modes moved it
            self._fsync_dir(directory)
            return created
        except OSError as e:
            raise _oserror(e, f"cannot write {name} to mirror {self.url}") from None

    def _create_noreplace(self, tmp: str, path: str) -> bool:
        modes = [self._put_if_absent_mode] if self._put_if_absent_mode else [_LINK, _RENAME_NOREPLACE, _CHECK_THEN_RENAME]
        for mode in modes:
            try:
                if mode == _LINK:
                    os.link(tmp, path)
                elif mode == _RENAME_NOREPLACE:
                    _renameat2_noreplace(tmp, path)
                else:
                    # Best effort for filesystems with neither hard links nor
                    # renameat2 flags (old vfat, some FUSE/network fs): a
                    # writer racing between the check and the rename can be
                    # replaced.  Objects are immutable and content-named, so
                    # the loser's bytes are normally the same.
                    if os.path.lexists(path):
                        return False
                    os.rename(tmp, path)
            except FileExistsError:
                self._put_if_absent_mode = mode
                return False
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EMLINK):
                    log.debug("put_if_absent: %s unsupported on %s (%s)", mode, self.root, e)
                    continue
                raise
            if self._put_if_absent_mode != mode:
                if mode == _CHECK_THEN_RENAME:
                    log.warning("mirror %s: no atomic create-if-absent on this filesystem, using check-then-rename", self.url)
                self._put_if_absent_mode = mode
            return True
        raise MirrorError(f"mirror {self.url}: cannot create objects on this filesystem")

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise MirrorObjectMissing(f"object {name} does not exist in mirror {self.url}") from None
        except IsADirectoryError:
            raise MirrorObjectMissing(f"object {name} does not exist in mirror {self.url} (it is a directory)") from None
        except OSError as e:
            raise _oserror(e, f"cannot read {name} from mirror {self.url}") from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise MirrorObjectMissing(f"object {name} does not exist in mirror {self.url}") from None
        except OSError as e:
            raise _oserror(e, f"cannot read {name} from mirror {self.url}") from None
        try:
            parts = []
            while length > 0:
                chunk = os.pread(fd, length, offset)
                if not chunk:
                    break
                parts.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
            return b"".join(parts)
        except IsADirectoryError:
            raise MirrorObjectMissing(f"object {name} does not exist in mirror {self.url} (it is a directory)") from None
        except OSError as e:
            raise _oserror(e, f"cannot read {name} from mirror {self.url}") from None
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(self._path(name)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise _oserror(e, f"cannot stat {name} in mirror {self.url}") from None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix names completely.
        dir_part = prefix.rpartition("/")[0]
        start = os.path.join(self.root, *dir_part.split("/")) if dir_part else self.root
        if not os.path.isdir(self.root):
            raise MirrorNotFound(f"mirror directory {self.root} does not exist")
        found: list[tuple[str, int]] = []

        def onerror(e: OSError) -> None:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise _oserror(e, f"cannot list mirror {self.url}")

        for dirpath, dirnames, filenames in os.walk(start, onerror=onerror):
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            for fn in filenames:
                if fn.startswith(TEMP_PREFIX):
                    continue
                name = base + fn
                if not name.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, fn), follow_symlinks=False)
                except FileNotFoundError:  # deleted while listing
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((name, st.st_size))
        found.sort()
        return iter(found)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise _oserror(e, f"cannot delete {name} from mirror {self.url}") from None
        try:
            self._fsync_dir(os.path.dirname(path))
        except OSError as e:
            raise _oserror(e, f"cannot delete {name} from mirror {self.url}") from None

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise MirrorNotFound(f"mirror directory {self.root} does not exist (is the drive mounted?)")
        # A real write proves more than os.access (read-only mounts, full
        # disks, root-squashed NFS).
        try:
            tmp = self._write_temp(self.root, b"deltafs mirror check\n")
            os.unlink(tmp)
        except OSError as e:
            raise _oserror(e, f"mirror directory {self.root} is not writable") from None

    def clean_temp(self, older_than: float = 3600.0) -> int:
        """Remove temp files left by crashed writers; return how many."""
        removed = 0
        cutoff = time.time() - older_than
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for fn in filenames:
                if fn.startswith(TEMP_PREFIX):
                    p = os.path.join(dirpath, fn)
                    try:
                        if os.stat(p, follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(p)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
