"""What ``deltafs status`` shows: gathered by the daemon, or from the journal alone.

A status is a plain dict (the ``--json`` output, documented in docs/cli.md):
``mounted``, ``daemon`` ("running", "not answering" or null), ``src``,
``mnt``, ``pid``, ``started``, ``uptime_s``, ``journal`` (path, sizes and
history counts), ``capture`` (counters since the daemon started; null
without a daemon), ``snapshots``, ``mirrors`` (one object per mirror:
``url``, ``state`` ok / retrying / stalled / circuit open / paused / not
replicating, ``lag_records``, ``lag_bytes``, ``lag_seconds``,
``last_success_ns``, ``last_error``, ``stalled_s``, ``in_flight``; live
from the daemon, else the replicator's last status copy in the journal
with ``state`` null and the lag computed from the journal now), ``descriptors``
(live only: ``open``, ``limit``, ``reserve``, ``budget``, ``cached``,
``pinned``, ``handles``, ``evictions``, ``reopens``, ``shed``,
``shortages``, ``refused``, ``inodes``).  ``problems`` turns one into the reasons
``--check`` fails; ``prometheus`` renders several as Prometheus text.
"""

from __future__ import annotations

import os
import time

from deltafs.errors import DeltafsError

MAP_FULL_RATIO = 0.9  # --check fails when data.mdb holds this share of the LMDB map
DISK_FREE_MIN_BYTES = 256 << 20  # ... or the journal's filesystem has less free space
DISK_FREE_MIN_RATIO = 0.02  # ... or less than this share of it free
MAX_MIRROR_LAG_S = 3600.0  # --check fails when a mirror lags more (--max-lag)
NOT_REPLICATING = "not replicating"  # a registered mirror the running mount does not replicate to
MIRROR_STATES = ("ok", "retrying", "stalled", "circuit open", "paused", NOT_REPLICATING)


def journal_status(journal) -> dict:
    """History counts and sizes of an open journal (blocking)."""
    from deltafs.snapshots import listing as list_snapshots
    from deltafs.journal import MAP_SIZE

    with journal.reader() as r:
        st = r.stats()
        snaps = list_snapshots(r)
        journal_mirrors = stored_mirrors(r)
    vfs = os.statvfs(journal.path)
    raw, stored = st["raw_bytes"], st["stored_bytes"]
    return {
        "path": journal.path,
        "records": st["records"],
        "chunks": st["chunks"],
        "files": st["files"],
        "stored_bytes": stored,
        "raw_bytes": raw,
        "ratio": round(raw / stored, 3) if stored else None,
        "data_file_bytes": st["data_file_bytes"],
        "data_file_allocated": st["data_file_allocated"],
        "pack_bytes": st["pack_bytes"],
        "map_size": MAP_SIZE,
        "fs_free_bytes": vfs.f_bavail * vfs.f_frsize,
        "fs_size_bytes": vfs.f_blocks * vfs.f_frsize,
        "data_bytes": journal.data_bytes(),  # packs + live pages: what --journal-limit counts
        "limit_bytes": None,  # --journal-limit of the running mount
        "_mirrors": journal_mirrors,
    }, snaps


def stored_mirrors(reader) -> list[dict]:
    """Every mirror a journal knows: its ``mirrors`` status kv (what the
    replicator last wrote) and its registered mirrors (``deltafs mirror
    add``; ``seq`` null until one received something), with ``lag_*``
    computed now from the journal rather than copied from the kv (which is
    only as fresh as the mirror's last pass).  No live state: ``state`` null."""
    from deltafs.mirrors import registry

    head = reader.head_seq()
    known = {url: v for url, v in reader.kv_items("mirrors") if isinstance(v, dict)}
    registered = {m["url"] for m in registry.configured(reader)}
    for url in registered:
        known.setdefault(url, {})
    out = []
    for url, v in sorted(known.items()):
        seq = v.get("seq") if isinstance(v.get("seq"), int) else None
        out.append({"url": url, "state": None, "paused": None, "seq": seq, "head_seq": head,
                    **mirror_lag(reader, seq or 0, head),
                    "failures": v.get("failures", 0), "last_success_ns": v.get("last_success_ns"),
                    "last_error": v.get("last_error"), "last_error_ns": v.get("last_error_ns"),
                    "retry_in_s": None, "stalled_s": None, "in_flight": None,
                    "registered": url in registered})
    return out


