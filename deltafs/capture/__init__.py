"""Turn what happens in the mount into journal records, in the order it happened.

The rules (pre-images, atomic saves, file identity, ignored paths) are in
:mod:`deltafs.capture.recorder`'s docstring and docs/design.md.  The
package, by concern (docs/design.md, "Layers"):

* ``recorder``: the Recorder, a thin coordinator; ``ops`` calls its typed
  hooks (the ``ops.Capture`` protocol); the scan at mount time;
* ``saves``: what a rename means (atomic save, hidden, plain rename);
* ``pipeline``: the ordered, bounded queue (backpressure), group commit, who waits for what;
* ``content``: dirty ranges -> a content version, delta bases, caches;
* ``identity``: paths that just lost their file (the reuse window);
* ``state``: one inode's capture state (``ops.Node.cap``): dirty ranges,
  the capture in flight, the version the ranges apply to.
"""

from __future__ import annotations

from deltafs.capture.content import (BASE_MISSES, BASE_RETRY, CHUNK_FLUSH_BYTES, FULL, LIST_CACHE_BYTES,
                                     LIST_CACHE_ENTRIES, LIST_CACHE_OVERHEAD, LIST_CACHE_VERSIONS, RAW_CACHE_BYTES,
                                     RESTART_HANDICAP, ContentCapture, capture_chunks, file_holes)
from deltafs.capture.identity import GONE_KEPT, REUSE_SECONDS, GonePaths
from deltafs.capture.pipeline import GROUP_WINDOW, MAX_BYTES, MAX_ITEMS, Item, Pipeline
from deltafs.capture.recorder import Recorder
from deltafs.capture.saves import Rename, classify_rename
from deltafs.capture.state import NodeCapture

__all__ = [
    "BASE_MISSES", "BASE_RETRY", "CHUNK_FLUSH_BYTES", "FULL", "GONE_KEPT", "GROUP_WINDOW",
    "LIST_CACHE_BYTES", "LIST_CACHE_ENTRIES", "LIST_CACHE_OVERHEAD", "LIST_CACHE_VERSIONS", "MAX_BYTES",
    "MAX_ITEMS",
    "RAW_CACHE_BYTES", "RESTART_HANDICAP", "REUSE_SECONDS", "ContentCapture", "GonePaths", "Item",
    "NodeCapture", "Pipeline", "Recorder",
    "Rename", "capture_chunks", "classify_rename", "file_holes",
]
