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
circuit breaker.  Each mirror call of its passes goes through a
:class:`Watch`: a total deadline per call, progress for ``stalled``, and
a gate that lets unmount stop a pass at a clean point.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass

import trio

from deltafs.chunking import RawCache
from deltafs.errors import CorruptionError, MirrorError
from deltafs.journal import check_link, decode_chunk

from . import format as F
from .base import Mirror, MirrorObjectMissing, MirrorTimeout

log = logging.getLogger(__name__)

MAX_SEGMENT_RECORDS = 10_000
MAX_SEGMENT_CHUNK_BYTES = 64 << 20  # chunk bytes shipped per segment (then the next pass)
TAIL_READ = 256 << 10  # bytes read from a pack's end to find its index
POLL_INTERVAL = 1.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 120.0
BREAKER_FAILURES = 5  # consecutive failures that open the circuit
PROBE_INTERVAL = 300.0  # then one probe pass this often
FINAL_FLUSH_TIMEOUT = 15.0  # unmount: the last pass (and waiting for one in flight), at most
STALL_AFTER = 30.0  # seconds without progress that make a pass with work to do "stalled"
CALL_DEADLINE = 90.0  # seconds one mirror call may take in all, plus its bytes at CALL_MIN_RATE
CALL_MIN_RATE = 64 << 10  # bytes/s
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
        cache = RawCache(8 << 20)  # delta bases just checked
        with self.journal.reader() as r:

            def want(cid: bytes, optional: bool, rec) -> None:
                nonlocal chunk_bytes
                todo = [cid]  # the chunk, then its bases (several since format 9), theirs...
                while todo:
                    cid = todo.pop()
                    if cid in shipped or cid in chunks:
                        continue
                    val = r.raw_chunk(cid)
                    if val is None:
                        if optional:  # freed by compaction: the version is shipped as pruned
                            return
                        raise MirrorError(f"chunk {cid.hex()} is missing from the journal; cannot replicate it")
                    try:
                        r.read_chunk(cid, cache)  # never ship a chunk that does not match its id
                    except CorruptionError as e:
                        raise CorruptionError(e.detail, rec.path, rec.seq) from e
                    chunks[cid] = val
                    chunk_bytes += len(val)
                    todo.extend(decode_chunk(val)[2])

            last = first - 1
            prev = bytes.fromhex(m.last_hash)
            for seq, value in r.raw_records(first, min(head, first + MAX_SEGMENT_RECORDS - 1)):
                rec, problem = check_link(value, seq, prev)  # ship only what continues the chain
                if problem:
                    raise CorruptionError(f"record {seq} {problem}", rec.path if rec else None, seq)
                prev = rec.hash
                gone = rec.is_content and r.is_pruned(seq)
                if gone:
                    pruned.append(seq)
                elif rec.is_content:
                    r.packed_list(seq)  # its chunk list matches its size and content hash
                for _, _, refs in rec.edit or []:
                    for cid, _ in refs:
                        want(cid, gone, rec)  # a pruned version's surviving chunks still ship (later ones need them)
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


