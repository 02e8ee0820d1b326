"""History tools over a journal reader: log, cat, diff, restore (no mount needed).

Everything here takes a :class:`deltafs.journal.Reader` (or a Journal and
opens its own short readers) and a path relative to SRC (bytes, ``b""`` is
the root).  Nothing here prints: functions return data or strings, and
``cli`` prints them.

Path semantics:

* ``log PATH`` of a file lists every record whose path (or rename/link
  target) is PATH, plus every record of the file currently at PATH (so a
  file renamed into place shows its earlier versions); of a directory,
  every record at or below it; of the root, every record.
* ``cat``/``diff``/``restore`` resolve PATH in the tree *as it was* at the
  chosen moment (``Reader.tree_at``), so deleted and renamed-away paths
  work.
"""

from __future__ import annotations

import bisect
import difflib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Callable, Iterator

from deltafs import chunking
from deltafs.errors import CorruptionError, NotFoundError, UsageError
from deltafs.journal import (KIND_DIR, KIND_FILE, KIND_SPECIAL, KIND_SYMLINK, Change, Journal,
                             Reader, TreeEntry, content_hash)
from deltafs.journal import compact as JC
from deltafs.journal.state import tree_entry
from deltafs.when import Point, parse_when, resolve_when, since_seq

log = logging.getLogger(__name__)

TEXT_DIFF_MAX = 8 << 20  # larger files get the chunk summary, never a text diff
TMP_PREFIX = b".deltafs-restore-"  # + b"PID-N.tmp": a restore's file before its rename
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + rb"(\d+)-\d+\.tmp\Z")


# --- small formatting helpers ------------------------------------------------------
def iso_time(ns: int, table: bool = False) -> str:
    dt = datetime.fromtimestamp(ns / 10**9).astimezone()
    if table:
        return dt.strftime("%Y-%m-%d %H:%M:%S")
    return dt.isoformat(timespec="milliseconds")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show_path(p: bytes | None) -> str:
    if p is None:
        return ""
    return os.fsdecode(p) if p else "/"


# --- resolving a path at a moment --------------------------------------------------
def path_seen(r: Reader, rel: bytes) -> bool:
    return rel == b"" and r.head_seq() > 0 or bool(r.versions_under(rel))


def entry_at(r: Reader, rel: bytes, seq: int) -> TreeEntry | None:
    """The tree entry at ``rel`` right after record ``seq`` (None: absent)."""
    if seq >= r.head_seq():
        fid = r.file_id_at(rel) if rel else None
        if fid is None:
            return _root_entry() if rel == b"" else None
        return tree_entry(rel, fid, r.file_state(fid))
    e = r.tree_at(seq, prefix=rel).get(rel)
    return e if e is not None or rel != b"" else _root_entry()


def _root_entry() -> TreeEntry:
    return TreeEntry(b"", KIND_DIR, 0, 0, 0, None, None, None, None, None, None, {}, None)


def _missing(r: Reader, rel: bytes, seq: int) -> NotFoundError:
    name = show_path(rel)
    seqs = r.versions_under(rel)
    if not seqs:
        return NotFoundError(f"{name}: never seen in this journal")
    if seq >= r.head_seq():
        return NotFoundError(f"{name} does not exist now (last change in version {seqs[0]}); "
                             "give --at or --version to name a moment it existed")
    first = seqs[-1]
    if seq < first:
        return NotFoundError(f"{name} did not exist yet at version {seq} (first seen in version {first})")
    return NotFoundError(f"{name} did not exist at version {seq}")


# --- pruned versions (docs/format.md "Compaction and retention") ----------------------
def open_pruned(j: Journal) -> None:
    """Open the journal's ``pruned`` db handle; call it before the readers of
    these tools begin (else every version looks retained)."""
    JC.pruned_db(j)


def pruned_seqs(r: Reader) -> set[int]:
    return JC.pruned_seqs(r._j, r.txn)


def _is_pruned(r: Reader, seq: int) -> bool:
    return bool(seq) and JC.is_pruned(r._j, r.txn, seq)


def _retained_of(r: Reader, file_id: int) -> list[int]:
    """Retained content versions of a file, newest first."""
    pruned = pruned_seqs(r)
    return [s for s in r.versions_of(file_id) if s not in pruned and r.record(s).is_content]


def pruned_error(r: Reader, rel: bytes, seq: int, file_id: int) -> NotFoundError:
    """"version N of PATH was pruned by retention on ...; nearest retained: M"."""
    info = JC.pruned_info(r._j, r.txn, seq) or {}
    on = f" on {iso_time(info['t'], table=True)}" if info.get("t") else ""
    kept = _retained_of(r, file_id)
    near = min(kept, key=lambda s: (abs(s - seq), s)) if kept else None
    return NotFoundError(f"version {seq} of {show_path(rel)} was pruned by retention{on}; "
                         f"nearest retained: {near if near is not None else 'none'}")


