"""Bytes and objects of a group store (docs/sync.md, docs/format.md "Sync groups").

A group store is a mirror URL (any :class:`deltafs.mirrors.base.Mirror`,
plain or encrypted) holding ``group.json`` and, per member device,
``members/<device>/head.json`` (the only object a member replaces), its
event segments ``members/<device>/events/<first>-<last>.seg`` and its packs
``members/<device>/packs/<blake2b>.pack``.  Only the member itself writes
under its prefix.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field

import msgpack

from deltafs.errors import DeltafsError, MirrorError
from deltafs.mirrors import format as F

GROUP_FORMAT = 1
GROUP_OBJ = "group.json"
SEG_MAGIC = b"DFSSYN1\n"
HASH_LEN = 32
ZERO = bytes(HASH_LEN)
ENTRY_LEN = 20  # packed chunk list entry: id (16) || u32 length


class GroupError(DeltafsError):
    """A group store or membership problem (bad input: exit 2)."""

    exit_code = 2


class GroupCorruptError(MirrorError):
    """An object of a group store is not what its member's head promises."""


def _packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def blake(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=HASH_LEN).digest()


def pack_list(refs) -> bytes:
    return b"".join(bytes(i) + int(n).to_bytes(4, "big") for i, n in refs)


def unpack_list(b: bytes) -> list[tuple[bytes, int]]:
    if len(b) % ENTRY_LEN:
        raise ValueError("packed chunk list of bad length")
    return [(bytes(b[o:o + 16]), int.from_bytes(b[o + 16:o + 20], "big")) for o in range(0, len(b), ENTRY_LEN)]


# --- names -------------------------------------------------------------------
def head_name(dev: str) -> str:
    return f"members/{dev}/head.json"


def segment_name(dev: str, first: int, last: int) -> str:
    return f"members/{dev}/events/{first:016x}-{last:016x}.seg"


def pack_name(dev: str, data: bytes) -> str:
    return f"members/{dev}/packs/{blake(data).hex()}.pack"


# --- group.json --------------------------------------------------------------
def read_group(store) -> dict | None:
    """The group's identity, or None if the store holds no group."""
    try:
        if not store.exists(GROUP_OBJ):
            return None
        d = json.loads(store.get(GROUP_OBJ))
    except MirrorError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GroupCorruptError(f"group store {store.url}: {GROUP_OBJ} is corrupt: {e}") from None
    if d.get("format") != GROUP_FORMAT:
        raise GroupError(f"group store {store.url} has group format {d.get('format')}; "
                         f"this deltafs knows format {GROUP_FORMAT}")
    return d


def create_group(store) -> dict:
    """group.json, created if absent (two members racing for an empty store agree)."""
    g = read_group(store)
    if g is not None:
        return g
    if store.exists(F.MANIFEST):
        raise GroupError(f"{store.url} is a journal mirror, not a group store: use an empty store for a group")
    d = {"format": GROUP_FORMAT, "group_id": str(uuid.uuid4()), "created_ns": time.time_ns()}
    store.put_if_absent(GROUP_OBJ, json.dumps(d, sort_keys=True).encode())
    return read_group(store)


# --- head.json ---------------------------------------------------------------
@dataclass
class Head:
    """``members/<device>/head.json``: names the member's segments and packs."""

    device: str
    name: str = ""
    last: int = 0  # events published
    last_hash: str = "00" * HASH_LEN
    segments: list = field(default_factory=list)  # [{name, first, last}] contiguous from 1
    packs: list = field(default_factory=list)  # pack names, upload order
    seen: dict = field(default_factory=dict)  # device -> events of that device handled
    left: bool = False
    updated_ns: int = 0

    def encode(self) -> bytes:
        d = asdict(self)
        d["format"] = GROUP_FORMAT
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, url: str, dev: str) -> "Head":
        try:
            d = json.loads(data)
            if d.pop("format") != GROUP_FORMAT:
                raise ValueError("unknown format")
            h = cls(**d)
            if h.device != dev:
                raise ValueError(f"it names device {h.device}")
            n = 0
            for s in h.segments:
                if s["first"] != n + 1 or s["last"] < s["first"]:
                    raise ValueError("segments are not contiguous")
                n = s["last"]
            if n != h.last:
                raise ValueError("segments do not end at last")
            return h
        except Exception as e:  # noqa: BLE001
            raise GroupCorruptError(f"group store {url}: {head_name(dev)} is corrupt: {e}") from None


def read_head(store, dev: str) -> Head | None:
    name = head_name(dev)
    if not store.exists(name):
        return None
    return Head.decode(store.get(name), store.url, dev)


def list_members(store) -> list[str]:
    out = []
    for name, _ in store.list("members/"):
        parts = name.split("/")
        if len(parts) == 3 and parts[2] == "head.json":
            out.append(parts[1])
    return sorted(out)


# --- segments ------------------------------------------------------------------
def event_value(prev: bytes, ev: dict) -> tuple[bytes, bytes]:
    """-> (stored value = hash || body, hash) of an event following the one hashed ``prev``."""
    body = _packb(ev)
    h = blake(prev + body)
    return h + body, h


def encode_segment(dev: str, first: int, last: int, values: list[bytes]) -> bytes:
    return SEG_MAGIC + _packb({"v": 1, "device": dev, "first": first, "last": last, "e": values})


def decode_segment(data: bytes, name: str, url: str, dev: str, first: int, last: int,
                   prev: bytes) -> tuple[list[dict], bytes]:
    """-> (events, hash of the last); each event gets ``d`` (device) and ``n`` (its number)."""
    try:
        if not data.startswith(SEG_MAGIC):
            raise ValueError("bad magic")
        d = msgpack.unpackb(data[len(SEG_MAGIC):], raw=False, strict_map_key=False)
        if d["device"] != dev or d["first"] != first or d["last"] != last or len(d["e"]) != last - first + 1:
            raise ValueError("its range does not match its name")
        out = []
        for i, value in enumerate(d["e"]):
            h, body = bytes(value[:HASH_LEN]), bytes(value[HASH_LEN:])
            if blake(prev + body) != h:
                raise ValueError(f"event {first + i} does not continue the chain")
            ev = msgpack.unpackb(body, raw=False, strict_map_key=False)
            ev["d"], ev["n"] = dev, first + i
            if ev.get("v", {}).get(dev) != first + i:
                raise ValueError(f"event {first + i} does not count itself in its vector")
            out.append(ev)
            prev = h
        return out, prev
    except Exception as e:  # noqa: BLE001
        raise GroupCorruptError(f"group store {url}: {name} is corrupt: {e}") from None


# --- packs -------------------------------------------------------------------
def encode_pack(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """Mirror pack format; each value is a standalone payload (chunking.compress_chunk)."""
    return F.encode_pack(chunks)


def read_pack_index(store, name: str) -> list[tuple[bytes, int, int]]:
    size = None
    for n, sz in store.list(name):
        if n == name:
            size = sz
    if size is None:
        raise GroupCorruptError(f"group store {store.url}: pack {name} is missing")
    tail = store.get_range(name, max(0, size - (256 << 10)), 256 << 10)
    need = F.index_size(tail)
    if need is not None and need > len(tail):
        tail = store.get_range(name, max(0, size - need), need)
    try:
        return F.pack_index(tail, name, store.url)
    except MirrorError as e:
        raise GroupCorruptError(str(e)) from None
