"""Records: the immutable, hash-chained entries of the ``changes`` db.

Stored value = ``hash (32 bytes) || body`` where body is a msgpack map and
``hash = blake2b-256(body)``.  The body contains ``seq`` and ``prev`` (the
previous record's hash, 32 zero bytes for seq 1), so the chain is checked
by hashing the stored body bytes as they are: no re-encoding, nothing
canonical to agree on.  Field names are in docs/format.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from deltafs.chunking import NewChunk

from .schema import HASH_LEN, pack_list, unpack_list

RECORD_VERSION = 1
ZERO_HASH = bytes(HASH_LEN)

OPS = frozenset(
    "create mkdir symlink mknod link unlink rmdir rename setattr setxattr removexattr write".split()
)
CAUSES = frozenset("write fsync preimage scan restore rename-over".split())
RENAME_EXCHANGE = 2  # same value as Linux's flag

# python attribute -> short msgpack key
_FIELDS = {
    "op": "op",
    "file_id": "fid",
    "path": "p",
    "path2": "p2",
    "target": "tg",
    "mode": "m",
    "uid": "u",
    "gid": "g",
    "mtime_ns": "t",
    "size": "s",
    "rdev": "rd",
    "flags": "fl",
    "xattr_name": "xn",
    "xattr_value": "xv",
    "cause": "c",
    "base_seq": "b",
}


@dataclass(slots=True)
class Change:
    """One operation to journal, built by the capture layer.

    ``file_id`` is the caller's stable identity of the file (survives
    renames).  For ``op="write"`` (a content version) give ``size``,
    ``cause``, ``edit`` = ``[(old_start, old_count, [(id, len), ...])]``
    against the full chunk list of record ``base_seq`` (``base_seq=0``:
    against the empty list, i.e. ``edit`` holds the full list) and in
    ``chunks`` the chunks this version introduces (already-known ones are
    skipped by the writer: dedup).
    """

    op: str
    file_id: int = 0
    path: bytes = b""
    path2: bytes | None = None
    target: bytes | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    size: int | None = None
    rdev: int | None = None
    flags: int | None = None
    xattr_name: bytes | None = None
    xattr_value: bytes | None = None
    cause: str | None = None
    base_seq: int | None = None
    edit: list | None = None
    chunks: list[NewChunk] = field(default_factory=list)


@dataclass(slots=True)
class Record:
    """A journaled change as read back: the Change fields plus what the writer assigned."""

    seq: int
    hlc: int
    op: str
    file_id: int = 0
    path: bytes = b""
    path2: bytes | None = None
    target: bytes | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    size: int | None = None
    rdev: int | None = None
    flags: int | None = None
    xattr_name: bytes | None = None
    xattr_value: bytes | None = None
    cause: str | None = None
    base_seq: int | None = None
    edit: list | None = None  # [(old_start, old_count, [(id, len)...])]
    stored: int | None = None  # bytes newly stored by this version
    content_hash: bytes | None = None
    prev: bytes = ZERO_HASH
    hash: bytes = ZERO_HASH

    @property
    def is_content(self) -> bool:
        return self.op == "write"

    @property
    def time_ns(self) -> int:
        """Wall-clock estimate of the record's HLC (ms precision)."""
        return (self.hlc >> 16) * 1_000_000

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (bytes as str/hex) for --json output."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name in ("path", "path2", "target"):
                v = v.decode("utf-8", "surrogateescape")
            elif isinstance(v, bytes):
                v = v.hex()
            elif f.name == "edit":
                v = [[s, c, [[i.hex(), n] for i, n in refs]] for s, c, refs in v]
            out[f.name] = v
        return out


def encode_record(seq: int, hlc: int, ch: Change, prev: bytes, stored: int | None, chash: bytes | None) -> tuple[bytes, bytes]:
    """-> (stored value, hash)."""
    body: dict[str, Any] = {"v": RECORD_VERSION, "seq": seq, "hlc": hlc, "prev": prev}
    for attr, key in _FIELDS.items():
        v = getattr(ch, attr)
        if v is not None:
            body[key] = v
    if ch.edit is not None:
        body["e"] = [[int(s), int(c), pack_list(refs)] for s, c, refs in ch.edit]
    if stored is not None:
        body["st"] = stored
    if chash is not None:
        body["ch"] = chash
    raw = msgpack.packb(body, use_bin_type=True)
    h = hashlib.blake2b(raw, digest_size=HASH_LEN).digest()
    return h + raw, h


def split_value(value: bytes) -> tuple[bytes, bytes]:
    """-> (stored hash, body bytes)."""
    return bytes(value[:HASH_LEN]), bytes(value[HASH_LEN:])


def body_hash(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=HASH_LEN).digest()


def decode_record(value: bytes) -> Record:
    h, body = split_value(value)
    d = msgpack.unpackb(body, raw=False)
    if d.get("v") != RECORD_VERSION:
        raise ValueError(f"unknown record version {d.get('v')}")
    kw = {attr: d[key] for attr, key in _FIELDS.items() if key in d}
    edit = None
    if "e" in d:
        edit = [(s, c, unpack_list(p)) for s, c, p in d["e"]]
    return Record(
        seq=d["seq"], hlc=d["hlc"], prev=d["prev"], hash=h, edit=edit,
        stored=d.get("st"), content_hash=d.get("ch"), **kw,
    )