def retained_entry(r: Reader, rel: bytes, e: TreeEntry, explicit: int | None = None) -> TreeEntry:
    """``e`` with its content version replaced by the latest retained one at or
    before it when it was pruned.  ``explicit``: the version id the user
    named; naming a pruned version is an error, never a silent substitute."""
    if e.kind != KIND_FILE or not e.content_seq or not _is_pruned(r, e.content_seq):
        return e
    if explicit is not None and explicit == e.content_seq:
        raise pruned_error(r, rel, e.content_seq, e.file_id)
    older = [s for s in _retained_of(r, e.file_id) if s < e.content_seq]
    if not older:
        raise pruned_error(r, rel, e.content_seq, e.file_id)
    return replace(e, content_seq=older[0], size=r.record(older[0]).size or 0)


def resolve_point(r: Reader, at: str | None = None, version: str | None = None,
                  now_ns: int | None = None) -> Point:
    """--at WHEN / --version ID (at most one) -> Point; neither: the head."""
    if at is not None and version is not None:
        raise UsageError("give either --at or --version, not both")
    if version is not None:
        w = parse_when(version, now_ns)
        if w.seq is None:
            raise UsageError(f"--version takes a version id (123, v123 or @123), not {version!r}")
        return resolve_when(r, w, now_ns)
    return resolve_when(r, at if at is not None else "now", now_ns)


def _content_entry(r: Reader, rel: bytes, point: Point) -> TreeEntry:
    """The file entry at ``rel`` at ``point``; a content record of ``rel``
    named by --version is used directly (no tree replay)."""
    if point.when.seq is not None:
        rec = r.record(point.seq)
        if rec.is_content and rec.path == rel:
            if _is_pruned(r, rec.seq):
                raise pruned_error(r, rel, rec.seq, rec.file_id)
            st = r.file_state(rec.file_id)
            return TreeEntry(rel, KIND_FILE, rec.file_id, rec.seq, rec.size or 0, None, None, None,
                             None, None, None, {}, None) if st else entry_at(r, rel, point.seq)
    e = entry_at(r, rel, point.seq)
    if e is None:
        raise _missing(r, rel, point.seq)
    return retained_entry(r, rel, e, point.when.seq)


# --- log ----------------------------------------------------------------------------
def record_entry(rec) -> dict:
    """One line of ``log``: JSON-ready."""
    d = {
        "version": rec.seq,
        "time": iso_time(rec.time_ns),
        "time_ns": rec.time_ns,
        "op": rec.op,
        "path": show_path(rec.path),
        "file_id": rec.file_id,
    }
    if rec.path2 is not None:
        d["path2"] = show_path(rec.path2)
    if rec.is_content:
        d["cause"] = rec.cause
        d["size"] = rec.size or 0
        d["stored"] = rec.stored or 0
        d["base"] = rec.base_seq or 0
    elif rec.size is not None:
        d["size"] = rec.size
    return d


def _path_seqs(r: Reader, rel: bytes) -> list[int] | None:
    """Newest-first seqs of PATH's history (None: the root, i.e. everything)."""
    if rel == b"":
        return None
    seqs = set(r.versions_under(rel))
    fid = r.file_id_at(rel)
    if fid is not None:
        st = r.file_state(fid)
        if st is not None and st.kind != KIND_DIR:
            seqs.update(r.versions_of(fid))
    return sorted(seqs, reverse=True)


def log_entries(r: Reader, rel: bytes, since: str | None = None, until: str | None = None,
                limit: int | None = None, now_ns: int | None = None,
                show_pruned: bool = False) -> Iterator[dict]:
    """Records of PATH, newest first, filtered by --since/--until (inclusive).
    Pruned versions are left out, or with ``show_pruned`` marked ``"pruned": True``."""
    lo = since_seq(r, since, now_ns) if since else 1
    hi = resolve_when(r, until, now_ns, clamp=True).seq if until else r.head_seq()
    seqs = _path_seqs(r, rel)
    if seqs is not None and not seqs:
        raise _missing(r, rel, r.head_seq())
    if seqs is None:
        it = r.records(lo, hi, reverse=True) if hi >= lo else iter(())
    else:
        it = (r.record(s) for s in seqs if lo <= s <= hi)
    pruned = pruned_seqs(r)
    n = 0
    for rec in it:
        if limit is not None and n >= limit:
            return
        d = record_entry(rec)
        if rec.seq in pruned:
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
            raise _missing(r, rel, r.head_seq())
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
    while True:
        with j.reader() as r:
            head = r.head_seq()
            if head > after:
                for rec in r.records(after + 1, head):
                    if _matches(rec, rel):
                        yield record_entry(rec)
                after = head
        sleep(interval)


def _under(p: bytes | None, rel: bytes) -> bool:
    return p is not None and (not rel or p == rel or p.startswith(rel + b"/"))


def _matches(rec, rel: bytes) -> bool:
    return _under(rec.path, rel) or _under(rec.path2, rel)


def log_line(d: dict, table: bool) -> str:
    """One entry as a table row (terminal) or tab-separated plain line."""
    op = d.get("cause") or d["op"]
    path = d["path"] + (f" -> {d['path2']}" if "path2" in d else "")
    if d["op"] == "deleted":
        path += f" (deleted in {d['deleted_version']} at {d['deleted_time']})"
    if d.get("pruned"):
        path += " (pruned)"
    if table:
        t = iso_time(d["time_ns"], table=True)
        stored = human_size(d["stored"]) if "stored" in d else "-"
        return f"{d['version']:>8}  {t}  {op:<11} {human_size(d.get('size')):>10} {stored:>10}  {path}"
    return "\t".join(str(x) for x in (d["version"], d["time"], op, d.get("size", "-"),
                                       d.get("stored", "-"), path))


