"""The daemon's C heap (glibc malloc): one arena, and free pages handed back.

Python frees big transient objects (a tree checkpoint's whole state, a
compaction pass's plan) back to malloc, but glibc keeps the pages: the
heap's top cannot shrink past a live block, and free pages inside it stay
resident.  Measured in the 60-minute soak (2026-12-06): RssAnon 138 MiB,
of which ``malloc_trim(0)`` returned 19.5 MiB at once.  So the daemon
trims after the work that makes such peaks (``maintenance``).  Not glibc
(musl, macOS): both calls do nothing.
"""

from __future__ import annotations

import ctypes
import time

_libc = None
_last_trim = 0.0
TRIM_EVERY_S = 10.0  # at most one trim per this many seconds (it walks the heap under malloc's lock)


def _lib():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)
        except OSError:
            _libc = False
    return _libc


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def stats() -> dict:
    """glibc's view (``mallinfo2``): bytes in use, free bytes kept in the heap,
    mmapped blocks; and RssAnon from /proc.  {} parts where unknown."""
    out: dict = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    out["rss_anon"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    lib = _lib()
    try:
        fn = lib.mallinfo2
    except (AttributeError, TypeError):  # not glibc 2.33+
        return out
    fn.restype = _Mallinfo2
    m = fn()
    out.update(in_use=m.uordblks + m.hblkhd, free_kept=m.fordblks, mmapped=m.hblkhd, top_pad=m.keepcost)
    return out


def limit_arenas(n: int) -> None:
    """M_ARENA_MAX = ``n``: every thread allocates from the same ``n`` arenas."""
    lib = _lib()
    try:
        lib.mallopt(-8, n)  # M_ARENA_MAX (glibc malloc.h)
    except (AttributeError, TypeError):  # not glibc: nothing to limit
        pass


def fix_mmap_threshold(n: int) -> None:
    """M_MMAP_THRESHOLD = ``n``: every allocation of ``n`` bytes or more is its own
    mapping, returned to the kernel when freed.  A fixed value also turns off
    glibc's dynamic threshold, which after the first such buffer is freed
    rises to its size (up to 32 MiB) and serves later ones from the heap,
    where they leave holes that stay resident (issue 19)."""
    lib = _lib()
    try:
        lib.mallopt(-3, n)  # M_MMAP_THRESHOLD (glibc malloc.h)
    except (AttributeError, TypeError):  # not glibc
        pass


def trim(force: bool = False) -> bool:
    """Give free heap pages back to the kernel (``malloc_trim(0)``), at most
    once per TRIM_EVERY_S unless ``force``; -> whether it trimmed."""
    global _last_trim
    now = time.monotonic()
    if not force and now - _last_trim < TRIM_EVERY_S:
        return False
    _last_trim = now
    lib = _lib()
    try:
        lib.malloc_trim(0)
    except (AttributeError, TypeError):
        return False
    return True