def mirror_lag(reader, seq: int, head: int) -> dict:
    """Records a mirror at ``seq`` lacks, and the age of the oldest of them."""
    lag_s = 0.0
    if seq < head:
        lag_s = max(0.0, (time.time_ns() - reader.record(seq + 1).time_ns) / 1e9)
    return {"lag_records": max(0, head - seq), "lag_bytes": None, "lag_seconds": round(lag_s, 3)}


async def daemon_status(daemon) -> dict:
    """The status of the running mount (in the daemon)."""
    import trio

    j, snaps = await trio.to_thread.run_sync(journal_status, daemon.journal)
    j["limit_bytes"] = getattr(daemon.cfg, "journal_limit", None)
    workers = daemon.services.mirrors
    mirrors = [await w.status() for w in workers]
    # registered (deltafs mirror add) after this mount started: nothing replicates to them now
    for mi in j.pop("_mirrors", []):
        if mi["registered"] and mi["url"] not in workers and mi["url"] not in daemon.cfg.mirrors:
            mirrors.append({**mi, "state": NOT_REPLICATING})
    rec = daemon.rec
    cfg = daemon.cfg
    capture = None
    if rec is not None:
        capture = {
            "enabled": True,
            "paused": rec.paused,
            "versions": rec.versions,
            "records": rec.records,
            "pending": rec.pending(),
            "pending_bytes": rec.pipe.queued_bytes,
            "backpressure_waits": rec.pipe.waits,
            "failures": rec.failures,
            "last_error": rec.last_error,
            "last_capture_ns": rec.last_capture_ns or None,
            "gap": len(rec.gap),
            # journal transactions since the daemon started (each a durable commit), and how
            # many of them the loop thread made (namespace batches) or a capture's worker (solo)
            "commits": rec.journal.sync_count,
            "inline_commits": rec.pipe.inline_commits,
            "solo_commits": rec.pipe.solo_commits,
            # setattrs set in their file's queued create record instead of a record of their own
            "folded_setattrs": rec.pipe.folded,
            # chunk-list checkpoints a commit left to a transaction of their own while
            # idle, and how many of them were written so (the rest: a later version's)
            "deferred_checkpoints": rec.journal.lists_deferred,
            "later_checkpoints": rec.journal.lists_written_later,
        }
    else:
        capture = {"enabled": False, "paused": False, "versions": 0, "records": 0, "pending": 0,
                   "pending_bytes": 0, "backpressure_waits": 0, "failures": 0, "last_error": None,
                   "last_capture_ns": None, "gap": 0, "commits": 0, "inline_commits": 0, "solo_commits": 0,
                   "folded_setattrs": 0, "deferred_checkpoints": 0, "later_checkpoints": 0}
    return {
        "mounted": True,
        "daemon": "running",
        "src": cfg.src,
        "mnt": cfg.mnt,
        "pid": os.getpid(),
        "started": daemon.started,
        "uptime_s": round(time.time() - daemon.started, 3),
        "journal": j,
        "capture": capture,
        "snapshots": snaps,
        "mirrors": mirrors,
        "maintenance": (daemon.services.maintenance.to_dict()  # maintenance.maintenance_service
                        if daemon.services.maintenance is not None else None),
        "descriptors": daemon.ops.descriptor_status(),
        "guard": g.status() if (g := daemon.services.guard) is not None else None,  # deltafs.guard
        "group": await trio.to_thread.run_sync(_group, cfg.journal, getattr(daemon.services, "sync", None)),
    }


def _group(journal_dir: str, handle=None) -> dict | None:
    """The sync group's figures (docs/sync.md), None outside a group."""
    from deltafs import sync

    try:
        return sync.group_status(journal_dir, handle)
    except (OSError, ValueError) as e:
        return {"error": f"sync state unreadable: {e}"}