LOG_HEADER = f"{'VERSION':>8}  {'TIME':<19}  {'OP':<11} {'SIZE':>10} {'STORED':>10}  PATH"


# --- cat ------------------------------------------------------------------------------
def cat_source(r: Reader, rel: bytes, at: str | None = None, version: str | None = None,
               now_ns: int | None = None) -> tuple[TreeEntry, Iterator[bytes]]:
    """-> (entry, chunks of its content) of PATH at --at/--version (default: now)."""
    point = resolve_point(r, at, version, now_ns)
    e = _content_entry(r, rel, point)
    if e.kind == KIND_DIR:
        raise UsageError(f"{show_path(rel)} is a directory (use 'deltafs log' or 'deltafs restore')")
    if e.kind == KIND_SYMLINK:
        raise UsageError(f"{show_path(rel)} is a symlink to {show_path(e.target)}")
    if e.kind != KIND_FILE:
        raise UsageError(f"{show_path(rel)} is a special file, it has no content")
    return e, (r.iter_content(e.content_seq) if e.content_seq else iter(()))


# --- diff -----------------------------------------------------------------------------
@dataclass
class Side:
    """One side of a diff: the moment, the file's content version (0: empty/absent)."""

    seq: int
    content_seq: int = 0
    size: int = 0
    exists: bool = True


def _side(r: Reader, rel: bytes, text: str | None, now_ns) -> tuple[Side, TreeEntry | None]:
    p = resolve_when(r, text or "now", now_ns)
    e = entry_at(r, rel, p.seq)
    if e is None:
        return Side(p.seq, exists=False), None
    if e.kind != KIND_FILE:
        raise UsageError(f"{show_path(rel)} is not a regular file at version {p.seq}")
    e = retained_entry(r, rel, e, p.when.seq)
    return Side(p.seq, e.content_seq, e.size), e


def _is_text(data: bytes) -> bool:
    if b"\0" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


COMPARE_WINDOW = 4 << 20  # bytes of each version held at once when comparing contents


def _range_bytes(r: Reader, refs, offs: list[int], x: int, y: int) -> bytes:
    """Bytes ``[x, y)`` of the content whose chunk list is ``refs``."""
    out = []
    k = bisect.bisect_right(offs, x) - 1
    while k < len(refs) and offs[k] < y:
        raw = r.read_chunk(refs[k][0])
        out.append(raw[max(x - offs[k], 0) : y - offs[k]])
        k += 1
    return b"".join(out)


def same_content(r: Reader, la, lb) -> bool:
    """Do two chunk lists hold the same bytes?  Equal lists do; otherwise
    only the byte ranges where the lists do not share a chunk at the same
    offset are read and compared (an in-place file's list is cut where it
    was written, so one content may have two lists: docs/format.md)."""
    if content_hash(la) == content_hash(lb):
        return True
    oa, ob = chunking.list_offsets(la), chunking.list_offsets(lb)
    if oa[-1] != ob[-1]:
        return False
    shared = set(zip(oa, la)) & set(zip(ob, lb))
    differ = [(o, o + ref[1]) for offs, refs in ((oa, la), (ob, lb))
              for o, ref in zip(offs, refs) if (o, ref) not in shared]
    for x, y in chunking.merge_ranges(differ):
        for w in range(x, y, COMPARE_WINDOW):
            e = min(w + COMPARE_WINDOW, y)
            if _range_bytes(r, la, oa, w, e) != _range_bytes(r, lb, ob, w, e):
                return False
    return True


def _read_all(r: Reader, side: Side) -> bytes:
    return r.read_content(side.content_seq) if side.content_seq else b""


def diff_file(r: Reader, rel: bytes, frm: str | None = None, to: str | None = None,
              stat_only: bool = False, now_ns: int | None = None) -> dict:
    """Between two versions of a file (default: its previous and current one)."""
    if not path_seen(r, rel):
        raise _missing(r, rel, r.head_seq())
    b, eb = _side(r, rel, to, now_ns)
    if frm is not None:
        a, _ = _side(r, rel, frm, now_ns)
    else:
        seqs = set(_path_seqs(r, rel) or [])
        if eb is not None:
            seqs.update(r.versions_of(eb.file_id))
        limit = b.content_seq if b.content_seq else b.seq
        pruned = pruned_seqs(r)
        prev = [s for s in seqs if s < limit and s not in pruned and r.record(s).is_content]
        a = Side(max(prev), max(prev), r.record(max(prev)).size or 0) if prev else Side(0, exists=False)
    if not a.exists and not b.exists:
        raise _missing(r, rel, b.seq)
    out = {"path": show_path(rel), "type": "file",
           "from": {"version": a.seq, "content_version": a.content_seq, "size": a.size, "exists": a.exists},
           "to": {"version": b.seq, "content_version": b.content_seq, "size": b.size, "exists": b.exists}}
    la = r.chunk_list(a.content_seq) if a.content_seq else []
    lb = r.chunk_list(b.content_seq) if b.content_seq else []
    out["identical"] = same_content(r, la, lb)
    ids_a = {c for c, _ in la}
    new = [(c, n) for c, n in lb if c not in ids_a]
    out["chunks"] = {"from": len(la), "to": len(lb), "new": len(new), "new_bytes": sum(n for _, n in new)}
    da = db = None
    binary = True
    if a.size <= TEXT_DIFF_MAX and b.size <= TEXT_DIFF_MAX:
        da, db = _read_all(r, a), _read_all(r, b)
        binary = not (_is_text(da) and _is_text(db))
    out["binary"] = binary
    if binary:
        return out
    la_lines = da.decode().splitlines(keepends=True)
    lb_lines = db.decode().splitlines(keepends=True)
    name = show_path(rel)
    lines = []
    for line in difflib.unified_diff(la_lines, lb_lines, f"a/{name}@{a.seq}" if a.exists else "/dev/null",
                                     f"b/{name}@{b.seq}" if b.exists else "/dev/null"):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    out["added_lines"] = sum(1 for x in lines if x.startswith("+") and not x.startswith("+++"))
    out["removed_lines"] = sum(1 for x in lines if x.startswith("-") and not x.startswith("---"))
    if not stat_only:
        out["diff"] = "".join(lines)
    return out


