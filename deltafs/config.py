"""Mount options as a frozen dataclass, validated once in cli/mount."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from deltafs.errors import UsageError

DEFAULT_JOURNAL_NAME = ".deltafs"
HOUR = 3600.0
DAY = 86400.0
WEEK = 7 * DAY
DEFAULT_COMPACT_EVERY = 600.0  # seconds between a mount's compaction passes


@dataclass(frozen=True)
class RetentionPolicy:
    """Which old content versions compaction keeps (docs/cli.md "Retention").

    Default: every version for 24 h, then hourly for 7 days, daily for 90
    days, weekly after; bursts (a version followed within 10 s by the next
    one) keep only their last version once older than a minute.  A bucket
    length of 0 in ``tiers``/``after`` keeps every version of that age;
    ``after=None`` keeps none older than the last tier (the newest version
    of a file and pinned versions are always kept).
    """

    keep_all: float = DAY  # seconds: younger versions are all kept (bursts aside)
    tiers: tuple[tuple[float, float], ...] = ((7 * DAY, HOUR), (90 * DAY, DAY))  # (up to age, one per)
    after: float | None = WEEK  # one per this, older than the last tier
    burst: float = 10.0  # seconds; 0 turns coalescing off
    burst_min_age: float = 60.0

    def bucket(self, age_s: float) -> float | None:
        """Length of the thinning bucket at this age; None: keep all; -1: keep none."""
        if age_s < self.keep_all:
            return None
        for upto, every in self.tiers:
            if age_s < upto:
                return every or None
        if self.after is None:
            return -1.0
        return self.after or None

    def spec(self) -> str:
        """The --retention text of this policy (round-trips through parse_retention)."""
        parts = [f"{fmt_duration(self.keep_all)}:all"] if self.keep_all else []
        parts += [f"{fmt_duration(u)}:{fmt_duration(e) if e else 'all'}" for u, e in self.tiers]
        tail = "none" if self.after is None else (fmt_duration(self.after) if self.after else "all")
        return ",".join(parts + [f"*:{tail}"])


_DUR = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)?$")
_DUR_UNITS = {"s": 1.0, "m": 60.0, "h": HOUR, "d": DAY, "w": WEEK}


def parse_duration(text: str, what: str = "duration") -> float:
    """``90``, ``30s``, ``15m``, ``24h``, ``7d``, ``2w`` -> seconds (> 0)."""
    m = _DUR.match(text.strip().lower())
    if not m:
        raise UsageError(f"bad {what} {text!r}: expected a number with s, m, h, d or w (e.g. 24h)")
    v = float(m.group(1)) * _DUR_UNITS[m.group(2) or "s"]
    if v <= 0:
        raise UsageError(f"bad {what} {text!r}: must be more than 0")
    return v


def fmt_duration(s: float) -> str:
    for unit in ("w", "d", "h", "m"):
        n = s / _DUR_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{s:g}s"


def parse_retention(spec: str, burst: float = 10.0) -> RetentionPolicy:
    """``AGE:EVERY,...,*:EVERY`` -> RetentionPolicy; one-line UsageError when bad.

    Each ``AGE:EVERY`` says: versions younger than AGE (and older than the
    previous AGE) keep one per EVERY (``all``: every version).  The last
    entry, ``*:EVERY``, covers everything older (``none``: keep nothing
    older except each file's newest and snapshot-pinned versions).
    Example (the default): ``24h:all,7d:1h,90d:1d,*:1w``.
    """
    items = [p.strip() for p in spec.split(",") if p.strip()]
    if not items:
        raise UsageError("empty --retention: give e.g. 24h:all,7d:1h,90d:1d,*:1w")
    keep_all, tiers, after, last_age = 0.0, [], None, 0.0
    for i, item in enumerate(items):
        age_t, sep, every_t = item.partition(":")
        if not sep:
            raise UsageError(f"bad --retention entry {item!r}: expected AGE:EVERY such as 7d:1h")
        every_t = every_t.strip().lower()
        if age_t.strip() == "*":
            if i != len(items) - 1:
                raise UsageError(f"bad --retention {spec!r}: '*:EVERY' must be the last entry")
            after = None if every_t == "none" else 0.0 if every_t == "all" else parse_duration(every_t, "--retention interval")
            return RetentionPolicy(keep_all=keep_all, tiers=tuple(tiers), after=after, burst=burst)
        age = parse_duration(age_t, "--retention age")
        if age <= last_age:
            raise UsageError(f"bad --retention {spec!r}: ages must increase ({age_t.strip()} after "
                             f"{fmt_duration(last_age)})")
        last_age = age
        if every_t == "none":
            raise UsageError(f"bad --retention entry {item!r}: 'none' is only allowed in the last entry, *:none")
        if every_t == "all":
            if not tiers:
                keep_all = age
            else:
                tiers.append((age, 0.0))
            continue
        tiers.append((age, parse_duration(every_t, "--retention interval")))
    raise UsageError(f"bad --retention {spec!r}: end it with '*:EVERY' (e.g. *:1w, or *:none)")


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$")


def parse_size(text: str, what: str = "--journal-limit") -> int:
    """``10G``, ``500M``, ``2TiB``, ``1048576`` -> bytes (binary units)."""
    m = _SIZE.match(text.strip().lower())
    if not m:
        raise UsageError(f"bad {what} {text!r}: expected a size such as 10G, 500M or 2T")
    n = int(float(m.group(1)) * 1024 ** "_kmgtp".index(m.group(2) or "_"))
    if n <= 0:
        raise UsageError(f"bad {what} {text!r}: must be more than 0")
    return n


def parse_minutes(text: str, what: str = "--compact-every") -> float:
    """MINUTES (fractions allowed: 0.05 = 3 s) -> seconds."""
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: expected minutes, e.g. 10 or 0.5") from None
    if not v > 0 or v != v or v == float("inf"):
        raise UsageError(f"bad {what} {text!r}: must be more than 0 minutes")
    return v * 60.0


def parse_seconds(text: str, what: str = "--coalesce") -> float:
    """SECONDS (0 allowed: off)."""
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: expected seconds, e.g. 10 (0 turns it off)") from None
    if not v >= 0 or v == float("inf"):
        raise UsageError(f"bad {what} {text!r}: must be 0 or more seconds")
    return v


def parse_metrics_addr(text: str, what: str = "--metrics-addr") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); one-line UsageError when bad.

    HOST is required (``0.0.0.0`` for every interface: say so on purpose);
    whether it resolves is checked by deltafs.metrics before any fork."""
    t = text.strip()
    host, sep, port_t = t.rpartition(":")
    if t.startswith("["):
        if not host.endswith("]"):
            raise UsageError(f"bad {what} {text!r}: expected HOST:PORT or [IPV6]:PORT, e.g. 127.0.0.1:9108")
        host = host[1:-1]
    if not sep or not host or ":" in host and not t.startswith("["):
        raise UsageError(f"bad {what} {text!r}: expected HOST:PORT or [IPV6]:PORT, e.g. 127.0.0.1:9108")
    if not port_t.isdigit() or not 0 < int(port_t) < 65536:
        raise UsageError(f"bad {what} {text!r}: the port must be a number from 1 to 65535")
    return host, int(port_t)


def parse_fd_budget(text: str, what: str = "--fd-budget") -> int:
    """N descriptors (at least 4) the mount may keep open for inodes it caches."""
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: expected a number of descriptors, e.g. 4096") from None
    if n < 4:
        raise UsageError(f"bad {what} {text!r}: must be at least 4")
    return n


def retention_from_args(retention: str | None, coalesce: str | None) -> RetentionPolicy:
    """--retention / --coalesce of mount and compact -> a policy (defaults for what is missing)."""
    burst = parse_seconds(coalesce) if coalesce is not None else RetentionPolicy.burst
    if retention is None:
        return RetentionPolicy(burst=burst)
    return parse_retention(retention, burst)


@dataclass(frozen=True)
class MountConfig:
    src: str
    mnt: str
    journal: str
    foreground: bool = False
    fuse_options: tuple[str, ...] = ()
    debug: bool = False
    capture: bool = True
    log_level: str = "INFO"
    log_file: str | None = None
    timeout: float = 86400.0  # kernel entry/attribute cache lifetime, seconds
    mirrors: tuple[str, ...] = field(default_factory=tuple)
    endpoint_url: str | None = None  # S3 endpoint for s3:// mirrors (--endpoint-url)
    retention: RetentionPolicy = RetentionPolicy()  # --retention, --coalesce
    compact_every: float = DEFAULT_COMPACT_EVERY  # seconds (--compact-every MINUTES)
    journal_limit: int | None = None  # bytes of journal data (--journal-limit SIZE)
    metrics_addr: tuple[str, int] | None = None  # (host, port) of /metrics (--metrics-addr)
    fd_budget: int | None = None  # descriptors cached for inodes (--fd-budget; default limit/4)
    guard: str = "normal"  # --guard off|low|normal|high (deltafs.guard)
    on_alert: str | None = None  # --on-alert CMD

    @property
    def journal_in_src(self) -> bool:
        j = os.path.realpath(self.journal)
        s = os.path.realpath(self.src)
        return j == s or j.startswith(s + "/")
