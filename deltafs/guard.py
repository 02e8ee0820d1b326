"""The mass-damage guard: notice ransomware-like or runaway destruction of
many files while it happens (docs/guard.md).

Two parts:

* :class:`Detector` -- pure: it is fed the changes the capture pipeline has
  just committed (``observe(changes, seqs)``, called once per committed
  item by ``capture.Recorder``, on the trio thread, never from a FUSE
  handler) and returns an :class:`Alert` when the score of distinct
  damaged-looking files in its sliding window reaches the level's
  threshold.  It reads no file and makes no pass over the data: it looks at
  what capture already computed (each new chunk's compressed size, whether
  it was delta-coded against the chunk it replaces, the edit list) and at
  the first 4 KiB of the file's first chunk when capture's raw-chunk cache
  still holds it (that of the old first chunk too, when it was the base).
* :class:`Guard` -- the daemon side: on an alert it pins a snapshot
  ``guard-<time>`` at the record before the first suspicious change, holds
  back compaction (so mirrors prune nothing either), logs at ERROR, runs
  ``--on-alert CMD``, saves the alert in ``JOURNAL/guard-alert.json`` (a
  remounted daemon takes it over) and, with ``--guard-action block``,
  installs a :class:`Block` that ops asks before every change.

The scoring rule (docs/guard.md has the user's view):

per content version (a write of an existing file; ``scan``, ``preimage``
and ``restore`` causes are not the user's writes and are skipped):

* ``type``    0.5  the file's type (magic number at its start, known from
                   the old first chunk, the guard's memory of the path, or
                   its extension) is gone: a PDF no longer starts ``%PDF-``,
                   a text file's head is no longer text (its byte entropy
                   reached 5.5 bits); 0.75 for a document or archive format
                   that always starts with its magic (PDF, PNG, JPEG, GIF,
                   zip and the office formats, gzip, xz, zstd, bzip2, 7z,
                   SQLite);
* ``entropy`` 0.5  the changed bytes are incompressible (their chunks of
                   OPAQUE_MIN bytes or more were stored raw, and the new head
                   sample, if known, is not plainly compressible) where the
                   file was compressible (its old head
                   sample, or its extension's class, says so), or the head
                   sample's byte entropy rose by >= 1.5 bits/byte to >= 7.2
                   (or reached 7.2 with ``type``, the old head unsampled
                   and of a type that is not compressed); 0.25 when a
                   compressed format of the 0.75 ``type`` lost its magic
                   to a head of >= 7.2 of no known format;
                   0.25 when nothing is known about the old content;
* ``dissimilar`` 0.25 on top of ``type`` or ``entropy``: new chunks replaced
                   old ones and (almost) none of them could be coded as a
                   delta of the chunk it replaces (a build rewriting its
                   outputs is dissimilar too, so alone it scores nothing);
* ``rewritten`` 0.25 every chunk of a file of 3 chunks or more was replaced,
                   and each new chunk is still a delta of the one it replaces:
                   changed everywhere a little (16-byte stripes);

A new file whose content is >= 90% incompressible and not a recognised
format is remembered as ``opaque`` (it scores nothing alone: new random
files are no damage); the delete (or rename away) of a file whose name it
extends or shares the stem of within the window scores ``replaced`` 1.0
(write-new-then-delete-old); so does the delete of a file of a known type
that was opened for reading (ops.open counts opens) before a new opaque
file of any name appeared that no delete was paired with yet (``read``).  A rename that gives a file of a known
type an unknown extension scores ``extension`` 0.5.

A version whose new head is a recognised container or compressed format
with a valid-looking structure (gzip, zip, xz, zstd, bzip2, 7z, PNG, JPEG,
GIF, WebP, MP4, PDF, SQLite, git pack/index, ELF) of the same type as
before scores a quarter of the above: that keeps ``gzip -r`` and image
editors quiet, and lets an attacker who fakes a header pass at a quarter
weight (docs/guard.md, "Limits").

A file's score is the sum of its signals, at most 1.0, and a file counts
once (its highest score) in the window.  The alert fires when the sum over
distinct files in the window reaches the level's threshold: ``low`` 10
files-worth in 10 minutes, ``normal`` 5 in one hour, ``high`` 3 in six
hours.  A slow attack (one file every 30 s) is inside every window.
"""

from __future__ import annotations

import collections
import errno
import itertools
import json
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)

LEVELS = {  # name -> (threshold in files-worth of score, window in seconds)
    "low": (10.0, 600.0),
    "normal": (5.0, 3600.0),
    "high": (3.0, 6 * 3600.0),
}
LEVEL_NAMES = ("off", *LEVELS)
SKIP_CAUSES = frozenset({"scan", "preimage", "restore", "sync"})  # sync: scored as an incoming stream (deltafs/sync/incoming.py)
HEAD = 4096  # bytes of the head sample
SNAPSHOT_PREFIX = "guard-"
SUSPECT = 0.1  # from this share of the threshold on, changes wait for capture (pacing, either action)
PACE_QUIET = 30.0  # ... until this many seconds pass without a new suspicious change
OPAQUE_MIN = 512  # chunks smaller than this never count as incompressible (zstd cannot shrink them)
OPENED_KEPT = 20_000  # read-only opens (and unpaired new opaque files) the detector remembers
PATHS_KEPT = 20_000  # paths whose last write / content type it remembers (oldest dropped first)
OPENS_QUEUED = 4096  # opens ops.open may queue between two drains (the oldest are dropped)
LATE_PAIRING = 30.0  # seconds a delete waits for the new opaque file scored after it (Detector.gone)
DEFER_S = 0.1  # quiet committed items wait at most this long to be scored in one batch (Guard.scorer)
DEFER_ITEMS = 256  # ... or until this many are queued
DEFER_BYTES = 4 << 20  # ... or this many new content bytes (their payloads are held; raw cache is 32 MiB)
ACTIONS = ("alert", "block")
STATE_FILE = "guard-alert.json"  # in the journal directory while an alert stands (docs/format.md)

# Recognised formats: name -> check(head) -> bool (a valid-looking structure, not just 2 bytes)


def _deflates(h: bytes) -> bool:
    """Does a zlib stream start here?  Its 2-byte header alone matches text
    too: "x " (0x78 0x20) passes the header check, and a text file starting
    "x alpha" read as zlib scored a type change at its next save."""
    try:
        zlib.decompressobj().decompress(h[:256], 64)
    except zlib.error:
        return False
    return True


