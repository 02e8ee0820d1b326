"""Mount options as a frozen dataclass, validated once in cli/mount."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable

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


class Option:
    """One ``deltafs mount`` option of a MountConfig field, declared once.

    ``add`` puts it on the mount parser, ``read`` turns the parsed text into
    the field's value (a UsageError when bad), ``argv`` gives the arguments
    that recreate a value for the background daemon ([] for the default).
    """

    def __init__(self, flags: tuple[str, ...], *, help: str, parse: Callable[[str], Any] | None = None,
                 show: Callable[[Any], str] = str, metavar: str | None = None, kind: str = "value",
                 choices: tuple[str, ...] | None = None, daemon: bool = True) -> None:
        self.flags, self.help, self.parse, self.show = flags, help, parse, show
        self.metavar, self.kind, self.choices, self.daemon = metavar, kind, choices, daemon
        self.name = ""  # the field's name, set by MountConfig

    @property
    def dest(self) -> str:
        return "cfg_" + self.name

    def add(self, parser) -> None:
        kw: dict[str, Any] = {"dest": self.dest, "help": self.help}
        if self.kind in ("flag", "negated"):
            kw["action"] = "store_true"
        else:
            kw["metavar"] = self.metavar
            if self.choices:
                kw["choices"] = self.choices
            if self.kind == "repeat":
                kw.update(action="append", default=[])
        parser.add_argument(*self.flags, **kw)

    def read(self, args, default: Any) -> Any:
        v = getattr(args, self.dest)
        if self.kind == "flag":
            return bool(v)
        if self.kind == "negated":
            return not v
        if self.kind == "repeat":
            return tuple(v)
        if v is None:
            return default
        return self.parse(v) if self.parse else v

    def argv(self, value: Any, default: Any) -> list[str]:
        if not self.daemon or value == default:
            return []
        if self.kind in ("flag", "negated"):
            return [self.flags[0]]
        if self.kind == "repeat":
            return [a for v in value for a in (self.flags[0], v)]
        return [self.flags[-1], self.show(value)]


class RetentionOption(Option):
    """--retention and --coalesce: two flags, one RetentionPolicy field."""

    def add(self, parser) -> None:
        add_retention_options(parser)

    def read(self, args, default: Any) -> Any:
        return retention_from_args(args.retention, args.coalesce)

    def argv(self, value: Any, default: Any) -> list[str]:
        if value == default:
            return []
        return ["--retention", value.spec(), "--coalesce", repr(value.burst)]


DEFAULT_HISTORY_DIR = ".deltafs-history"


def parse_history_dir(text: str, what: str = "--history-dir") -> str:
    """NAME of the history view in MNT's root: one path component."""
    if not text or "/" in text or "\0" in text or text in (".", "..") or len(os.fsencode(text)) > 255:
        raise UsageError(f"bad {what} {text!r}: give one name without '/', e.g. .deltafs-history")
    return text


class HistoryDirOption(Option):
    """--history-dir NAME and --no-history-dir: one field, the view's name or None (off)."""

    def add(self, parser) -> None:
        g = parser.add_mutually_exclusive_group()
        g.add_argument("--history-dir", dest=self.dest, metavar="NAME",
                       help="name of the read-only history view in MNT's root (at/WHEN, snapshots/, "
                            f"versions/PATH, deleted/PATH; default {DEFAULT_HISTORY_DIR})")
        g.add_argument("--no-history-dir", dest=self.dest + "_off", action="store_true",
                       help="no history view in the mount")

    def read(self, args, default: Any) -> Any:
        if getattr(args, self.dest + "_off", False):
            return None
        v = getattr(args, self.dest, None)
        return default if v is None else parse_history_dir(v)

    def argv(self, value: Any, default: Any) -> list[str]:
        if value == default:
            return []
        return ["--no-history-dir"] if value is None else ["--history-dir", value]


def add_retention_options(q) -> None:
    """--retention and --coalesce of mount and compact."""
    q.add_argument("--retention", metavar="POLICY",
                   help="AGE:EVERY,...,*:EVERY: versions younger than AGE keep one per EVERY ('all': "
                        "every one); '*' is everything older ('none': drop). Ages s/m/h/d/w. Default "
                        "24h:all,7d:1h,90d:1d,*:1w")
    q.add_argument("--coalesce", metavar="SECONDS",
                   help="a version followed within SECONDS by the next one is dropped once older than "
                        "a minute (default 10; 0: off)")


def option(*flags: str, default: Any = None, **kw) -> Any:
    """A MountConfig field that is a ``deltafs mount`` option (see Option)."""
    cls = kw.pop("cls", Option)
    return field(default=default, metadata={"option": cls(flags, **kw)})


