"""Records: the immutable, hash-chained entries of the ``changes`` db.

Stored value = ``hash (32 bytes) || body`` where body is a msgpack map.
Record version 2 (written since journal format 3) keys the map with small
integers and ``hash = blake2b-256(prev || body)``, ``prev`` being the
previous record's hash (32 zero bytes for seq 1); its seq is its position
in the chain (the LMDB key, a mirror segment's first seq + index), so
neither is repeated in the body.  Version 1 (formats 1-2) used string keys,
carried ``seq`` and ``prev`` in the body and hashed the body alone; such
records stay as they were written and are still read and checked.  Either
way the chain is checked by hashing the stored bytes as they are: no
re-encoding, nothing canonical to agree on.  Keys are in docs/format.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from deltafs.chunking import NewChunk

from .schema import HASH_LEN, pack_list, unpack_list

RECORD_VERSION = 2
ZERO_HASH = bytes(HASH_LEN)

# record v2 stores op and cause as their index in these tuples (never reorder; append only)
OP_CODES = tuple("create mkdir symlink mknod link unlink rmdir rename setattr setxattr removexattr write".split())
CAUSE_CODES = tuple("write fsync preimage scan restore rename-over repair sync".split())  # sync: format 8
OPS = frozenset(OP_CODES)
CAUSES = frozenset(CAUSE_CODES)
_OP_NUM = {name: i for i, name in enumerate(OP_CODES)}
_CAUSE_NUM = {name: i for i, name in enumerate(CAUSE_CODES)}
RENAME_EXCHANGE = 2  # same value as Linux's flag

# python attribute -> msgpack key of record v1
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

# record v2: python attribute -> integer key (0 is the record version; see docs/format.md)
_V2_KEYS = {
    "hlc": 1, "op": 2, "file_id": 3, "path": 4, "path2": 5, "target": 6, "mode": 7, "uid": 8,
    "gid": 9, "mtime_ns": 10, "size": 11, "rdev": 12, "flags": 13, "xattr_name": 14,
    "xattr_value": 15, "cause": 16, "base_seq": 17, "edit": 18, "stored": 19, "content_hash": 20,
    "origin": 21,  # format 8: "DEVICE:N", the sync group event a record applied (docs/sync.md)
    "content_tree": 22,  # format 11: the two-level content hash of a list over one page (schema.tree_hash)
}
_V2_ATTRS = {k: a for a, k in _V2_KEYS.items()}


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
    origin: str | None = None  # "DEVICE:N": applied from a sync group's event (format 8)


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
    content_hash: bytes | None = None  # flat: blake2b-256 of the packed list (key 20)
    origin: str | None = None  # "DEVICE:N" of the sync group event this record applied (format 8)
    prev: bytes = ZERO_HASH
    hash: bytes = ZERO_HASH
    content_tree: bytes | None = None  # two-level (format 11, a list over one page; key 22)

    @property
    def is_content(self) -> bool:
        return self.op == "write"

    @property
    def version_hash(self) -> tuple[bool, bytes] | None:
        """(tree?, hash) of the content hash this record carries, or None.
        Hashes of different kinds never compare: one content may carry either
        (a version written before format 11, or its list not over one page)."""
        if self.content_tree is not None:
            return True, self.content_tree
        return None if self.content_hash is None else (False, self.content_hash)

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


def encode_record(seq: int, hlc: int, ch: Change, prev: bytes, stored: int | None, chash: bytes | None,
                  ctree: bytes | None = None) -> tuple[bytes, bytes]:
    """-> (stored value, hash) of record ``seq`` (version 2) following the record hashed ``prev``.

    ``seq`` is not stored: it is the record's place in the chain.  ``chash``
    the flat content hash (key 20) or ``ctree`` the tree hash (key 22).
    """
    del seq
    body: dict[int, Any] = {0: RECORD_VERSION, 1: hlc}
    for attr in _FIELDS:
        v = getattr(ch, attr)
        if v is not None:
            body[_V2_KEYS[attr]] = v
    body[2] = _OP_NUM[ch.op]
    if ch.cause is not None:
        body[16] = _CAUSE_NUM[ch.cause]
    if ch.edit is not None:
        # a capture's PackedRefs is the packed form already: its buffer as it is (msgpack
        # writes a bytearray as bin, the same bytes), not a copy (issue 19 memory)
        body[18] = [[int(s), int(c), _packed(refs)] for s, c, refs in ch.edit]
    if stored is not None:
        body[19] = stored
    if chash is not None:
        body[20] = chash
    if ch.origin is not None:
        body[21] = ch.origin
    if ctree is not None:
        body[22] = ctree
    parts = _body_parts(body)
    hasher = hashlib.blake2b(prev, digest_size=HASH_LEN)  # record_hash(prev, body, 2), part by part
    for p in parts:
        hasher.update(p)
    h = hasher.digest()
    return b"".join((h, *parts)), h


SPLIT_BYTES = 64 << 10  # a packed list this long is hashed and joined as it is (_body_parts)


def _body_parts(body: dict[int, Any]) -> list:
    """``msgpack.packb(body, use_bin_type=True)`` as parts whose concatenation
    is those very bytes: each packed list of SPLIT_BYTES or more is a part of
    its own, the caller's buffer as it is, behind its msgpack bin header.
    packb would copy a 4 GiB file's 3.7 MB list into its buffer, growing
    it by reallocation (three copies alive at its peak), then the stored
    value would be one more (``hash + body``): the record is now one join
    of the parts, the only copy (issue 19, twelfth session)."""
    edit = body.get(18)
    if edit is None or all(len(p) < SPLIT_BYTES for _, _, p in edit):
        return [msgpack.packb(body, use_bin_type=True)]
    pk = msgpack.Packer(use_bin_type=True)
    parts: list = [pk.pack_map_header(len(body))]
    for k, v in body.items():  # in the dict's order, as packb
        if k != 18:
            parts.append(pk.pack(k) + pk.pack(v))
            continue
        parts.append(pk.pack(k) + pk.pack_array_header(len(v)))
        for span in v:
            p = span[2]
            if len(p) < SPLIT_BYTES:
                parts.append(pk.pack(span))
            else:
                parts.append(pk.pack_array_header(3) + pk.pack(span[0]) + pk.pack(span[1]) + _bin_header(len(p)))
                parts.append(p)
    return parts


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of ``n`` bytes (bin 8, 16 or 32: the smallest that holds n)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def record_of(seq: int, hlc: int, ch: Change, h: bytes, stored: int | None, chash: bytes | None,
              ctree: bytes | None = None) -> Record:
    """The record ``encode_record(seq, hlc, ch, ...)`` stores (hashed ``h``), as
    ``decode_record(value, seq, lists=False)`` would read it back, built from
    ``ch`` without decoding: the writer applies it to the tree state.  Bytes
    fields are copied as bytes (the decoder's type), the edit left out."""
    return Record(
        seq=seq, hlc=hlc, op=ch.op, file_id=ch.file_id, path=_b(ch.path), path2=_b(ch.path2),
        target=_b(ch.target), mode=ch.mode, uid=ch.uid, gid=ch.gid, mtime_ns=ch.mtime_ns, size=ch.size,
        rdev=ch.rdev, flags=ch.flags, xattr_name=_b(ch.xattr_name), xattr_value=_b(ch.xattr_value),
        cause=ch.cause, base_seq=ch.base_seq, stored=stored, content_hash=chash, origin=ch.origin,
        hash=h, content_tree=ctree,
    )


def _b(v):
    return v if v is None or type(v) is bytes else bytes(v)


def _packed(refs):
    """``refs`` packed (:func:`pack_list`): a PackedRefs' own buffer, no copy."""
    p = getattr(refs, "packed", None)
    return p if p is not None else pack_list(refs)


def split_value(value: bytes) -> tuple[bytes, bytes]:
    """-> (stored hash, body bytes)."""
    return bytes(value[:HASH_LEN]), bytes(value[HASH_LEN:])


def record_hash(prev: bytes, body: bytes, version: int) -> bytes:
    """The chain hash of a record body: blake2b-256(prev || body), or of the body alone (v1)."""
    h = hashlib.blake2b(digest_size=HASH_LEN)
    if version >= 2:
        h.update(prev)
    h.update(body)
    return h.digest()


def _body(value: bytes) -> dict:
    d = msgpack.unpackb(memoryview(value)[HASH_LEN:], raw=False, strict_map_key=False)
    if not isinstance(d, dict):
        raise ValueError("record body is not a map")
    return d


def decode_record(value: bytes, seq: int, *, lists: bool = True) -> Record:
    """The record stored as ``value`` under ``seq``.

    For a version-1 record the seq and prev in its body are returned as
    stored (check_link compares them); a version-2 record gets ``seq`` and
    ``prev`` = ZERO_HASH (its prev is the previous record's hash, which
    only the chain knows).  ``lists=False``: a content record's edit is
    left undecoded (``edit`` None): the tree state needs none of it, and a
    4 GiB file's edit decodes to ~100 bytes of Python objects per chunk.
    """
    return _decode(value, seq, lists)[0]


def _decode(value: bytes, seq: int, lists: bool = True) -> tuple[Record, int]:
    d = _body(value)
    h = bytes(value[:HASH_LEN])
    if d.get(0) == 2:
        kw = {_V2_ATTRS[k]: v for k, v in d.items() if k in _V2_ATTRS}
        kw["op"] = OP_CODES[kw["op"]]
        if "cause" in kw:
            kw["cause"] = CAUSE_CODES[kw["cause"]]
        if "edit" in kw:
            kw["edit"] = [(s, c, unpack_list(p)) for s, c, p in kw["edit"]] if lists else None
        return Record(seq=seq, hash=h, **kw), 2
    if d.get("v") != 1:
        raise ValueError(f"unknown record version {d.get('v', d.get(0))}")
    kw = {attr: d[key] for attr, key in _FIELDS.items() if key in d}
    edit = None
    if "e" in d and lists:
        edit = [(s, c, unpack_list(p)) for s, c, p in d["e"]]
    return Record(
        seq=d["seq"], hlc=d["hlc"], prev=d["prev"], hash=h, edit=edit,
        stored=d.get("st"), content_hash=d.get("ch"), **kw,
    ), 1


def check_link(value: bytes, seq: int, prev: bytes) -> tuple[Record | None, str | None]:
    """Check that ``value`` is record ``seq`` continuing the chain after the record hashed ``prev``.

    -> (record, None), or (record or None, what is wrong) in the words a
    user reads after "record N ".
    """
    try:
        rec, version = _decode(value, seq)
    except Exception as e:  # noqa: BLE001 - any decode failure is the same problem
        return None, f"cannot be decoded: {e}"
    if record_hash(prev, bytes(value[HASH_LEN:]), version) != rec.hash:
        if version == 2:
            return rec, "has been altered or does not continue the chain: its hash does not match"
        return rec, "has been altered: its hash does not match its content"
    if rec.seq != seq:
        return rec, f"claims to be record {rec.seq}"
    if version == 1 and rec.prev != prev:
        return rec, "does not continue the chain (its prev is not the previous record's hash)"
    return rec, None