class _Caller:
    """Runs mirror calls one at a time in a daemon thread of its own, so the
    pass that asked can stop waiting for one (a hung server) while it
    finishes or fails in the background.  Calls stay in order: the next one
    starts after the one left behind, never beside it (an old manifest PUT
    can never land after a newer one).  A daemon thread: one stuck in a
    call never holds up the daemon's exit."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None

    def call(self, timeout: float, fn, *args):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        done, box = threading.Event(), []
        self._q.put((fn, args, done, box))
        if not done.wait(timeout):
            raise TimeoutError
        ok, value = box[0]
        if ok:
            return value
        raise value

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)  # after the call in progress, if any

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            fn, args, done, box = item
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append((False, e))
            done.set()


class Watch:
    """The mirror as a worker's passes use it (the Mirror methods a pass calls).

    * every call has a total deadline, ``CALL_DEADLINE`` plus its bytes at
      ``CALL_MIN_RATE``: past it the pass fails with :class:`MirrorTimeout`
      (boto's own timeouts bound each socket read, not a trickle);
    * ``call`` is the call in flight (op, name, bytes, monotonic start) and
      ``progress`` the monotonic time of the last sign of life: a call that
      returned, or a piece of a PUT body sent (``on_progress`` of S3);
    * ``gate`` is held by a pass thread whenever it is not waiting for the
      mirror, i.e. while it reads the journal.  :meth:`close` (unmount)
      takes it for good: a pass left running can then never touch the
      journal again, which the daemon is about to close.
    """

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.url = mirror.url
        self.call: tuple[str, str | None, int, float] | None = None
        self.progress = time.monotonic()
        self.gate = threading.Lock()
        self._caller = _Caller(f"deltafs-mirror-io {mirror.url}")
        if hasattr(mirror, "on_progress"):
            mirror.on_progress = self._tick

    def _tick(self, n: int) -> None:
        self.progress = time.monotonic()

    def _call(self, op: str, name: str | None, nbytes: int, fn, *args):
        deadline = CALL_DEADLINE + nbytes / CALL_MIN_RATE
        self.call = (op, name, nbytes, time.monotonic())
        self.gate.release()
        try:
            value = self._caller.call(deadline, fn, *args)
        except TimeoutError:
            raise MirrorTimeout(f"mirror {self.url}: {op} {name} had no complete answer within "
                                f"{deadline:.0f}s") from None
        finally:
            self.call = None
            self.gate.acquire()  # blocks for good once the worker closed: the journal is going away
        self.progress = time.monotonic()
        return value

    def get(self, name: str) -> bytes:
        return self._call("get", name, 0, self.mirror.get, name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self._call("get", name, length, self.mirror.get_range, name, offset, length)

    def put(self, name: str, data: bytes) -> None:
        return self._call("put", name, len(data), self.mirror.put, name, data)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        return self._call("put", name, len(data), self.mirror.put_if_absent, name, data)

    def exists(self, name: str) -> bool:
        return self._call("head", name, 0, self.mirror.exists, name)

    def list(self, prefix: str = "") -> list[tuple[str, int]]:
        return self._call("list", prefix or None, 0, lambda: list(self.mirror.list(prefix)))

    def delete(self, name: str) -> None:
        return self._call("delete", name, 0, self.mirror.delete, name)

    def run_pass(self, fn):
        """Run ``fn`` (a pass, in a worker thread) holding the gate."""
        with self.gate:
            return fn()

    def close(self) -> None:
        """Blocking: wait until no pass reads the journal, and keep it so."""
        self.gate.acquire()
        self._caller.stop()

    def in_flight(self) -> str | None:
        c = self.call
        if c is None:
            return None
        op, name, nbytes, t0 = c
        size = f", {nbytes} bytes" if nbytes else ""
        return f"{op} {name}{size}, for {time.monotonic() - t0:.0f}s"


class MirrorWorker:
    """One mirror of a running mount: its replication loop and live state.

    The loop (:meth:`run`) polls the journal head every ``POLL_INTERVAL``
    and replicates when it moved.  A failed pass is retried after
    :func:`backoff_delay` (exponential, full jitter, capped); after
    ``BREAKER_FAILURES`` failures in a row the circuit opens and only one
    probe pass runs every ``PROBE_INTERVAL``; the first success closes it.
    A pass with work to do that has seen no progress for ``STALL_AFTER``
    seconds (a call without an answer, or failures by timeout since) is
    ``stalled``.
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
        self.watch = Watch(mirror)
        self.rep = Replicator(journal, self.watch)
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
        self.timed_out = False  # the last failure was a call the mirror did not answer in time
        self.passes = 0
        self.next_attempt: float | None = None  # trio time of the next retry or probe
        self._force = False
        self._wake = trio.Event()
        self._passed = trio.Event()
        self._in_pass = False  # a pass is running (attempt() has not returned)

    # --- state ---------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.paused:
            return "paused"
        if self.failures >= BREAKER_FAILURES:
            return "circuit open"
        if self.stalled_s is not None:
            return "stalled"
        if self.failures:
            return "retrying"
        return "ok"

    @property
    def stalled_s(self) -> float | None:
        """Seconds without progress, once past ``STALL_AFTER``, while a call
        is in flight or the last failure was a timeout; else None."""
        if self.paused or (self.watch.call is None and not (self.failures and self.timed_out)):
            return None
        idle = time.monotonic() - self.watch.progress
        return idle if idle >= STALL_AFTER else None

    async def status(self) -> dict:
        """The live status (``deltafs status``, key ``mirrors``); no secrets in it."""
        seq = self.seq or 0
        lag = await trio.to_thread.run_sync(mirror_lag, self.journal, seq)
        retry_in = None
        if self.failures and self.next_attempt is not None and not self.paused:
            retry_in = round(max(0.0, self.next_attempt - trio.current_time()), 3)
        stalled = self.stalled_s
        return {"url": self.url, "state": self.state, "paused": self.paused, "seq": self.seq,
                "encrypted": getattr(self.mirror, "key", None) is not None,
                **lag, "failures": self.failures, "last_success_ns": self.last_success_ns,
                "last_error": self.last_error, "last_error_ns": self.last_error_ns,
                "retry_in_s": retry_in, "stalled_s": None if stalled is None else round(stalled, 1),
                "in_flight": self.watch.in_flight()}

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
        open circuit).  MirrorError if the mirror is paused or the pass fails.
        Only a pass that starts after this call counts: one already running may
        have met the mirror as it was before (a drive plugged back in since)."""
        target = await trio.to_thread.run_sync(self._head)
        while True:
            if self.paused:
                raise MirrorError(f"mirror {self.url} is paused (deltafs resume --mirror {self.url})")
            if self._in_pass:
                await self._passed.wait()
                continue
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
        """One pass; -> whether it succeeded.  Never raises but Cancelled
        (which leaves the pass thread behind: see :meth:`run`)."""
        self._in_pass = True
        try:
            return await self._attempt()
        finally:
            self._in_pass = False

    async def _attempt(self) -> bool:
        if not self.failures:
            self.watch.progress = time.monotonic()  # work starts now: stalled counts from here
        try:
            stats = await trio.to_thread.run_sync(self.watch.run_pass, self.rep.run_once,
                                                  limiter=self.limiter, abandon_on_cancel=True)
        except Exception as e:  # noqa: BLE001 - a mirror must never take the mount down
            self.failures += 1
            self.timed_out = isinstance(e, MirrorTimeout)
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
            await trio.to_thread.run_sync(lambda: record_status(self.journal, self.url, error=msg, failures=n))
        else:
            if self.failures:
                log.info("mirror %s: replicating again after %d failures", self.url, self.failures)
            self.failures = 0
            self.timed_out = False
            self.next_attempt = None
            self.seq = stats.last_seq
            self.done_head = stats.head_seq
            self.last_success_ns = time.time_ns()
            ok = True
            if stats.records or stats.lag == 0:
                await trio.to_thread.run_sync(lambda: record_status(self.journal, self.url, stats))
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
            # Unmount: one last pass for what was journaled since, unless the mirror is down,
            # stalled or paused; a pass in flight is waited for (the limiter), within the same bound.
            if self.failures == 0 and not self.paused and self.stalled_s is None:
                with trio.move_on_after(FINAL_FLUSH_TIMEOUT, shield=True):
                    if self.drain is not None:
                        await self.drain()
                    await self.attempt()
            # Whatever a pass left running still does, it never touches the journal again
            # (the daemon closes it next); the mirror's manifest is the cursor, so the
            # next mount resumes from what the mirror really holds.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.watch.close)
            raise


class Unopened(Mirror):
    """A mirror that could not be opened when the mount started (a USB drive
    not plugged in, an NFS share not mounted): every call tries to open it
    again, so its worker fails, backs off and retries like any unreachable
    mirror, ``status`` says why, and the mount itself works."""

    def __init__(self, url: str, open_fn, error: MirrorError) -> None:
        self._url = url
        self._open = open_fn
        self._mirror: Mirror | None = None
        self._progress = None
        self.error = error

    @property
    def url(self) -> str:
        return self._mirror.url if self._mirror is not None else self._url

    @property
    def on_progress(self):
        return self._progress

    @on_progress.setter
    def on_progress(self, fn) -> None:
        self._progress = fn
        if self._mirror is not None and hasattr(self._mirror, "on_progress"):
            self._mirror.on_progress = fn

    def _m(self) -> Mirror:
        if self._mirror is None:
            m = self._open()
            if hasattr(m, "on_progress"):
                m.on_progress = self._progress
            self._mirror = m
            log.warning("mirror %s can be reached again", self._url)
        return self._mirror

    def put(self, name, data):
        return self._m().put(name, data)

    def put_if_absent(self, name, data):
        return self._m().put_if_absent(name, data)

    def get(self, name):
        return self._m().get(name)

    def get_range(self, name, offset, length):
        return self._m().get_range(name, offset, length)

    def exists(self, name):
        return self._m().exists(name)

    def list(self, prefix=""):
        return self._m().list(prefix)

    def delete(self, name):
        return self._m().delete(name)

    def check(self):
        return self._m().check()

    def close(self) -> None:
        if self._mirror is not None:
            self._mirror.close()


def _open_or_retry(url: str, open_fn) -> Mirror:
    """``open_fn()``, or an :class:`Unopened` stand-in when the mirror cannot be
    opened now: a mirror that is down never stops a mount (DESIGN.md)."""
    try:
        return open_fn()
    except MirrorError as e:
        log.error("mirror %s cannot be opened now (%s): the mount goes on and retries it", url, e)
        return Unopened(url, open_fn, e)


class Mirrors:
    """The mirror workers of a running mount: mirror_service's handle, used by
    the control socket (status, pause/resume --mirror, flush --mirrors,
    mirror add while mounted)."""

    def __init__(self) -> None:
        self.workers: dict[str, MirrorWorker] = {}  # URL -> its worker
        self._add = None  # set while the service runs

    def __contains__(self, url: str) -> bool:
        return url in self.workers

    def __iter__(self):
        """The workers, in URL order."""
        return iter([w for _, w in sorted(self.workers.items())])

    def find(self, url: str) -> MirrorWorker:
        """The worker of mirror ``url``, else UsageError."""
        from deltafs.errors import UsageError

        w = self.workers.get(url) or self.workers.get(url.rstrip("/"))
        if w is None:
            known = ", ".join(sorted(self.workers)) or "none"
            raise UsageError(f"{url} is not a mirror of this mount (its mirrors: {known})")
        return w

    @property
    def can_add(self) -> bool:
        return self._add is not None

    async def add(self, url: str) -> None:
        """Replicate to ``url`` from now on (``mirror add`` while mounted), or
        reopen it with a key the journal has just been given."""
        if self._add is None:
            raise RuntimeError("the mirror service is not running")
        await self._add(url)


async def mirror_service(daemon, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Background service of a mount: one :class:`MirrorWorker` per mirror,
    in the :class:`Mirrors` it hands to ``task_status.started``."""
    from . import open_mirror

    def opened(url: str) -> Mirror:  # sealed with the journal's key for an encrypted mirror
        from .keys import open_for_journal

        return open_for_journal(open_mirror(url, endpoint_url=getattr(daemon.cfg, "endpoint_url", None)),
                                daemon.journal.path)

    mirrors = [_open_or_retry(url, lambda url=url: opened(url)) for url in daemon.cfg.mirrors]
    handle = Mirrors()
    workers = handle.workers
    drain = daemon.rec.drain if daemon.rec is not None else None
    try:
        async with trio.open_nursery() as nursery:
            async def add(url: str) -> None:
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

            handle._add = add
            for mirror in mirrors:
                w = MirrorWorker(daemon.journal, mirror, drain=drain)
                workers[w.url] = w
                await nursery.start(w.run)
            task_status.started(handle)
            await trio.sleep_forever()  # mirrors may be added while mounted
    finally:
        handle._add = None
        for mirror in mirrors:
            if workers.get(mirror.url) is not None and workers[mirror.url].mirror is mirror:
                workers.pop(mirror.url, None)
            mirror.close()
