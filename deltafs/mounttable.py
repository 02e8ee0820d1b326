"""Find deltafs mounts: the kernel's mount table plus a runtime record per mount.

The mount table (``/proc/self/mountinfo``) shows SRC as the source and
``fuse.deltafs`` as the type.  Each daemon also writes a small JSON record
(pid, SRC, MNT, journal) into the runtime directory, so commands given a
path inside MNT or SRC find the journal and the daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    uid = os.getuid()
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}")
    if not base.is_dir() or not os.access(base, os.W_OK):
        base = Path(f"/tmp/deltafs-{uid}")
        base.mkdir(mode=0o700, exist_ok=True)
        return base
    d = base / "deltafs"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _record_path(mnt: str) -> Path:
    key = hashlib.blake2b(os.fsencode(os.path.abspath(mnt)), digest_size=8).hexdigest()
    return runtime_dir() / f"mount-{key}.json"


def write_record(mnt: str, info: dict) -> Path:
    p = _record_path(mnt)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, p)
    return p


def read_record(mnt: str) -> dict | None:
    try:
        return json.loads(_record_path(mnt).read_text())
    except (OSError, ValueError):
        return None


def remove_record(mnt: str) -> None:
    try:
        _record_path(mnt).unlink()
    except OSError:
        pass


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
