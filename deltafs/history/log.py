"""log: records of a path (with --follow, --deleted, --watch), and records grouped into saves."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from deltafs.history.format import iso_time, record_entry, show_path
from deltafs.history.query import missing_error, path_seqs, pruned_seqs
from deltafs.journal import Journal, Reader
from deltafs.when import resolve_when, since_seq


# --- log ----------------------------------------------------------------------------
def log_entries(r: Reader, rel: bytes, since: str | None = None, until: str | None = None,
                limit: int | None = None, now_ns: int | None = None,
                show_pruned: bool = False, follow: bool = False) -> Iterator[dict]:
    """Records of PATH, newest first, filtered by --since/--until (inclusive).
    Pruned versions are left out, or with ``show_pruned`` marked ``"pruned": True``.
    ``follow``: a file's records across renames too (:func:`path_seqs`)."""
    lo = since_seq(r, since, now_ns) if since else 1
    hi = resolve_when(r, until, now_ns, clamp=True).seq if until else r.head_seq()
    seqs = path_seqs(r, rel, follow)
    if seqs is not None and not seqs:
        raise missing_error(r, rel, r.head_seq())
    if seqs is None:
        it = r.records(lo, hi, reverse=True) if hi >= lo else iter(())
    else:
        it = (r.record(s) for s in seqs if lo <= s <= hi)
    # one PATH: a lookup per content record (O(versions of PATH), not O(pruned versions))
    pruned = pruned_seqs(r) if seqs is None else None
    n = 0
    for rec in it:
        if limit is not None and n >= limit:
            return
        d = record_entry(rec)
        if (rec.seq in pruned) if pruned is not None else (rec.is_content and r.is_pruned(rec.seq)):
            if not show_pruned:
                continue
            d["pruned"] = True
        yield d
        n += 1


def deleted_entries(r: Reader, rel: bytes, since: str | None = None, until: str | None = None,
                    limit: int | None = None, now_ns: int | None = None) -> list[dict]:
    """Files at or below PATH that are deleted now, newest deletion first, each
    with its last version (``version``; 0 = it never had content)."""
    lo = since_seq(r, since, now_ns) if since else 1
    hi = resolve_when(r, until, now_ns, clamp=True).seq if until else r.head_seq()
    if rel:
        seqs = r.versions_under(rel)
        if not seqs:
            raise missing_error(r, rel, r.head_seq())
        fids = {r.record(s).file_id for s in seqs}
    else:
        fids = {rec.file_id for rec in r.records()}
    out = []
    for fid in fids:
        st = r.file_state(fid)
        if st is None or not st.deleted or not lo <= st.last_seq <= hi:
            continue
        if rel and not (st.path == rel or st.path.startswith(rel + b"/")):
            continue
        last = r.record(st.content_seq) if st.content_seq else r.record(st.last_seq)
        gone = r.record(st.last_seq)
        out.append({
            "version": st.content_seq, "time": iso_time(last.time_ns), "time_ns": last.time_ns,
            "op": "deleted", "path": show_path(st.path), "file_id": fid, "kind": st.kind,
            "size": st.size, "deleted_version": st.last_seq, "deleted_time": iso_time(gone.time_ns),
        })
    out.sort(key=lambda d: d["deleted_version"], reverse=True)
    return out[:limit] if limit is not None else out


