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
from deltafs.journal import compact as JC
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
LAG_SCAN_MAX = 100_000  # records read to estimate a mirror's lag in bytes


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
    pruned: int = 0  # records shipped as pruned versions (their freed chunks left out)

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
        if m is None and self.mirror.exists(F.KEY_BLOB):  # a plain manifest would leak into a sealed mirror
            raise MirrorError(f"mirror {self.mirror.url} is encrypted and this journal holds no key for it: "
                              f"unlock it with `deltafs mirror add {self.mirror.url}`")
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
        pruned: list[int] = []
        JC.pruned_db(self.journal)  # before the read transaction (see its docstring)
        with self.journal.reader() as r:

            def want(cid: bytes, optional: bool) -> None:
                nonlocal chunk_bytes
                while cid not in shipped and cid not in chunks:
                    val = r.raw_chunk(cid)
                    if val is None:
                        if optional:  # freed by compaction: the version is shipped as pruned
                            return
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
                gone = rec.is_content and JC.is_pruned(self.journal, r.txn, seq)
                if gone:
                    pruned.append(seq)
                for _, _, refs in rec.edit or []:
                    for cid, _ in refs:
                        want(cid, gone)  # a pruned version's surviving chunks still ship (later ones need them)
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
        data = F.encode_segment(self.journal.journal_id, first, last, [p["name"] for p in new_packs], values,
                                pruned)
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
        st.pruned += len(pruned)
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


def mirror_lag(journal, seq: int) -> dict:
    """How far a mirror at record ``seq`` is behind the journal (blocking).

    ``lag_records``; ``lag_bytes``: stored bytes of those records plus the
    raw bytes of the chunks their edits name (an upper bound of what is
    left to upload: some chunks may be shipped already); ``lag_seconds``:
    age of the oldest record the mirror lacks.  Counts at most
    ``LAG_SCAN_MAX`` records (``lag_bytes`` is then a lower bound).
    """
    with journal.reader() as r:
        head = r.head_seq()
        n = nbytes = 0
        lag_s = 0.0
        if seq < head:
            lag_s = max(0.0, (time.time_ns() - r.record(seq + 1).time_ns) / 1e9)
            for s, value in r.raw_records(seq + 1, min(head, seq + LAG_SCAN_MAX)):
                nbytes += len(value)
                for _, _, refs in r.record(s).edit or []:
                    nbytes += sum(n for _, n in refs)
    return {"head_seq": head, "lag_records": head - seq, "lag_bytes": nbytes, "lag_seconds": round(lag_s, 3)}


