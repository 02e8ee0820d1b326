"""Hybrid logical clock: 64 bits = wall milliseconds << 16 | logical counter.

Record times come from here, never from file mtimes, so a wall clock that
jumps back (NTP, a dead RTC, a VM restore) cannot reorder history: the
clock then keeps the last physical value and counts in the low bits.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)

LOGICAL_BITS = 16


def hlc_to_ns(hlc: int) -> int:
    return (hlc >> LOGICAL_BITS) * 1_000_000


def ns_to_hlc(ns: int) -> int:
    """The smallest HLC at wall time ``ns`` (ms precision)."""
    return (ns // 1_000_000) << LOGICAL_BITS


class HLC:
    """Not thread-safe on its own: the journal calls it under its write lock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self._clock = clock
        self.last = 0
        self._behind = False

    def now_ns(self) -> int:
        """The wall clock this HLC ticks from, in nanoseconds."""
        return self._clock()

    def restore(self, last: int) -> None:
        self.last = max(self.last, int(last))

    def tick(self) -> int:
        now = ns_to_hlc(self._clock())
        if now > self.last:
            self.last = now
            self._behind = False
        else:
            if not self._behind and now < self.last - (60_000 << LOGICAL_BITS):
                self._behind = True  # say it once per jump, not per record
                log.warning("wall clock is more than a minute behind the journal's clock; ordering kept")
            self.last += 1
        return self.last
