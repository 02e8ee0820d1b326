"""Issue 19: DELTAFS_MMAP_THRESHOLD=N fixes glibc's mmap threshold in the daemon,
so a freed 4 MiB read window does not raise it and later windows are not
served from the heap, where they leave resident holes (off by default)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import os, sys
from deltafs import heap, mount
mount._limit_malloc_arenas()
b = bytearray(4 << 20); del b   # glibc's dynamic threshold would rise to 4 MiB here
b = bytearray(4 << 20)
print(heap.stats()["mmapped"])
"""


def _mmapped(env_value: str | None) -> int:
    import os
    env = dict(os.environ)
    env.pop("DELTAFS_MMAP_THRESHOLD", None)
    if env_value is not None:
        env["DELTAFS_MMAP_THRESHOLD"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def test_a_second_big_buffer_is_mapped_apart_not_taken_from_the_heap():
    from deltafs import heap
    if not heap.stats():
        pytest.skip("not glibc")
    assert _mmapped(str(1 << 20)) >= 4 << 20
    assert _mmapped("0") < 4 << 20  # glibc's dynamic default: the heap serves it
    assert _mmapped(None) < 4 << 20  # the default
