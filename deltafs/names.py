"""How paths appear in messages and plain-text output: one line each, whatever a name holds.

A file name may hold any byte but NUL and ``/``.  A newline in a name must
not split a plain ``log`` line or an error message in two, nor may an
escape sequence drive the terminal, nor an undecodable byte crash the
printing.  So such names are shown the way git shows them: in double
quotes with C escapes (``"a\\nb"``, ``"caf\\xe9"``); every other name
exactly as it is.  JSON output keeps the raw name (JSON escapes it itself).
Pure: no I/O, imported by every layer.
"""

from __future__ import annotations

import os
import re

# C0 controls, DEL, C1 controls, and the lone surrogates that stand for
# undecodable bytes after os.fsdecode (surrogateescape)
_SPECIAL = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")
_QUOTED = re.compile('[\x00-\x1f\x7f-\x9f\udc80-\udcff"\\\\]')
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _escape(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n - 0xDC00 if n >= 0xDC00 else n:02x}"


def quote_name(name: str) -> str:
    """``name`` as it is, or quoted with C escapes when it holds a control
    character or an undecodable byte (so it stays on one line and prints)."""
    if not _SPECIAL.search(name):
        return name
    return '"' + _QUOTED.sub(_escape, name) + '"'


def show_name(path: bytes | None) -> str:
    """A journal path (bytes relative to SRC, ``b""`` = the root) for a message."""
    if path is None:
        return ""
    return quote_name(os.fsdecode(path)) if path else "/"


def one_line(text: str) -> str:
    """Any text (an error message) with control characters and undecodable
    bytes escaped: the last safeguard before a line is printed."""
    return _SPECIAL.sub(_escape, text)
