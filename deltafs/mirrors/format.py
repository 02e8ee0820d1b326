"""Bytes of a mirror: manifest, segments, packs, snapshots (docs/format.md,
"Mirror format").  Pure: no I/O; replicate.py and clone.py move the bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import msgpack

from deltafs.errors import MirrorError

MIRROR_FORMAT = 1
MANIFEST = "manifest.json"
KEY_BLOB = "deltafs-key.json"  # present only in encrypted mirrors (crypto.py)
SEGMENT_MAGIC = b"DFSSEG1\n"
PACK_MAGIC = b"DFSPACK1"
PACK_TRAILER = b"DFSPIDX1"
_TAIL = struct.Struct(">I8s")  # index length, trailer magic
PACK_TARGET_BYTES = 16 << 20  # a pack is closed once it holds this much
ID_LEN = 16
HASH_LEN = 32


class MirrorCorruptError(MirrorError):
    """An object of a mirror whose bytes are not what the manifest promises."""


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def blake(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=HASH_LEN).hexdigest()


# --- names -------------------------------------------------------------------
def segment_name(first: int, last: int) -> str:
    return f"segments/{first:016x}-{last:016x}.seg"


def pack_name(data: bytes) -> str:
    return f"packs/{blake(data)}.pack"


def snapshots_name(data: bytes) -> str:
    return f"snapshots/{blake(data)}.snap"


# --- manifest ----------------------------------------------------------------
@dataclass
class Manifest:
    """``manifest.json``: the one mutable object; names everything else."""

    journal_id: str
    last_seq: int = 0
    last_hash: str = "00" * HASH_LEN
    segments: list[dict] = field(default_factory=list)  # {name, first, last, last_hash, packs}
    packs: list[dict] = field(default_factory=list)  # {name, size, chunks}
    snapshots: str | None = None  # name of the snapshots object
    updated_ns: int = 0
    format: int = MIRROR_FORMAT

    def encode(self) -> bytes:
        d = {"format": self.format, "journal_id": self.journal_id, "last_seq": self.last_seq,
             "last_hash": self.last_hash, "updated_ns": self.updated_ns, "snapshots": self.snapshots,
             "segments": self.segments, "packs": self.packs}
        return json.dumps(d, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, url: str) -> "Manifest":
        try:
            d = json.loads(data)
            fmt = d["format"]
        except Exception as e:  # noqa: BLE001 - any garbage is the same problem
            raise MirrorCorruptError(f"mirror {url}: {MANIFEST} cannot be read: {e}") from None
        if fmt != MIRROR_FORMAT:
            raise MirrorError(f"mirror {url} has mirror format {fmt}; this deltafs reads format {MIRROR_FORMAT}")
        try:
            return cls(journal_id=d["journal_id"], last_seq=int(d["last_seq"]), last_hash=d["last_hash"],
                       segments=list(d["segments"]), packs=list(d["packs"]), snapshots=d.get("snapshots"),
                       updated_ns=int(d.get("updated_ns", 0)), format=fmt)
        except (KeyError, TypeError, ValueError) as e:
            raise MirrorCorruptError(f"mirror {url}: {MANIFEST} lacks or garbles field {e}") from None


# --- segments ----------------------------------------------------------------
def encode_segment(journal_id: str, first: int, last: int, packs: list[str], values: list[bytes],
                   pruned: list[int] | None = None) -> bytes:
    """Magic, then a msgpack map; ``r`` holds the records' stored values verbatim.

    ``pruned``: seqs of the range that were pruned versions when shipped
    (their freed chunks are not in any pack); omitted when empty."""
    d = {"v": 1, "journal_id": journal_id, "first": first, "last": last, "packs": packs, "r": values}
    if pruned:
        d["pruned"] = sorted(pruned)
    return SEGMENT_MAGIC + _packb(d)


def decode_segment(data: bytes, name: str, url: str) -> dict:
    if not data.startswith(SEGMENT_MAGIC):
        raise MirrorCorruptError(f"mirror {url}: segment {name} is corrupt (bad magic)")
    try:
        d = msgpack.unpackb(data[len(SEGMENT_MAGIC):], raw=False)
        values = d["r"]
        if len(values) != d["last"] - d["first"] + 1:
            raise ValueError("record count does not match its range")
        d["pruned"] = [int(s) for s in d.get("pruned", [])]
        if any(not d["first"] <= s <= d["last"] for s in d["pruned"]):
            raise ValueError("a pruned seq lies outside its range")
    except Exception as e:  # noqa: BLE001
        raise MirrorCorruptError(f"mirror {url}: segment {name} is corrupt: {e}") from None
    return d


# --- packs -------------------------------------------------------------------
def encode_pack(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """``PACK_MAGIC``, the stored chunk values back to back, a msgpack index
    ``[[id, offset, length], ...]``, then u32 index length and ``PACK_TRAILER``."""
    out = [PACK_MAGIC]
    off = len(PACK_MAGIC)
    index = []
    for cid, val in chunks:
        index.append([cid, off, len(val)])
        out.append(val)
        off += len(val)
    idx = _packb(index)
    out.append(idx)
    out.append(_TAIL.pack(len(idx), PACK_TRAILER))
    return b"".join(out)


def pack_index(tail: bytes, name: str, url: str) -> list[tuple[bytes, int, int]]:
    """The index from the last bytes of a pack (enough of them to hold it)."""
    try:
        n, magic = _TAIL.unpack(tail[-_TAIL.size:])
        if magic != PACK_TRAILER or n + _TAIL.size > len(tail):
            raise ValueError("bad trailer")
        return [(bytes(i), o, ln) for i, o, ln in msgpack.unpackb(tail[-_TAIL.size - n:-_TAIL.size])]
    except Exception as e:  # noqa: BLE001
        raise MirrorCorruptError(f"mirror {url}: pack {name} is corrupt: its index cannot be read ({e})") from None


def index_size(tail: bytes) -> int | None:
    """Bytes of index + trailer, from a tail of at least the trailer; None if not a pack tail."""
    if len(tail) < _TAIL.size:
        return None
    n, magic = _TAIL.unpack(tail[-_TAIL.size:])
    return n + _TAIL.size if magic == PACK_TRAILER else None


def decode_pack(data: bytes, name: str, url: str) -> dict[bytes, bytes]:
    """id -> stored chunk value; the whole pack must hash to its name."""
    if pack_name(data) != name:
        raise MirrorCorruptError(f"mirror {url}: pack {name} is corrupt: its content does not match its name")
    out = {}
    for cid, off, ln in pack_index(data, name, url):
        out[cid] = data[off:off + ln]
    return out


def split_packs(chunks: list[tuple[bytes, bytes]], target: int = PACK_TARGET_BYTES) -> list[list[tuple[bytes, bytes]]]:
    groups: list[list] = [[]]
    size = 0
    for item in chunks:
        if groups[-1] and size + len(item[1]) > target:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item[1])
    return [g for g in groups if g]


# --- snapshots ---------------------------------------------------------------
def encode_snapshots(items: list[tuple[str, object]]) -> bytes:
    return _packb({"v": 1, "snapshots": dict(items)})


def decode_snapshots(data: bytes, name: str, url: str) -> dict:
    try:
        return msgpack.unpackb(data, raw=False)["snapshots"]
    except Exception as e:  # noqa: BLE001
        raise MirrorCorruptError(f"mirror {url}: {name} is corrupt: {e}") from None
