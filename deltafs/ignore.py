"""Which paths are passed through but never journaled.

Built-in patterns cover the swap, lock, backup and temp files of common
editors; SRC/.deltaignore adds the user's own in gitignore syntax
(pathspec does the matching).  An ignored file works normally in the
mount; when it is renamed to a path that is not ignored (an atomic save),
its content is captured as a version of that path.
"""

from __future__ import annotations

import logging
import os
import re

import pathspec
from pathspec.util import normalize_file

log = logging.getLogger(__name__)

BUILTIN_PATTERNS = [
    # vim: swap files, the 4913 write probe, backups
    "*.swp", "*.swo", "*.swn", "*.swx", "*.swpx", ".*.sw[a-p]", "4913", "*~",
    # emacs: lock links and auto-save files
    ".#*", "#*#",
    # gedit/GIO atomic writes, generic temp files, partial downloads
    ".goutputstream-*", "*.tmp", "*.temp", "*.part", "*.crdownload",
    # SQLite rollback journals: created, fsynced and deleted by every
    # transaction; the database's own versions (taken at its fsyncs, the
    # commit points) are what history needs.  WAL files are kept: they
    # hold committed data.
    "*.db-journal", "*.sqlite-journal", "*.sqlite3-journal",
    # LibreOffice locks, Kate swap, JetBrains safe-write temp files
    ".~lock.*#", "*.kate-swp", "*___jb_tmp___", "*___jb_old___",
]
IGNORE_FILE = ".deltaignore"
MEMO_GENERATION = 32768  # answers per memo generation: at most twice this many kept


class Ignore:
    def __init__(self, src: str, extra: list[str] | None = None) -> None:
        self.src = src
        self.extra = list(extra or [])
        self.reload()

    def reload(self) -> None:
        lines = list(BUILTIN_PATTERNS) + self.extra
        try:
            with open(os.path.join(self.src, IGNORE_FILE), encoding="utf-8", errors="replace") as f:
                lines += f.read().splitlines()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot read %s: %s", IGNORE_FILE, e)
        self.spec = pathspec.GitIgnoreSpec.from_lines(lines)
        self._any = any_match(self.spec)
        # a bounded memo in two generations (a save asks about one path several
        # times): answers go into ``_new``; when it is full it becomes ``_old``
        # and the generation before is dropped.  An answer asked for again is
        # carried into ``_new``, so paths in use never fall out at once (a
        # single memo cleared when full made every path miss at the same moment).
        self._new: dict[tuple[bytes, bool], bool] = {}
        self._old: dict[tuple[bytes, bool], bool] = {}

    def match(self, path: bytes | None, is_dir: bool = False) -> bool:
        """True if path (relative to SRC) is ignored.  None (unlinked) counts as ignored."""
        if path is None:
            return True
        if not path:
            return False
        key = (path, is_dir)
        hit = self._new.get(key)
        if hit is not None:
            return hit
        hit = self._old.get(key)
        if hit is None:
            p = os.fsdecode(path)
            if is_dir:
                p += "/"
            # most paths match no pattern at all: one search of every pattern at once
            # (~2 us) says so, instead of pathspec trying the patterns one by one (~8 us)
            a = self._any
            hit = False if a is not None and a.search(normalize_file(p)) is None else self.spec.match_file(p)
        if len(self._new) >= MEMO_GENERATION:
            self._old, self._new = self._new, {}
        self._new[key] = hit
        return hit

    def memo_size(self) -> int:
        """Answers kept (at most 2 * MEMO_GENERATION)."""
        return len(self._new) + len(self._old)


_PREFIX = "^(?:.+/)?"  # how pathspec begins a pattern without a slash (it matches at any depth)
_NAMED = re.compile(r"\(\?P<\w+>")


def any_match(spec) -> "re.Pattern | None":
    """One regex that finds a match wherever any pattern of ``spec`` matches
    (``regex.search``, as pathspec tries each), or None when one cannot be
    built (flags differ, a back-reference).  Exact as a pre-filter: no match
    means no pattern matches, so the path is not ignored whatever the
    patterns' order and negations; a match leaves the answer to pathspec.
    The patterns' common prefix is searched once (the alternatives of a
    search all start at the same place)."""
    regexes = [p.regex for p in spec.patterns if getattr(p, "include", None) is not None and
               getattr(p, "regex", None) is not None]
    if not regexes:
        return re.compile(r"(?!)")  # nothing ever matches
    if len({r.flags for r in regexes}) != 1:
        return None
    anywhere, other = [], []
    for r in regexes:
        src = r.pattern
        if not isinstance(src, str) or "(?P=" in src or re.search(r"\\[1-9]", src):
            return None
        src = _NAMED.sub("(?:", src)  # the same group names in every pattern: not allowed in one regex
        if src.startswith(_PREFIX):
            anywhere.append(src[len(_PREFIX):])
        else:
            other.append(src)
    alts = ([_PREFIX + "(?:" + "|".join(anywhere) + ")"] if anywhere else []) + other
    try:
        return re.compile("|".join(f"(?:{a})" for a in alts), regexes[0].flags)
    except re.error:
        return None
