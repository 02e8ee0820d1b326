"""diff: two versions of a file, or two moments of a tree."""

from __future__ import annotations

import bisect
import difflib
from dataclasses import dataclass
from typing import Iterator

from deltafs import chunking
from deltafs.errors import UsageError
from deltafs.history.format import show_path
from deltafs.history.query import (Thinned, entry_at, is_pruned, missing_error, path_seen, path_seqs,
                                   reading, retained_entry)
from deltafs.journal import KIND_FILE, Reader, TreeEntry, content_hash
from deltafs.names import show_name
from deltafs.when import resolve_when

TEXT_DIFF_MAX = 8 << 20  # larger files get the chunk summary, never a text diff


# --- diff -----------------------------------------------------------------------------
@dataclass
class Side:
    """One side of a diff: the moment, the file's content version (0: empty/absent)."""

    seq: int
    content_seq: int = 0
    size: int = 0
    exists: bool = True


def _side(r: Reader, rel: bytes, text: str | None, now_ns, thinned: list[Thinned],
          side: str) -> tuple[Side, TreeEntry | None]:
    p = resolve_when(r, text or "now", now_ns)
    e = entry_at(r, rel, p.seq)
    if e is None:
        return Side(p.seq, exists=False), None
    if e.kind != KIND_FILE:
        raise UsageError(f"{show_name(rel)} is not a regular file at version {p.seq}")
    e = retained_entry(r, rel, e, thinned, side)
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
    """Between two versions of a file (default: its previous and current one).

    A side whose version retention pruned is the latest retained version
    before it; the result's ``thinned`` lists such sides."""
    with reading(rel):
        return _diff_file(r, rel, frm, to, stat_only, now_ns)


def _diff_file(r: Reader, rel: bytes, frm: str | None, to: str | None, stat_only: bool,
               now_ns: int | None) -> dict:
    if not path_seen(r, rel):
        raise missing_error(r, rel, r.head_seq())
    thinned: list[Thinned] = []
    b, eb = _side(r, rel, to, now_ns, thinned, "to")
    if frm is not None:
        a, _ = _side(r, rel, frm, now_ns, thinned, "from")
    else:
        seqs = set(path_seqs(r, rel) or [])
        if eb is not None:
            seqs.update(r.versions_of(eb.file_id))
        limit = b.content_seq if b.content_seq else b.seq
        prev = [s for s in seqs if s < limit and r.record(s).is_content and not r.is_pruned(s)]
        a = Side(max(prev), max(prev), r.record(max(prev)).size or 0) if prev else Side(0, exists=False)
    if not a.exists and not b.exists:
        raise missing_error(r, rel, b.seq)
    out = {"path": show_path(rel), "type": "file",
           "from": {"version": a.seq, "content_version": a.content_seq, "size": a.size, "exists": a.exists},
           "to": {"version": b.seq, "content_version": b.content_seq, "size": b.size, "exists": b.exists}}
    if thinned:
        out["thinned"] = [t.to_dict() for t in thinned]
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
    name = show_name(rel)
    lines = []
    for line in difflib.unified_diff(la_lines, lb_lines, f"a/{name}@{a.seq}" if a.exists else "/dev/null",
                                     f"b/{name}@{b.seq}" if b.exists else "/dev/null"):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    out["added_lines"] = sum(1 for x in lines if x.startswith("+") and not x.startswith("+++"))
    out["removed_lines"] = sum(1 for x in lines if x.startswith("-") and not x.startswith("---"))
    if not stat_only:
        out["diff"] = "".join(lines)
    return out


def entry_changes(r: Reader, x: TreeEntry, y: TreeEntry) -> list[str]:
    """What differs between two entries of one path ([] = nothing)."""
    if x.kind != y.kind:
        return ["kind"]
    ch = []
    if x.kind == KIND_FILE and x.content_seq != y.content_seq:
        rx = r.record(x.content_seq) if x.content_seq else None
        ry = r.record(y.content_seq) if y.content_seq else None
        hx = rx.version_hash if rx else (False, content_hash([]))
        hy = ry.version_hash if ry else (False, content_hash([]))
        # the records' content hashes are exact, pruned versions included; only
        # the same bytes cut differently need reading (and a pruned one cannot be),
        # or the same list under hashes of two kinds (format 11: a version over one
        # tree page written before the upgrade is flat, after it a tree)
        if hx != hy and not (rx and ry and rx.size == ry.size and not is_pruned(r, rx.seq)
                             and not is_pruned(r, ry.seq)
                             and same_content(r, r.chunk_list(rx.seq), r.chunk_list(ry.seq))):
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
    (default: just before the newest change below it, and now).  Contents are
    compared by the content hashes the records keep, so the answer is exact
    even where retention pruned a version."""
    b = resolve_when(r, to or "now", now_ns).seq
    if frm is not None:
        a = resolve_when(r, frm, now_ns).seq
    else:
        seqs = [s for s in (path_seqs(r, rel) or [r.head_seq()]) if s <= b]
        a = seqs[0] - 1 if seqs else b
    with reading(rel):  # one tree (at the earlier moment) and the records in between
        lo, hi = r.tree_changes(min(a, b), max(a, b), prefix=rel)
    ta, tb = (lo, hi) if a <= b else (hi, lo)
    for p in sorted(set(ta) | set(tb)):
        if p == rel:
            continue
        x, y = ta.get(p), tb.get(p)
        if x is None:
            status, changes = "added", []
        elif y is None:
            status, changes = "removed", []
        else:
            with reading(p):
                changes = entry_changes(r, x, y)
            if not changes:
                continue
            status = "changed"
        e = y or x
        yield {"status": status, "path": show_path(p), "kind": e.kind, "changes": changes,
               "from": a, "to": b, "from_size": x.size if x else None, "to_size": y.size if y else None}
