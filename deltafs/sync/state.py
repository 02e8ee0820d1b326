"""A member's sync state: ``JOURNAL/sync/state`` (msgpack, 0600, replaced atomically).

It holds what the member knows of the group: its membership, the synced
state (vector, content) of every path, open conflicts, each peer's cursor,
where each chunk of the store is, apply intents and the publish outbox
(docs/sync.md, "Crash safety").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import msgpack

STATE_VERSION = 1
SYNC_DIR = "sync"
STATE_FILE = "state"
# Maps whose packed entries SyncState.to_wire keeps between saves: their values are
# replaced, never changed in place (the cache is keyed by the value's identity).
CACHED = ("files", "chunks", "origins")


@dataclass
class SyncState:
    url: str
    device: str
    group_id: str
    name: str = ""
    endpoint_url: str | None = None
    joined_ns: int = 0
    # path -> synced state: an event dict ({p,k,x,v,c,l,s,m,t,tg,h,d,n}) plus
    # "ls": the local journal's content seq (files) it corresponds to
    files: dict = field(default_factory=dict)
    conflicts: dict = field(default_factory=dict)  # path -> [remote event, ...] (concurrent heads)
    cursor: int = 0  # local journal seq handled by detection
    published: int = 0  # own events named by head.json
    numbered: int = 0  # own events numbered (published + outbox)
    last_hash: bytes = bytes(32)  # hash of own event `numbered`
    outbox: list = field(default_factory=list)  # stored values of events numbered, not yet published
    outbox_chunks: list = field(default_factory=list)  # chunk ids those events need uploaded
    segments: list = field(default_factory=list)  # own [{name, first, last}]
    packs: list = field(default_factory=list)  # own pack names
    peers: dict = field(default_factory=dict)  # device -> {n, hash, name, seen_ns, last, packs, left}
    chunks: dict = field(default_factory=dict)  # chunk id -> [pack name, offset, length]
    intents: dict = field(default_factory=dict)  # path -> target state being applied
    pending: dict = field(default_factory=dict)  # path -> [remote events waiting for the path to settle]
    origins: dict = field(default_factory=dict)  # local journal seq -> "device:n" it applied
    left: bool = False
    paused: bool = False  # pause --group: no pass publishes or pulls until resume --group
    conflict_copies: bool = False  # group join --conflict-copies: a remote head also as NAME.conflict-DEV-N.EXT
    head_ns: int = 0  # when head.json was last written (heartbeat)
    head_seen: dict = field(default_factory=dict)  # the "seen" map it carried

    def to_wire(self) -> bytes:
        """The msgpack map of every field (and "version"): byte for byte what
        ``msgpack.packb`` of that dict gives, but the entries of the big maps
        (:data:`CACHED`) are packed once and kept, keyed by the identity of their
        value, so a save re-packs only what changed since the last one.  (Packing
        every path again made each save O(paths) of C under the GIL the mount's
        FUSE handlers share: 0.13 s at 50,000 paths, several times a pass.)
        The engine never changes such a value in place; it puts a new one."""
        packer = msgpack.Packer(use_bin_type=True)
        names = [f.name for f in fields(self)]
        out = [packer.pack_map_header(len(names) + 1)]
        cache = getattr(self, "_packed", None) or {}
        kept: dict = {}
        for name in names:
            val = getattr(self, name)
            out.append(packer.pack(name))
            if name not in CACHED:
                out.append(packer.pack(val))
                continue
            get = (cache.get(name) or {}).get
            pack = packer.pack
            new = kept[name] = {k: h if (h := get(k)) is not None and h[0] is v else (v, pack(k) + pack(v))
                                for k, v in val.items()}
            out.append(packer.pack_map_header(len(val)))
            out.append(b"".join([h[1] for h in new.values()]))
        out.append(packer.pack("version"))
        out.append(packer.pack(STATE_VERSION))
        self._packed = kept
        return b"".join(out)

    @classmethod
    def from_wire(cls, b: bytes) -> "SyncState":
        d = msgpack.unpackb(b, raw=False, strict_map_key=False)
        if d.pop("version", None) != STATE_VERSION:
            raise ValueError("unknown sync state version")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def state_path(journal_dir: str) -> str:
    return os.path.join(journal_dir, SYNC_DIR, STATE_FILE)


def load(journal_dir: str) -> SyncState | None:
    try:
        with open(state_path(journal_dir), "rb") as f:
            return SyncState.from_wire(f.read())
    except FileNotFoundError:
        return None


def save(journal_dir: str, st: SyncState) -> None:
    d = os.path.join(journal_dir, SYNC_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = os.path.join(d, f".{STATE_FILE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        data = st.to_wire()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(d, STATE_FILE))
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def identity(journal_dir: str) -> tuple | None:
    """(inode, size, mtime) of the state file: every save replaces it (a new inode)."""
    try:
        st = os.stat(state_path(journal_dir))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def remove(journal_dir: str) -> None:
    try:
        os.unlink(state_path(journal_dir))
    except FileNotFoundError:
        pass
