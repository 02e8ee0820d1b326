"""WHEN: the moments the history tools accept, and how they become a record seq.

Accepted forms (tried in this order; docs/cli.md has the user's view):

* ``now`` -- the head of the journal.
* a version id: ``123``, ``v123`` or ``@123`` -- record seq 123 (a bare
  integer is always a version id, never a year).
* relative: ``N <unit> ago`` with unit s/sec/second, m/min/minute,
  h/hour, d/day, w/week (plurals allowed, e.g. ``10 minutes ago``,
  ``2h ago``); ``today``, ``yesterday``, optionally followed by ``HH:MM``
  or ``HH:MM:SS`` (``yesterday 17:00``; bare ``today``/``yesterday`` mean
  their midnight).
* ISO 8601: ``2026-11-23``, ``2026-11-23T09:00``, ``2026-11-23 09:00:05``,
  with or without a zone (``Z``, ``+01:00``); without a zone it is local
  time.
* a snapshot name: anything else is looked up in the ``snapshots`` store
  (value ``{"seq": N, ...}``).

:func:`parse_when` is pure (no journal); :func:`resolve_when` turns the
result into a seq against a reader.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from deltafs.errors import NotFoundError, UsageError

_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_VERSION = re.compile(r"^[v@]?(\d+)$", re.I)
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+)\s+ago$", re.I)
_DAY = re.compile(r"^(today|yesterday)(?:\s+(\d{1,2}):(\d{2})(?::(\d{2}))?)?$", re.I)


@dataclass(frozen=True)
class When:
    """A parsed WHEN: exactly one of ``seq``, ``time_ns``, ``snapshot`` is set
    (``now`` sets none: the head)."""

    text: str
    seq: int | None = None
    time_ns: int | None = None
    snapshot: str | None = None

    @property
    def is_now(self) -> bool:
        return self.seq is None and self.time_ns is None and self.snapshot is None


@dataclass(frozen=True)
class Point:
    """A WHEN resolved against a journal: the record seq it stands for."""

    seq: int
    when: When


def _local_ns(dt: datetime) -> int:
    """ns since the epoch; a naive datetime is local time."""
    if dt.tzinfo is None:
        return int(time.mktime(dt.timetuple())) * 10**9 + dt.microsecond * 1000
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def parse_when(text: str, now_ns: int | None = None) -> When:
    """Parse ``text`` (see the module docstring); ``now_ns`` fixes "now" (tests)."""
    s = " ".join(str(text).split())
    if not s:
        raise UsageError("empty WHEN: give a time, a version id or a snapshot name")
    now_ns = time.time_ns() if now_ns is None else now_ns
    low = s.lower()
    if low == "now":
        return When(s)
    m = _VERSION.match(s)
    if m:
        return When(s, seq=int(m.group(1)))
    m = _AGO.match(s)
    if m:
        unit = _UNITS.get(m.group(2).lower())
        if unit is None:
            raise UsageError(f"cannot read WHEN {s!r}: unknown unit {m.group(2)!r} "
                             "(use seconds, minutes, hours, days or weeks)")
        return When(s, time_ns=now_ns - int(float(m.group(1)) * unit * 10**9))
    m = _DAY.match(s)
    if m:
        day = datetime.fromtimestamp(now_ns / 10**9).replace(hour=0, minute=0, second=0, microsecond=0)
        if m.group(1).lower() == "yesterday":
            day = (day - timedelta(days=1)).replace(hour=0)  # DST-safe: back to midnight
        h, mi, sec = int(m.group(2) or 0), int(m.group(3) or 0), int(m.group(4) or 0)
        if h > 23 or mi > 59 or sec > 59:
            raise UsageError(f"cannot read WHEN {s!r}: not a valid time of day")
        return When(s, time_ns=_local_ns(day.replace(hour=h, minute=mi, second=sec)))
    if s[:1].isdigit():
        iso = s[:-1] + "+00:00" if s[-1:] in "zZ" else s
        try:
            return When(s, time_ns=_local_ns(datetime.fromisoformat(iso)))
        except ValueError:
            raise UsageError(f"cannot read WHEN {s!r}: expected ISO 8601 such as 2026-11-23T09:00, "
                             "'10 minutes ago', 'yesterday 17:00', a version id or a snapshot name") from None
    return When(s, snapshot=s)


def _fmt_ns(ns: int) -> str:
    return datetime.fromtimestamp(ns / 10**9).isoformat(timespec="seconds")


def resolve_when(r, text: str | When, now_ns: int | None = None, *, clamp: bool = False) -> Point:
    """-> the record seq a WHEN stands for in reader ``r``.

    A time resolves to the last record at or before it.  Errors
    (``clamp=False``): a time before the first record or in the future is a
    UsageError; an unknown version id or snapshot is a NotFoundError.
    With ``clamp=True`` (log --since/--until) out-of-range times clamp to
    0 / the head instead.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    w = text if isinstance(text, When) else parse_when(text, now_ns)
    head = r.head_seq()
    if w.is_now:
        return Point(head, w)
    if w.seq is not None:
        if not 1 <= w.seq <= head:
            if clamp:
                return Point(min(w.seq, head), w)
            raise NotFoundError(f"unknown version {w.text}: the journal has versions 1 to {head}"
                                if head else f"unknown version {w.text}: the journal is empty")
        return Point(w.seq, w)
    if w.snapshot is not None:
        snap = r.kv_get("snapshots", w.snapshot)
        if snap is None:
            raise NotFoundError(f"{w.text!r} is not a time, a version id or a known snapshot name")
        seq = int(snap["seq"] if isinstance(snap, dict) else snap)
        return Point(min(seq, head), w)
    if w.time_ns > now_ns + 1_000_000_000:  # a second of slack for clock jitter
        if clamp:
            return Point(head, w)
        raise UsageError(f"{w.text} ({_fmt_ns(w.time_ns)}) is in the future")
    seq = r.seq_at_time(w.time_ns)
    if seq == 0 and not clamp:
        if head == 0:
            raise UsageError(f"{w.text}: the journal has no history yet")
        first = r.record(1).time_ns
        raise UsageError(f"{w.text} ({_fmt_ns(w.time_ns)}) is before the first version "
                         f"({_fmt_ns(first)})")
    return Point(seq, w)


def since_seq(r, text: str, now_ns: int | None = None) -> int:
    """First seq included by ``--since WHEN``: a version/snapshot includes
    itself; a time includes records at or after it (ms precision)."""
    w = parse_when(text, now_ns)
    if w.time_ns is not None:
        return r.seq_at_time(w.time_ns - 1_000_000) + 1
    return max(resolve_when(r, w, now_ns, clamp=True).seq, 1)
