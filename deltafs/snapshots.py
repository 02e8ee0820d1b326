"""Named snapshots: a name for the journal's head at one moment, usable as a WHEN.

Stored in the journal's ``snapshots`` settings table (docs/format.md).  The
daemon makes them for a mounted journal (control op ``snapshot``, after the
capture queue is drained); the CLI makes them on an unmounted one.
"""

from __future__ import annotations

import time

from deltafs.errors import DeltafsError, UsageError


def check_name(name: str) -> None:
    """A UsageError unless ``name`` is usable as a snapshot name (and reads back as one as a WHEN)."""
    from deltafs.when import parse_when

    if not name or name != name.strip() or any(c in name for c in "\n\r\0/") or len(name) > 200:
        raise UsageError(f"bad snapshot name {name!r}: use a short name without '/', newlines or "
                         "surrounding spaces")
    try:
        w = parse_when(name)
    except DeltafsError:
        w = None
    if w is None or w.snapshot != name:
        raise UsageError(f"bad snapshot name {name!r}: it reads as a time or a version id, so it "
                         "could never be used as a WHEN")


def make(journal, name: str) -> dict:
    """Name the journal's current head (blocking: run it in a thread in the daemon)."""
    check_name(name)
    with journal.reader() as r:
        if r.kv_get("snapshots", name) is not None:
            raise UsageError(f"snapshot {name!r} already exists")
        seq = r.head_seq()
    value = {"seq": seq, "time_ns": time.time_ns()}
    journal.kv_put("snapshots", name, value)
    return {"name": name, **value}


def listing(reader) -> list[dict]:
    """Every snapshot, oldest version first: {"name", "seq", "time_ns"}."""
    out = []
    for name, v in reader.kv_items("snapshots"):
        if isinstance(v, dict):
            out.append({"name": name, "seq": int(v.get("seq", 0)), "time_ns": v.get("time_ns")})
        else:
            out.append({"name": name, "seq": int(v), "time_ns": None})
    out.sort(key=lambda d: (d["seq"], d["name"]))
    return out