def _zip(h: bytes) -> bool:
    return h[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08") and (len(h) < 8 or h[4] < 64)


def _png(h: bytes) -> bool:
    return h[:8] == b"\x89PNG\r\n\x1a\n" and (len(h) < 16 or h[12:16] == b"IHDR")


def _gzip(h: bytes) -> bool:
    return h[:3] == b"\x1f\x8b\x08" and (len(h) < 4 or h[3] < 32)


def _jpeg(h: bytes) -> bool:
    return h[:3] == b"\xff\xd8\xff"


def _mp4(h: bytes) -> bool:
    return h[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free")


def _riff(h: bytes) -> bool:
    return h[:4] == b"RIFF" and h[8:12] in (b"WEBP", b"WAVE", b"AVI ")


FORMATS: dict[str, Callable[[bytes], bool]] = {
    "zip": _zip,
    "png": _png,
    "gzip": _gzip,
    "jpeg": _jpeg,
    "gif": lambda h: h[:6] in (b"GIF87a", b"GIF89a"),
    "xz": lambda h: h[:6] == b"\xfd7zXZ\x00",
    "zstd": lambda h: h[:4] == b"\x28\xb5\x2f\xfd",
    "bzip2": lambda h: h[:3] == b"BZh" and h[3:4].isdigit(),
    "7z": lambda h: h[:6] == b"7z\xbc\xaf\x27\x1c",
    "pdf": lambda h: h[:5] == b"%PDF-",
    "sqlite": lambda h: h[:16] == b"SQLite format 3\x00",
    "gitpack": lambda h: h[:4] == b"PACK" and h[4:8] in (b"\0\0\0\2", b"\0\0\0\3"),
    "gitidx": lambda h: h[:4] == b"\xfftOc",
    "elf": lambda h: h[:4] == b"\x7fELF",
    "mp4": _mp4,
    "riff": _riff,
    "zlib": lambda h: len(h) >= 2 and h[0] == 0x78 and ((h[0] << 8) | h[1]) % 31 == 0 and _deflates(h),
}
# formats whose content is compressed: incompressible chunks are normal for them
COMPRESSED = frozenset({"zip", "png", "gzip", "jpeg", "gif", "xz", "zstd", "bzip2", "7z", "gitpack",
                        "mp4", "riff", "zlib"})
EXT_FORMAT = {
    ".zip": "zip", ".docx": "zip", ".xlsx": "zip", ".pptx": "zip", ".odt": "zip", ".ods": "zip",
    ".odp": "zip", ".jar": "zip", ".epub": "zip", ".whl": "zip", ".apk": "zip",
    ".png": "png", ".gz": "gzip", ".tgz": "gzip", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif",
    ".xz": "xz", ".zst": "zstd", ".bz2": "bzip2", ".7z": "7z", ".pdf": "pdf",
    ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite", ".pack": "gitpack", ".idx": "gitidx",
    ".so": "elf", ".mp4": "mp4", ".m4a": "mp4", ".mov": "mp4", ".webp": "riff", ".wav": "riff",
    ".avi": "riff",
}
# formats that always start with their magic number: losing it scores 0.75 (see write_signals)
STRONG_TYPES = frozenset({"pdf", "png", "jpeg", "gif", "zip", "gzip", "xz", "zstd", "bzip2", "7z", "sqlite"})
TEXT_EXT = frozenset(
    ".txt .md .rst .csv .tsv .json .xml .html .htm .css .js .ts .py .c .h .cc .cpp .hpp .java .go .rs "
    ".rb .pl .sh .yml .yaml .toml .ini .cfg .conf .log .tex .sql .svg .eml .ics .vcf .srt .org .php".split())
# extensions a rename may add or change to without looking like a ransom note
BENIGN_EXT = frozenset(
    ".bak .old .orig .tmp .temp .swp .part .partial .crdownload .download .lock .new .save .backup "
    ".gpg .asc .sig .pgp .age .enc .1 .2 .3 .0 .rej .pyc .o .a .d .dep".split()) | frozenset(EXT_FORMAT) | TEXT_EXT
# .gpg/.age/.enc: a user encrypting on purpose renames this way too; ransomware's
# own extensions (.locked, .crypt, random ones) are not in this list


def ext_of(path: bytes) -> str:
    name = path.rpartition(b"/")[2]
    stem, dot, ext = name.rpartition(b".")
    if not dot or not stem or len(ext) > 12:
        return ""
    return "." + ext.decode("latin-1").lower()


def stem_of(path: bytes) -> bytes:
    """dir/name without its last extension (dir/a.pdf -> dir/a)."""
    d, _, name = path.rpartition(b"/")
    stem, dot, _ = name.rpartition(b".")
    s = stem if dot and stem else name
    return d + b"/" + s if d else s


# the first byte each format's check requires (mp4: any, its magic is at offset 4)
FIRST_BYTE = {"zip": b"P", "png": b"\x89", "gzip": b"\x1f", "jpeg": b"\xff", "gif": b"G", "xz": b"\xfd",
              "zstd": b"\x28", "bzip2": b"B", "7z": b"7", "pdf": b"%", "sqlite": b"S", "gitpack": b"P",
              "gitidx": b"\xff", "elf": b"\x7f", "mp4": None, "riff": b"R", "zlib": b"\x78"}
# first byte -> the checks that may pass, in FORMATS order (a head of no format is told in one
# or two calls instead of seventeen: a new file's scoring, cp -a, git add's objects)
_BY_FIRST = [tuple((n, c) for n, c in FORMATS.items() if FIRST_BYTE[n] in (None, bytes([b])))
             for b in range(256)]
_NO_BYTE = tuple((n, c) for n, c in FORMATS.items() if FIRST_BYTE[n] is None)


def format_of(head: bytes) -> str | None:
    for name, check in _BY_FIRST[head[0]] if head else _NO_BYTE:
        if check(head):
            return name
    return None


_CLOG = [0.0] + [c * math.log2(c) for c in range(1, HEAD + 1)]  # c*log2(c), for entropy


def entropy(sample: bytes) -> float:
    """Shannon entropy of a byte sample, bits per byte (0..8).

    Over every fourth byte of the sample when it is longer than a quarter
    of the head (the count is most of a save's scoring cost): random bytes
    then measure ~7.8 instead of ~7.95, text the same to a few hundredths;
    every threshold of the rule (5.5, 6.0, 6.5, 7.2) is far from both."""
    if len(sample) > HEAD // 4:
        sample = sample[:HEAD:4]
    n = len(sample)
    if not n:
        return 0.0
    return math.log2(n) - sum(map(_CLOG.__getitem__, collections.Counter(sample).values())) / n


def trim_oldest(d: dict, keep: int) -> None:
    """Drop the oldest entries of an insertion-ordered dict down to ``keep``,
    in one go (callers let it pass ``keep`` by a tenth first).  Popping the
    first key once per insert, as before, cost ~10 µs per insert at 20,000
    entries instead of ~0.4: ``next(iter(d))`` walks over every slot deleted
    before it since the dict's last resize (a long-running mount's memory of
    paths, its last writes and creates were full: 2026-12-06 night)."""
    for k in list(itertools.islice(d, max(0, len(d) - keep))):
        del d[k]


DISTINCT_BOUND = 51  # log2(51) = 5.67: an entropy bound every rule treats as the exact value


def head_bound(head: bytes) -> float:
    """A new file's text head, only remembered for its next save: its entropy
    over every 16th byte, or, when those samples take at most DISTINCT_BOUND
    values, log2 of their count (an upper bound of it, in a third of the
    time of counting them).  As the old head's entropy, every value up to
    5.7 decides alike: it is under 6.0 (compressible before), and a new
    head of >= 7.2 rose by >= 1.5 from it."""
    s = head[:HEAD:16]
    k = len(set(s))
    return math.log2(k) if 0 < k <= DISTINCT_BOUND else entropy(s)


def looks_text(head: bytes) -> bool:
    if not head:
        return True
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 4:  # a character cut at the sample's end
            return True
    bad = sum(1 for b in head if b < 9 or 13 < b < 32 or b == 127)
    return bad < len(head) * 0.05 and entropy(head) < 6.5


def expected_type(path: bytes) -> str | None:
    """What the extension promises: a format name, "text", or None."""
    e = ext_of(path)
    if e in EXT_FORMAT:
        return EXT_FORMAT[e]
    return "text" if e in TEXT_EXT else None


def type_of(head: bytes) -> str | None:
    f = format_of(head)
    if f is not None:
        return f
    return "text" if looks_text(head) else None


# ---- the detector --------------------------------------------------------------------------------

@dataclass
class Hit:
    """One file's suspicious change."""

    key: bytes  # the file's path (moves with renames)
    score: float
    reasons: tuple[str, ...]
    seq: int  # its record
    t: float  # monotonic seconds

    def to_dict(self) -> dict:
        return {"path": os.fsdecode(self.key), "score": round(self.score, 2), "reasons": list(self.reasons),
                "version": self.seq}


@dataclass
class Alert:
    level: str
    score: float
    threshold: float
    first_seq: int  # the first suspicious record in the window: the attack began after first_seq - 1
    time_ns: int
    hits: list[Hit] = field(default_factory=list)

    nfiles: int | None = None  # restored from a saved alert (its hits are only the examples)

    @property
    def files(self) -> int:
        return self.nfiles if self.nfiles is not None else len({h.key for h in self.hits})

    @classmethod
    def from_dict(cls, d: dict) -> "Alert":
        """Back from :meth:`to_dict` (the alert state a remounted daemon takes over)."""
        hits = [Hit(os.fsencode(e["path"]), float(e["score"]), tuple(e["reasons"]), int(e["version"]), 0.0)
                for e in d.get("examples") or ()]
        a = cls(str(d["level"]), float(d["score"]), float(d["threshold"]), int(d["first_version"]),
                int(d["time_ns"]), hits)
        a.nfiles = int(d.get("files", len(hits)))
        return a

    def to_dict(self) -> dict:
        return {"level": self.level, "score": round(self.score, 2), "threshold": self.threshold,
                "first_version": self.first_seq, "before_version": max(0, self.first_seq - 1),
                "time_ns": self.time_ns, "files": self.files,
                "examples": [h.to_dict() for h in self.hits[:20]]}


def write_signals(change, raw: Callable[[bytes], bytes | None], memory: dict) -> tuple[float, list[str]]:
    """Score one committed content version (a Change with op "write")."""
    new = change.chunks or []
    new_bytes = sum(c.raw_len for c in new)
    # stored raw or hardly smaller: incompressible -- unless it is too small for
    # zstd to gain anything (an appended line), which says nothing of its bytes
    opaque = sum(c.raw_len for c in new if c.base_id is None and c.raw_len >= OPAQUE_MIN and
                 (c.payload[:1] == b"\0" or len(c.payload) >= 0.9 * c.raw_len))
    delta = sum(c.raw_len for c in new if c.base_id is not None)
    edit = change.edit or []
    replaced = sum(n for _, n, _ in edit)
    has_old = bool(change.base_seq) and replaced > 0
    # the head sample: the new first chunk (if the edit rewrote it) and the old one it replaced
    new_head = old_head = None
    if edit and edit[0][0] == 0 and edit[0][2]:
        first = edit[0][2][0][0]
        got = raw(first)
        if got is not None:
            new_head = got[:HEAD]
            nc = next((c for c in new if c.id == first), None)
            if nc is not None and nc.base_id is not None:
                b = raw(nc.base_id)
                old_head = b[:HEAD] if b is not None else None
    path = change.path
    mem = memory.get(path)
    if mem is not None:  # what the guard saw of this path's last save (no second count of the old head)
        old_type, old_ent = mem
    elif old_head is not None:
        old_type, old_ent = type_of(old_head), entropy(old_head)
    else:
        old_type, old_ent = expected_type(path), None
    new_type = new_ent = None
    if new_head is not None:
        new_type = type_of(new_head)
        # a new file's text head is only remembered for its next save: a quarter of the
        # samples places it as far under every threshold (the count is most of the cost of
        # scoring a new file: cp -a, untar, a build)
        new_ent = head_bound(new_head) if not has_old and new_type == "text" else entropy(new_head)
        memory[path] = (new_type, new_ent)
        if len(memory) > PATHS_KEPT + PATHS_KEPT // 10:
            trim_oldest(memory, PATHS_KEPT)
    elif mem is not None:
        del memory[path]  # new content the guard did not see: what it remembered is stale
    if not has_old:
        # a new file (or one written from empty): opaque content of no known format
        if new_bytes >= 512 and opaque >= 0.9 * new_bytes and new_type is None and \
                (new_head is None or format_of(new_head) is None):
            return 0.25, ["opaque"]
        return 0.0, []
    score, why = 0.0, []
    if new_head is not None and old_type is not None and new_type != old_type and \
            (old_type != "text" or new_ent >= 5.5):  # text that merely gained a few odd bytes is not gone
        # a document format whose magic number is gone is broken for every program that opens it
        score += 0.75 if old_type in STRONG_TYPES and ext_of(path) in EXT_FORMAT else 0.5
        why.append("type")
    compressible_before = (old_ent is not None and old_ent < 6.0) or \
        (old_ent is None and old_type is not None and old_type not in COMPRESSED)
    # (a head sample that is plainly compressible overrules the payloads: capture stores
    # chunks raw without trying for a while after a run of incompressible ones)
    if new_bytes and opaque >= 0.5 * new_bytes and compressible_before and (new_ent is None or new_ent >= 6.0):
        score += 0.5
        why.append("entropy")
    elif new_ent is not None and old_ent is not None and new_ent >= 7.2 and new_ent - old_ent >= 1.5:
        score += 0.5
        why.append("entropy")
    elif new_ent is not None and old_ent is None and new_ent >= 7.2 and why and old_type not in COMPRESSED:
        # the old head was not sampled (its chunk has left capture's raw cache: the first save
        # of a file since the mount), but it was of a known type that is not compressed (text,
        # PDF, SQLite) and lost it, and the new head is random: only the first 4 KiB encrypted
        score += 0.5
        why.append("entropy")
    elif new_ent is not None and new_ent >= 7.2 and why and new_type is None and old_type in COMPRESSED and \
            old_type in STRONG_TYPES:
        # a compressed format's head was random-looking already; one that lost its magic
        # number to a head of random bytes of no format (its first 4 KiB encrypted) counts a
        # quarter more: 0.75 + 0.25, a whole file
        score += 0.25
        why.append("entropy")
    elif new_bytes and opaque >= 0.9 * new_bytes and old_type is None and old_ent is None:
        score += 0.25
        why.append("entropy?")
    if why and why != ["entropy?"] and new_bytes >= 1024 and delta < 0.1 * new_bytes:
        score += 0.25  # only on top of a type or entropy signal: a build rewrites its outputs too
        why.append("dissimilar")
    if edit and len(edit) == 1 and edit[0][0] == 0 and len(edit[0][2]) >= 3 and \
            sum(n for _, n in edit[0][2]) == change.size and delta >= 0.9 * new_bytes and \
            _all_new(edit[0][2], new):
        score += 0.25  # every chunk changed, each still like the one it replaced: intermittent encryption
        why.append("rewritten")
    if new_head is not None and new_type is not None and new_type == old_type and new_type in FORMATS:
        score *= 0.25  # a valid container of the same type: a re-save, not a destruction
    return min(score, 1.0), why


def _all_new(refs, new) -> bool:
    """Is every chunk of ``refs`` among the ``new`` chunks?  Stops at the first that
    is not (a large file's list is not made into a set of ids)."""
    ids = {c.id for c in new}
    return all(cid in ids for cid, _ in refs)


class Detector:
    """Scores committed changes; see the module docstring for the rule."""

    def __init__(self, level: str = "normal", raw: Callable[[bytes], bytes | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if level not in LEVELS:
            raise ValueError(f"guard level {level!r}: use one of {', '.join(LEVEL_NAMES)}")
        self.level = level
        self.threshold, self.window = LEVELS[level]
        self.raw = raw or (lambda cid: None)
        self.clock = clock
        self.hits: collections.deque[Hit] = collections.deque()
        self.memory: dict[bytes, tuple] = {}  # path -> (type, head entropy) last seen
        # new opaque files, in time order: b"\1"+path, stem (a.pdf.locked -> a.pdf), b"\0"+stem -> when
        self.fresh: collections.OrderedDict[bytes, tuple[float, int]] = collections.OrderedDict()
        self.created: dict[bytes, int] = {}  # path -> seq of its create record (recent ones)
        self.written: dict[bytes, tuple[float, int]] = {}  # path -> (when, seq) of its last content version
        # paths recently opened read-only (ops.open via Guard.drain_opens) -> when (monotonic)
        self.opened: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        # new opaque files no delete has been paired with yet: path -> (when, seq of its create)
        self.orphans: collections.OrderedDict[bytes, tuple[float, int]] = collections.OrderedDict()
        # deletes no new opaque file explained (yet), for LATE_PAIRING seconds: capture commits a
        # namespace change (the unlink) before the content of a file written just before it, so
        # the new file may be scored after the delete it replaced: path -> (when, read: the file
        # was of a readable type and opened for reading before it went, seq of the delete); and
        # stem -> path
        self.gone: collections.OrderedDict[bytes, tuple[float, bool, int]] = collections.OrderedDict()
        self.gone_stems: dict[bytes, bytes] = {}
        self.gone_read: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # those with read
        self.alert: Alert | None = None  # the standing alert (until resume)
        self.observed = 0
        self.last_score = 0.0  # the window's score after the last observe that added a hit
        self._added = 0
        self.damaged_since_alert = 0

    def resume(self) -> None:
        self.alert = None
        self.last_score = 0.0
        self.hits.clear()
        self.fresh.clear()
        self.orphans.clear()
        self.gone.clear()
        self.gone_stems.clear()
        self.gone_read.clear()
        self.damaged_since_alert = 0

    def note_opens(self, paths: Iterable[bytes]) -> None:
        """Files opened read-only through the mount (counted in ops.open: reads
        served from the page cache never reach the daemon, opens do)."""
        now = self.clock()
        op = self.opened
        for p in paths:
            op.pop(p, None)
            op[p] = now
        while op and (len(op) > OPENED_KEPT or now - next(iter(op.values())) > self.window):
            op.popitem(last=False)

    def score(self) -> float:
        best: dict[bytes, float] = {}
        for h in self.hits:
            best[h.key] = max(best.get(h.key, 0.0), h.score)
        return sum(best.values())

    def _hit(self, key: bytes, score: float, why: list[str], seq: int, now: float) -> None:
        if score > 0:
            self.hits.append(Hit(key, score, tuple(why), seq, now))
            self._added += 1

    def observe(self, changes: Iterable, seqs: Iterable[int]) -> Alert | None:
        """Feed one committed item (its changes and their record seqs); -> a new Alert or None."""
        now = self.clock()
        self._added = 0
        changes = list(changes or ())
        seqs = list(seqs or ())
        if len(seqs) != len(changes):
            seqs = (seqs + [0] * len(changes))[: len(changes)]
        for c, seq in zip(changes, seqs):
            self.observed += 1
            op = c.op
            if op == "write":
                if c.cause in SKIP_CAUSES:
                    continue
                self.written.pop(c.path, None)
                self.written[c.path] = (now, seq)
                if len(self.written) > PATHS_KEPT + PATHS_KEPT // 10:
                    trim_oldest(self.written, PATHS_KEPT)
                s, why = write_signals(c, self.raw, self.memory)
                if "opaque" in why:  # remembered under the name it extends, and under its stem;
                    # it scores only once an original goes (new random files alone are no damage)
                    first = self.created.pop(c.path, seq)  # the attack began with its create
                    late = self._late_pair(c.path, first, now)
                    if late is not None:  # the original went before this file's content was scored
                        self._hit(late[0], 1.0, late[1], first, now)
                        continue
                    for k in (b"\1" + c.path, stem_of(c.path), b"\0" + stem_of(c.path)):
                        self.fresh.pop(k, None)
                        self.fresh[k] = (now, first, c.path)
                    self.orphans.pop(c.path, None)
                    self.orphans[c.path] = (now, first)
                    continue
                self._hit(c.path, s, why, seq, now)
            elif op == "unlink" or (op == "rename" and c.path2 is not None and
                                    ext_of(c.path2) != ext_of(c.path)):
                if op == "rename":
                    self._renamed(c, seq, now)
                first = self._replaced_by_fresh(c.path, now)
                if first is not None:
                    self._hit(c.path, 1.0, ["opaque", "replaced"], first, now)
                elif op == "unlink":
                    first = self._read_then_deleted(c.path, now)
                    if first is not None:
                        self._hit(c.path, 1.0, ["read", "opaque", "deleted"], first, now)
                    else:
                        self._note_gone(c.path, seq, now)
                self.orphans.pop(c.path, None)
                self.opened.pop(c.path, None)
            elif op == "rename" and c.path2 is not None:
                self._move(c.path, c.path2)
            elif op == "create":
                self.created[c.path] = seq
                if len(self.created) > 11_000:
                    trim_oldest(self.created, 10_000)
        expired = False
        while self.hits and now - self.hits[0].t > self.window:
            self.hits.popleft()
            expired = True
        while self.fresh and now - next(iter(self.fresh.values()))[0] > self.window:
            self.fresh.popitem(last=False)
        while self.orphans and (len(self.orphans) > OPENED_KEPT or
                                now - next(iter(self.orphans.values()))[0] > self.window):
            self.orphans.popitem(last=False)
        while self.gone and (len(self.gone) > OPENED_KEPT or
                             now - next(iter(self.gone.values()))[0] > LATE_PAIRING):
            self._forget_gone(next(iter(self.gone)))
        if self.alert is not None:
            self.damaged_since_alert += self._added
            return None
        if not self._added:  # the score rises only with a new hit
            if expired:
                self.last_score = self.score()
            return None
        total = self.last_score = self.score()
        if total >= self.threshold:
            first = min(h.seq for h in self.hits if h.seq) if any(h.seq for h in self.hits) else 0
            self.alert = Alert(self.level, total, self.threshold, first, time.time_ns(), list(self.hits))
            return self.alert
        return None

    def _move(self, old: bytes, new: bytes) -> None:
        for h in self.hits:
            if h.key == old:
                h.key = new
        if old in self.orphans:
            self.orphans[new] = self.orphans.pop(old)
        if old in self.memory:
            self.memory[new] = self.memory.pop(old)
        if old in self.written:
            self.written[new] = self.written.pop(old)

    def _renamed(self, c, seq: int, now: float) -> None:
        old_ext, new_ext = ext_of(c.path), ext_of(c.path2)
        known_before = expected_type(c.path) is not None  # a.pdf, not HEAD.lock -> HEAD
        appended = c.path2.startswith(c.path + b".")
        self._move(c.path, c.path2)
        if new_ext and new_ext not in BENIGN_EXT and (known_before or appended) and old_ext != new_ext:
            # its content may have been destroyed just before, by a write that scored nothing
            # (the guard knew nothing of the old content): the attack on it began there
            w = self.written.get(c.path2)
            self._hit(c.path2, 0.5, ["extension"], w[1] if w and now - w[0] <= self.window and w[1] else seq, now)

    def _replaced_by_fresh(self, path: bytes, now: float) -> int | None:
        """Was a new opaque file written whose name extends this one's
        (a.pdf -> a.pdf.locked) or shares its stem (a.pdf -> a.enc)? -> its create seq"""
        if not self.fresh:
            return None  # no new opaque file about (rm -rf: every delete)
        if b"\1" + path in self.fresh:
            return None  # the new file itself goes
        v = self.fresh.get(path)
        if v is None:
            v = self.fresh.get(b"\0" + stem_of(path))
        if v is None or now - v[0] > self.window:
            return None
        self.orphans.pop(v[2], None)  # paired: it cannot pair with an unrelated delete as well
        return v[1]

    def _note_gone(self, path: bytes, seq: int, now: float) -> None:
        """A delete nothing explained: a new opaque file scored in the next
        LATE_PAIRING seconds may still pair with it (:meth:`_late_pair`)."""
        t_open = self.opened.get(path)
        read = False
        if t_open is not None and now - t_open <= self.window:  # (rm -rf: opened nothing)
            mem = self.memory.get(path)
            read = (mem[0] is not None) if mem is not None else expected_type(path) is not None
        self._forget_gone(path)
        self.gone[path] = (now, read, seq)
        self.gone_stems[stem_of(path)] = path
        if read:  # the open-then-delete pairing looks at these only (an rm -rf leaves thousands of others)
            self.gone_read[path] = None

    def _forget_gone(self, path: bytes) -> None:
        if self.gone.pop(path, None) is not None and self.gone_stems.get(stem_of(path)) == path:
            del self.gone_stems[stem_of(path)]
        self.gone_read.pop(path, None)

    def _late_pair(self, path: bytes, created: int, now: float) -> tuple[bytes, list[str]] | None:
        """The pairings of :meth:`_replaced_by_fresh` and :meth:`_read_then_deleted`
        the other way round, for a new opaque file at ``path`` (created at
        record ``created``) scored after a delete that nothing explained, at
        most LATE_PAIRING seconds before, and made after this file was
        created (a file created after the delete explains nothing): the
        deleted file's name is this one's stem (a.pdf -> a.pdf.locked) or
        shares it (a.pdf -> a.enc); else a readable file opened for reading
        went (open-then-delete, any name).  Each delete pairs once.
        -> (the deleted path, reasons) or None"""
        if not self.gone:
            return None
        stem = stem_of(path)
        for d in (stem, self.gone_stems.get(stem)):
            g = self.gone.get(d) if d is not None and d != path else None
            if g is not None and now - g[0] <= LATE_PAIRING and created < g[2]:
                self._forget_gone(d)
                return d, ["opaque", "replaced"]
        for d in reversed(self.gone_read):
            t, _, del_seq = self.gone[d]
            if now - t > LATE_PAIRING:
                break
            if d != path and created < del_seq:
                self._forget_gone(d)
                return d, ["read", "opaque", "deleted"]
        return None

    def _read_then_deleted(self, path: bytes, now: float) -> int | None:
        """Open-then-delete: ``path`` was opened for reading, a new opaque file
        (any name) appeared after that open and no delete was paired with it
        yet, and now ``path`` goes.  Each new opaque file pairs once, so N new
        random files explain at most N deletes.  A file that was itself
        opaque (an encrypted backup's pack: restic prune, borg compact) is
        no loss.  -> the new file's create seq"""
        t_open = self.opened.get(path)
        if t_open is None or now - t_open > self.window or not self.orphans:
            return None
        mem = self.memory.get(path)
        if mem is not None:
            if mem[0] is None:
                return None  # opaque before: nothing readable was destroyed
        elif expected_type(path) is None:
            return None  # nothing known about it: no evidence of a loss
        for k, (t, first) in self.orphans.items():
            if t >= t_open:
                del self.orphans[k]
                return first
        return None


# ---- the daemon side -------------------------------------------------------------------------------

def guard_snapshot_name(now_ns: int | None = None) -> str:
    ns = time.time_ns() if now_ns is None else now_ns
    t = time.gmtime(ns // 10**9)
    return SNAPSHOT_PREFIX + time.strftime("%Y%m%dT%H%M%S", t) + "Z"


def pin_snapshot(journal, seq: int, alert: Alert, name: str | None = None) -> str:
    """Name the record before the attack ``guard-<time>`` (blocking; a worker thread).

    A snapshot pins the versions current at it against retention
    (maintenance.pinned_by_snapshots), so they are never thinned."""
    name = name or guard_snapshot_name(alert.time_ns)
    with journal.reader() as r:
        n = 1
        base = name
        while r.kv_get("snapshots", name) is not None:
            n += 1
            name = f"{base}-{n}"
    journal.kv_put("snapshots", name, {"seq": seq, "time_ns": alert.time_ns, "guard": alert.to_dict()})
    return name


class Block:
    """``--guard-action block``: while an alert stands, ``ops.guard_block`` is
    one of these and every request that would change the tree asks
    :meth:`check` first (a request that is not blocked costs ops one
    attribute test: ``ops.guard_block is None``).

    Before the alert, while the window's score is at least SUSPECT of the
    threshold and a suspicious change came in the last PACE_QUIET seconds,
    the guard installs one that only paces (``blocking`` False): each such
    request first waits until every capture queued before it is committed
    and scored (``drain``), and ops.flush queues a written file's capture at
    close(2), so an attacker cannot run ahead of the capture pipeline; the
    request that follows the change crossing the threshold is refused.
    Pacing runs under ``--guard-action alert`` too (there the alert is raised
    before the attacker's next change instead of 4-6 files later, the lag of
    capture behind a full-speed attacker); it ends at the alert, which
    refuses nothing under alert.

    Refused with EPERM, for every process but the ones allowed (the
    ``deltafs rollback`` that undoes the attack registers its own): opens
    for writing or with O_TRUNC, creates, mknod, mkdir, symlink, link,
    unlink, rmdir, rename, truncate, chmod, chown, setxattr and removexattr.
    Reads, listings, stat, timestamps (the kernel sets them itself after
    writes) and WRITE requests on descriptors opened before the alert (they
    arrive at writeback time, not attributable to a process) go through."""

    def __init__(self, blocking: bool = True, drain: Callable[[], Awaitable] | None = None) -> None:
        self.blocking = blocking
        self.drain = drain
        self.allowed: set[int] = set()  # pids (their threads too) that may change the tree
        self.refused = 0
        self.paced = 0
        self.processes: dict[int, str] = {}  # pid -> command name of the first few refused

    def allow(self, pid: int) -> None:
        self.allowed = {p for p in self.allowed if os.path.exists(f"/proc/{p}")} | {pid}

    async def check(self, ctx) -> None:
        if not self.blocking:
            if self.drain is not None:
                self.paced += 1
                await self.drain()
            if not self.blocking:
                return
        pid = getattr(ctx, "pid", 0)
        for a in self.allowed:  # FUSE gives the calling thread's id: accept a thread of an allowed pid
            if pid == a or os.path.exists(f"/proc/{a}/task/{pid}"):
                return
        self.refused += 1
        if pid not in self.processes and len(self.processes) < 20:
            try:
                with open(f"/proc/{pid}/comm", "rb") as f:
                    name = f.read().strip().decode(errors="replace")
            except OSError:
                name = "?"
            self.processes[pid] = name
            log.warning("guard: refused a change by pid %d (%s): an alert stands and --guard-action is "
                        "block (deltafs guard resume re-allows changes)", pid, name)
        raise PermissionError(errno.EPERM, "refused by the deltafs guard (deltafs guard resume)")

    async def wait_scored(self) -> None:
        """Pacing only, never refusing: wait until every capture queued so far
        is committed and scored.  ops.flush calls it after queueing a written
        file's capture, so close(2) returns once that file is scored: the
        alert (or the block) stands before the attacker opens its next file,
        not at that file's first change."""
        if not self.blocking and self.drain is not None:
            self.paced += 1
            await self.drain()

    def status(self) -> dict:
        return {"refused": self.refused,
                "processes": [{"pid": p, "name": n} for p, n in self.processes.items()]}


def save_state(path: str, state: dict) -> None:
    """Write the standing alert to ``path`` (owner-only, atomic, no symlink followed)."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(state, indent=1).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_state(path: str) -> dict | None:
    """The alert a previous daemon left standing, or None (a damaged file is logged and ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.error("guard: cannot read %s: %s", path, e.strerror)
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            d = json.loads(f.read(1 << 20))
        if not isinstance(d, dict) or d.get("version") != 1 or not isinstance(d.get("alert"), dict):
            raise ValueError("not a guard alert record")
        Alert.from_dict(d["alert"])  # checks the fields
        return d
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("guard: ignoring the damaged alert state %s (%s)", path, e)
        return None


class Guard:
    """The detector wired into a mount: ``Recorder.guard`` (observe) and
    ``daemon.services.guard`` (status, resume, allow)."""

    def __init__(self, detector: Detector, journal, nursery, on_alert: str | None = None,
                 mnt: str = "", action: str = "alert", ops=None, state_path: str | None = None,
                 watching: bool = True) -> None:
        self.detector = detector
        self.journal = journal
        self.nursery = nursery
        self.on_alert = on_alert
        self.mnt = mnt
        self.action = action
        self.ops = ops
        self.state_path = state_path
        self.watching = watching  # False: --guard off, only a standing alert from an earlier mount
        self.snapshot: str | None = None
        self.alerts = 0
        self.scoring_cpu_s = 0.0  # thread CPU time spent scoring (score_item)
        self.hook_error: str | None = None
        self.block: Block | None = None  # installed in ops while pacing or blocking
        self.drain = None  # capture.Recorder.drain (set by guard_service)
        self.since_mount = False  # the standing alert was raised by an earlier daemon
        # ops.open appends (parent node, name) of each read-only open; drained before each observe
        self.opens: collections.deque = collections.deque(maxlen=OPENS_QUEUED)
        self._blk: Block | None = None  # the Block of the current alert's life (see _block)
        # deferred scoring (guard_service, --guard-action alert): observe only queues the committed
        # item, and the scorer task scores it once the waiters of that commit (fsync) have been answered
        self.deferred = False
        self.unscored: collections.deque = collections.deque()
        self._more = None  # trio.Event: something to score
        self._now = None  # trio.Event: an urgent item is queued (score without waiting for a batch)
        self._queued_bytes = 0  # new content bytes of the quiet items queued (bounded: DEFER_BYTES)
        self._idle = None  # trio.Event: set while nothing waits to be scored

    def drain_opens(self) -> None:
        q = self.opens
        if not q or self.ops is None:
            return
        paths = []
        child_path = self.ops.child_path
        while q:
            parent, name = q.popleft()
            p = child_path(parent, name)
            if p is not None:
                paths.append(p)
        self.detector.note_opens(paths)

    def observe(self, changes, seqs) -> None:
        """Called by capture.Recorder for each committed item (trio thread, never a FUSE handler).

        ``--guard-action alert`` (the default): deferred, only queued here and
        scored by :meth:`scorer` after the committer has answered that
        commit's fsync, so scoring is off the fsync's critical path.

        ``--guard-action block``: scored here, before the committer wakes the
        commit's waiters.  A change request the pacing Block holds waits for
        that commit (:meth:`settle`), so it sees the score of every change
        committed before it: the request after the change that crosses the
        threshold is refused, never one later."""
        if self.deferred:
            self.unscored.append((changes, seqs))
            if self._idle.is_set():
                import trio

                self._idle = trio.Event()
            if not self._now.is_set() and self._urgent(changes):
                self._now.set()
            self._more.set()
            return
        self.score_item(changes, seqs)

    def _urgent(self, changes) -> bool:
        """Must this committed item be scored at once (after its commit's waiters),
        or may it wait for a batch (:meth:`scorer`, up to DEFER_S)?

        Only changes that cannot add a hit nor start pacing wait: a new
        file's content that is not opaque (it only leaves its type and head
        entropy in the detector's memory), creates, attributes, renames that
        keep the extension, and deletes while no new opaque file is
        unpaired (nothing they could pair with; the delete is remembered
        for a late pairing in order, before any later item is scored).
        Everything else -- a version replacing content, a new opaque file,
        a rename to another extension, a delete while a new opaque file is
        about -- is urgent, and scoring it scores the whole queue in order.
        The queued new bytes are bounded too (DEFER_BYTES): their payloads
        stay referenced until scored, and a head sample must still be in
        capture's raw cache then."""
        d = self.detector
        for c in changes:
            op = c.op
            if op == "write":
                if c.cause in SKIP_CAUSES:
                    continue
                if c.base_seq and c.edit and any(e[1] for e in c.edit):
                    return True  # content replaced: every write signal may fire
                nb = opaque = 0
                for ch in c.chunks or ():
                    n = ch.raw_len
                    nb += n
                    if ch.base_id is None and n >= OPAQUE_MIN and (
                            ch.payload[:1] == b"\0" or len(ch.payload) >= 0.9 * n):
                        opaque += n
                self._queued_bytes += nb
                if nb >= 512 and opaque >= 0.9 * nb and not self._known_format(c):
                    return True  # a new opaque file: the write-new-delete-old and read-then-delete pairings
            elif op == "unlink":
                if d.fresh or d.orphans:
                    return True
            elif op == "rename":
                if c.path2 is not None and ext_of(c.path2) != ext_of(c.path):
                    return True
        return self._queued_bytes >= DEFER_BYTES or len(self.unscored) >= DEFER_ITEMS

    def _known_format(self, c) -> bool:
        """Does this new file's head, in capture's raw cache now, start with a
        recognised format?  Then write_signals cannot call it opaque (git's
        objects are zlib streams: incompressible, never opaque), so it may
        wait for a batch.  Should the head leave the cache before it is
        scored, it is scored as opaque (no head: nothing known) in its place
        in the queue, at most DEFER_S later than at once."""
        edit = c.edit
        if not edit or edit[0][0] != 0 or not edit[0][2]:
            return False
        got = self.detector.raw(edit[0][2][0][0])
        return got is not None and format_of(got[:HEAD]) is not None

    async def scorer(self) -> None:
        """The task that scores what observe queued (guard_service runs it).

        An urgent item (:meth:`_urgent`) is scored, with everything queued
        before it, right after its commit's waiters are answered; a queue of
        only quiet items waits up to DEFER_S for one, then is scored in one
        batch.  Quiet items cannot raise the score, so waiting changes no
        decision; it takes the scoring (and two task switches per commit)
        out of the moment after each fsync's answer, when the writer's next
        requests arrive (cost of the signals, docs/guard.md).  Whoever needs
        the score (flush, pacing, resume) scores the queue itself (scored)."""
        import trio

        while True:
            await self._more.wait()
            self._more = trio.Event()
            if not self._now.is_set():
                with trio.move_on_after(DEFER_S):
                    await self._now.wait()
            self._now = trio.Event()
            await trio.lowlevel.cancel_shielded_checkpoint()  # the fsync waiters the commit woke go first
            t0 = time.thread_time()
            n = 0
            while self.unscored:
                # no local names: the last item's changes (a 4 GiB file's edit and
                # payloads) would stay referenced by this frame until the next one
                self.score_item(*self.unscored.popleft(), timed=False)
                n += 1
                if n % 64 == 0:
                    self.scoring_cpu_s += time.thread_time() - t0
                    await trio.lowlevel.checkpoint()  # a long batch (rm -rf): let requests through
                    t0 = time.thread_time()
            self.scoring_cpu_s += time.thread_time() - t0
            self._queued_bytes = 0
            self._idle.set()

    def score_queued(self) -> int:
        """Score what observe queued, now (resume: under the alert that stands;
        scored: whoever needs the score)."""
        n = 0
        t0 = time.thread_time()
        while self.unscored:
            self.score_item(*self.unscored.popleft(), timed=False)
            n += 1
        self.scoring_cpu_s += time.thread_time() - t0
        self._queued_bytes = 0
        if self._idle is not None and not self._idle.is_set():
            self._idle.set()
        return n

    async def scored(self) -> None:
        """Everything observe queued so far is scored (control's flush and the
        pacing wait for it): what waits is scored here and now, not after
        the scorer's batch delay."""
        if self.deferred:
            self.score_queued()
            while self.unscored or not self._idle.is_set():
                await self._idle.wait()

    async def settle(self) -> None:
        """Every capture queued so far is committed and scored (the pacing Block waits here).
        Pacing ends once PACE_QUIET seconds pass without a new suspicious change: one
        odd file in ordinary work paces the next half minute, not the window's hour."""
        blk = self.block
        if blk is not None and not blk.blocking and not self.suspicious():
            self._pace(False)
            return
        if self.drain is not None:
            await self.drain()
        await self.scored()

    def suspicious(self) -> bool:
        """Pace (either action)?  While the window's score is at least
        SUSPECT of the threshold and a suspicious change came in the last
        PACE_QUIET seconds, or (under block) a new opaque file (what encryption
        writes, and what a delete of the original turns into a hit) came in
        them: an attacker's first files then wait for their own scoring
        instead of running ahead of capture's first commits.  Under alert it
        takes two new opaque files: gpg -c of one file, then 30 s of pip
        install paced file by file, ran twice as long (14.2 s against 6.9,
        2026-12-06 20:21 UTC)."""
        d = self.detector
        if d.last_score >= SUSPECT * d.threshold and self.quiet_for() <= PACE_QUIET:
            return True
        fresh = d.fresh
        if not fresh:
            return False
        now = d.clock()
        need = 1 if self.action == "block" else 2  # alert: one new opaque file (gpg -c) paces nothing
        seen: set[bytes] = set()
        for t, _, path in reversed(fresh.values()):
            if now - t > PACE_QUIET:
                return False
            seen.add(path)
            if len(seen) >= need:
                return True
        return False

    def quiet_for(self) -> float:
        """Seconds since the newest suspicious change in the window (inf: none)."""
        hits = self.detector.hits
        return self.detector.clock() - hits[-1].t if hits else math.inf

    def start_deferred(self) -> None:
        """Score after each commit's waiters are answered (guard_service, at mount).
        Not under ``--guard-action block``: there the committer scores (observe)."""
        import trio

        if self.action == "block":
            return
        self.deferred = True
        self._more = trio.Event()
        self._now = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def score_item(self, changes, seqs, timed: bool = True) -> None:
        t0 = time.thread_time() if timed else 0.0
        try:
            self.drain_opens()
            alert = self.detector.observe(changes, seqs)
        except Exception:  # the guard must never break capture
            log.exception("guard: scoring failed")
            return
        finally:  # the signals' own CPU (status --json guard.scoring_cpu_s; tools/bench/guard.py);
            if timed:  # the batches (scorer, score_queued) count theirs once: a clock call is ~0.7 µs
                self.scoring_cpu_s += time.thread_time() - t0
        if alert is not None:
            self.alerts += 1
            self.snapshot = guard_snapshot_name(alert.time_ns)  # status names it at once
            self._start_blocking()
            if self.action != "block" and self.ops is not None:
                self._pace(False)  # alert only: once raised, nothing waits for the guard any more
            self.nursery.start_soon(self._alerted, alert)
        elif self.ops is not None and self.detector.alert is None:
            self._pace(self.suspicious())  # both actions: see Block (alert: the alert comes files sooner)

    def _block(self) -> "Block":
        """The one Block of this alert's life: a request that waits in its pacing
        sees it turn blocking (a second object could be missed by a request
        holding the first)."""
        if self._blk is None:
            self._blk = Block(blocking=False, drain=self.settle)
        return self._blk

    def _pace(self, on: bool) -> None:
        if on and self.block is None:
            self.block = self._block()
            self.ops.guard_block = self.block
            log.info("guard: score %.2f of %g: changes wait for capture until it falls",
                     self.detector.last_score, self.detector.threshold)
        elif not on and self.block is not None and not self.block.blocking:
            self.block = None
            self.ops.guard_block = None

    def _start_blocking(self) -> None:
        if self.action == "block" and self.ops is not None:
            self.block = self._block()
            self.block.blocking = True
            self.ops.guard_block = self.block  # from the next request on

    def _state(self) -> dict:
        return {"version": 1, "alert": self.detector.alert.to_dict(), "snapshot": self.snapshot,
                "action": self.action, "mnt": self.mnt}

    def _persist(self) -> None:
        if self.state_path is None or self.detector.alert is None:
            return
        try:
            save_state(self.state_path, self._state())
        except OSError as e:
            log.error("guard: cannot save the alert in %s (a remount would forget it): %s",
                      self.state_path, e.strerror)

    def restore(self, state: dict) -> None:
        """Take over the alert an earlier daemon left standing (at mount)."""
        self.detector.alert = Alert.from_dict(state["alert"])
        self.snapshot = state.get("snapshot")
        self.since_mount = True
        self._start_blocking()
        a = self.detector.alert
        log.error("GUARD ALERT from before the remount stands on %s: %d files looked destroyed after version %d "
                  "(snapshot %s). Compaction is held%s. Undo with: deltafs rollback %s --to %s ; then deltafs "
                  "guard resume %s", self.mnt, a.files, max(0, a.first_seq - 1), self.snapshot,
                  "; changes through the mount are refused" if self.block else "", self.mnt,
                  self.snapshot or f"v{max(0, a.first_seq - 1)}", self.mnt)

    async def _alerted(self, alert: Alert) -> None:
        import trio

        try:
            self.snapshot = await trio.to_thread.run_sync(pin_snapshot, self.journal,
                                                          max(0, alert.first_seq - 1), alert, self.snapshot)
        except Exception as e:  # noqa: BLE001 - the alert still goes out
            log.exception("guard: cannot pin the snapshot before the attack")
            self.snapshot = None
            self.hook_error = f"snapshot failed: {e}"
        if self.detector.alert is alert:  # not resumed meanwhile
            await trio.to_thread.run_sync(self._persist)
        ex = ", ".join(os.fsdecode(h.key) for h in alert.hits[:5])
        log.error("GUARD ALERT on %s: %d files look destroyed (score %.1f >= %.1f, level %s; e.g. %s). "
                  "Compaction is held%s. Undo with: deltafs rollback %s --to %s ; then deltafs guard resume %s",
                  self.mnt, alert.files, alert.score, alert.threshold, alert.level, ex,
                  "; changes through the mount are refused" if self.block else "", self.mnt,
                  self.snapshot or f"v{max(0, alert.first_seq - 1)}", self.mnt)
        if self.on_alert:
            env = {**os.environ, "DELTAFS_MNT": self.mnt, "DELTAFS_GUARD_SNAPSHOT": self.snapshot or "",
                   "DELTAFS_GUARD_FILES": str(alert.files), "DELTAFS_GUARD_SCORE": f"{alert.score:.2f}",
                   "DELTAFS_GUARD_VERSION": str(max(0, alert.first_seq - 1))}
            try:
                with trio.fail_after(60):
                    res = await trio.run_process(self.on_alert, shell=True, env=env, check=False,
                                                 stdin=b"", capture_stdout=True, capture_stderr=True)
                if res.returncode:
                    self.hook_error = f"--on-alert exited {res.returncode}: {res.stderr.decode(errors='replace')[-200:]}"
                    log.error("guard: %s", self.hook_error)
            except (OSError, trio.TooSlowError) as e:
                self.hook_error = f"--on-alert failed: {e}"
                log.error("guard: %s", self.hook_error)

    @property
    def alerted(self) -> bool:
        return self.detector.alert is not None

    def allow(self, pid: int) -> dict:
        """Let process ``pid`` change the tree while blocking (deltafs rollback registers itself)."""
        if self.block is not None:
            self.block.allow(pid)
        return {"allowed": pid, "blocking": self.block is not None}

    async def resume_settled(self, timeout: float = 30.0) -> dict:
        """``deltafs guard resume`` through the control socket: first every change
        made before it is committed and scored, under the alert that stands
        (they are the attack's tail, counted in ``changes_since``), then the
        alert is cleared.  Scored after the clear, they would fill the new
        window at once and raise the alert again."""
        import trio

        if self.detector.alert is not None:
            with trio.move_on_after(timeout):  # a journal that cannot commit must not hang the resume
                if self.drain is not None:
                    await self.drain()
            self.score_queued()
        return self.resume()

    def resume(self) -> dict:
        was = self.detector.alert
        self.detector.resume()
        self.snapshot = None
        self.hook_error = None
        self.since_mount = False
        if self.ops is not None:
            self.ops.guard_block = None
        self.block = None
        self._blk = None
        if self.state_path is not None:
            try:
                os.unlink(self.state_path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("guard: cannot remove %s (a remount would raise the alert again): %s",
                          self.state_path, e.strerror)
        if was is not None:
            log.warning("guard: alert cleared by the user (deltafs guard resume); compaction resumes%s",
                        "; changes are allowed again" if self.action == "block" else "")
        return {"cleared": was is not None}

    def status(self) -> dict:
        d = self.detector
        a = d.alert
        return {"level": d.level if self.watching else "off", "threshold": d.threshold, "window_s": d.window,
                "action": self.action, "score": round(d.score(), 2), "alert": None if a is None else {
                    **a.to_dict(), "snapshot": self.snapshot, "changes_since": d.damaged_since_alert,
                    "hook_error": self.hook_error, "from_earlier_mount": self.since_mount,
                    "blocking": None if self.block is None or not self.block.blocking else self.block.status()},
                "alerts": self.alerts, "scoring_cpu_s": round(self.scoring_cpu_s, 3),
                "pacing": self.block is not None and not self.block.blocking}


def refuse_compaction_while_alerted(journal_dir: str, where: str) -> None:
    """``deltafs compact`` (mounted or not) prunes nothing while an alert stands:
    the versions from before the attack must outlive the alert."""
    if os.path.exists(os.path.join(journal_dir, STATE_FILE)):
        from deltafs.errors import UsageError

        raise UsageError(f"compaction is held: a guard alert stands on {where} (see `deltafs guard status`); "
                         "after `deltafs guard resume` it runs again (--dry-run works meanwhile)")


def holding(g: "Guard | None") -> bool:
    """Is compaction held by a standing guard alert (maintenance asks before each pass)?"""
    return bool(g is not None and getattr(g, "alerted", False))


async def guard_service(daemon, task_status=None) -> None:
    """Install the guard on the mount's recorder (``--guard``, default normal;
    ``--guard-action``), taking over an alert an earlier daemon left standing."""
    import trio

    if task_status is None:
        task_status = trio.TASK_STATUS_IGNORED
    cfg = daemon.cfg
    level = getattr(cfg, "guard", None) or "normal"
    if daemon.rec is None:
        task_status.started(None)
        return
    state_path = os.path.join(cfg.journal, STATE_FILE)
    state = await trio.to_thread.run_sync(load_state, state_path)
    if level == "off" and state is None:
        task_status.started(None)
        return
    rec = daemon.rec
    g = Guard(Detector(level if level != "off" else "normal", raw=rec.raw_cache.get), daemon.journal,
              daemon.nursery, getattr(cfg, "on_alert", None), cfg.mnt, getattr(cfg, "guard_action", "alert"),
              daemon.ops, state_path, watching=level != "off")
    g.drain = rec.drain
    if state is not None:
        g.restore(state)
    if g.watching:
        g.start_deferred()  # not under block: there the committer scores, the next request sees it
        rec.guard = g
        if daemon.ops is not None:
            daemon.ops.guard_opens = g.opens
    task_status.started(g)  # services.Services.guard: control (guard status|resume), status, maintenance
    try:
        if g.deferred:
            await g.scorer()
        await trio.sleep_forever()
    finally:
        rec.guard = None
        if daemon.ops is not None:
            daemon.ops.guard_opens = None
            daemon.ops.guard_block = None


# ---- deltafs guard test: the detector over a past window of the journal ---------------------------

class _Stored:
    """A chunk as the journal keeps it, looking like capture's NewChunk to write_signals."""

    __slots__ = ("id", "raw_len", "payload", "base_id")

    def __init__(self, cid: bytes, info) -> None:
        self.id = cid
        self.raw_len = info.raw_len
        self.base_id = info.base_id
        # stored at >= 90% of its size without a base: it was incompressible
        self.payload = b"\0" if info.base_id is None and info.stored_len >= 0.9 * info.raw_len else b"\3"


def replay(r, start: int, end: int, level: str = "normal") -> dict:
    """Run a fresh Detector over records start..end of reader ``r`` (record
    times as its clock); -> {"alerts": [...], "records": n, "score": s, "hits": [...]}.

    Each alert is followed by a resume, so every attack in the window shows."""
    now = [0.0]
    cache: dict[bytes, bytes] = {}

    def raw(cid: bytes) -> bytes | None:
        if cid not in cache:
            try:
                cache[cid] = r.read_chunk(cid)[:HEAD]
            except Exception:  # noqa: BLE001 - a pruned or damaged chunk: no head sample
                cache[cid] = None
            if len(cache) > 4096:
                cache.pop(next(iter(cache)))
        return cache[cid]

    det = Detector(level, raw=raw, clock=lambda: now[0])
    seen: set[bytes] = set()
    alerts, hits, n = [], [], 0
    for rec in r.records(start, end):
        n += 1
        now[0] = rec.time_ns / 1e9
        if rec.op == "write":
            chunks = []
            for _, _, refs in rec.edit or ():
                for cid, _ in refs:
                    if cid not in seen:
                        seen.add(cid)
                        info = r.chunk_info(cid)
                        if info is not None:
                            chunks.append(_Stored(cid, info))
            rec = _ReplayChange(rec, chunks)
        before = len(det.hits)
        a = det.observe([rec], [getattr(rec, "seq", 0)])
        hits.extend(h.to_dict() for h in list(det.hits)[before:])
        if a is not None:
            alerts.append(a.to_dict())
            det.resume()
    return {"level": level, "from": start, "to": end, "records": n, "alerts": alerts,
            "score": round(det.score(), 2), "hits": hits[-200:]}


class _ReplayChange:
    __slots__ = ("op", "path", "path2", "cause", "base_seq", "edit", "size", "chunks", "seq")

    def __init__(self, rec, chunks) -> None:
        self.op, self.path, self.path2, self.cause = rec.op, rec.path, rec.path2, rec.cause
        self.base_seq, self.edit, self.size, self.seq = rec.base_seq, rec.edit, rec.size, rec.seq
        self.chunks = chunks