def _fmt_addr(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


@dataclass(frozen=True)
class MountConfig:
    """Everything a mount runs with.  Each option is declared once, here:
    ``add_arguments`` makes the parser, ``from_args`` reads it,
    ``to_argv`` gives the background daemon the same configuration.

    A new mount option is one field with ``option(...)`` (its flags, help,
    ``parse`` from text and ``show`` back to text) plus its entry in
    EVERY_OPTION of tests/unit/test_cli.py, which round-trips each one.
    Checks that need more than the text (FUSE present, a mirror URL, an
    address free) stay in cli.cmd_mount, before any fork."""

    src: str
    mnt: str
    journal: str
    foreground: bool = option("-f", "--foreground", default=False, kind="flag", daemon=False,
                              help="stay attached, log to stderr; Ctrl-C unmounts cleanly")
    fuse_options: tuple[str, ...] = option("-o", default=(), kind="repeat", metavar="OPTION",
                                           help="a FUSE mount option, e.g. allow_other (repeatable, comma "
                                                "lists allowed)")
    debug: bool = option("--debug", default=False, kind="flag", help="log every FUSE request (slow)")
    capture: bool = option("--no-capture", default=True, kind="negated",
                           help="pass-through only: record nothing (for benchmarks and debugging)")
    log_level: str = option("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                            help="log level of the daemon (default INFO)")
    log_file: str | None = None  # set by spawn_daemon for the background daemon (--log-file)
    timeout: float = 86400.0  # kernel entry/attribute cache lifetime, seconds
    mirrors: tuple[str, ...] = option("--mirror", default=(), kind="repeat", metavar="URL",
                                      help="replicate the journal to this mirror (file:///path or "
                                           "s3://bucket/prefix; repeatable)")
    endpoint_url: str | None = option("--endpoint-url", metavar="URL",
                                      help="S3 endpoint for s3:// mirrors (self-hosted S3)")
    retention: RetentionPolicy = option("--retention", "--coalesce", default=RetentionPolicy(),
                                        cls=RetentionOption, help="")
    compact_every: float = option("--compact-every", default=DEFAULT_COMPACT_EVERY, metavar="MINUTES",
                                  parse=parse_minutes, show=lambda s: repr(s / 60.0),
                                  help="minutes between background compaction passes (default 10; "
                                       "fractions allowed)")
    journal_limit: int | None = option("--journal-limit", metavar="SIZE", parse=parse_size,
                                       help="journal data size (e.g. 10G, 500M) above which compaction "
                                            "runs at once and thins harder than the retention policy "
                                            "(default: no limit)")
    metrics_addr: tuple[str, int] | None = option("--metrics-addr", metavar="HOST:PORT",
                                                  parse=parse_metrics_addr, show=_fmt_addr,
                                                  help="serve the mount's Prometheus metrics over HTTP at "
                                                       "http://HOST:PORT/metrics (default: off)")
    fd_budget: int | None = option("--fd-budget", metavar="N", parse=parse_fd_budget,
                                   help="descriptors the daemon may keep open for the inodes it caches "
                                        "(default: a quarter of its RLIMIT_NOFILE); 256 more always "
                                        "stay free")
    guard: str = option("--guard", default="normal", choices=("off", "low", "normal", "high"),
                        help="mass-damage guard sensitivity (default normal; docs/guard.md)")
    on_alert: str | None = option("--on-alert", metavar="CMD",
                                  help="shell command run when the guard raises an alert")
    history_dir: str | None = option("--history-dir", "--no-history-dir", default=DEFAULT_HISTORY_DIR,
                                     cls=HistoryDirOption, help="")
    group: str | None = option("--group", metavar="URL", daemon=False,
                               help="join the sync group stored at URL first (unless this journal is its "
                                    "member already), with one sync pass, then mount (docs/sync.md)")
    guard_action: str = option("--guard-action", default="alert", choices=("alert", "block"),
                               help="on a guard alert: alert only (default), or also block: refuse "
                                    "changes through the mount (EPERM) until deltafs guard resume; "
                                    "reads go on (docs/guard.md)")

    @classmethod
    def options(cls) -> list[Option]:
        out = []
        for f in fields(cls):
            opt = f.metadata.get("option")
            if opt is not None:
                opt.name = f.name
                out.append(opt)
        return out

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Every mount option onto ``parser`` (SRC, MNT and --journal are the caller's)."""
        for opt in cls.options():
            opt.add(parser)

    @classmethod
    def from_args(cls, args, src: str, mnt: str, journal: str, **more) -> "MountConfig":
        """The parsed options -> a config; a bad value raises a one-line UsageError."""
        defaults = {f.name: f.default for f in fields(cls)}
        vals = {o.name: o.read(args, defaults[o.name]) for o in cls.options()}
        return cls(src=src, mnt=mnt, journal=journal, **vals, **more)

    def to_argv(self) -> list[str]:
        """``mount`` arguments that give the background daemon this configuration."""
        defaults = {f.name: f.default for f in fields(self)}
        argv = ["mount", self.src, self.mnt, "--journal", self.journal]
        for o in self.options():
            argv += o.argv(getattr(self, o.name), defaults[o.name])
        return argv

    @property
    def journal_in_src(self) -> bool:
        j = os.path.realpath(self.journal)
        s = os.path.realpath(self.src)
        return j == s or j.startswith(s + "/")
