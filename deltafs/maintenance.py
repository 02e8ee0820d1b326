"""Retention, compaction (prune + GC), verify and vacuum; the mount's compactor.

Retention is a pure function (:func:`retain`) of a file's content versions,
the journal's time and a :class:`RetentionPolicy`.  :func:`compact` asks it
about every file and hands the answer to the journal (``Journal.prune``),
which prunes in small transactions (docs/format.md, "Compaction and retention").
Times are the journal's HLC times, never file mtimes; "now" is the HLC of
the journal's newest record, so an idle journal is not thinned further and
a wall clock that jumps ahead cannot expire history.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from deltafs import heap
from deltafs.config import DEFAULT_COMPACT_EVERY, HOUR as HOUR_F, WEEK as WEEK_F, RetentionPolicy
from deltafs.journal import REPACK_DEAD_RATIO, VerifyResult, decode_record, hlc_to_ns

log = logging.getLogger(__name__)

S_NS = 1_000_000_000
HOUR = 3600
DAY = 86400
WEEK = 7 * DAY
# after a pass re-coded chunk values, packs more than this dead are rewritten:
# the old values (and the old copies of the values whose depth was rewritten)
# stay in their pack, so re-coding pays only once they are gone (sqlite's
# history: 13 % of its pack dead after the pass, 7 % more on disk until repacked)
RECODE_DEAD_RATIO = 0.1


def retain(versions: Sequence[tuple[int, int]], now_hlc: int, policy: RetentionPolicy = RetentionPolicy(),
           pinned: frozenset[int] | set[int] = frozenset()) -> set[int]:
    """Seqs to keep of one file's content versions ``[(seq, hlc)]`` (any order).

    * the newest version and every pinned one are always kept;
    * burst coalescing: a version older than ``burst_min_age`` whose next
      version follows within ``burst`` seconds is dropped;
    * of the rest, a version younger than ``keep_all`` is kept; older ones
      are grouped in buckets of the tier's length, aligned to the epoch
      (so a later pass only ever keeps a subset), and the newest of each
      bucket is kept.
    """
    vs = sorted(versions)
    if not vs:
        return set()
    now_ns = hlc_to_ns(now_hlc)
    keep = {vs[-1][0]} | {s for s, _ in vs if s in pinned}
    best: dict[tuple[float, int], int] = {}
    for i, (seq, hlc) in enumerate(vs):
        t = hlc_to_ns(hlc)
        age = (now_ns - t) / S_NS
        if i + 1 < len(vs):  # the newest is kept, and takes its bucket
            nxt = hlc_to_ns(vs[i + 1][1])
            if policy.burst > 0 and age > policy.burst_min_age and (nxt - t) / S_NS <= policy.burst:
                continue
        every = policy.bucket(age)
        if every is None:
            keep.add(seq)
        elif every < 0:
            continue  # older than the last tier with *:none
        else:
            best[(every, int(t // int(every * S_NS)))] = seq  # ascending: the last one wins
    keep.update(best.values())
    return keep


def pinned_by_snapshots(versions: Sequence[tuple[int, int]], snapshot_seqs) -> set[int]:
    """The version current at each snapshot seq: the newest with seq <= it."""
    seqs = sorted(s for s, _ in versions)
    out = set()
    for snap in snapshot_seqs:
        cur = None
        for s in seqs:
            if s > snap:
                break
            cur = s
        if cur is not None:
            out.add(cur)
    return out


@dataclass
class CompactReport:
    dry_run: bool
    files: int = 0
    versions: int = 0  # content versions before
    versions_pruned: int = 0
    checkpoints_written: int = 0
    chunks_freed: int = 0
    bytes_freed: int = 0
    chunks_rebased: int = 0  # kept chunks re-coded past bases only pruned versions needed
    transactions: int = 0
    pressure_steps: int = 0  # extra thinning rounds to get under --journal-limit / disk-free floor
    policy: str | None = None  # the policy of the last round (its --retention text)
    data_bytes: int | None = None  # journal data after the pass (Journal.data_bytes)
    packs_emptied: int = 0  # pack files whose live values were moved out (Journal.repack)
    bytes_reclaimed: int = 0  # their dead bytes
    index_pages_saved: int = 0  # chunk index rewritten in key order (Journal.densify_index)
    records_archived: int = 0  # records moved into compressed blocks (Journal.archive_records)
    tree_checkpoints: int = 0  # tree checkpoints written (write_tree_checkpoints)
    files_examined: int | None = None  # files the plan asked about (all of them: full plan)
    versions_examined: int | None = None  # versions the plan read and asked about
    plan_full_why: str | None = None  # why the plan asked about every file (None: it did not)
    plan_s: float | None = None  # seconds planning
    prune_s: float | None = None  # seconds in Journal.prune (checkpoints, prune, GC)
    chunks_recoded: int = 0  # chunk values re-coded smaller (Journal.recode)
    recode_bytes_saved: int = 0
    recode_s: float | None = None
    repack_s: float | None = None
    archive_s: float | None = None
    densify_s: float | None = None
    pass_s: float | None = None  # seconds for the whole pass
    data_file_before: int | None = None  # --vacuum
    data_file_after: int | None = None
    pruned: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("pruned")
        return d


_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WAS_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # held at the last incremental plan


def held_versions(j) -> Counter:
    """Content versions open in a view of this journal in this process (the
    history view, historyview.py): seq -> opens.  Compaction keeps them."""
    return _HELD.setdefault(j, Counter())


def plan(j, policy: RetentionPolicy = RetentionPolicy(), now_hlc: int | None = None) -> tuple[list[int], list[int], int]:
    """The full plan: every content version of the journal decoded and asked
    about.  -> (seqs to prune, seqs retained, files examined), nothing
    written.  (Dry runs use it; a pass uses :func:`plan_incremental`, which
    must prune exactly what this prunes.)"""
    held = set(_HELD.get(j, ()))
    with j.reader() as r:
        vs = r.content_versions()
        snaps = snapshot_seqs(r).values()
        # a mirror that has not shipped a version yet still needs its chunks
        floor = min((v.get("seq", 0) for _, v in r.kv_items("mirrors") if isinstance(v, dict)),
                    default=vs.head_seq)
    now = vs.head_hlc if now_hlc is None else now_hlc
    prune, kept = [], []
    for _, versions in vs.by_file.items():
        pinned = pinned_by_snapshots(versions, snaps) | {s for s, _ in versions if s > floor or s in held}
        keep = retain(versions, now, policy, pinned)
        for s, _ in versions:
            (kept if s in keep else prune).append(s)
    return sorted(prune), sorted(kept), len(vs.by_file)


# --- incremental planning (issue 18) ------------------------------------------------------
NEVER_NS = (1 << 64) - 1
WAKE_MARGIN_NS = 1_000  # an age threshold this close behind "now" is looked at again next pass


@dataclass
class Plan:
    prune: list[int]  # content versions to prune
    checkpoint: list[int]  # retained versions whose chain may read one of them (Journal.prune's "retained")
    examined: int  # files asked about
    files: int  # files with content versions
    versions: int  # content versions not pruned (before this pass)
    full: bool = False  # every file was asked about
    read: int = 0  # versions read and asked about
    why: str | None = None  # why every file was asked about


def _policy_key(p: RetentionPolicy) -> list:
    return [p.keep_all, [list(t) for t in p.tiers], p.after, p.burst, p.burst_min_age]


def _thresholds_ns(p: RetentionPolicy) -> list[int]:
    """Ages at which :func:`retain`'s answer about a version can change."""
    th = [p.burst_min_age] if p.burst > 0 else []
    th += [p.keep_all] if p.keep_all > 0 else []
    th += [u for u, _ in p.tiers]
    return sorted({int(x * S_NS) for x in th})