def offline_status(journal_dir: str, src: str | None, mnt: str | None = None,
                   daemon: str | None = None) -> dict:
    """The status from the journal alone (read-only; no daemon needed)."""
    from deltafs.journal import Journal

    with Journal.open(journal_dir, readonly=True) as jr:
        j, snaps = journal_status(jr)
    mirrors = j.pop("_mirrors")
    return {"mounted": mnt is not None, "daemon": daemon, "src": src, "mnt": mnt, "pid": None,
            "started": None, "uptime_s": None, "journal": j, "capture": None, "snapshots": snaps,
            "mirrors": mirrors, "group": _group(journal_dir)}


def status_of(loc, timeout: float = 10.0) -> dict:
    """Status of a located mount or journal: through the daemon when mounted."""
    from deltafs import control

    if loc.mount is not None:
        try:
            return control.request(loc.journal, "status", timeout=timeout)["status"]
        except control.DaemonNotRunning:
            return offline_status(loc.journal, loc.src, loc.mnt, daemon="not answering")
    return offline_status(loc.journal, loc.src)


def all_mounts(timeout: float = 10.0) -> list[dict]:
    """The status of every deltafs mount in the mount table."""
    from deltafs import mounttable
    from deltafs.locate import Location, mount_journal

    out = []
    for e in mounttable.deltafs_mounts():
        loc = Location(mount_journal(e), b"", e, e.src)
        try:
            out.append(status_of(loc, timeout))
        except DeltafsError as err:  # e.g. another user's journal we cannot read
            out.append({"mounted": True, "daemon": None, "src": e.src, "mnt": e.mnt,
                        "journal": {"path": loc.journal}, "capture": None, "snapshots": [],
                        "error": str(err)})
    from deltafs.pastfs import view_statuses

    return out + view_statuses()


