"""Paired, interleaved A/B rounds: the statistics shared by the cost benchmarks
(tools/bench/guard.py: the guard's signals; tools/bench/sync.py: a running sync).

Each round runs both sides back to back (alternating which goes first), so both
see the same load; what is reported is the median over rounds of the per-round
ratio B/A - 1, with a distribution-free 95% confidence interval of that median.
"""

from __future__ import annotations

import math
import statistics


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def median_ci(v: list[float], conf: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: order statistics
    (k, n+1-k) with the largest k for which P(Binomial(n, 1/2) < k) <= (1-conf)/2."""
    s, n = sorted(v), len(v)
    k, cum = 0, 0.0
    while True:
        p = math.comb(n, k) / 2 ** n
        if cum + p > (1 - conf) / 2:
            break
        cum += p
        k += 1
    if k == 0:
        return s[0], s[-1]  # too few pairs for that confidence: the whole range
    return s[k - 1], s[n - k]


def ratio_summary(b: list[float], a: list[float]) -> dict:
    """Per-pair b/a - 1 of two equally long series: median, its 95% interval, min, max, n."""
    ratios = [x / y - 1 for x, y in zip(b, a)]
    lo, hi = median_ci(ratios)
    return {"median": round(statistics.median(ratios), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "min": round(min(ratios), 4), "max": round(max(ratios), 4), "n": len(ratios)}


def order(r: int, a: str, b: str) -> list[str]:
    """Round r's order of the two sides: alternating, so neither always goes first."""
    return [a, b] if r % 2 else [b, a]