def plan_incremental(j, policy: RetentionPolicy = RetentionPolicy(), now_hlc: int | None = None) -> Plan:
    """Plan a pass from the journal's planning state (``Journal.planning``):
    only the records since the last plan are decoded, and only files that
    changed, whose versions reached an age threshold (their wake-up time),
    or whose mirror pins were released are asked about.  A different policy,
    a snapshot removed or a journal time before the last plan's asks every file
    in the state (no record decoded).  The state is rebuilt from the records
    when it disagrees with the journal's pruned counter (a prune by other
    code, a crash between a plan and its prune, a new journal).

    Why this prunes what :func:`plan` prunes: a file not asked about has not
    changed since it was last asked, when everything it did not keep was
    pruned; its versions crossed no age threshold since (else it would be
    due); pins only grew (a new mirror, a mirror floor lower than before).
    :func:`retain` of a file's kept versions with the same ages and more
    pins keeps them all.  tests/unit/test_maintenance.py checks it against
    :func:`plan` over random histories."""
    store = j.planning()
    held = set(_HELD.get(j, ()))
    released = _WAS_HELD.get(j, set()) - held  # their files are asked about again
    for _ in range(3):
        with store.update() as p:
            out = _plan_in(p, policy, now_hlc, held, released)
        if out is not None:
            _WAS_HELD[j] = held
            return out
        if not store.rebuild():
            log.info("compaction planning state: a prune ran during the rebuild; trying again")
    raise RuntimeError("compaction planning state could not be rebuilt")


