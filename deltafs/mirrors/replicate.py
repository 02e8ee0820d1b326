"""Replication: ship new journal records and the chunks they introduce to a mirror.

One pass (:func:`replicate_once`, blocking, run it in a worker thread):

1. read ``manifest.json``; none yet: claim the mirror for this journal
   (``put_if_absent`` of an empty manifest).  Another journal id: refused.
   The journal's record at the manifest's ``last_seq`` must have the
   manifest's ``last_hash`` (else the journal and the mirror diverged).
2. the records after ``last_seq`` (at most ``MAX_SEGMENT_RECORDS`` per
   segment), and every chunk their edits name that is not in a pack the
   manifest already names (plus the delta bases those chunks need);
3. upload the packs, then the segment, then the manifest naming them.

The manifest is the cursor: a crash between uploads leaves objects no
manifest names (harmless; the next pass writes the same packs again under
the same content-hash names and replaces the unnamed segment), never a
manifest naming a missing object, never a duplicated record.  The
journal's ``mirrors`` kv (key = mirror URL) is a status copy for
``deltafs status`` / ``mirror list``, written when the journal is writable.

:func:`mirror_service` is the mount's background service: one task per
mirror, polling the journal head every second, with backoff, jitter and a
circuit breaker.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass

import trio

from deltafs.errors import MirrorError
from deltafs.journal import schema as S

from . import format as F
from .base import Mirror, MirrorObjectMissing

log = logging.getLogger(__name__)

MAX_SEGMENT_RECORDS = 10_000
MAX_SEGMENT_CHUNK_BYTES = 64 << 20  # chunk bytes shipped per segment (then the next pass)
TAIL_READ = 256 << 10  # bytes read from a pack's end to find its index
POLL_INTERVAL = 1.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 120.0
BREAKER_FAILURES = 5  # consecutive failures that open the circuit
PROBE_INTERVAL = 300.0  # then one probe pass this often
FINAL_FLUSH_TIMEOUT = 30.0


@dataclass
class ReplicationStats:
    mirror: str
    records: int = 0  # records shipped by this pass
    segments: int = 0
    packs: int = 0
    chunks: int = 0
    bytes: int = 0  # bytes uploaded
    last_seq: int = 0  # the mirror's cursor after the pass
    head_seq: int = 0  # the journal's head seen by the pass
    seconds: float = 0.0

    @property
    def lag(self) -> int:
        return self.head_seq - self.last_seq

    def to_dict(self) -> dict:
        return {**asdict(self), "lag_records": self.lag}


def load_manifest(mirror: Mirror) -> F.Manifest | None:
    try:
        data = mirror.get(F.MANIFEST)
    except MirrorObjectMissing:
        return None
    return F.Manifest.decode(data, mirror.url)


def read_pack_indexes(mirror: Mirror, packs: list[dict]) -> dict[bytes, str]:
    """chunk id -> pack name for the named packs (one ranged read per pack)."""
    where: dict[bytes, str] = {}
    for p in packs:
        name, size = p["name"], int(p["size"])
        off = max(0, size - TAIL_READ)
        tail = mirror.get_range(name, off, size - off)
        need = F.index_size(tail)
        if need is not None and need > len(tail) and need <= size:
            tail = mirror.get_range(name, size - need, need)
        for cid, _, _ in F.pack_index(tail, name, mirror.url):
            where[cid] = name
    return where


class Replicator:
    """Replication state for one (journal, mirror): keeps the set of shipped
    chunk ids between passes so a long-running mount reads pack indexes once."""

    def __init__(self, journal, mirror: Mirror) -> None:
        self.journal = journal
        self.mirror = mirror
        self._shipped: set[bytes] | None = None
        self._known_packs: set[str] = set()

    def _claim(self) -> F.Manifest:
        m = load_manifest(self.mirror)
        if m is None:
            m = F.Manifest(journal_id=self.journal.journal_id, updated_ns=time.time_ns())
            if not self.mirror.put_if_absent(F.MANIFEST, m.encode()):
                m = load_manifest(self.mirror)  # lost a race: look at the winner
                if m is None:
                    raise MirrorError(f"mirror {self.mirror.url}: {F.MANIFEST} appeared and vanished")
            else:
                log.info("claimed mirror %s for journal %s", self.mirror.url, self.journal.journal_id)
        if m.journal_id != self.journal.journal_id:
            raise MirrorError(f"mirror {self.mirror.url} belongs to journal {m.journal_id}, not to this "
                              f"journal ({self.journal.journal_id}): use another mirror URL")
        return m

    def _sync_shipped(self, m: F.Manifest) -> set[bytes]:
        names = {p["name"] for p in m.packs}
        if self._shipped is None or not self._known_packs <= names:
            self._shipped, self._known_packs = set(), set()
        new = [p for p in m.packs if p["name"] not in self._known_packs]
        if new:
            self._shipped.update(read_pack_indexes(self.mirror, new))
            self._known_packs.update(p["name"] for p in new)
        return self._shipped

    def run_once(self) -> ReplicationStats:
        """One pass: ship everything after the mirror's cursor, segment by segment."""
        t0 = time.monotonic()
        st = ReplicationStats(self.mirror.url)
        m = self._claim()
        shipped = self._sync_shipped(m)
        with self.journal.reader() as r:
            head = r.head_seq()
            st.head_seq = head
            if m.last_seq > head:
                raise MirrorError(f"mirror {self.mirror.url} holds records up to {m.last_seq} but this journal "
                                  f"ends at {head}: they diverged")
            if m.last_seq and r.record(m.last_seq).hash.hex() != m.last_hash:
                raise MirrorError(f"mirror {self.mirror.url} diverged from this journal at record {m.last_seq}")
            snaps = r.kv_items("snapshots")
        while m.last_seq < head:
            m = self._ship_segment(m, head, shipped, st)
        snap_name = F.snapshots_name(F.encode_snapshots(snaps)) if snaps else None
        if snap_name != m.snapshots:
            data = F.encode_snapshots(snaps)
            if snap_name is not None:
                self.mirror.put_if_absent(snap_name, data)
                st.bytes += len(data)
            m.snapshots = snap_name
            m.updated_ns = time.time_ns()
            self.mirror.put(F.MANIFEST, m.encode())
        st.last_seq = m.last_seq
        st.seconds = time.monotonic() - t0
        if st.records:
            log.info("mirror %s: shipped records %d..%d (%d chunks in %d packs, %d bytes)", self.mirror.url,
                     st.last_seq - st.records + 1, st.last_seq, st.chunks, st.packs, st.bytes)
        return st

    def _ship_segment(self, m: F.Manifest, head: int, shipped: set[bytes], st: ReplicationStats) -> F.Manifest:
        first = m.last_seq + 1
        values: list[bytes] = []
        chunks: dict[bytes, bytes] = {}
        chunk_bytes = 0
        last_hash = m.last_hash
        with self.journal.reader() as r:

            def want(cid: bytes) -> None:
                nonlocal chunk_bytes
                while cid not in shipped and cid not in chunks:
                    val = r.raw_chunk(cid)
                    if val is None:
                        raise MirrorError(f"chunk {cid.hex()} is missing from the journal; cannot replicate it")
                    chunks[cid] = val
                    chunk_bytes += len(val)
                    base = S.decode_chunk(val)[2]
                    if base is None:
                        return
                    cid = base

            last = first - 1
            for seq, value in r.raw_records(first, min(head, first + MAX_SEGMENT_RECORDS - 1)):
                rec = r.record(seq)
                for _, _, refs in rec.edit or []:
                    for cid, _ in refs:
                        want(cid)
                values.append(value)
                last, last_hash = seq, rec.hash.hex()
                if chunk_bytes >= MAX_SEGMENT_CHUNK_BYTES:
                    break
        if last < first:
            raise MirrorError(f"journal records {first}..{head} vanished while replicating")
        # packs, then the segment, then the manifest naming them
        new_packs = []
        for group in F.split_packs(sorted(chunks.items())):
            data = F.encode_pack(group)
            name = F.pack_name(data)
            if self.mirror.put_if_absent(name, data):
                st.bytes += len(data)
            new_packs.append({"name": name, "size": len(data), "chunks": len(group)})
            st.packs += 1
            st.chunks += len(group)
        seg = F.segment_name(first, last)
        data = F.encode_segment(self.journal.journal_id, first, last, [p["name"] for p in new_packs], values)
        self.mirror.put(seg, data)  # not yet named by the manifest: replacing a crashed attempt is fine
        st.bytes += len(data)
        m.segments.append({"name": seg, "first": first, "last": last, "last_hash": last_hash,
                           "packs": [p["name"] for p in new_packs]})
        m.packs.extend(new_packs)
        m.last_seq, m.last_hash, m.updated_ns = last, last_hash, time.time_ns()
        self.mirror.put(F.MANIFEST, m.encode())
        shipped.update(chunks)
        self._known_packs.update(p["name"] for p in new_packs)
        st.records += last - first + 1
        st.segments += 1
        return m