def problems(st: dict, max_lag: float = MAX_MIRROR_LAG_S, max_peer_age: float | None = None) -> list[str]:
    """Why a mount is unhealthy (empty: healthy).  ``max_lag``: seconds a
    mirror may lag behind the journal; ``max_peer_age``: seconds a sync
    group's peer may go unheard (None: not checked)."""
    out = []
    grp = st.get("group") or {}
    where0 = st.get("mnt") or st.get("src") or st.get("journal", {}).get("path")
    if grp.get("error") or (grp.get("service") or {}).get("last_error"):
        out.append(f"{where0}: sync group: {grp.get('error') or grp['service']['last_error']}")
    for p in grp.get("peers") or []:
        held = p.get("held")
        if held and not p.get("left"):
            ex = ", ".join(held.get("examples") or [])
            out.append(f"{where0}: sync peer {p['device']} ({p.get('name') or '-'}) is held by the damage guard: "
                       f"{held.get('files', '?')} files would be destroyed from its event {held.get('from', '?')} on"
                       + (f" (e.g. {ex})" if ex else "") + f"; check them, then deltafs guard resume {where0}")
    if max_peer_age is not None:
        for p in grp.get("peers") or []:
            if not p.get("left") and (p.get("age_s") is None or p["age_s"] > max_peer_age):
                seen = "never" if p.get("age_s") is None else f"{_ago(p['age_s'])} ago"
                out.append(f"{where0}: sync peer {p['device']} ({p.get('name') or '-'}) last heard {seen}")
    if st.get("view") == "past":  # a read-only mount --at view: nothing to lag or fail
        return out
    where = st.get("mnt") or st.get("src") or st.get("journal", {}).get("path")
    if st.get("error"):
        out.append(f"{where}: {st['error']}")
    if st.get("mounted") and st.get("daemon") != "running":
        out.append(f"{where}: mounted, but its daemon does not answer")
    cap = st.get("capture") or {}
    if cap.get("failures"):
        out.append(f"{where}: {cap['failures']} capture(s) failed since the daemon started"
                   + (f"; last error: {cap['last_error']}" if cap.get("last_error") else ""))
    elif cap.get("last_error"):
        out.append(f"{where}: capture error: {cap['last_error']}")
    ga = (st.get("guard") or {}).get("alert")
    if ga:
        out.append(f"{where}: GUARD ALERT: {ga['files']} files look destroyed since version "
                   f"{ga['before_version']}; undo with deltafs rollback {where} --to "
                   f"{ga.get('snapshot') or 'v%d' % ga['before_version']}, then deltafs guard resume {where}")
    fds = st.get("descriptors") or {}
    if fds.get("shortages"):
        out.append(f"{where}: descriptors ran short {fds['shortages']} time(s) (limit {fds['limit']}, "
                   f"{fds['refused']} open(s) refused): raise the daemon's RLIMIT_NOFILE")
    j = st.get("journal") or {}
    if j.get("map_size") and j.get("data_file_bytes", 0) >= MAP_FULL_RATIO * j["map_size"]:
        out.append(f"{where}: the journal uses {j['data_file_bytes'] / j['map_size']:.0%} of its "
                   f"LMDB map ({_size(j['map_size'])})")
    if "fs_free_bytes" in j:
        free, size = j["fs_free_bytes"], j.get("fs_size_bytes") or 0
        if free < DISK_FREE_MIN_BYTES or (size and free < DISK_FREE_MIN_RATIO * size):
            out.append(f"{where}: only {_size(free)} free on the journal's filesystem")
    for mi in st.get("mirrors") or []:
        err = f"; last error: {mi['last_error']}" if mi.get("last_error") else ""
        if mi.get("state") == "circuit open":
            out.append(f"{where}: mirror {mi['url']} is unreachable (circuit open after "
                       f"{mi.get('failures')} failures){err}")
        elif mi.get("state") == "stalled":
            doing = f" ({mi['in_flight']})" if mi.get("in_flight") else ""
            out.append(f"{where}: mirror {mi['url']} is stalled: no progress for "
                       f"{_ago(mi.get('stalled_s') or 0)}{doing}; the server does not answer{err}")
        elif mi.get("seq") is None and mi.get("state") != "ok" and mi.get("lag_records"):
            why = {None: "", NOT_REPLICATING: " (registered after this mount started: remount, or "
                                              f"deltafs mirror sync {mi['url']})"}.get(mi.get("state"),
                                                                                       f" ({mi['state']})")
            out.append(f"{where}: mirror {mi['url']} has never received anything: "
                       f"{mi['lag_records']} records behind{why}{err}")
        elif (mi.get("lag_seconds") or 0) > max_lag:
            out.append(f"{where}: mirror {mi['url']} lags {_ago(mi['lag_seconds'])} "
                       f"({mi.get('lag_records')} records) behind the journal{err}")
    return out


# ---- text ----------------------------------------------------------------------