def _bucket_lo(t: int, now_ns: int, policy: RetentionPolicy) -> int:
    """The oldest time whose version :func:`retain` may decide otherwise because
    of a version at ``t`` that is new or crossed an age threshold: the start of
    its bucket (its bucket mates lose to the newest), else ``t`` itself."""
    every = policy.bucket((now_ns - t) / S_NS)
    if every is None or every < 0:
        return t
    e = int(every * S_NS)
    return t // e * e


def _next_wake(t: int, now_ns: int, th: list[int]) -> int:
    """The first age threshold the version at ``t`` reaches after ``now_ns``
    (one just behind counts as ahead, WAKE_MARGIN_NS: float ages); 0: none."""
    for d in th:
        if t + d > now_ns - WAKE_MARGIN_NS:
            return t + d
    return 0


def _plan_in(p, policy: RetentionPolicy, now_hlc: int | None, held: set = frozenset(),
             released: set = frozenset()) -> Plan | None:
    """One plan in the planning transaction ``p``.  Each file asked about is
    read and asked about only from its oldest *changed* version on (new
    versions, versions whose age crossed a threshold: ``p.due``), back to the
    start of that version's bucket and one version more: :func:`retain`'s
    answer about a version depends only on it and the versions after it, so
    the older ones keep theirs.  Files whose pins were released, and every
    file when the policy, the snapshots or the clock changed, are read whole.
    So a pass costs what changed since the last one, not the history."""
    r = p.reader
    head = r.head_seq()
    m = p.meta()
    if m is None or m.get("layout") != p.LAYOUT or m.get("pruned") != p.pruned_counter() \
            or m.get("upto", 0) > head:
        return None
    now = p.head_hlc() if now_hlc is None else now_hlc
    now_ns = hlc_to_ns(now)
    snaps = sorted(set(snapshot_seqs(r).values()))
    mirrors = [v.get("seq", 0) for _, v in r.kv_items("mirrors") if isinstance(v, dict)]
    floor = min(mirrors) if mirrors else None
    key = _policy_key(policy)
    # A snapshot added since only pins more (a guard alert names one): retain()
    # of what a file kept, with more pins, keeps it all, so nothing is asked
    # again; a snapshot removed may release a version of any file.
    why = "a rebuilt planning state" if m.get("policy") is None else \
        "a new policy" if m.get("policy") != key else \
        "a snapshot removed" if not set(m.get("snaps") or ()) <= set(snaps) else \
        "a journal time before the last plan's" if now_ns < m.get("now_ns", 0) else None
    everything = why is not None
    if everything:
        log.info("compaction plan: every file asked about (%s)", why)
    upto, nv, nf = m["upto"], m.get("versions", 0), m.get("files", 0)
    since: dict[int, int] = {}  # file -> read its versions from this time on
    whole: set[int] = set()  # files read whole

    def changed(fid: int, t: int) -> None:
        lo = _bucket_lo(t, now_ns, policy)
        if lo < since.get(fid, NEVER_NS):
            since[fid] = lo

    for seq, v in r.raw_records(upto + 1, head):  # new since the last plan
        rec = decode_record(v, seq, lists=False)  # no edit: a 4 GiB file's is ~27 MiB decoded
        if rec.is_content and not r.is_pruned(seq):
            nf += p.add_version(rec.file_id, seq, rec.hlc, rec.base_seq or 0)
            nv += 1
            changed(rec.file_id, hlc_to_ns(rec.hlc))
    f0 = m.get("floor")
    if not everything and f0 is not None and (floor is None or floor > f0):
        # the mirror floor rose: versions in (f0, new floor] are pinned no more
        hi = upto if floor is None else min(floor, upto)
        for seq, v in r.raw_records(f0 + 1, hi):
            rec = decode_record(v, seq, lists=False)
            if rec.is_content:
                whole.add(rec.file_id)
    for seq in released:  # a version a view held (held_versions) may go now
        try:
            whole.add(r.record(seq).file_id)
        except Exception:  # noqa: BLE001 (gone: nothing to ask about)
            pass
    if not everything:
        for _, fid, seq in p.due(now_ns):  # versions whose age crossed a threshold
            hlc = p.version_hlc(fid, seq)
            if hlc is None:  # not in the state: read the file whole
                whole.add(fid)
            else:
                changed(fid, hlc_to_ns(hlc))
    files = p.files() if everything else sorted(whole.union(since))
    th = _thresholds_ns(policy)
    prune_of: list[tuple[int, int]] = []  # (file id, seq) of each version to prune
    read = 0
    for fid in files:
        full = everything or fid in whole
        vs = p.tail(fid, 0 if full else since[fid])
        if not vs:
            continue
        read += len(vs)
        versions = [(s, h) for s, h, _, _ in vs]
        first = versions[0][0]
        # a snapshot before the first version read pins one before it (or none)
        pinned = pinned_by_snapshots(versions, snaps if full else [x for x in snaps if x >= first])
        if floor is not None:
            pinned |= {s for s, _ in versions if s > floor}
        if held:
            pinned |= {s for s, _ in versions if s in held}
        keep = retain(versions, now, policy, pinned)
        prune_of += [(fid, s) for s, _ in versions if s not in keep]
        lone = len(vs) == 1 and (full or p.is_first(fid, first))  # a lone version is never pruned
        p.set_wakes(fid, [(s, h, b, w, 0 if lone else _next_wake(hlc_to_ns(h), now_ns, th))
                          for s, h, b, w in vs if s in keep])
    prune = sorted(s for _, s in prune_of)
    doomed = set(prune)
    cands: set[int] = set()  # every retained version whose chain may read a doomed one
    stack, seen = list(prune_of), set()
    while stack:
        for fc in p.children(*stack.pop()):
            c = fc[1]
            if c in seen:
                continue
            seen.add(c)
            if c not in doomed:
                cands.add(c)
                if p.has_checkpoint(c):
                    continue  # a chain through c stops at c
            stack.append(fc)
    p.set_meta({**m, "upto": head, "policy": key, "snaps": snaps, "floor": floor, "now_ns": now_ns,
                "versions": nv, "files": nf})
    return Plan(prune, sorted(cands), len(files), nf, nv, everything, read, why)


