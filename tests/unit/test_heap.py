"""deltafs.heap: freed C-heap pages go back to the kernel after the daemon's
peaks (tree checkpoints, compaction passes), so its RssAnon follows what it
holds, not the highest it ever held."""

from __future__ import annotations

import subprocess
import sys

from deltafs import heap, maintenance
from deltafs.journal import Journal

PROBE = r"""
import sys
from deltafs import heap

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) >> 10

heap.limit_arenas(1)
blocks = [bytes(1500 + (i % 7) * 100) for i in range(150_000)]  # > 512 B: malloc's heap, not pymalloc
keep = blocks[::50]  # a live block every few pages: the heap's top cannot shrink
del blocks
before = anon()
trimmed = heap.trim(force=True)
print(before, anon(), trimmed, len(keep))
"""


def test_trim_hands_free_heap_pages_back():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    before, after, trimmed, _ = out.split()
    assert trimmed == "True"
    assert int(before) - int(after) >= 100, f"RssAnon {before} -> {after} MiB"


def test_trim_runs_at_most_every_few_seconds_unless_forced():
    heap.trim(force=True)
    assert heap.trim() is False
    assert heap.trim(force=True) is True


def test_a_compaction_pass_trims(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "trim", lambda force=False: calls.append(force) or True)
    j = Journal.open(tmp_path / "j", create=True)
    try:
        maintenance.compact(j)
    finally:
        j.close()
    assert calls == [True]
