"""Retention, compaction (prune + GC), verify and vacuum; the mount's compactor.

Retention is a pure function (:func:`retain`) of a file's content versions,
the journal's time and a :class:`RetentionPolicy`.  :func:`compact` asks it
about every file and hands the answer to ``deltafs.journal.compact``, which
prunes in small transactions (docs/format.md, "Compaction and retention").
Times are the journal's HLC times, never file mtimes; "now" is the HLC of
the journal's newest record, so an idle journal is not thinned further and
a wall clock that jumps ahead cannot expire history.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

from deltafs.errors import JournalError
from deltafs.journal import compact as JC
from deltafs.journal.hlc import hlc_to_ns

log = logging.getLogger(__name__)

S_NS = 1_000_000_000
HOUR = 3600
DAY = 86400
WEEK = 7 * DAY


@dataclass(frozen=True)
class RetentionPolicy:
    """Default: every version for 24 h, then hourly for 7 days, daily for 90
    days, weekly after; bursts (a version followed within 10 s by the next
    one) keep only their last version once older than a minute."""

    keep_all: float = DAY  # seconds: younger versions are all kept (bursts aside)
    tiers: tuple[tuple[float, float], ...] = ((7 * DAY, HOUR), (90 * DAY, DAY))  # (up to age, one per)
    after: float = WEEK  # one per this, older than the last tier
    burst: float = 10.0  # seconds; 0 turns coalescing off
    burst_min_age: float = 60.0

    def bucket(self, age_s: float) -> float | None:
        """Length of the thinning bucket at this age, None: keep all."""
        if age_s < self.keep_all:
            return None
        for upto, every in self.tiers:
            if age_s < upto:
                return every
        return self.after


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
    transactions: int = 0
    data_file_before: int | None = None  # --vacuum
    data_file_after: int | None = None
    pruned: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("pruned")
        return d


def plan(j, policy: RetentionPolicy = RetentionPolicy(), now_hlc: int | None = None) -> tuple[list[int], list[int], int]:
    """-> (seqs to prune, seqs retained, files examined), nothing written."""
    JC.pruned_db(j)
    with j.reader() as r:
        vs = JC.content_versions(j, r)
        snaps = JC.snapshot_seqs(r).values()
        # a mirror that has not shipped a version yet still needs its chunks
        floor = min((v.get("seq", 0) for _, v in r.kv_items("mirrors") if isinstance(v, dict)),
                    default=vs.head_seq)
    now = vs.head_hlc if now_hlc is None else now_hlc
    prune, kept = [], []
    for _, versions in vs.by_file.items():
        pinned = pinned_by_snapshots(versions, snaps) | {s for s, _ in versions if s > floor}
        keep = retain(versions, now, policy, pinned)
        for s, _ in versions:
            (kept if s in keep else prune).append(s)
    return sorted(prune), sorted(kept), len(vs.by_file)


def compact(j, policy: RetentionPolicy = RetentionPolicy(), dry_run: bool = False,
            now_hlc: int | None = None) -> CompactReport:
    """Apply retention and free unreferenced chunks, now (``j``: a writer)."""
    prune, kept, files = plan(j, policy, now_hlc)
    rep = CompactReport(dry_run=dry_run, files=files, versions=len(prune) + len(kept), pruned=prune)
    if prune:
        res = JC.prune(j, prune, kept, dry_run=dry_run)
        rep.versions_pruned = res.versions_pruned
        rep.checkpoints_written = res.checkpoints_written
        rep.chunks_freed = res.chunks_freed
        rep.bytes_freed = res.bytes_freed
        rep.transactions = res.transactions
    return rep


def verify(j, full: bool = False) -> JC.VerifyResult:
    return JC.verify(j, full)


def vacuum(j) -> tuple[int, int]:
    """Compacting copy of data.mdb swapped in; closes ``j``.  -> (size before, after)."""
    try:
        before, after = JC.vacuum(j)
    except RuntimeError as e:
        raise JournalError(f"cannot vacuum {j.path}: {e}") from e
    return before[0], after[0]


# --- the mount's background compactor -------------------------------------------------
DEFAULT_INTERVAL = 600.0  # seconds between passes


async def maintenance_service(daemon, task_status=None, interval: float | None = None,
                              policy: RetentionPolicy = RetentionPolicy()) -> None:
    """A compaction pass every ``interval`` seconds (``daemon.cfg.maintenance_interval``
    if set, else 10 minutes), in a worker thread; small transactions, so the
    mount's writer interleaves.  A failed pass is logged and retried next time."""
    import trio

    if task_status is None:
        task_status = trio.TASK_STATUS_IGNORED
    if interval is None:
        interval = getattr(daemon.cfg, "maintenance_interval", None) or DEFAULT_INTERVAL
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            rep = await trio.to_thread.run_sync(compact, daemon.journal, policy)
        except Exception:  # keep the mount running; one ERROR per failed pass
            log.exception("compaction pass failed")
            continue
        if rep.versions_pruned:
            log.info("compaction: pruned %d versions, freed %d chunks (%d bytes)",
                     rep.versions_pruned, rep.chunks_freed, rep.bytes_freed)