def follow_entries(j: Journal, rel: bytes, after: int, interval: float = 0.2,
                   sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """New records of PATH after seq ``after``, oldest first, as they are
    committed (polls the head; ends only when the caller stops iterating)."""
    for batch in follow_batches(j, rel, after, interval, sleep):
        yield from batch


def follow_batches(j: Journal, rel: bytes, after: int, interval: float = 0.2,
                   sleep: Callable[[float], None] = time.sleep) -> Iterator[list[dict]]:
    """:func:`follow_entries` one poll at a time: the non-empty lists of
    PATH's records committed since the previous poll, oldest first."""
    while True:
        with j.reader() as r:
            head = r.head_seq()
            if head > after:
                batch = [record_entry(rec) for rec in r.records(after + 1, head) if _matches(rec, rel)]
                after = head
                if batch:
                    yield batch
        sleep(interval)


# --- saves: a log of what the user did, not of each record (docs/cli.md "deltafs log") ---
SAVE_GAP_NS = 2_000_000_000
"""Records further apart than this are never one save."""
_SAVE_CAUSES = ("sync", "restore", "repair", "scan", "preimage")


def _save_keys(d: dict) -> set:
    keys = {("f", d["file_id"]), ("p", d["path"])}
    if "path2" in d:
        keys.add(("p", d["path2"]))
    return keys


def save_entry(recs: list[dict]) -> dict:
    """One save from its records (oldest first): the newest record's version
    and time, the cause, the path the saved file has after it, and the records
    themselves (newest first, like the log)."""
    content = [d for d in recs if "cause" in d]
    main = content[-1] if content else recs[-1]
    path = main["path"]
    for d in recs[recs.index(main) + 1:]:
        if d["op"] == "rename" and d["file_id"] == main["file_id"] and d["path"] == path:
            path = d["path2"]
    causes = {d["cause"] for d in content}
    cause = next((c for c in _SAVE_CAUSES if c in causes), None)
    if cause is None:
        if "rename-over" in causes or any(d["op"] == "rename" and d.get("path2") == path
                                         for d in recs):
            cause = "atomic save"
        elif content:
            cause = "save"
        else:
            cause = recs[0]["op"]
    last = recs[-1]
    e = {"version": last["version"], "first_version": recs[0]["version"], "time": last["time"],
         "time_ns": last["time_ns"], "op": "save", "cause": cause, "path": path,
         "file_id": main["file_id"]}
    if "size" in main:
        e["size"] = main["size"]
    if content:
        e["stored"] = sum(d["stored"] for d in content)
    origin = next((d["origin"] for d in reversed(recs) if "origin" in d), None)
    if origin:
        e["origin"] = origin
    if all(d.get("pruned") for d in recs):
        e["pruned"] = True
    e["records"] = recs[::-1]
    return e


def group_saves(recs: list[dict]) -> list[dict]:
    """Records in version order (oldest first) -> saves, oldest first.  A
    record joins the save before it when it is within ``SAVE_GAP_NS`` of that
    save's last record and shares a file id or a path (path or rename target)
    with one of its records, unless both hold a content version: a save has at
    most one; anything else starts a new save."""
    saves: list[list[dict]] = []
    keys: set = set()
    for d in recs:
        k = _save_keys(d)
        if saves and d["time_ns"] - saves[-1][-1]["time_ns"] <= SAVE_GAP_NS and k & keys:
            cur = saves[-1]
            if "cause" in d and any("cause" in x for x in cur):
                # a second content version is a second save (never hide a version): the
                # renames and creates after the first one's content prepared this one
                last = max(i for i, x in enumerate(cur) if "cause" in x)
                cut = len(cur)
                while cut > last + 1 and cur[cut - 1]["op"] in ("rename", "create"):
                    cut -= 1
                saves[-1], nxt = cur[:cut], cur[cut:] + [d]
                saves.append(nxt)
                keys = set().union(*(_save_keys(x) for x in nxt))
                continue
            cur.append(d)
            keys |= k
        else:
            saves.append([d])
            keys = k
    return [save_entry(g) for g in saves]


def save_entries(entries: Iterable[dict]) -> Iterator[dict]:
    """Newest-first records (:func:`log_entries`) -> newest-first saves.
    Records are read a burst at a time (runs with gaps of at most
    ``SAVE_GAP_NS``), so a save is never split by where reading stops."""
    burst: list[dict] = []
    for d in entries:
        if burst and burst[-1]["time_ns"] - d["time_ns"] > SAVE_GAP_NS:
            yield from reversed(group_saves(burst[::-1]))
            burst = []
        burst.append(d)
    if burst:
        yield from reversed(group_saves(burst[::-1]))


def _under(p: bytes | None, rel: bytes) -> bool:
    return p is not None and (not rel or p == rel or p.startswith(rel + b"/"))


def _matches(rec, rel: bytes) -> bool:
    return _under(rec.path, rel) or _under(rec.path2, rel)
