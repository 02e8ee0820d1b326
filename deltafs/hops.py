"""Cheap hand-offs from the trio thread to worker threads, for the hot path.

``trio.to_thread.run_sync`` costs ~170 µs of CPU and ~650 µs of wall per
round trip on the 2-core bench machine under load (2026-12-05, trio
0.35: limiter, thread cache, two ``prctl`` to name the thread, the
result message); a bare hand-off to a persistent worker and back through
``TrioToken.run_sync_soon`` costs ~43 µs CPU and ~95 µs wall.  Every
captured fsync made three such round trips (SRC fsync, capture, commit),
so they are what ``run`` is for.  Semantics are ``to_thread.run_sync``'s:
the caller waits for ``fn`` even when cancelled (not abandoned), and its
exception is raised in the caller.
"""

from __future__ import annotations

import queue
import threading

import outcome
import trio

from deltafs import trace

MAX_THREADS = 32  # past this, calls queue for a free worker


class _Pool:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = 0
        self.busy = 0  # calls submitted and not yet reported back (trio thread only)

    def _work(self) -> None:
        while True:
            fn, args, task, token = self.jobs.get()
            if trace.ON:
                trace.mark(f"hop.start {getattr(fn, '__name__', fn)}")
            result = outcome.capture(fn, *args)
            if trace.ON:
                trace.mark(f"hop.end {getattr(fn, '__name__', fn)}")
            try:
                token.run_sync_soon(self._back, task, result)
            except trio.RunFinishedError:  # the loop is gone: nobody waits any more
                pass
            # nothing of this call kept while the thread waits for the next: its
            # arguments and result (a capture's Change: up to CHUNK_FLUSH_BYTES of
            # payloads and the file's packed list) stayed referenced by every idle
            # worker until its next call (issue 19, eleventh session)
            fn = args = task = token = result = None

    def _back(self, task, result) -> None:
        self.busy -= 1
        if trace.ON:
            trace.mark("hop.back")
        trio.lowlevel.reschedule(task, result)

    async def run(self, fn, *args):
        await trio.lowlevel.checkpoint_if_cancelled()
        self.busy += 1
        if self.busy > self.threads and self.threads < MAX_THREADS:
            self.threads += 1
            threading.Thread(target=self._work, name="deltafs-hop", daemon=True).start()
        self.jobs.put((fn, args, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token()))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


_pool = _Pool()


async def run(fn, *args, limiter: trio.CapacityLimiter | None = None):
    """fn(*args) in a worker thread; -> its result (or raise its exception)."""
    if limiter is None:
        return await _pool.run(fn, *args)
    async with limiter:
        return await _pool.run(fn, *args)


class Flush:
    """An fsync's SRC flush, ``fn(fd)``, run exactly once, beside the journal wait:
    either by the worker call that computes and commits the capture (:meth:`claim`,
    then :meth:`run_here` in that worker and :meth:`ran` back on the loop: one hop
    for both, issue 19), or in a hop of its own in ``nursery`` (:meth:`start`), in
    parallel with the journal as ``Operations._durable`` always did.  An OSError of
    the flush is kept in ``error`` for the fsync to raise after both are done."""

    def __init__(self, fn, fd: int, nursery=None) -> None:
        self.fn = fn
        self.fd = fd
        self.nursery = nursery
        self.error: OSError | None = None
        self.taken = False  # claimed by a worker call, or started (trio thread only)
        self._done = trio.Event()

    def claim(self) -> bool:
        """The capture's worker call will run it (:meth:`run_here`); False if started already."""
        if self.taken:
            return False
        self.taken = True
        return True

    def run_here(self) -> None:
        """In the worker thread that claimed it."""
        try:
            self.fn(self.fd)
        except OSError as e:
            self.error = e

    def ran(self) -> None:
        """Back on the trio thread after the claiming worker call (run or raised)."""
        self._done.set()

    def start(self) -> None:
        """Its own hop, in parallel with whatever the caller awaits next (no-op once taken)."""
        if not self.taken:
            self.taken = True
            self.nursery.start_soon(self._hop)

    async def _hop(self) -> None:
        try:
            await run(self.fn, self.fd)
        except OSError as e:
            self.error = e
        finally:
            self._done.set()

    async def wait(self) -> None:
        """Until it has run (runs it here if nobody took it); does not raise its error."""
        if not self.taken:
            self.taken = True
            await self._hop()
        else:
            await self._done.wait()
