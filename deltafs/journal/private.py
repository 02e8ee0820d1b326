"""A journal is its owner's alone: directory 0700, every file in it 0600.

A journal holds every version of every file of SRC, deleted and 0600 ones
included, with their paths, sizes, times and xattrs: anyone who can read
``data.mdb`` or a pack file can read them all.  So the journal directory
is created 0700 and everything in it is 0600 (subdirectories 0700),
whatever the umask; a writer tightens an existing journal when it opens
it (journals made by older versions were 0755/0644).  Modes are set
explicitly, never by changing the process umask.
"""

from __future__ import annotations

import errno
import os
import stat

from deltafs.errors import JournalError

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dir(path: str) -> None:
    """Create the journal directory (and missing parents) if needed; the
    directory itself gets mode 0700.  JournalError, one line, when it cannot
    be created or written (read-only filesystem, permissions)."""
    try:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    except OSError as e:
        raise JournalError(f"cannot create the journal directory {path}: {reason(e, path)}") from None
    if not os.path.isdir(path):
        raise JournalError(f"the journal {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise JournalError(f"cannot write the journal {path}: {reason(None, path)}")


def reason(e: OSError | None, path: str) -> str:
    erofs = e is not None and e.errno == errno.EROFS
    if not erofs:
        try:
            p = path
            while not os.path.exists(p) and os.path.dirname(p) != p:
                p = os.path.dirname(p)
            erofs = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            pass
    if erofs:
        return "its filesystem is read-only (give --journal DIR on a writable filesystem)"
    if e is None or e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


def tighten(path: str) -> None:
    """Give the journal directory mode 0700, every directory below it 0700
    and every other entry 0600 (symlinks are left alone: their mode means
    nothing and chmod would follow them).  Entries owned by someone else
    are left as they are.  Called by the writer at open."""
    uid = os.geteuid()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise JournalError(f"cannot open the journal directory {path}: {reason(e, path)}") from None
    try:
        _tighten_dir(fd, uid, depth=0)
    finally:
        os.close(fd)


def _tighten_dir(fd: int, uid: int, depth: int) -> None:
    st = os.fstat(fd)
    if st.st_uid == uid and stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.fchmod(fd, DIR_MODE)
    if depth > 2:  # packs/, vacuum.tmp/: nothing deeper is ours
        return
    with os.scandir(fd) as it:
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    for name, est in entries:
        if est.st_uid != uid or stat.S_ISLNK(est.st_mode):
            continue
        if stat.S_ISDIR(est.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue  # replaced meanwhile
            try:
                _tighten_dir(sub, uid, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_IMODE(est.st_mode) != FILE_MODE:
            try:
                os.chmod(name, FILE_MODE, dir_fd=fd, follow_symlinks=False)
            except NotImplementedError:  # no fchmodat(AT_SYMLINK_NOFOLLOW): it was no symlink above
                os.chmod(name, FILE_MODE, dir_fd=fd)
            except FileNotFoundError:
                pass