def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_text(st: dict) -> str:
    if st.get("view") == "past":
        from deltafs.pastfs import format_view

        return format_view(st)
    j = st.get("journal") or {}
    cap = st.get("capture")
    if st.get("mnt"):
        head = f"{st['mnt']} (SRC {st.get('src')})"
        if st.get("daemon") == "running":
            head += f": mounted, pid {st['pid']}, up {_ago(st['uptime_s'])}"
        else:
            head += f": mounted, daemon {st.get('daemon') or 'unknown'}"
    else:
        head = f"{st.get('src') or j.get('path')}: not mounted"
    lines = [head]
    if st.get("error"):
        lines.append(f"  error      {st['error']}")
    if "records" in j:
        lines.append(f"  journal    {j['path']}, {_size(j['data_file_allocated'] + j.get('pack_bytes', 0))} on disk, "
                     f"{_size(j['fs_free_bytes'])} free")
        ratio = f" ({j['ratio']:.2f}x)" if j.get("ratio") else ""
        if j.get("limit_bytes"):
            lines.append(f"  limit      {_size(j.get('data_bytes'))} of data, limit {_size(j['limit_bytes'])} "
                         f"({(j.get('data_bytes') or 0) / j['limit_bytes']:.0%})")
        lines.append(f"  history    {j['records']} records, {j['files']} files, {j['chunks']} chunks; "
                     f"{_size(j['stored_bytes'])} stored for {_size(j['raw_bytes'])}{ratio}")
    if cap is not None:
        if not cap["enabled"]:
            lines.append("  capture    off (--no-capture)")
        else:
            last = "never"
            if cap["last_capture_ns"]:
                last = f"{_ago(time.time() - cap['last_capture_ns'] / 1e9)} ago"
            lines.append(f"  capture    {'PAUSED' if cap['paused'] else 'running'}: "
                         f"{cap['versions']} versions, {cap['records']} records since start, "
                         f"{cap['pending']} pending, last {last}")
            if cap["failures"] or cap["last_error"]:
                lines.append(f"  failures   {cap['failures']}; last error: {cap['last_error']}")
    gd = st.get("guard")
    if gd:
        ga = gd.get("alert")
        lines.append(f"  guard      {gd['level']}: " + (
            f"ALERT: {ga['files']} files look destroyed after version {ga['before_version']} (snapshot "
            f"{ga.get('snapshot')}); deltafs rollback, then deltafs guard resume"
            + ("; changes are refused (--guard-action block)" if ga.get("blocking") else "") if ga else
            f"watching, score {gd['score']} of {gd['threshold']:g}"))
    fds = st.get("descriptors")
    if fds:
        lines.append(f"  descriptors {fds['open']} of {fds['limit']} open: {fds['cached']} cached for "
                     f"{fds['inodes']} inodes (budget {fds['budget']}), {fds['pinned']} pinned, "
                     f"{fds['handles']} handles; {fds['evictions']} evictions")
        if fds["shortages"] or fds["refused"]:
            lines.append(f"             SHORT {fds['shortages']} time(s): {fds['shed']} cached closed, "
                         f"{fds['refused']} open(s) refused to keep {fds['reserve']} free")
    grp = st.get("group")
    if grp and not grp.get("error"):
        lines.append(f"  group      {grp['url']}: device {grp['device']}, {grp['conflicts']} conflict(s) open"
                     + (f" ({', '.join(grp['conflict_paths'])})" if grp["conflicts"] else "")
                     + f", pending out {grp['pending_out']}, waiting in {grp['pending_in']}")
        for p in grp.get("peers") or []:
            seen = "never" if p.get("age_s") is None else f"{_ago(p['age_s'])} ago"
            lines.append(f"  peer       {p['device']} {p.get('name') or '-'}: last heard {seen}, "
                         f"pending in {p['pending_in']}, out {p['pending_out']}" + (" (left)" if p.get("left") else "")
                         + (" HELD by the damage guard" if p.get("held") else ""))
    snaps = st.get("snapshots") or []
    if snaps:
        s = snaps[-1]
        lines.append(f"  snapshots  {len(snaps)}, latest {s['name']!r} at version {s['seq']}")
    for mi in st.get("mirrors") or []:
        state = mi.get("state") or "not running"
        if mi.get("lag_records"):
            lag = f"{mi['lag_records']} records"
            if mi.get("lag_bytes") is not None:
                lag += f", {_size(mi['lag_bytes'])}"
            lag += f", {_ago(mi.get('lag_seconds') or 0)} behind"
        else:
            lag = "up to date" if mi.get("lag_records") == 0 else "lag unknown"
        last = "never"
        if mi.get("last_success_ns"):
            last = f"{_ago(time.time() - mi['last_success_ns'] / 1e9)} ago"
        lines.append(f"  mirror     {mi['url']}: {state}, {lag}, last success {last}")
        if mi.get("in_flight") and state == "stalled":
            lines.append(f"             no progress for {_ago(mi.get('stalled_s') or 0)}: {mi['in_flight']}")
        if mi.get("last_error") and state != "ok":
            retry = f" (retry in {_ago(mi['retry_in_s'])})" if mi.get("retry_in_s") is not None else ""
            lines.append(f"             last error: {mi['last_error']}{retry}")
    return "\n".join(lines)


# ---- Prometheus ------------------------------------------------------------------

