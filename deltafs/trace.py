"""Stage timestamps of one captured fsync, for latency work (issue 19).

Off unless ``DELTAFS_TRACE`` names a file when the daemon starts: then
every stage the fsync path passes (request arrival, capture queued,
capture compute in its worker, the committer taking it, pack flush, LMDB
commit, waiter woken, reply) is stamped with ``time.perf_counter_ns`` and
the thread it ran on, and each fsync that waited for the journal appends
one JSON line to that file.  Disabled, a mark is one global lookup and a
false test.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time

PATH = os.environ.get("DELTAFS_TRACE") or None
ON = PATH is not None
_marks: list = []


def mark(stage: str) -> None:
    """Stamp ``stage`` (only when tracing; call as ``if trace.ON: trace.mark(...)``)."""
    _marks.append((time.perf_counter_ns(), threading.current_thread().name, stage))


class _Steps:
    """A trio instrument: task steps on the loop thread longer than 0.3 ms,
    while a traced fsync is in flight (what else the loop ran meanwhile)."""

    def __init__(self) -> None:
        self.t0 = 0

    def before_task_step(self, task) -> None:
        self.t0 = time.perf_counter_ns()

    def after_task_step(self, task) -> None:
        if _marks and time.perf_counter_ns() - self.t0 > 300_000:
            _marks.append((self.t0, "MainThread", f"step.start {task.name}"))
            mark(f"step.end {task.name}")


_steps = None


def start() -> None:
    """A traced fsync begins (on the trio thread): forget the marks of whatever came before."""
    global _steps
    if _steps is None:
        import trio

        _steps = _Steps()
        trio.lowlevel.add_instrument(_steps)
    _marks.clear()
    mark("fsync.arrive")


def dump(**extra) -> None:
    """Append this fsync's marks as one JSON line (ms since its arrival)."""
    if not _marks:
        return
    t0 = _marks[0][0]
    line = {"stages": [[round((t - t0) / 1e6, 3), th, st] for t, th, st in sorted(_marks)], **extra}
    _marks.clear()
    # the daemon's own file: its owner's alone, and never through a symlink
    fd = os.open(PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "a") as f:
        f.write(json.dumps(line) + "\n")


def _gc(phase: str, info: dict) -> None:
    if _marks:  # only inside a traced fsync
        mark(f"gc.{phase} gen={info.get('generation')}")


if ON:
    gc.callbacks.append(_gc)