class MirrorWorker:
    """One mirror of a running mount: its replication loop and live state.

    The loop (:meth:`run`) polls the journal head every ``POLL_INTERVAL``
    and replicates when it moved.  A failed pass is retried after
    :func:`backoff_delay` (exponential, full jitter, capped); after
    ``BREAKER_FAILURES`` failures in a row the circuit opens and only one
    probe pass runs every ``PROBE_INTERVAL``; the first success closes it.
    :meth:`pause`, :meth:`resume` and :meth:`flush` (``deltafs pause
    --mirror``, ``flush --mirrors``) wake the loop at once.  A mirror never
    blocks local writes: every pass runs in a worker thread behind this
    mirror's own limiter.  :meth:`status` is what ``deltafs status``
    shows for it.
    """

    def __init__(self, journal, mirror: Mirror, *, rnd: random.Random | None = None,
                 drain=None) -> None:
        self.journal = journal
        self.mirror = mirror
        self.url = mirror.url
        self.rep = Replicator(journal, mirror)
        self.limiter = trio.CapacityLimiter(1)
        self.rnd = rnd or random.Random()
        self.drain = drain  # awaitable callable: pending captures made durable (unmount)
        self.failures = 0
        self.paused = False
        self.seq: int | None = None  # the mirror's cursor as last seen
        self.done_head = -1  # journal head covered by the last successful pass
        self.last_success_ns: int | None = None
        self.last_error: str | None = None
        self.last_error_ns: int | None = None
        self.passes = 0
        self.next_attempt: float | None = None  # trio time of the next retry or probe
        self._force = False
        self._wake = trio.Event()
        self._passed = trio.Event()

    # --- state ---------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.paused:
            return "paused"
        if self.failures >= BREAKER_FAILURES:
            return "circuit open"
        if self.failures:
            return "retrying"
        return "ok"

    async def status(self) -> dict:
        """The live status (``deltafs status``, key ``mirrors``); no secrets in it."""
        seq = self.seq or 0
        lag = await trio.to_thread.run_sync(mirror_lag, self.journal, seq)
        retry_in = None
        if self.failures and self.next_attempt is not None and not self.paused:
            retry_in = round(max(0.0, self.next_attempt - trio.current_time()), 3)
        return {"url": self.url, "state": self.state, "paused": self.paused, "seq": self.seq,
                "encrypted": getattr(self.mirror, "key", None) is not None,
                **lag, "failures": self.failures, "last_success_ns": self.last_success_ns,
                "last_error": self.last_error, "last_error_ns": self.last_error_ns,
                "retry_in_s": retry_in}

    def _kick(self) -> None:
        self._wake.set()

    def pause(self) -> bool:
        was, self.paused = self.paused, True
        if not was:
            log.info("mirror %s: paused", self.url)
        self._kick()
        return was

    def resume(self) -> bool:
        was, self.paused = self.paused, False
        if was:
            log.info("mirror %s: resumed", self.url)
            self._force = True  # catch up now, also out of a backoff
        self._kick()
        return was

    async def flush(self) -> dict:
        """Replicate everything journaled so far, now (also out of a backoff or an
        open circuit).  MirrorError if the mirror is paused or the pass fails."""
        target = await trio.to_thread.run_sync(self._head)
        while True:
            if self.paused:
                raise MirrorError(f"mirror {self.url} is paused (deltafs resume --mirror {self.url})")
            if self.seq is not None and self.seq >= target and not self.failures:
                return {"url": self.url, "seq": self.seq}
            passed = self._passed
            self._force = True
            self._kick()
            await passed.wait()
            if self.failures:
                raise MirrorError(f"mirror {self.url}: {self.last_error}")

    # --- the loop -------------------------------------------------------------
    def _head(self) -> int:
        with self.journal.reader() as r:
            return r.head_seq()

    def _load(self) -> None:
        with self.journal.reader() as r:
            known = r.kv_get("mirrors", self.url)
        if isinstance(known, dict) and isinstance(known.get("seq"), int):
            self.seq = known["seq"]

    async def _sleep(self, seconds: float | None) -> None:
        """Sleep until ``seconds`` pass (None: forever) or someone kicks us."""
        with trio.move_on_after(float("inf") if seconds is None else seconds):
            await self._wake.wait()
        if self._wake.is_set():
            self._wake = trio.Event()

    async def attempt(self) -> bool:
        """One pass; -> whether it succeeded.  Never raises but Cancelled."""
        try:
            stats = await trio.to_thread.run_sync(self.rep.run_once, limiter=self.limiter)
        except Exception as e:  # noqa: BLE001 - a mirror must never take the mount down
            self.failures += 1
            n = self.failures
            msg = str(e) if isinstance(e, MirrorError) else f"{type(e).__name__}: {e}"
            self.last_error, self.last_error_ns = msg, time.time_ns()
            if n == 1:
                log.warning("mirror %s: replication failed, will retry: %s", self.url, msg)
            elif n == BREAKER_FAILURES:
                log.error("mirror %s: %d failures in a row, circuit open: probing every %.0fs: %s",
                          self.url, n, PROBE_INTERVAL, msg)
            if not isinstance(e, MirrorError):
                log.debug("mirror %s: unexpected error", self.url, exc_info=True)
            self.next_attempt = trio.current_time() + backoff_delay(n, self.rnd)
            ok = False
            await trio.to_thread.run_sync(lambda: record_status(self.journal, self.url, error=msg, failures=n),
                                          limiter=self.limiter)
        else:
            if self.failures:
                log.info("mirror %s: replicating again after %d failures", self.url, self.failures)
            self.failures = 0
            self.next_attempt = None
            self.seq = stats.last_seq
            self.done_head = stats.head_seq
            self.last_success_ns = time.time_ns()
            ok = True
            if stats.records or stats.lag == 0:
                await trio.to_thread.run_sync(lambda: record_status(self.journal, self.url, stats),
                                              limiter=self.limiter)
        self.passes += 1
        self._passed.set()
        self._passed = trio.Event()
        return ok

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self._load, limiter=self.limiter)
        task_status.started()
        try:
            while True:
                if self.paused:
                    await self._sleep(None)
                    continue
                if self._force:
                    self._force = False
                    await self.attempt()
                    continue
                if self.failures:
                    wait = self.next_attempt - trio.current_time()
                    if wait > 0:
                        await self._sleep(wait)
                        continue
                    await self.attempt()
                    continue
                h = await trio.to_thread.run_sync(self._head, limiter=self.limiter)
                if h != self.done_head:
                    await self.attempt()
                else:
                    await self._sleep(POLL_INTERVAL)
        except trio.Cancelled:
            # Unmount: one last pass for what was journaled since, unless the mirror is down or paused.
            if self.failures == 0 and not self.paused:
                with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                    if self.drain is not None:
                        await self.drain()
                    await self.attempt()
            raise


