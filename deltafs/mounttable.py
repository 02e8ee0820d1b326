"""Find deltafs mounts: the kernel's mount table plus a runtime record per mount.

The mount table (``/proc/self/mountinfo``) shows SRC as the source and
``fuse.deltafs`` as the type.  Each daemon also writes a small JSON record
(pid, SRC, MNT, journal) into the runtime directory, so commands given a
path inside MNT or SRC find the journal and the daemon.  The directory and
the records are this user's alone (see :func:`open_runtime_dir`): status,
umount and the history tools trust what a record says.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from deltafs.errors import MountError

FSTYPE = "fuse.deltafs"


@dataclass(frozen=True)
class MountEntry:
    mnt: str
    src: str
    fstype: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            entries.append(MountEntry(_unescape(fields[4]), _unescape(rfields[1]), rfields[0]))
    return entries


def mount_at(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly path (no stat: a dead mount hangs stat)."""
    path = os.path.abspath(path)
    found = None
    for e in mounts():
        if e.mnt == path:
            found = e
    return found


def deltafs_mounts() -> list[MountEntry]:
    return [e for e in mounts() if e.fstype == FSTYPE]


def runtime_dir() -> Path:
    """Where this user's mount records live (not created or checked here).

    ``$XDG_RUNTIME_DIR/deltafs``, else ``/run/user/UID/deltafs``: either
    base only if it is a directory of this user's (never another user's,
    e.g. one ``sudo -E`` carried over), else ``$TMPDIR/deltafs-UID``
    (``/tmp/deltafs-UID``).  :func:`open_runtime_dir` checks it.
    """
    uid = os.getuid()
    for base in (os.environ.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}"):
        if not base or not os.path.isabs(base):
            continue
        try:
            st = os.lstat(base)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and os.access(base, os.W_OK):
            return Path(base) / "deltafs"
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return Path(tmp if os.path.isabs(tmp) else "/tmp") / f"deltafs-{uid}"


def open_runtime_dir(create: bool = True) -> int | None:
    """A descriptor of the runtime directory, after checking that only this
    user can use it: a real directory (not a symlink), owned by this uid,
    mode 0700 at most.  In a shared /tmp another user may create
    ``/tmp/deltafs-UID`` first, to read our records or to plant a symlink
    we would write through: that is refused with one clear line, never
    used.  ``create``: make it (mode 0700) when missing, else return None.
    Everything in it is then reached through the descriptor, so a rename
    of the path meanwhile changes nothing.
    """
    d = runtime_dir()
    uid = os.getuid()
    if create:
        try:
            os.mkdir(d, 0o700)  # fails if anything is there already: it is then checked below
        except FileExistsError:
            pass
        except OSError as e:
            raise MountError(f"cannot create the runtime directory {d}: {e.strerror or e}") from None
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise MountError(f"the runtime directory {d} vanished while it was created") from None
        return None
    except OSError as e:
        if os.path.islink(d):  # O_NOFOLLOW | O_DIRECTORY says ELOOP or ENOTDIR
            what = "is a symlink"
        elif e.errno == errno.ENOTDIR:
            what = "is not a directory"
        else:
            what = f"cannot be opened ({e.strerror})"
        raise MountError(f"the runtime directory {d} {what}: remove it (or set XDG_RUNTIME_DIR "
                         "to a directory only you can use)") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != uid:
        problem = f"belongs to uid {st.st_uid}, not to you (uid {uid})"
    elif stat.S_IMODE(st.st_mode) & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}: other users may use it"
    if problem:
        os.close(fd)
        raise MountError(f"the runtime directory {d} {problem}: remove it (or set XDG_RUNTIME_DIR "
                         "to a directory only you can use)")
    return fd


def check_runtime_dir() -> None:
    """Create the runtime directory if needed; MountError unless it is ours alone."""
    os.close(open_runtime_dir(create=True))


def _record_name(mnt: str) -> str:
    key = hashlib.blake2b(os.fsencode(os.path.abspath(mnt)), digest_size=8).hexdigest()
    return f"mount-{key}.json"


def write_record(mnt: str, info: dict) -> Path:
    """Write MNT's record (mode 0600): a new temp file (``O_EXCL``, never
    through a symlink), renamed over the old record atomically."""
    name = _record_name(mnt)
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    dfd = open_runtime_dir(create=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                fd = -1
                os.fchmod(f.fileno(), 0o600)  # whatever the umask
                json.dump(info, f)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)
    return runtime_dir() / name


def read_record(mnt: str) -> dict | None:
    """MNT's record, or None (never through a symlink; MountError if the
    runtime directory is not this user's alone)."""
    dfd = open_runtime_dir(create=False)
    if dfd is None:
        return None
    try:
        try:
            fd = os.open(_record_name(mnt), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                return None
            rec = json.loads(f.read(1 << 20))
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(dfd)


def remove_record(mnt: str) -> None:
    try:
        dfd = open_runtime_dir(create=False)
    except MountError:
        return
    if dfd is None:
        return
    try:
        os.unlink(_record_name(mnt), dir_fd=dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def find_mount_for(path: str) -> MountEntry | None:
    """The deltafs mount whose MNT or SRC contains path (lexically, after realpath of parents)."""
    p = os.path.abspath(path)
    best = None
    for e in deltafs_mounts():
        for root in (e.mnt, e.src):
            if p == root or p.startswith(root.rstrip("/") + "/"):
                if best is None or len(root) > len(best[1]):
                    best = (e, root)
    return best[0] if best else None
