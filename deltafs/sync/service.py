"""The mount's sync service: a pass every few seconds, and on request (docs/sync.md).

Remote states are applied *through the mount* (MNT), from a worker
thread: the write is an ordinary save to the daemon, so the capture layer
journals it like any local change (an atomic save: an ignored temp file
renamed over the path), the kernel's caches (keep_cache, writeback, long
entry timeouts) learn of it from the daemon itself, and nothing is written
behind the mount's back.  A file open for writing is not replaced: its
remote state waits (pending) until the file is closed and captured, and
then meets the local save as a concurrent state (a conflict) if the two
differ.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import trio

from . import state as S
from .engine import Engine
from .local import LocalIO, lstat

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0  # seconds between passes
# A timed pass waits while the mount is busy with local saves (a cp -a, an unpack, a build):
# the journal grew by BUSY_RECORDS or more in the last QUIET_S seconds.  It runs when a
# second goes by with fewer, or MAX_DEFER_S after it was due (docs/sync.md, "Bulk saves").
QUIET_S = 1.0
BUSY_RECORDS = 50
MAX_DEFER_S = 30.0


class MountIO(LocalIO):
    """Writes go through MNT (the daemon serves them); checks read SRC and the daemon's nodes."""

    mounted = True

    def __init__(self, journal, src: str, mnt: str, ops, rec) -> None:
        super().__init__(journal, src)
        self.root = os.fsencode(mnt)  # LocalIO's writes: through the mount
        self.ops = ops
        self.rec = rec

    def busy(self, path: bytes) -> bool:
        st = lstat(self.src, path)
        if st is None or self.ops is None:
            return False
        node = self.ops.nodes.get(self.ops.fuse_ino(st.st_ino))  # (a dict read: GIL-atomic)
        return node is not None and (node.writers > 0 or node.cap.pending is not None)

    def tag(self, path: bytes, origin: str) -> None:
        """The capture layer gives the records of ``path`` this origin until ``record``."""
        if self.rec is not None:
            self.rec.pipe.origins[path] = origin  # (a dict write: GIL-atomic; the committer reads it)

    def untag(self, path: bytes) -> None:
        if self.rec is not None:
            self.rec.pipe.origins.pop(path, None)

    def record(self, paths) -> dict[bytes, int]:
        """The saves went through the mount: wait until the capture layer journaled them."""
        if self.rec is not None:
            try:
                trio.from_thread.run(self.rec.drain)
            finally:
                for p in paths:
                    self.rec.pipe.origins.pop(p, None)
        return {}


@dataclass
class GroupSync:
    """The service's handle: status and the request to sync now."""

    url: str
    device: str
    interval: float
    passes: int = 0
    deferred: int = 0  # seconds timed passes waited for local saves to calm down
    last_pass_ns: int = 0
    last_report: dict = field(default_factory=dict)
    last_error: str | None = None
    paused: bool = False
    wake: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)
    daemon: object = field(default=None, repr=False)
    io: object = field(default=None, repr=False)
    guard: object = field(default=None, repr=False)  # incoming.IncomingGuard (None: --guard off)
    # The state as the last pass left it, and the state file's identity then: the next pass
    # takes it instead of decoding the file again (O(paths) of Python per pass, under the GIL
    # the FUSE handlers share) while nothing else replaced the file.  Dropped on an error.
    state: object = field(default=None, repr=False)
    state_id: tuple | None = None

    async def run(self, action=None) -> dict:
        """A pass now (control op ``group``); ``action(engine)`` runs in it first (resolve)."""
        from . import open_store
        from .store import GroupError

        if self.paused:
            raise GroupError(f"the sync group {self.url} is paused for this mount: `deltafs resume --group` first")
        return await run_now(self, self.daemon, self.io, open_store, action, asked=True)

    async def guard_resume(self) -> list[str]:
        """``deltafs guard resume``: release the peers the incoming guard holds, pass now."""
        from . import guard_resume

        async with self.lock:
            out = await trio.to_thread.run_sync(guard_resume, self.daemon.journal.path)
            if self.guard is not None:
                self.guard.resume()
        if out:
            log.warning("sync: guard resume released peer(s) %s", ", ".join(out))
            self.wake.set()
        return out

    async def set_paused(self, paused: bool) -> dict:
        """pause|resume --group: passes stop (after the one running) or go on; kept in the state."""
        from . import set_paused

        async with self.lock:
            was = self.paused
            self.paused = paused
            await trio.to_thread.run_sync(set_paused, self.daemon.journal.path, paused)
        if paused != was:
            log.info("sync group %s %s", self.url, "paused" if paused else "resumed")
        if not paused:
            self.wake.set()  # a pass now
        return {"url": self.url, "paused": paused, "was_paused": was}

    def status(self) -> dict:
        return {"url": self.url, "device": self.device, "passes": self.passes, "deferred_s": self.deferred,
                "last_pass_ns": self.last_pass_ns,
                "last_error": self.last_error, "paused": self.paused, **self.last_report}