def snapshot_seqs(r) -> dict[str, int]:
    """Named snapshots -> their seq (``snapshots`` values ``{"seq": N}``)."""
    out = {}
    for name, v in r.kv_items("snapshots"):
        if isinstance(v, dict) and isinstance(v.get("seq"), int):
            out[name] = v["seq"]
    return out


_PASS_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PASS_LOCKS_LOCK = threading.Lock()


def pass_lock(j) -> threading.RLock:
    """One compaction pass at a time per journal (the mount's background
    service and `deltafs compact` through the control socket)."""
    with _PASS_LOCKS_LOCK:
        return _PASS_LOCKS.setdefault(j, threading.RLock())


def compact(j, policy: RetentionPolicy = RetentionPolicy(), dry_run: bool = False,
            now_hlc: int | None = None, dead_ratio: float = REPACK_DEAD_RATIO) -> CompactReport:
    """Apply retention, free unreferenced chunks and rewrite pack files more
    than ``dead_ratio`` dead, now (``j``: a writer)."""
    with pass_lock(j):
        try:
            return _compact(j, policy, dry_run, now_hlc, dead_ratio)
        finally:
            heap.trim(force=True)  # a pass's plan and lists are freed now: hand the pages back


def _compact(j, policy: RetentionPolicy, dry_run: bool, now_hlc: int | None,
             dead_ratio: float) -> CompactReport:
    t0 = time.monotonic()
    if dry_run:
        prune, kept, files = plan(j, policy, now_hlc)
        rep = CompactReport(dry_run=dry_run, files=files, versions=len(prune) + len(kept), pruned=prune,
                            files_examined=files)
    else:
        pl = plan_incremental(j, policy, now_hlc)
        prune, kept = pl.prune, pl.checkpoint
        rep = CompactReport(dry_run=dry_run, files=pl.files, versions=pl.versions, pruned=prune,
                            files_examined=pl.examined, versions_examined=pl.read, plan_full_why=pl.why)
    rep.plan_s = round(time.monotonic() - t0, 4)
    t1 = time.monotonic()
    if prune:
        try:
            res = j.prune(prune, kept, dry_run=dry_run)
        except BaseException:
            if not dry_run:  # the plan's wake-ups assumed these went: plan everything again
                j.planning().invalidate()
            raise
        rep.versions_pruned = res.versions_pruned
        rep.checkpoints_written = res.checkpoints_written
        rep.chunks_freed = res.chunks_freed
        rep.bytes_freed = res.bytes_freed
        rep.chunks_rebased = res.chunks_rebased
        rep.transactions = res.transactions
    t2 = time.monotonic()
    rep.prune_s = round(t2 - t1, 4)
    if not dry_run:
        rc = j.recode()
        rep.chunks_recoded, rep.recode_bytes_saved = rc.chunks_recoded, rc.bytes_before - rc.bytes_after
        rep.recode_s = rc.seconds
        if rc.chunks_recoded:  # its old values are dead now: reclaim them sooner than other dead bytes
            dead_ratio = min(dead_ratio, RECODE_DEAD_RATIO)
        t2 = time.monotonic()
        rp = j.repack(dead_ratio)
        t3 = time.monotonic()
        rep.packs_emptied, rep.bytes_reclaimed = rp.packs_emptied, rp.bytes_reclaimed
        rep.records_archived = j.archive_records()
        t4 = time.monotonic()
        rep.tree_checkpoints = write_tree_checkpoints(j)
        rep.index_pages_saved = j.densify_index()
        rep.repack_s, rep.archive_s = round(t3 - t2, 4), round(t4 - t3, 4)
        rep.densify_s = round(time.monotonic() - t4, 4)
    rep.pass_s = round(time.monotonic() - t0, 4)
    return rep