def replicate_once(journal, mirror: Mirror) -> ReplicationStats:
    """One replication pass of ``journal`` into ``mirror`` (blocking)."""
    return Replicator(journal, mirror).run_once()


def record_status(journal, url: str, stats: ReplicationStats | None = None, error: str | None = None,
                  failures: int = 0) -> None:
    """Write the mirror's status into the journal's ``mirrors`` kv (writers only)."""
    if journal.readonly:
        return
    with journal.reader() as r:
        cur = dict(r.kv_get("mirrors", url) or {})
        head = r.head_seq()
        if stats is not None:
            cur.update(seq=stats.last_seq, last_success_ns=time.time_ns(), last_error=None, failures=0)
        else:
            cur.update(last_error=error, last_error_ns=time.time_ns(), failures=failures)
        seq = cur.get("seq", 0)
        lag_s = 0.0
        if seq < head:
            lag_s = max(0.0, (time.time_ns() - r.record(seq + 1).time_ns) / 1e9)
        cur.update(url=url, head_seq=head, lag_records=head - seq, lag_seconds=round(lag_s, 3))
    journal.kv_put("mirrors", url, cur)


def backoff_delay(failures: int, rnd: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [d/2, d]; probes once the breaker is open."""
    if failures >= BREAKER_FAILURES:
        d = PROBE_INTERVAL
    else:
        d = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1))
    return d * (0.5 + (rnd or random).random() / 2)


async def mirror_service(daemon, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Background service of a mount: one replication task per mirror."""
    from . import open_mirror

    mirrors = [open_mirror(url, endpoint_url=getattr(daemon.cfg, "endpoint_url", None))
               for url in daemon.cfg.mirrors]
    try:
        async with trio.open_nursery() as nursery:
            for mirror in mirrors:
                nursery.start_soon(_mirror_task, daemon, mirror)
            task_status.started()
    finally:
        for mirror in mirrors:
            mirror.close()


async def _mirror_task(daemon, mirror: Mirror) -> None:
    journal = daemon.journal
    rep = Replicator(journal, mirror)
    limiter = trio.CapacityLimiter(1)
    state = {"failures": 0, "done_head": -1}

    def head() -> int:
        with journal.reader() as r:
            return r.head_seq()

    async def attempt() -> None:
        try:
            stats = await trio.to_thread.run_sync(rep.run_once, limiter=limiter)
        except Exception as e:  # noqa: BLE001 - a mirror must never take the mount down
            state["failures"] += 1
            n = state["failures"]
            msg = str(e) if isinstance(e, MirrorError) else f"{type(e).__name__}: {e}"
            if n == 1:
                log.warning("mirror %s: replication failed, will retry: %s", mirror.url, msg)
            elif n == BREAKER_FAILURES:
                log.error("mirror %s: %d failures in a row, probing every %.0fs: %s",
                          mirror.url, n, PROBE_INTERVAL, msg)
            if not isinstance(e, MirrorError):
                log.debug("mirror %s: unexpected error", mirror.url, exc_info=True)
            await trio.to_thread.run_sync(lambda: record_status(journal, mirror.url, error=msg, failures=n),
                                          limiter=limiter)
            return
        if state["failures"]:
            log.info("mirror %s: replicating again after %d failures", mirror.url, state["failures"])
        state["failures"] = 0
        state["done_head"] = stats.head_seq
        if stats.records or stats.lag == 0:
            await trio.to_thread.run_sync(lambda: record_status(journal, mirror.url, stats), limiter=limiter)

    try:
        while True:
            if state["failures"]:
                await trio.sleep(backoff_delay(state["failures"]))
                await attempt()
                continue
            h = await trio.to_thread.run_sync(head, limiter=limiter)
            if h != state["done_head"]:
                await attempt()
            else:
                await trio.sleep(POLL_INTERVAL)
    except trio.Cancelled:
        # Unmount: one last pass for what was journaled since, unless the mirror is down.
        if state["failures"] == 0:
            with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                if daemon.rec is not None:
                    await daemon.rec.drain()
                await attempt()
        raise