def prometheus(statuses: list[dict]) -> bytes:
    """Prometheus text exposition format for the given statuses."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    labels = ["mnt", "src", "journal"]

    def g(name, doc):
        return Gauge(name, doc, labels, registry=reg)

    m = {
        "mounted": g("deltafs_mounted", "1 when the journal's SRC is mounted"),
        "up": g("deltafs_daemon_up", "1 when the mount's daemon answers on its control socket"),
        "uptime": g("deltafs_uptime_seconds", "seconds since the daemon mounted"),
        "records": g("deltafs_journal_records", "records in the journal (its head version id)"),
        "chunks": g("deltafs_journal_chunks", "distinct chunks stored"),
        "files": g("deltafs_journal_files", "files the journal knows (also deleted ones)"),
        "stored": g("deltafs_journal_stored_bytes", "bytes stored for chunks (compressed, deduplicated)"),
        "raw": g("deltafs_journal_raw_bytes", "bytes of the content versions before dedup and compression"),
        "data": g("deltafs_journal_data_file_bytes", "allocated size of data.mdb"),
        "packs": g("deltafs_journal_pack_bytes", "size of the journal's pack files (chunk values)"),
        "free": g("deltafs_journal_fs_free_bytes", "free bytes on the journal's filesystem"),
        "snapshots": g("deltafs_snapshots", "named snapshots"),
        "versions": g("deltafs_capture_versions", "content versions recorded since the daemon started"),
        "crecords": g("deltafs_capture_records", "records written since the daemon started"),
        "pending": g("deltafs_capture_pending", "captures queued, not yet durable"),
        "failures": g("deltafs_capture_failures", "captures that failed since the daemon started"),
        "paused": g("deltafs_capture_paused", "1 while capture is paused"),
        "last": g("deltafs_capture_last_timestamp_seconds", "time of the last committed capture"),
        "fd_open": g("deltafs_descriptors_open", "descriptors the daemon has open"),
        "fd_limit": g("deltafs_descriptors_limit", "the daemon's RLIMIT_NOFILE"),
        "fd_budget": g("deltafs_descriptors_budget", "descriptors the daemon may cache for inodes"),
        "fd_cached": g("deltafs_descriptors_cached", "inode descriptors in the cache"),
        "fd_evictions": g("deltafs_descriptor_evictions", "inode descriptors closed by the cache's budget"),
        "fd_shortages": g("deltafs_descriptor_shortages", "times descriptors ran short (one warning each)"),
        "inodes": g("deltafs_inodes", "inodes the kernel knows through the mount"),
        "guard_alert": g("deltafs_guard_alert", "1 while a mass-damage guard alert stands (docs/guard.md)"),
        "guard_score": g("deltafs_guard_score", "the guard's score of damaged-looking files in its window"),
    }
    for st in statuses:
        j = st.get("journal") or {}
        lv = (st.get("mnt") or "", st.get("src") or "", j.get("path") or "")
        m["mounted"].labels(*lv).set(1 if st.get("mounted") else 0)
        m["up"].labels(*lv).set(1 if st.get("daemon") == "running" else 0)
        if st.get("uptime_s") is not None:
            m["uptime"].labels(*lv).set(st["uptime_s"])
        for key, field in (("records", "records"), ("chunks", "chunks"), ("files", "files"),
                           ("stored", "stored_bytes"), ("raw", "raw_bytes"),
                           ("data", "data_file_allocated"), ("packs", "pack_bytes"),
                           ("free", "fs_free_bytes")):
            if j.get(field) is not None:
                m[key].labels(*lv).set(j[field])
        m["snapshots"].labels(*lv).set(len(st.get("snapshots") or []))
        cap = st.get("capture")
        if cap is not None:
            m["versions"].labels(*lv).set(cap["versions"])
            m["crecords"].labels(*lv).set(cap["records"])
            m["pending"].labels(*lv).set(cap["pending"])
            m["failures"].labels(*lv).set(cap["failures"])
            m["paused"].labels(*lv).set(1 if cap["paused"] else 0)
            if cap["last_capture_ns"]:
                m["last"].labels(*lv).set(cap["last_capture_ns"] / 1e9)
        gd = st.get("guard")
        if gd:
            m["guard_alert"].labels(*lv).set(1 if gd.get("alert") else 0)
            m["guard_score"].labels(*lv).set(gd.get("score") or 0)
        fds = st.get("descriptors")
        if fds:
            for key, field in (("fd_open", "open"), ("fd_limit", "limit"), ("fd_budget", "budget"),
                               ("fd_cached", "cached"), ("fd_evictions", "evictions"),
                               ("fd_shortages", "shortages"), ("inodes", "inodes")):
                m[key].labels(*lv).set(fds[field])
    ml = [*labels, "mirror"]
    mg = {
        "m_lag": Gauge("deltafs_mirror_lag_records", "journal records the mirror lacks", ml, registry=reg),
        "m_lag_b": Gauge("deltafs_mirror_lag_bytes", "bytes of records and chunks the mirror lacks (upper bound)",
                         ml, registry=reg),
        "m_lag_s": Gauge("deltafs_mirror_lag_seconds", "age of the oldest record the mirror lacks", ml,
                         registry=reg),
        "m_fail": Gauge("deltafs_mirror_failures", "replication failures in a row", ml, registry=reg),
        "m_last": Gauge("deltafs_mirror_last_success_timestamp_seconds", "time of the last successful pass",
                        ml, registry=reg),
        "m_state": Gauge("deltafs_mirror_state", "1 for the mirror's current state", [*ml, "state"],
                         registry=reg),
        "m_stall": Gauge("deltafs_mirror_stalled_seconds", "seconds without progress of a stalled mirror",
                         ml, registry=reg),
    }
    for st in statuses:
        j = st.get("journal") or {}
        lv = (st.get("mnt") or "", st.get("src") or "", j.get("path") or "")
        for mi in st.get("mirrors") or []:
            mv = (*lv, mi["url"])
            for key, fld in (("m_lag", "lag_records"), ("m_lag_b", "lag_bytes"), ("m_lag_s", "lag_seconds"),
                             ("m_fail", "failures")):
                if mi.get(fld) is not None:
                    mg[key].labels(*mv).set(mi[fld])
            if mi.get("last_success_ns"):
                mg["m_last"].labels(*mv).set(mi["last_success_ns"] / 1e9)
            if mi.get("stalled_s") is not None:
                mg["m_stall"].labels(*mv).set(mi["stalled_s"])
            if mi.get("state"):
                for state in MIRROR_STATES:
                    mg["m_state"].labels(*mv, state).set(1 if mi["state"] == state else 0)
    _group_metrics(reg, labels, statuses)
    return generate_latest(reg)


def _group_metrics(reg, labels, statuses) -> None:
    """The sync group's figures (docs/sync.md): conflicts, pending, each peer's age and lag."""
    from prometheus_client import Gauge

    pl = [*labels, "peer"]
    conf = Gauge("deltafs_sync_conflicts", "open sync conflicts", labels, registry=reg)
    out = Gauge("deltafs_sync_pending_out", "local events not yet published", labels, registry=reg)
    age = Gauge("deltafs_sync_peer_age_seconds", "seconds since the peer's stream last moved", pl, registry=reg)
    pin = Gauge("deltafs_sync_peer_pending_in", "the peer's events not yet applied here", pl, registry=reg)
    pout = Gauge("deltafs_sync_peer_pending_out", "events of this member the peer has not taken", pl, registry=reg)
    held = Gauge("deltafs_sync_peer_held", "1 while the damage guard holds the peer's events", pl, registry=reg)
    for st in statuses:
        grp = st.get("group") or {}
        if not grp or grp.get("error"):
            continue
        j = st.get("journal") or {}
        lv = (st.get("mnt") or "", st.get("src") or "", j.get("path") or "")
        conf.labels(*lv).set(grp["conflicts"])
        out.labels(*lv).set(grp["pending_out"])
        for p in grp.get("peers") or []:
            if p.get("age_s") is not None:
                age.labels(*lv, p["device"]).set(p["age_s"])
            pin.labels(*lv, p["device"]).set(p["pending_in"])
            pout.labels(*lv, p["device"]).set(p["pending_out"])
            held.labels(*lv, p["device"]).set(1 if p.get("held") else 0)
