"""The damage guard on incoming streams (docs/sync.md, "Guard").

Before a peer's segment of events is applied, its events are scored by the
guard's own detector (:class:`deltafs.guard.Detector`, one per peer, the
mount's ``--guard`` level), as the content versions and deletes they would
make here: a file event over a local file is a version replacing the local
chunk list (the chunks it brings: incompressible if their pack payload is
>= 90% of their size; its head sample read from the store), a tombstone of
a local file is an unlink.  When the detector alerts, the segment is not
applied: the peer is *held* (its cursor stays before the segment) until
``deltafs guard resume``, which lets every event published so far through
unscored.  The guard's scoring rule and its cost stay deltafs/guard.py's.
"""

from __future__ import annotations

import logging

from deltafs import guard as Gd

from . import store as G

log = logging.getLogger(__name__)

OPAQUE_MIN = 512  # bytes: smaller chunks never count as incompressible


class _Chunk:
    """A chunk an event brings, looking like capture's NewChunk to the detector."""

    __slots__ = ("id", "raw_len", "payload", "base_id")

    def __init__(self, cid: bytes, raw_len: int, opaque: bool) -> None:
        self.id, self.raw_len, self.base_id = cid, raw_len, None
        self.payload = b"\0" if opaque else b"\3"


class _Change:
    __slots__ = ("op", "path", "path2", "cause", "base_seq", "edit", "size", "chunks")

    def __init__(self, op: str, path: bytes, **kw) -> None:
        self.op, self.path, self.path2, self.cause = op, path, None, "write"  # scored (not a skipped cause)
        self.base_seq, self.edit, self.size, self.chunks = kw.get("base_seq", 0), kw.get("edit"), \
            kw.get("size", 0), kw.get("chunks", [])


class IncomingGuard:
    """One detector per peer; ``check`` scores a segment before it is applied."""

    def __init__(self, level: str = "normal") -> None:
        self.level = level
        self.detectors: dict[str, Gd.Detector] = {}
        self.heads: dict[bytes, bytes | None] = {}  # chunk id -> its first bytes (this pass's reads)

    def check(self, engine, dev: str, events: list[dict]):
        """-> the detector's Alert if these events of ``dev`` trip it, else None."""
        det = self.detectors.get(dev)
        if det is None:
            det = self.detectors[dev] = Gd.Detector(self.level, raw=lambda cid: self._head(engine, cid))
        changes, seqs = [], []
        for ev in events:
            c = self._change(engine, ev)
            if c is not None:
                changes.append(c)
                seqs.append(ev.get("n", 0))
        if not changes:
            return None
        return det.observe(changes, seqs)

    def resume(self, dev: str | None = None) -> None:
        for d, det in self.detectors.items():
            if dev is None or d == dev:
                det.resume()

    def _head(self, engine, cid: bytes) -> bytes | None:
        if cid not in self.heads:
            try:
                with engine.journal.reader() as r:
                    raw = r.read_chunk(cid) if r.has_chunk(cid) else None
                if raw is None and cid in engine.st.chunks:
                    raw = self._store_head(engine, cid)
                self.heads[cid] = raw[:Gd.HEAD] if raw else None
            except Exception:  # noqa: BLE001 - no head sample: the detector scores without it
                self.heads[cid] = None
            if len(self.heads) > 4096:
                self.heads.pop(next(iter(self.heads)))
        return self.heads[cid]

    @staticmethod
    def _store_head(engine, cid: bytes) -> bytes | None:
        from deltafs import chunking

        name, off, n = engine.st.chunks[cid]
        raw = chunking.decompress_chunk(engine.store.get_range(name, off, n))
        return raw if chunking.chunk_id(raw) == cid else None

    @staticmethod
    def _change(engine, ev: dict):
        p = ev["p"]
        cur = engine.effective(p)
        local_file = cur is not None and not cur.get("x") and cur.get("k") == "f"
        if ev.get("x"):
            return _Change("unlink", p) if local_file else None
        if ev.get("k") != "f":
            return None
        new = G.unpack_list(ev.get("l", b""))
        old = G.unpack_list(cur.get("l", b"")) if local_file else []
        known = {cid for cid, _ in old}
        chunks = []
        for cid, ln in new:
            if cid in known:
                continue
            known.add(cid)
            loc = engine.st.chunks.get(cid)
            # incompressible: its pack payload kept >= 90% of its size (a chunk under
            # OPAQUE_MIN says nothing: even text does not compress at a few bytes)
            chunks.append(_Chunk(cid, ln, loc is not None and ln >= OPAQUE_MIN and loc[2] >= 0.9 * ln))
        return _Change("write", p, base_seq=1 if old else 0, edit=[(0, len(old), new)], size=ev.get("s", 0),
                       chunks=chunks)


def describe(alert) -> dict:
    d = alert.to_dict()
    return {k: d[k] for k in ("level", "score", "threshold", "files") if k in d} | {
        "examples": [e.get("path") for e in d.get("examples", [])[:5]]}