def write_tree_checkpoints(j) -> int:
    """The tree checkpoints due (docs/format.md, "Tree checkpoints"): called by
    every compaction pass and at the mount's maintenance ticks; cheap when none
    is due, a pass over the whole history the first time on an upgraded journal.
    Writing one builds the whole tree state: the heap is trimmed after it."""
    n = j.checkpoint_trees()
    if n:
        heap.trim()
    return n


def verify(j, full: bool = False) -> VerifyResult:
    return j.verify(full)


def vacuum(j) -> tuple[int, int]:
    """Compacting copy of data.mdb swapped in; closes ``j``.  -> (size before, after)."""
    before, after = j.vacuum()
    return before[0], after[0]


# --- the journal size limit -------------------------------------------------------------
FS_FREE_MIN_RATIO = 0.05  # below this share free on the journal's filesystem: pressure
MAX_PRESSURE_STEPS = 40
PRESSURE_DEAD_RATIO = 0.1  # over the limit, a pack 10 % dead is worth rewriting


@dataclass
class Pressure:
    data_bytes: int
    limit: int | None
    fs_free_ratio: float

    @property
    def over_limit(self) -> bool:
        return self.limit is not None and self.data_bytes > self.limit

    @property
    def disk_low(self) -> bool:
        return self.fs_free_ratio < FS_FREE_MIN_RATIO

    @property
    def active(self) -> bool:
        return self.over_limit or self.disk_low

    def why(self) -> str:
        if self.over_limit:
            return (f"journal data {_mib(self.data_bytes)} exceeds its limit {_mib(self.limit)}")
        return f"only {self.fs_free_ratio:.1%} of the journal's filesystem is free"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def pressure(j, limit: int | None) -> Pressure:
    """Journal data size (live pages, graveyard excluded) against ``limit``, and disk free."""
    vfs = os.statvfs(j.path)
    ratio = vfs.f_bavail / vfs.f_blocks if vfs.f_blocks else 1.0
    return Pressure(j.data_bytes(), limit, ratio)