async def mirror_service(daemon, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Background service of a mount: one :class:`MirrorWorker` per mirror,
    registered in ``daemon.state["mirrors"]`` (URL -> worker) for the
    control socket (status, pause/resume --mirror, flush --mirrors)."""
    from . import open_mirror

    def opened(url: str) -> Mirror:  # sealed with the journal's key for an encrypted mirror
        from .keys import open_for_journal

        return open_for_journal(open_mirror(url, endpoint_url=getattr(daemon.cfg, "endpoint_url", None)),
                                daemon.journal.path)

    mirrors = [opened(url) for url in daemon.cfg.mirrors]
    workers = daemon.state.setdefault("mirrors", {})
    drain = daemon.rec.drain if daemon.rec is not None else None
    try:
        async with trio.open_nursery() as nursery:
            async def add(url: str) -> None:
                """Replicate to ``url`` from now on (``mirror add`` while mounted), or
                reopen it with a key the journal has just been given."""
                mirror = opened(url)
                mirrors.append(mirror)
                old = workers.get(mirror.url)
                if old is not None:
                    old.mirror = old.rep.mirror = mirror
                    old.failures, old._force = 0, True
                    old._kick()
                    return
                w = MirrorWorker(daemon.journal, mirror, drain=drain)
                workers[w.url] = w
                await nursery.start(w.run)

            daemon.state["mirror_add"] = add
            for mirror in mirrors:
                w = MirrorWorker(daemon.journal, mirror, drain=drain)
                workers[w.url] = w
                await nursery.start(w.run)
            task_status.started()
            await trio.sleep_forever()  # mirrors may be added while mounted
    finally:
        daemon.state.pop("mirror_add", None)
        for mirror in mirrors:
            if workers.get(mirror.url) is not None and workers[mirror.url].mirror is mirror:
                workers.pop(mirror.url, None)
            mirror.close()


def find_worker(daemon, url: str) -> MirrorWorker:
    """The worker of mirror ``url`` in a running mount, else UsageError."""
    from deltafs.errors import UsageError

    workers = (getattr(daemon, "state", None) or {}).get("mirrors") or {}
    w = workers.get(url) or workers.get(url.rstrip("/"))
    if w is None:
        known = ", ".join(sorted(workers)) or "none"
        raise UsageError(f"{url} is not a mirror of this mount (its mirrors: {known})")
    return w
