"""Version vectors: ``{device: n}``, n the number of device's event (docs/sync.md).

Pure functions on plain dicts, so they serialise as msgpack maps as they are.
"""

from __future__ import annotations

EQUAL, NEWER, OLDER, CONCURRENT = "equal", "newer", "older", "concurrent"


def includes(a: dict, b: dict) -> bool:
    """Does ``a`` include every change counted in ``b`` (a >= b)?"""
    return all(a.get(d, 0) >= n for d, n in b.items())


def compare(a: dict, b: dict) -> str:
    """How state ``a`` relates to state ``b``: EQUAL, NEWER (a includes b), OLDER or CONCURRENT."""
    ab, ba = includes(a, b), includes(b, a)
    if ab and ba:
        return EQUAL
    if ab:
        return NEWER
    if ba:
        return OLDER
    return CONCURRENT


def merge(*vs: dict) -> dict:
    """The least vector including all of ``vs``."""
    out: dict = {}
    for v in vs:
        for d, n in v.items():
            if n > out.get(d, 0):
                out[d] = n
    return out


def show(v: dict) -> str:
    return ",".join(f"{d[:8]}:{n}" for d, n in sorted(v.items())) or "-"