def tighter(p: RetentionPolicy) -> RetentionPolicy | None:
    """One step of harder thinning: halve the keep-everything window down to
    1 s, then drop it and double every bucket length ("all" tiers become
    hourly); None when nothing is left to tighten."""
    if p.keep_all > 1.0:
        return replace(p, keep_all=p.keep_all / 2)
    tiers = tuple((u, e * 2 if e else HOUR_F) for u, e in p.tiers)
    after = None if p.after is None else (p.after * 2 if p.after else WEEK_F)
    if p.keep_all == 0 and after is not None and after > 1000 * WEEK_F and not tiers:
        return None
    if any(e > 1000 * WEEK_F for _, e in tiers):
        return None
    return replace(p, keep_all=0.0, tiers=tiers, after=after)


def compact_to_fit(j, policy: RetentionPolicy, limit: int | None, now_hlc: int | None = None) -> CompactReport:
    """A normal pass, then, while the journal is over ``limit`` (or its disk is
    low), passes with ever tighter policies (:func:`tighter`).  Each file's
    newest version and pinned versions survive every step."""
    with pass_lock(j):
        return _compact_to_fit(j, policy, limit, now_hlc)


def _compact_to_fit(j, policy: RetentionPolicy, limit: int | None, now_hlc: int | None) -> CompactReport:
    rep = compact(j, policy, now_hlc=now_hlc)
    p = policy
    pr = pressure(j, limit)
    if pr.active:  # dead bytes in packs first, before thinning harder
        rp = j.repack(PRESSURE_DEAD_RATIO)
        rep.packs_emptied += rp.packs_emptied
        rep.bytes_reclaimed += rp.bytes_reclaimed
        pr = pressure(j, limit)
    while pr.active and rep.pressure_steps < MAX_PRESSURE_STEPS:
        p2 = tighter(p)
        if p2 is None:
            break
        p = p2
        r2 = compact(j, p, now_hlc=now_hlc, dead_ratio=PRESSURE_DEAD_RATIO)
        rep.pressure_steps += 1
        rep.versions_pruned += r2.versions_pruned
        rep.checkpoints_written += r2.checkpoints_written
        rep.chunks_freed += r2.chunks_freed
        rep.bytes_freed += r2.bytes_freed
        rep.chunks_rebased += r2.chunks_rebased
        rep.transactions += r2.transactions
        rep.packs_emptied += r2.packs_emptied
        rep.bytes_reclaimed += r2.bytes_reclaimed
        rep.pruned += r2.pruned
        if r2.versions_pruned:
            pr = pressure(j, limit)
    rep.policy = p.spec()
    rep.data_bytes = pr.data_bytes
    return rep


# --- the mount's background compactor -------------------------------------------------
DEFAULT_INTERVAL = DEFAULT_COMPACT_EVERY  # seconds between passes
PRESSURE_CHECK_EVERY = 5.0  # seconds between checks of the size limit / disk free


@dataclass
class MaintenanceProgress:
    """The background compactor's progress: maintenance_service's handle
    (``deltafs status`` shows it as "maintenance")."""

    interval_s: float
    retention: str  # the policy's --retention text
    limit_bytes: int | None
    passes: int = 0
    last_pass_ns: int | None = None
    last_pass_s: float | None = None
    versions_pruned: int = 0
    bytes_freed: int = 0
    records_archived: int = 0
    pressure: bool = False
    last_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