async def sync_service(daemon, task_status=trio.TASK_STATUS_IGNORED, interval: float | None = None) -> None:
    """Run passes while the mount lives; hands a :class:`GroupSync` (or None: no group) to ``started``."""
    j = daemon.journal
    st = await trio.to_thread.run_sync(S.load, j.path)
    if st is None or st.left or daemon.rec is None:
        task_status.started(None)
        return
    from . import open_store

    cfg = daemon.cfg
    io = MountIO(j, cfg.src, cfg.mnt, daemon.ops, daemon.rec)
    handle = GroupSync(url=st.url, device=st.device, interval=interval or DEFAULT_INTERVAL, daemon=daemon, io=io,
                       paused=st.paused)
    level = getattr(cfg, "guard", None) or "normal"
    if level != "off":
        from .incoming import IncomingGuard

        handle.guard = IncomingGuard(level)
    task_status.started(handle)
    while True:
        with trio.move_on_after(max(handle.interval - QUIET_S, 0.0)):
            await handle.wake.wait()
        if not handle.wake.is_set() and not handle.paused:
            await _while_busy(handle, j)
        handle.wake = trio.Event()
        if handle.paused:
            continue
        await run_now(handle, daemon, io, open_store)


def _head(journal) -> int:
    with journal.reader() as r:
        return r.head_seq()


async def _while_busy(handle: GroupSync, journal) -> None:
    """A timed pass waits while local saves pour in (at most MAX_DEFER_S): a pass's work per
    new path (reading its records, an event, its chunks) runs under the GIL the FUSE
    handlers share, and would slow a bulk copy down by as much; after it, one pass takes
    the whole copy.  A single save never waits (it is far below BUSY_RECORDS)."""
    h0 = await trio.to_thread.run_sync(_head, journal)
    give_up = trio.current_time() + MAX_DEFER_S
    while True:
        with trio.move_on_after(QUIET_S):
            await handle.wake.wait()
        if handle.wake.is_set() or trio.current_time() >= give_up:
            return
        h1 = await trio.to_thread.run_sync(_head, journal)
        if h1 - h0 < BUSY_RECORDS:
            return
        h0 = h1
        handle.deferred += 1


async def run_now(handle: GroupSync, daemon, io, open_store, action=None, asked: bool = False) -> dict:
    """One pass (and ``action(engine)`` inside it, e.g. a resolve) in a worker thread;
    ``asked``: a request (`group sync -m MNT`) that gets the pass's error, not an empty report."""
    async with handle.lock:
        await daemon.rec.drain()  # the journal holds every save made so far

        def one_pass():
            jdir = daemon.journal.path
            st, handle.state = handle.state, None
            if st is None or handle.state_id is None or S.identity(jdir) != handle.state_id:
                st = S.load(jdir)
            if st is None or st.left or st.paused:
                return {}
            store = open_store(st.url, daemon.journal.path, st.endpoint_url)
            with store:
                eng = Engine(daemon.journal, daemon.cfg.src, store, st, io, guard=handle.guard)
                out = {}
                if action is not None:
                    eng.recover_intents()
                    eng.detect_local()
                    out = action(eng)
                rep = eng.run_pass()
                handle.state, handle.state_id = st, S.identity(jdir)
                return {**rep, **({"result": out} if out else {})}

        try:
            rep = await trio.to_thread.run_sync(one_pass, abandon_on_cancel=True)
        except Exception as e:  # noqa: BLE001 - logged once per distinct error, retried next pass
            msg = str(e)
            if msg != handle.last_error:
                log.error("sync with group %s failed (retried every %.0fs): %s", handle.url, handle.interval, msg,
                          exc_info=not hasattr(e, "exit_code"))
            handle.last_error = msg
            if action is not None or asked:
                raise
            return {}
        if handle.last_error is not None:
            log.warning("sync with group %s works again", handle.url)
        handle.last_error = None
        handle.passes += 1
        handle.last_pass_ns = time.time_ns()
        handle.last_report = {k: v for k, v in rep.items() if k != "result"}
        return rep