def diff_file_text(d: dict, stat_only: bool) -> str:
    a, b = d["from"], d["to"]
    if d["identical"] and a["exists"] == b["exists"]:
        return f"{d['path']}: identical (versions {a['version']} and {b['version']})\n"
    if d["binary"]:
        c = d["chunks"]
        return (f"Binary {d['path']}: {a['size']} -> {b['size']} bytes (versions {a['version']} -> "
                f"{b['version']}); {c['new']} of {c['to']} chunks new ({c['new_bytes']} bytes)\n")
    if stat_only:
        return f"{d['path']} | +{d['added_lines']} -{d['removed_lines']}\n"
    return d["diff"]


def _same(r: Reader, x: TreeEntry, y: TreeEntry) -> list[str]:
    """What differs between two entries of one path ([] = nothing)."""
    if x.kind != y.kind:
        return ["kind"]
    ch = []
    if x.kind == KIND_FILE and x.content_seq != y.content_seq:
        rx = r.record(x.content_seq) if x.content_seq else None
        ry = r.record(y.content_seq) if y.content_seq else None
        hx = rx.content_hash if rx else content_hash([])
        hy = ry.content_hash if ry else content_hash([])
        if hx != hy and not (rx and ry and rx.size == ry.size and  # the same bytes, cut differently?
                             same_content(r, r.chunk_list(rx.seq), r.chunk_list(ry.seq))):
            ch.append("content")
    if x.target != y.target:
        ch.append("target")
    if x.mode != y.mode:
        ch.append("mode")
    if (x.uid, x.gid) != (y.uid, y.gid):
        ch.append("owner")
    if x.xattrs != y.xattrs:
        ch.append("xattrs")
    return ch


def diff_tree(r: Reader, rel: bytes, frm: str | None = None, to: str | None = None,
              now_ns: int | None = None) -> Iterator[dict]:
    """Added/removed/changed paths below a directory between two moments
    (default: just before the newest change below it, and now)."""
    b = resolve_when(r, to or "now", now_ns).seq
    if frm is not None:
        a = resolve_when(r, frm, now_ns).seq
    else:
        seqs = [s for s in (_path_seqs(r, rel) or [r.head_seq()]) if s <= b]
        a = seqs[0] - 1 if seqs else b
    ta, tb = r.tree_at(a, prefix=rel), r.tree_at(b, prefix=rel)
    for p in sorted(set(ta) | set(tb)):
        if p == rel:
            continue
        x, y = ta.get(p), tb.get(p)
        if x is None:
            status, changes = "added", []
        elif y is None:
            status, changes = "removed", []
        else:
            changes = _same(r, x, y)
            if not changes:
                continue
            status = "changed"
        e = y or x
        yield {"status": status, "path": show_path(p), "kind": e.kind, "changes": changes,
               "from": a, "to": b, "from_size": x.size if x else None, "to_size": y.size if y else None}


def diff_tree_line(d: dict, stat_only: bool) -> str:
    s = {"added": "A", "removed": "D", "changed": "M"}[d["status"]]
    line = f"{s}\t{d['path']}"
    if d["changes"] and d["changes"] != ["content"]:
        line += f"\t({', '.join(d['changes'])})"
    if stat_only:
        line += f"\t{human_size(d['from_size'])} -> {human_size(d['to_size'])}"
    return line


# --- restore --------------------------------------------------------------------------
@dataclass
class RestoreReport:
    path: str
    version: int
    destination: str
    mode: str  # "to" (--to DEST), "mount" (through the running mount), "src" (into SRC, journaled here)
    dry_run: bool = False
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    links: int = 0
    specials: int = 0
    bytes: int = 0
    seconds: float = 0.0
    records: list[int] = field(default_factory=list)  # seqs journaled (mode "src")
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    corrupt: bool = False
    plan: list[dict] = field(default_factory=list)  # --dry-run

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "plan"}
        if self.dry_run:
            d["plan"] = self.plan
        return d

    def summary(self) -> str:
        verb = "would restore" if self.dry_run else "restored"
        s = (f"{verb} {self.path} at version {self.version} to {self.destination}: {self.files} files "
             f"({human_size(self.bytes)}), {self.dirs} dirs, {self.symlinks} symlinks, {self.links} hard links")
        if self.specials:
            s += f", {self.specials} special files"
        if not self.dry_run:
            s += f" in {self.seconds:.1f}s"
        if self.errors:
            s += f"; {len(self.errors)} FAILED"
        return s