async def maintenance_service(daemon, task_status=None, interval: float | None = None,
                              policy: RetentionPolicy | None = None) -> None:
    """A compaction pass every ``interval`` seconds (``daemon.cfg.compact_every``,
    default 10 minutes), in a worker thread; small transactions, so the
    mount's writer interleaves.  Every PRESSURE_CHECK_EVERY seconds it also
    checks ``daemon.cfg.journal_limit`` and the disk: under pressure a pass
    runs at once and thins harder (:func:`compact_to_fit`).  A failed pass is
    logged and retried next time.  Hands its :class:`MaintenanceProgress` to
    ``task_status.started`` (``deltafs status``)."""
    import trio

    from deltafs.guard import holding

    if task_status is None:
        task_status = trio.TASK_STATUS_IGNORED
    cfg = daemon.cfg
    if interval is None:
        interval = getattr(cfg, "compact_every", None) or DEFAULT_INTERVAL
    if policy is None:
        policy = getattr(cfg, "retention", None) or RetentionPolicy()
    limit = getattr(cfg, "journal_limit", None)
    j = daemon.journal
    st = MaintenanceProgress(interval_s=interval, retention=policy.spec(), limit_bytes=limit)
    check = min(interval, PRESSURE_CHECK_EVERY)
    task_status.started(st)
    next_pass = trio.current_time() + interval
    stuck = False  # under pressure and thinned as far as it goes: wait for the next regular pass
    while True:
        await trio.sleep(max(0.0, min(check, next_pass - trio.current_time())))
        due = trio.current_time() >= next_pass
        try:
            pr = await trio.to_thread.run_sync(pressure, j, limit)
        except Exception:  # noqa: BLE001 - a failed stat must not end the service
            log.exception("cannot measure the journal")
            pr = None
        under = pr is not None and pr.active
        if under and not st.pressure:
            log.warning("%s: compacting now and thinning harder than the retention policy", pr.why())
            st.pressure = True
            stuck = False
        elif pr is not None and not under and st.pressure:
            log.info("journal back under its limit (%s of data)", _mib(pr.data_bytes))
            st.pressure = False
        if not due and not (under and not stuck):
            try:  # the writer's share of checkpointing: a no-op until one is due
                await trio.to_thread.run_sync(write_tree_checkpoints, j)
            except Exception:  # noqa: BLE001 - checkpoints only speed history up; retry next tick
                log.exception("cannot write tree checkpoints")
            continue
        if holding(daemon.services.guard if hasattr(daemon, "services") else None):  # a guard alert stands: prune nothing (so mirrors prune nothing either)
            next_pass = trio.current_time() + interval
            log.warning("compaction held: the guard's alert stands (deltafs guard resume)")
            continue
        next_pass = trio.current_time() + interval
        t0 = time.monotonic()
        try:
            if under:
                rep = await trio.to_thread.run_sync(compact_to_fit, j, policy, limit)
            else:
                rep = await trio.to_thread.run_sync(compact, j, policy)
        except Exception as e:  # keep the mount running; one ERROR per failed pass
            log.exception("compaction pass failed")
            st.last_error = str(e)
            continue
        dt = time.monotonic() - t0
        st.passes += 1
        st.last_pass_ns = time.time_ns()
        st.last_pass_s = round(dt, 4)
        st.versions_pruned += rep.versions_pruned
        st.bytes_freed += rep.bytes_freed
        st.records_archived += rep.records_archived
        st.last_error = None
        if under:
            after = await trio.to_thread.run_sync(pressure, j, limit)
            was, stuck = stuck, after.active
            if stuck and not was:
                log.warning("%s even after thinning to %s; each file's newest and pinned versions stay",
                            after.why(), rep.policy)
            elif not stuck:
                log.info("under pressure: pruned %d versions in %d extra rounds (policy %s); "
                         "journal data now %s", rep.versions_pruned, rep.pressure_steps, rep.policy,
                         _mib(after.data_bytes))
        if rep.versions_pruned:
            log.info("compaction: pruned %d versions, freed %d chunks (%d bytes) in %.3fs",
                     rep.versions_pruned, rep.chunks_freed, rep.bytes_freed, dt)


