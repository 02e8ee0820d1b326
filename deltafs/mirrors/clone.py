"""Reading a mirror back: rebuild a journal from it (clone), verify it.

``clone_journal`` writes the mirror's records and chunks into a fresh
journal (same seqs, HLCs and hashes: the chain is the original's); the
tree is then written by ``history.restore`` (cli.cmd_clone calls both, so
this module stays below history in the import order).
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field

from deltafs.chunking import MAX_DELTA_DEPTH, chunk_id, decompress_chunk
from deltafs.errors import MirrorError
from deltafs.journal import ZERO_HASH, Journal, check_link, decode_chunk, decode_record

from . import format as F
from .base import Mirror, MirrorObjectMissing
from .replicate import load_manifest, read_pack_indexes

log = logging.getLogger(__name__)


def require_manifest(mirror: Mirror) -> F.Manifest:
    m = load_manifest(mirror)
    if m is None and mirror.exists(F.KEY_BLOB):
        raise MirrorError(f"mirror {mirror.url} is encrypted: open it with its passphrase or key file")
    if m is None:
        raise MirrorError(f"no deltafs mirror at {mirror.url} (no {F.MANIFEST})")
    return m


def _get(mirror: Mirror, name: str) -> bytes:
    try:
        return mirror.get(name)
    except MirrorObjectMissing:
        raise F.MirrorCorruptError(f"mirror {mirror.url}: {name} is named by the manifest but missing") from None


@dataclass
class CloneReport:
    mirror: str
    journal: str
    journal_id: str  # the new journal's id (a clone is a journal of its own)
    source_journal_id: str
    records: int = 0
    chunks: int = 0
    snapshots: int = 0
    pruned: int = 0  # versions the mirror holds as pruned (marked pruned in the clone)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def clone_journal(mirror: Mirror, journal_dir: str) -> CloneReport:
    """Create a journal at ``journal_dir`` (must not exist) holding every
    record and chunk of the mirror.  Segments are applied one by one, each
    in one transaction with the chunks of the packs it names.  Versions a
    segment lists as ``pruned`` (shipped after compaction freed their
    chunks) may lack chunks; once all records are in they are pruned in the
    clone as well (``Journal.prune``: refs and checkpoints as in the
    original)."""
    t0 = time.monotonic()
    m = require_manifest(mirror)
    if os.path.exists(os.path.join(journal_dir, "data.mdb")):
        raise MirrorError(f"{journal_dir} already holds a journal")
    j = Journal.open(journal_dir, create=True)
    try:
        rep = CloneReport(mirror.url, j.path, j.journal_id, m.journal_id)
        expect = 1
        pruned: set[int] = set()
        for seg in m.segments:
            if seg["first"] != expect:
                raise F.MirrorCorruptError(f"mirror {mirror.url}: segment {seg['name']} starts at {seg['first']}, "
                                           f"expected record {expect}")
            d = F.decode_segment(_get(mirror, seg["name"]), seg["name"], mirror.url)
            if d["journal_id"] != m.journal_id or d["first"] != seg["first"] or d["last"] != seg["last"]:
                raise F.MirrorCorruptError(f"mirror {mirror.url}: segment {seg['name']} does not match the manifest")
            chunks: dict[bytes, bytes] = {}
            for name in d["packs"]:
                chunks.update(F.decode_pack(_get(mirror, name), name, mirror.url))
            try:
                j.append_raw(d["r"], chunks, pruned=set(d["pruned"]))
            except Exception as e:
                raise F.MirrorCorruptError(f"mirror {mirror.url}: segment {seg['name']}: {e}") from None
            pruned.update(d["pruned"])
            rep.records += len(d["r"])
            rep.chunks += len(chunks)
            expect = seg["last"] + 1
        if expect - 1 != m.last_seq:
            raise F.MirrorCorruptError(f"mirror {mirror.url}: segments end at record {expect - 1}, "
                                       f"the manifest says {m.last_seq}")
        if pruned:  # versions shipped after compaction freed their chunks: pruned here too
            with j.reader() as r:
                retained = [s for s in r.retained_content() if s not in pruned]
            j.prune(pruned, retained)
            rep.pruned = len(pruned)
        if m.snapshots:
            snaps = F.decode_snapshots(_get(mirror, m.snapshots), m.snapshots, mirror.url)
            for name, value in snaps.items():
                j.kv_put("snapshots", name, value)
            rep.snapshots = len(snaps)
        j.set_setting("clone_of", {"mirror": mirror.url, "journal_id": m.journal_id, "seq": m.last_seq,
                                   "time_ns": time.time_ns()})
    finally:
        j.close()
    rep.seconds = time.monotonic() - t0
    log.info("cloned %d records from %s into %s", rep.records, mirror.url, journal_dir)
    return rep


class _MirrorPoints:
    """What ``when.resolve_when`` asks of a journal, answered from a mirror's
    manifest, its snapshots object and (only for a time) its first record."""

    def __init__(self, mirror: Mirror, m: F.Manifest) -> None:
        self.mirror, self.m = mirror, m
        self._first = None

    def head_seq(self) -> int:
        return self.m.last_seq

    def kv_get(self, db: str, key: str, default=None):
        snaps = F.decode_snapshots(_get(self.mirror, self.m.snapshots), self.m.snapshots,
                                   self.mirror.url) if self.m.snapshots else {}
        return snaps.get(key, default)

    def record(self, seq: int):
        if self._first is None:
            seg = self.m.segments[0]
            self._first = decode_record(F.decode_segment(_get(self.mirror, seg["name"]), seg["name"],
                                                         self.mirror.url)["r"][0], 1)
        return self._first

    def seq_at_time(self, time_ns: int) -> int:  # only "before the first record or not" matters here
        return int(self.m.last_seq > 0 and self.record(1).time_ns <= time_ns)


def check_when(mirror: Mirror, text: str) -> None:
    """Refuse ``clone --at WHEN`` the mirror cannot satisfy before the mirror
    is downloaded: a WHEN that does not parse, a time in the future, an
    unknown version id or snapshot (manifest and snapshots object only), a
    time before the first record (the first segment only)."""
    from deltafs.when import resolve_when

    resolve_when(_MirrorPoints(mirror, require_manifest(mirror)), text)


# --- verify ------------------------------------------------------------------
@dataclass
class MirrorVerifyReport:
    mirror: str
    journal_id: str = ""
    records: int = 0
    segments: int = 0
    packs: int = 0
    packs_checked: int = 0
    chunks_checked: int = 0
    pruned: int = 0  # pruned versions: their freed chunks are not looked for
    full: bool = False
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Chunks:
    """Chunk values fetched pack by pack, for decoding deltas across packs."""

    def __init__(self, mirror: Mirror, packs: list[dict]) -> None:
        self.mirror = mirror
        self.packs = packs
        self.loaded: dict[str, dict[bytes, bytes]] = {}
        self.values: dict[bytes, bytes] = {}
        self.where: dict[bytes, str] | None = None
        self.raw: dict[bytes, bytes] = {}

    def load(self, name: str) -> dict[bytes, bytes]:
        if name not in self.loaded:
            got = F.decode_pack(_get(self.mirror, name), name, self.mirror.url)
            self.loaded[name] = got
            self.values.update(got)
        return self.loaded[name]

    def locate(self) -> dict[bytes, str]:
        if self.where is None:
            self.where = read_pack_indexes(self.mirror, self.packs)
        return self.where

    def raw_of(self, cid: bytes, depth: int = 0) -> bytes:
        """Raw bytes of ``cid``, verified; a delta's bases decoded first.
        ``depth``: delta links followed to get here; over MAX_DELTA_DEPTH
        (a chain that loops) is an error.  The decoded chunks are kept
        (up to 4096), so a chunk shared by several values is decoded once."""
        if cid in self.raw:
            return self.raw[cid]
        if cid not in self.values:
            name = self.locate().get(cid)
            if name is None:
                raise ValueError(f"chunk {cid.hex()} is in no pack of the mirror")
            self.load(name)
        if depth > MAX_DELTA_DEPTH:
            raise ValueError("delta chain loops")
        d, raw_len, bases, payload = decode_chunk(self.values[cid])
        base_raw = b"".join(self.raw_of(b, depth + 1) for b in bases) if bases else None
        raw = decompress_chunk(payload, base_raw)
        if len(raw) != raw_len or chunk_id(raw) != cid:
            raise ValueError(f"chunk {cid.hex()} does not match its id")
        if len(self.raw) < 4096:
            self.raw[cid] = raw
        return raw


def verify_mirror(mirror: Mirror, *, full: bool = False, sample: int = 8,
                  rnd: random.Random | None = None) -> MirrorVerifyReport:
    """Check the manifest, the hash chain across every segment and (all
    with ``full``, else a sample of) the packs: each must hash to its name
    and every chunk in it must decode to bytes matching its id.  Problems
    are collected in ``report.errors``, each naming the object or record."""
    rep = MirrorVerifyReport(mirror.url, full=full)
    m = require_manifest(mirror)
    rep.journal_id = m.journal_id
    rep.segments, rep.packs = len(m.segments), len(m.packs)
    present = dict(mirror.list("packs/"))
    pack_names = {p["name"] for p in m.packs}
    for p in m.packs:
        if p["name"] not in present:
            rep.errors.append(f"pack {p['name']} is named by the manifest but missing")
        elif present[p["name"]] != p["size"]:
            rep.errors.append(f"pack {p['name']} has {present[p['name']]} bytes, the manifest says {p['size']}")
    prev, last_hlc, expect = ZERO_HASH, -1, 1
    named: list[tuple[int, bytes]] = []
    for seg in m.segments:
        name = seg["name"]
        if seg["first"] != expect:
            rep.errors.append(f"segment {name} starts at record {seg['first']}, expected {expect}: records missing")
        try:
            d = F.decode_segment(_get(mirror, name), name, mirror.url)
        except MirrorError as e:
            rep.errors.append(str(e))
            return rep  # the chain cannot be followed past a broken segment
        if d["journal_id"] != m.journal_id:
            rep.errors.append(f"segment {name} belongs to journal {d['journal_id']}")
        seg_pruned = set(d["pruned"])
        for p in d["packs"]:
            if p not in pack_names:
                rep.errors.append(f"segment {name} names pack {p}, which the manifest does not")
        for value in d["r"]:
            r, problem = check_link(value, expect, prev)
            if r is None:
                rep.errors.append(f"segment {name}: record {expect} {problem}")
                return rep
            if problem:
                rep.errors.append(f"record {expect} (segment {name}) {problem}")
            if r.hlc <= last_hlc:
                rep.errors.append(f"record {r.seq} (segment {name}) goes back in time")
            if r.seq in seg_pruned:
                rep.pruned += 1
            else:
                for _, _, refs in r.edit or []:
                    named.extend((r.seq, cid) for cid, _ in refs)
            prev, last_hlc, expect = r.hash, r.hlc, expect + 1
            rep.records += 1
        if prev.hex() != seg.get("last_hash"):
            rep.errors.append(f"segment {name}: its last record hash does not match the manifest")
    if expect - 1 != m.last_seq or prev.hex() != m.last_hash:
        rep.errors.append(f"the manifest says the mirror ends at record {m.last_seq}, the segments end at {expect - 1}")
    if m.snapshots:
        try:
            F.decode_snapshots(_get(mirror, m.snapshots), m.snapshots, mirror.url)
        except MirrorError as e:
            rep.errors.append(str(e))
    src = _Chunks(mirror, [p for p in m.packs if p["name"] in present])
    names = [p["name"] for p in m.packs if p["name"] in present]
    if not full and len(names) > sample:
        names = (rnd or random.Random()).sample(names, max(sample, len(names) // 10))
    for name in names:
        try:
            chunks = src.load(name)
        except MirrorError as e:
            rep.errors.append(str(e))
            continue
        rep.packs_checked += 1
        for cid in chunks:
            try:
                src.raw_of(cid)
            except MirrorError as e:
                rep.errors.append(f"pack {name}: chunk {cid.hex()}: {e}")
            except Exception as e:  # noqa: BLE001
                rep.errors.append(f"pack {name}: chunk {cid.hex()} cannot be decoded: {e}")
            rep.chunks_checked += 1
    if full:
        try:
            where = src.locate()
        except MirrorError as e:
            rep.errors.append(str(e))
            return rep
        for seq, cid in named:
            if cid not in where:
                rep.errors.append(f"record {seq} names chunk {cid.hex()}, which is in no pack")
    return rep