Progress = Callable[[int, int, int, int], None]  # files done, files total, bytes done, bytes total


class ProgressLine:
    """A one-line progress printer (files, bytes, rate, ETA) for a terminal stream."""

    def __init__(self, stream=None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.t0 = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, fd: int, ft: int, bd: int, bt: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and bd < bt:
            return
        self.last = now
        el = max(now - self.t0, 1e-6)
        rate = bd / el
        eta = (bt - bd) / rate if rate > 0 else 0
        self.stream.write(f"\r{fd}/{ft} files  {human_size(bd)}/{human_size(bt)}  "
                          f"{human_size(int(rate))}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}  \x1b[K")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _Restorer:
    def __init__(self, r: Reader, rep: RestoreReport, base: bytes, rel: bytes, progress: Progress | None,
                 journaling: bool, through_mount: bool) -> None:
        self.r = r
        self.rep = rep
        self.base = base
        self.rel = rel
        self.progress = progress
        self.journaling = journaling  # "src" mode: build Change records as we go
        self.through_mount = through_mount
        self.changes: list[Change] = []
        self.root = os.geteuid() == 0
        self.files_total = self.bytes_total = self.files_done = self.bytes_done = 0
        self.done: dict[int, bytes] = {}  # link group -> first restored target
        self.new_fids: dict[int, int] = {}  # old file id -> file id used for the restored path
        self.used_fids: set[int] = set()
        self.group_fid: dict[int, tuple[bytes, int]] = {}  # link group -> (first path, file id)
        self.seq_counter = 0
        self.swept: set[bytes] = set()  # directories cleared of stale temp files

    # where an entry goes
    def target(self, p: bytes) -> bytes:
        sub = p[len(self.rel):].lstrip(b"/") if self.rel else p
        return os.path.join(self.base, sub) if sub else self.base

    def tick(self, nbytes: int = 0, file_done: bool = False) -> None:
        self.bytes_done += nbytes
        self.files_done += file_done
        if self.progress:
            self.progress(self.files_done, self.files_total, self.bytes_done, self.bytes_total)

    # ---- journal bookkeeping (mode "src") ----
    def _cur(self, p: bytes) -> tuple[int, object] | None:
        fid = self.r.file_id_at(p) if p else None
        return (fid, self.r.file_state(fid)) if fid is not None else None

    def _fid_for(self, e: TreeEntry, p: bytes) -> tuple[int, bool]:
        """-> (file id for path p, whether a create record is needed)."""
        cur = self._cur(p)
        if cur is not None and cur[1].kind == e.kind and e.kind in (KIND_FILE, KIND_DIR):
            return cur[0], False
        if e.file_id in self.new_fids:
            return self.new_fids[e.file_id], True
        st = self.r.file_state(e.file_id)
        fid = e.file_id
        if (st is not None and not st.deleted) or fid in self.used_fids:
            fid = secrets.randbits(63) or 1
        self.new_fids[e.file_id] = fid
        self.used_fids.add(fid)
        return fid, True

    def _drop_existing(self, p: bytes, kind: str) -> None:
        cur = self._cur(p)
        if cur is not None and cur[1].kind != kind:
            self.changes.append(Change(op="rmdir" if cur[1].kind == KIND_DIR else "unlink",
                                       file_id=cur[0], path=p))

    def _attrs(self, e: TreeEntry) -> dict:
        return dict(mode=e.mode, uid=e.uid if self.root else None, gid=e.gid if self.root else None,
                    mtime_ns=e.mtime_ns)

    def _xattr_changes(self, fid: int, p: bytes, e: TreeEntry, old: dict) -> None:
        for k, v in e.xattrs.items():
            if old.get(k) != v:
                self.changes.append(Change(op="setxattr", file_id=fid, path=p, xattr_name=k, xattr_value=v))
        for k in old:
            if k not in e.xattrs:
                self.changes.append(Change(op="removexattr", file_id=fid, path=p, xattr_name=k))

    def _preimage(self, p: bytes, tgt: bytes) -> None:
        """SRC's file at p differs from the journal's latest version (changed
        behind deltafs' back): journal it first so the restore loses nothing."""
        try:
            st = os.lstat(tgt)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        fd = os.open(tgt, os.O_RDONLY | os.O_CLOEXEC)
        pread = lambda o, n: os.pread(fd, n, o)  # noqa: E731
        cur = self._cur(p)
        try:
            if cur is not None and cur[1].kind == KIND_FILE and cur[1].content_seq:
                # compare at the journal's boundaries (an in-place file's
                # list is not what a fresh chunking would cut)
                known = self.r.chunk_list(cur[1].content_seq)
                if sum(n for _, n in known) == st.st_size and not chunking.changed_ranges(
                        pread, st.st_size, known):
                    return
            refs, new, seen = [], [], set()
            for span, data in chunking.chunk_stream(pread, st.st_size):
                refs.append((span.id, span.length))
                if span.id not in seen and not self.r.has_chunk(span.id):
                    seen.add(span.id)
                    new.append(chunking.build_chunk(data))
        finally:
            os.close(fd)
        if cur is not None and cur[1].kind == KIND_FILE:
            known = self.r.record(cur[1].content_seq).content_hash if cur[1].content_seq else content_hash([])
            if known == content_hash(refs):
                return
            fid = cur[0]
        else:
            fid = secrets.randbits(63) or 1
            self.used_fids.add(fid)
            self.changes.append(Change(op="create", file_id=fid, path=p, mode=st.st_mode,
                                       uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns))
        self.changes.append(Change(op="write", file_id=fid, path=p, size=st.st_size, cause="scan",
                                   base_seq=0, edit=[(0, 0, refs)], chunks=new))
        self.rep.warnings.append(f"{show_path(p)} had changed outside deltafs; that content was "
                                 "journaled (cause scan) before the restore")

    # ---- filesystem work ----
    def _set_meta(self, path: bytes, e: TreeEntry, fd: int | None = None) -> None:
        is_link = e.kind == KIND_SYMLINK
        if self.root and e.uid is not None and e.gid is not None:
            try:
                if fd is not None:
                    os.fchown(fd, e.uid, e.gid)
                else:
                    os.chown(path, e.uid, e.gid, follow_symlinks=False)
            except OSError as err:
                self.rep.warnings.append(f"{show_path(e.path)}: cannot set owner: {err.strerror}")
        if e.mode is not None and not is_link:
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(e.mode))
            else:
                os.chmod(path, stat.S_IMODE(e.mode))
        if not is_link:
            for k, v in e.xattrs.items():
                try:
                    os.setxattr(fd if fd is not None else path, k, v)
                except OSError as err:
                    self.rep.warnings.append(f"{show_path(e.path)}: cannot set xattr "
                                             f"{os.fsdecode(k)}: {err.strerror}")
        if e.mtime_ns is not None:
            if fd is not None:
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            else:
                os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    def _clear(self, tgt: bytes, keep_dir: bool = False) -> None:
        """Remove what is at tgt so something else can take its place."""
        try:
            st = os.lstat(tgt)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            raise IsADirectoryError(21, "a directory is in the way", os.fsdecode(tgt))
        os.unlink(tgt)

    def _sweep(self, d: bytes) -> None:
        """Remove temp files a killed restore left in d (once per directory).

        Stale: its flock (held while it is written) is free and its PID is not
        alive here.  A live restore's file is left alone, whatever its age."""
        if d in self.swept:
            return
        self.swept.add(d)
        try:
            names = [n for n in os.listdir(d) if n.startswith(TMP_PREFIX)]
        except OSError:
            return
        for name in names:
            m = _TMP_NAME.match(name)
            if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            path = os.path.join(d, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # not ours to judge (another user's, or gone)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue  # being written
                os.unlink(path)
                self.rep.warnings.append(f"removed {os.fsdecode(path)}, left by an interrupted restore")
            except OSError as err:
                log.debug("cannot remove stale %r: %s", path, err)
            finally:
                os.close(fd)

    def _tmp_name(self, tgt: bytes) -> bytes:
        self._sweep(os.path.dirname(tgt))
        self.seq_counter += 1
        return os.path.join(os.path.dirname(tgt), TMP_PREFIX + b"%d-%d.tmp" % (os.getpid(), self.seq_counter))

    def write_file(self, e: TreeEntry) -> None:
        tgt = self.target(e.path)
        if os.path.isdir(tgt) and not os.path.islink(tgt):
            raise IsADirectoryError(21, "a directory is in the way", os.fsdecode(tgt))
        if self.journaling:
            self._preimage(e.path, tgt)
        tmp = self._tmp_name(tgt)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written" (see _sweep)
                except OSError:
                    pass  # no flock here: _sweep goes by the PID alone
                if e.content_seq:
                    write_content(self.r, e.content_seq, fd, self.tick)
                self._set_meta(tmp, e, fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, tgt)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self.through_mount:  # the daemon journals attributes set on the real path
            self._set_meta(tgt, e)
        self.rep.files += 1
        self.rep.bytes += e.size
        self.tick(file_done=True)
        if e.link_group is not None:
            self.done[e.link_group] = tgt
        if self.journaling:
            fid, create = self._fid_for(e, e.path)
            cur = self._cur(e.path)
            old_x = {} if create or cur is None else dict(cur[1].xattrs)
            if create:
                self._drop_existing(e.path, KIND_FILE)
                self.changes.append(Change(op="create", file_id=fid, path=e.path, **self._attrs(e)))
            refs = self.r.chunk_list(e.content_seq) if e.content_seq else []
            self.changes.append(Change(op="write", file_id=fid, path=e.path, size=e.size, cause="restore",
                                       base_seq=0, edit=[(0, 0, refs)], mode=e.mode, mtime_ns=e.mtime_ns))
            if not create:
                self.changes.append(Change(op="setattr", file_id=fid, path=e.path, **self._attrs(e)))
            self._xattr_changes(fid, e.path, e, old_x)
            if e.link_group is not None:
                self.group_fid[e.link_group] = (e.path, fid)

    def make_link(self, e: TreeEntry) -> None:
        tgt = self.target(e.path)
        first = self.done[e.link_group]
        self._clear(tgt)
        os.link(first, tgt)
        self.rep.links += 1
        self.tick(file_done=True)
        if self.journaling:
            primary, fid = self.group_fid[e.link_group]
            self._drop_existing(e.path, "")
            self.changes.append(Change(op="link", file_id=fid, path=primary, path2=e.path))

    def make_dir(self, e: TreeEntry) -> None:
        tgt = self.target(e.path)
        if os.path.lexists(tgt) and not os.path.isdir(tgt):
            self._clear(tgt)
        existed = os.path.isdir(tgt)
        os.makedirs(tgt, mode=0o700, exist_ok=True)
        if not existed and e.mode is not None:
            os.chmod(tgt, 0o700)  # writable while filling; the real mode is set at the end
        self.rep.dirs += 1
        if self.journaling and e.path:
            fid, create = self._fid_for(e, e.path)
            if create:
                self._drop_existing(e.path, KIND_DIR)
                self.changes.append(Change(op="mkdir", file_id=fid, path=e.path, **self._attrs(e)))

    def finish_dir(self, e: TreeEntry) -> None:
        tgt = self.target(e.path)
        self._set_meta(tgt, e)
        if self.journaling and e.path:
            cur = self._cur(e.path)
            fid = self.new_fids.get(e.file_id, cur[0] if cur else e.file_id)
            self.changes.append(Change(op="setattr", file_id=fid, path=e.path, **self._attrs(e)))
            self._xattr_changes(fid, e.path, e, dict(cur[1].xattrs) if cur and cur[0] == fid else {})

    def make_symlink(self, e: TreeEntry) -> None:
        tgt = self.target(e.path)
        self._clear(tgt)
        os.symlink(e.target or b"", tgt)
        self._set_meta(tgt, e)
        self.rep.symlinks += 1
        self.tick(file_done=True)
        if self.journaling:
            fid, _ = self._fid_for(e, e.path)
            cur = self._cur(e.path)
            if cur is not None:
                self.changes.append(Change(op="rmdir" if cur[1].kind == KIND_DIR else "unlink",
                                           file_id=cur[0], path=e.path))
            self.changes.append(Change(op="symlink", file_id=fid, path=e.path, target=e.target, **self._attrs(e)))

    def make_special(self, e: TreeEntry) -> None:
        tgt = self.target(e.path)
        self._clear(tgt)
        os.mknod(tgt, e.mode or (stat.S_IFIFO | 0o600), e.rdev or 0)
        self._set_meta(tgt, e)
        self.rep.specials += 1
        self.tick(file_done=True)
        if self.journaling:
            fid, _ = self._fid_for(e, e.path)
            self._drop_existing(e.path, KIND_SPECIAL)
            self.changes.append(Change(op="mknod", file_id=fid, path=e.path, rdev=e.rdev, **self._attrs(e)))

    def run(self, entries: list[TreeEntry], dry_run: bool) -> None:
        dirs = [e for e in entries if e.kind == KIND_DIR]
        others = [e for e in entries if e.kind != KIND_DIR]
        primaries, links, seen_groups = [], [], set()
        for e in others:
            if e.kind == KIND_FILE and e.link_group is not None:
                if e.link_group in seen_groups:
                    links.append(e)
                    continue
                seen_groups.add(e.link_group)
            primaries.append(e)
        self.files_total = len(others)
        self.bytes_total = sum(e.size for e in primaries if e.kind == KIND_FILE)
        if dry_run:
            for e in dirs + primaries + links:
                act = {KIND_DIR: "mkdir", KIND_FILE: "write", KIND_SYMLINK: "symlink",
                       KIND_SPECIAL: "mknod"}[e.kind]
                if e in links:
                    act = "link"
                self.rep.plan.append({"action": act, "path": show_path(e.path),
                                      "target": os.fsdecode(self.target(e.path)),
                                      "version": e.content_seq, "size": e.size})
                counter = {"mkdir": "dirs", "write": "files", "symlink": "symlinks", "mknod": "specials",
                           "link": "links"}[act]
                setattr(self.rep, counter, getattr(self.rep, counter) + 1)
                if act == "write":
                    self.rep.bytes += e.size
            return
        made_dirs = []
        for e in sorted(dirs, key=lambda e: e.path):
            if self._do(e, self.make_dir):
                made_dirs.append(e)
        for e in primaries:
            fn = {KIND_FILE: self.write_file, KIND_SYMLINK: self.make_symlink, KIND_SPECIAL: self.make_special}[e.kind]
            self._do(e, fn)
        for e in links:
            if e.link_group not in self.done:
                self.rep.errors.append(f"{show_path(e.path)}: not linked, its first path failed")
                continue
            self._do(e, self.make_link)
        for e in sorted(made_dirs, key=lambda e: e.path, reverse=True):
            self._do(e, self.finish_dir)
        if self.through_mount or not self.journaling:
            for d in {os.path.dirname(self.target(e.path)) for e in entries}:
                _fsync_dir(d)

    def _do(self, e: TreeEntry, fn) -> bool:
        try:
            fn(e)
            return True
        except CorruptionError as err:
            self.rep.corrupt = True
            self.rep.errors.append(f"{show_path(e.path)} (version {e.content_seq}): {err}")
        except OSError as err:
            self.rep.errors.append(f"{show_path(e.path)}: {err.strerror or err}")
        return False


def write_content(r: Reader, seq: int, fd: int, tick=None) -> None:
    """Write content version ``seq`` into the empty file open as fd, keeping it sparse.

    An all-zero chunk (the id of zeros of its length: a hole when it was
    captured, or zeros written) is neither read nor written: the file
    gets a hole there, and its size from ftruncate at the end.  The id is
    the hash of the content, so knowing it is knowing the bytes.
    """
    pos = 0
    for cid, n in r.chunk_list(seq):
        if cid != chunking.zero_id(n):
            mv = memoryview(r.read_chunk(cid))
            at = pos
            while mv:
                k = os.pwrite(fd, mv, at)
                mv, at = mv[k:], at + k
        pos += n
        if tick is not None:
            tick(n)
    os.ftruncate(fd, pos)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _fsync_dir(d: bytes) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def restore(journal_dir: str, rel: bytes, *, at: str | None = None, version: str | None = None,
            dest: str | None = None, mnt: str | None = None, src: str | None = None,
            force: bool = False, dry_run: bool = False, progress: Progress | None = None,
            now_ns: int | None = None) -> RestoreReport:
    """Restore PATH (file, directory or root) as it was at --at/--version.

    * ``dest``: write it there (refused if it exists, unless ``force``:
      then a file is replaced and a directory is merged into).
    * else ``mnt`` (a running mount): write through MNT so the daemon
      journals the restore as new versions.
    * else ``src``: write into SRC and journal the restore here (takes the
      journal's write lock; JournalLockedError if a mount holds it).

    In place, paths created after WHEN are left alone (nothing is deleted).
    Per-item failures (a corrupt chunk, an unwritable path) are collected in
    ``report.errors`` and the rest is restored.
    """
    t0 = time.monotonic()
    if dest is not None:
        mode, base = "to", os.fsencode(os.path.abspath(dest))
        if os.path.lexists(base) and not force:
            raise UsageError(f"{dest} exists (use --force to overwrite it)")
    elif mnt is not None:
        mode, base = "mount", os.path.join(os.fsencode(mnt), rel) if rel else os.fsencode(mnt)
    elif src is not None:
        mode, base = "src", os.path.join(os.fsencode(src), rel) if rel else os.fsencode(src)
    else:
        raise UsageError("this journal's SRC is unknown: give --to DEST")
    journal = Journal.open(journal_dir, readonly=(mode != "src" or dry_run))
    try:
        open_pruned(journal)
        with journal.reader() as r:
            point = resolve_point(r, at, version, now_ns)
            entries = r.tree_at(point.seq, prefix=rel)
            if rel not in entries:
                if rel != b"":
                    raise _missing(r, rel, point.seq)
                entries[b""] = _root_entry()
            entries[rel] = retained_entry(r, rel, entries[rel], point.when.seq)  # may raise
            gone: list[str] = []
            for p, e in list(entries.items()):  # pruned content: the latest retained at or before
                try:
                    entries[p] = retained_entry(r, p, e)
                except NotFoundError as err:
                    gone.append(str(err))
                    del entries[p]
            top = entries[rel]
            if dest is not None and os.path.lexists(base) and force and top.kind == KIND_DIR \
                    and not os.path.isdir(base):
                raise UsageError(f"{dest} exists and is not a directory")
            rep = RestoreReport(show_path(rel), point.seq, os.fsdecode(base), mode, dry_run)
            rep.errors += gone
            if top.kind != KIND_DIR:
                entries = {rel: top}
            if not dry_run:
                parent = os.path.dirname(base)
                if parent and not os.path.isdir(parent):
                    if mode == "to":
                        os.makedirs(parent, exist_ok=True)
                    else:
                        raise UsageError(f"{os.fsdecode(parent)} does not exist: restore the directory "
                                         "that contains it, or give --to DEST")
            rs = _Restorer(r, rep, base, rel, progress, journaling=(mode == "src"),
                           through_mount=(mode == "mount"))
            if top.kind != KIND_DIR and top.link_group is not None:
                entries = {rel: replace(top, link_group=None)}  # one path of a hard-linked file
            rs.run(list(entries.values()), dry_run)
        if rs.changes and not dry_run:
            rep.records = journal.commit(rs.changes)
            log.info("restore of %s journaled as records %s..%s", rep.path, rep.records[0], rep.records[-1])
    finally:
        journal.close()
    rep.seconds = time.monotonic() - t0
    return rep


def restore_exit_code(rep: RestoreReport) -> int:
    """0 ok; 3 (journal) when a chunk was corrupt; 1 (partial) for other failures."""
    from deltafs.errors import EXIT_JOURNAL, EXIT_OK, EXIT_PARTIAL

    if not rep.errors:
        return EXIT_OK
    return EXIT_JOURNAL if rep.corrupt else EXIT_PARTIAL