# --- the journal's current tree against SRC (verify --full, issue 18) ------------------
@dataclass
class Drift:
    """One path where the journal's current tree disagrees with SRC."""

    path: bytes
    what: str
    suspect: list[int] = field(default_factory=list)  # content versions recorded under a merged identity

    def to_dict(self) -> dict:
        return {"path": os.fsdecode(self.path), "what": self.what, "suspect_versions": self.suspect}


def tree_drift(j, src: str, hidden: str | None = None) -> list[Drift]:
    """Compare the journal's current tree with SRC: presence, kind, symlink
    targets, content (every chunk of the journal's current version hashed
    against SRC's bytes) and identity (a path whose file id does not list it
    among its links: a history merged by the old re-created-path rule, whose
    current content is another file's).  ``hidden``: the journal directory
    inside SRC, left out.  A mount's start-up scan records each of these
    paths again (cause ``repair``)."""
    import stat as st_

    from deltafs.ignore import Ignore

    ignore = Ignore(src)
    hidden = os.path.realpath(hidden) if hidden else None
    seen: dict[bytes, os.stat_result] = {}
    root = os.fsencode(src)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root) if dirpath != root else b""
        keep = []
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                s = os.lstat(full)
            except OSError:
                continue
            is_dir = st_.S_ISDIR(s.st_mode)
            if ignore.match(rel, is_dir) or (hidden and is_dir and os.path.realpath(full) == os.fsencode(hidden)):
                continue
            seen[rel] = s
            if is_dir:
                keep.append(name)
        dirnames[:] = [d for d in dirnames if d in keep]
    out: list[Drift] = []
    with j.reader() as r:
        known = {p: (fid, kind) for p, fid, kind in r.current_tree() if p}
        for p in sorted(set(seen) | set(known)):
            s, k = seen.get(p), known.get(p)
            if k is None:
                out.append(Drift(p, "in SRC, missing from the journal"))
                continue
            if s is None:
                out.append(Drift(p, "in the journal, not in SRC"))
                continue
            fid, kind = k
            want = "d" if st_.S_ISDIR(s.st_mode) else "l" if st_.S_ISLNK(s.st_mode) else \
                "f" if st_.S_ISREG(s.st_mode) else "n"
            if want != kind:
                out.append(Drift(p, f"the journal has a {kind!r}, SRC a {want!r}"))
                continue
            fs = r.file_state(fid)
            if fs is None:
                out.append(Drift(p, "the journal names a file id it has no state for"))
                continue
            if kind == "l":
                if os.readlink(os.path.join(root, p)) != fs.target:
                    out.append(Drift(p, "symlink target differs"))
                continue
            if kind != "f":
                continue
            merged = p not in fs.links
            suspect = []
            if merged:  # the identity's versions since another file took it (its second create)
                recs = [r.record(q) for q in reversed(r.versions_of(fid))]
                creates = [x.seq for x in recs if x.op == "create"]
                since = creates[1] if len(creates) > 1 else 0
                suspect = [x.seq for x in recs if x.is_content and x.seq > since]
            if merged:
                out.append(Drift(p, "merged history: its file id belongs to "
                                    f"{os.fsdecode(b', '.join(fs.links) or b'a deleted file')}", sorted(suspect)))
                continue
            if not _same_content(r, fs, os.path.join(root, p), s.st_size):
                out.append(Drift(p, "content differs from SRC"))
    return out


def _same_content(r, fs, path: bytes, size: int) -> bool:
    from deltafs.chunking import chunk_id

    if fs.size != size:
        return False
    refs = r.chunk_list(fs.content_seq) if fs.content_seq else []
    if sum(n for _, n in refs) != size:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        off = 0
        for cid, n in refs:
            if chunk_id(os.pread(fd, n, off)) != cid:
                return False
            off += n
    finally:
        os.close(fd)
    return True
