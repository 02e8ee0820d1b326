"""Sync groups: several journals keep one tree through a shared store (docs/sync.md).

Public API::

    from deltafs import sync
    st = sync.join(journal, url, name="", endpoint_url=None, secrets=None, encrypt=False)
    sync.leave(journal)                  # marks the stream as left, forgets the state
    sync.membership(journal_dir) -> SyncState | None
    sync.run_pass(journal, src) -> PassReport        # unmounted: publish, pull, apply
    sync.conflicts(journal_dir) -> list[dict]
    sync.resolve(journal, src, path, take) -> dict   # then a pass publishes it
    sync.peers(journal_dir) -> list[dict]            # status: last seen, lag, pending in/out
"""

from __future__ import annotations

import os
import time

from . import state as S
from . import store as G
from . import vv as V
from .engine import Engine, PassReport, device_of, head_id
from .local import LocalIO
from .store import GroupCorruptError, GroupError
from .state import SyncState

__all__ = [
    "Engine", "GroupCorruptError", "GroupError", "LocalIO", "PassReport", "SyncState", "conflicts", "device_of",
    "head_id", "join", "leave", "membership", "open_store", "peers", "resolve", "resolve_each", "run_pass", "V",
]


def membership(journal_dir: str) -> SyncState | None:
    st = S.load(journal_dir)
    return None if st is None or st.left else st


def open_store(url: str, journal_dir: str, endpoint_url: str | None = None):
    """The group store as this journal sees it: sealed with the key it keeps for URL, or plain."""
    from deltafs.mirrors import keys, open_mirror

    return keys.open_for_journal(open_mirror(url, endpoint_url=endpoint_url), journal_dir)


def _prepare(journal, url: str, *, name: str = "", endpoint_url: str | None = None, secrets=None,
             encrypt: bool = False, create: bool = True) -> SyncState:
    from deltafs.mirrors import keys, open_mirror

    old = membership(journal.path)
    if old is not None:
        raise GroupError(f"this journal is already a member of the group at {old.url}: "
                         "`deltafs group leave` first")
    backend = open_mirror(url, endpoint_url=endpoint_url)
    backend.check()
    key = keys.add_or_unlock(backend, secrets or keys.Secrets(), encrypt=encrypt,
                             stored=keys.KeyStore(journal.path).load(backend.url))
    if key is not None:
        keys.KeyStore(journal.path).save(backend.url, key)
    store = open_store(url, journal.path, endpoint_url)
    g = G.create_group(store) if create else G.read_group(store)
    if g is None:
        raise GroupError(f"{backend.url} holds no sync group (no {G.GROUP_OBJ})")
    dev = device_of(journal.journal_id)
    prev = G.read_head(store, dev)
    if prev is not None and prev.last:
        raise GroupError(f"device {dev} already has a stream in {backend.url} (this journal left the group or "
                         "is a copy of a member's journal): join from a fresh clone "
                         "(`deltafs clone URL DEST --join`)")
    return SyncState(url=backend.url, device=dev, group_id=g["group_id"], name=name or os.uname().nodename,
                     endpoint_url=endpoint_url, joined_ns=time.time_ns())


def join(journal, url: str, *, name: str = "", endpoint_url: str | None = None, secrets=None,
         encrypt: bool = False, conflict_copies: bool = False) -> SyncState:
    """Make ``journal`` a member of the group stored at ``url`` (made if the store is empty)."""
    st = _prepare(journal, url, name=name, endpoint_url=endpoint_url, secrets=secrets, encrypt=encrypt)
    st.conflict_copies = conflict_copies
    S.save(journal.path, st)
    return st


def is_group_store(url: str, endpoint_url: str | None = None) -> bool:
    """Does the (plain) store at url hold a group? Encrypted stores cannot tell before unlocking."""
    from deltafs.mirrors import open_mirror

    with open_mirror(url, endpoint_url=endpoint_url) as backend:
        return backend.exists(G.GROUP_OBJ)


def clone(journal, src: str, url: str, *, join: bool, name: str = "", endpoint_url: str | None = None,
          secrets=None) -> PassReport:
    """The group's merged tree into an empty ``src`` with a new ``journal``; a member with ``join``."""
    st = _prepare(journal, url, name=name, endpoint_url=endpoint_url, secrets=secrets, create=False)
    S.save(journal.path, st)
    try:
        store = open_store(st.url, journal.path, st.endpoint_url)
        with store:
            eng = Engine(journal, src, store, st, LocalIO(journal, src), publish=join)
            rep = eng.run_pass()
    finally:
        if not join:
            S.remove(journal.path)
    return rep


def leave(journal) -> SyncState:
    st = membership(journal.path)
    if st is None:
        raise GroupError(f"journal {journal.path} is in no sync group")
    st.left = True
    store = open_store(st.url, journal.path, st.endpoint_url)
    eng = Engine(journal, "", store, st, None)
    eng.publish(force_head=True)
    S.remove(journal.path)
    return st


def _require(journal_dir: str) -> SyncState:
    st = membership(journal_dir)
    if st is None:
        raise GroupError(f"journal {journal_dir} is in no sync group: `deltafs group join URL` first")
    return st


def _active(journal_dir: str) -> SyncState:
    st = _require(journal_dir)
    if st.paused:
        raise GroupError(f"the sync group {st.url} is paused for this tree: `deltafs resume --group` first")
    return st


def set_paused(journal_dir: str, paused: bool) -> dict:
    """pause|resume --group on an unmounted tree (the state keeps it for the next mount)."""
    st = _require(journal_dir)
    was = st.paused
    st.paused = paused
    S.save(journal_dir, st)
    return {"url": st.url, "paused": paused, "was_paused": was}


def scan(journal, src: str) -> dict:
    """Journal what changed in an unmounted SRC (the mount-time scan), before a pass."""
    import trio

    from deltafs.capture import Recorder

    from .engine import finished_intents

    rec = Recorder(journal, src)
    try:
        hidden = os.stat(journal.path).st_ino
    except OSError:
        hidden = -1
    out: dict = {}
    rec.pipe.origins.update(finished_intents(journal.path, src))  # a crash mid-apply: still a sync

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(rec.run)
            out.update(await rec.scan(None, hidden))
            await rec.drain()
            nursery.cancel_scope.cancel()

    trio.run(go)
    return out


def run_pass(journal, src: str, *, pull: bool = True, scan_first: bool = True,
             guard_level: str = "normal") -> PassReport:
    """One pass for an unmounted member (this process holds the journal writer): scan SRC
    for local changes, then publish, pull and apply (``guard_level`` "off": incoming
    segments are not scored)."""
    from .incoming import IncomingGuard

    st = _active(journal.path)
    if scan_first:
        scan(journal, src)
    store = open_store(st.url, journal.path, st.endpoint_url)
    with store:
        guard = IncomingGuard(guard_level) if guard_level != "off" else None
        return Engine(journal, src, store, st, LocalIO(journal, src), guard=guard).run_pass(pull=pull)


def guard_resume(journal_dir: str) -> list[str]:
    """``deltafs guard resume``: release every peer the guard holds; the events they
    published so far are applied unscored.  -> the devices released."""
    st = membership(journal_dir)
    if st is None:
        return []
    out = []
    for dev, p in st.peers.items():
        if p.pop("held", None) is not None:
            p["trusted"] = p.get("last", 0)
            out.append(dev)
    if out:
        S.save(journal_dir, st)
    return out


def _show(p: bytes) -> str:
    return p.decode("utf-8", "surrogateescape")


def describe(ev: dict | None) -> dict:
    if ev is None:
        return {"version": None, "deleted": True}
    return {"version": head_id(ev), "deleted": bool(ev.get("x")), "kind": ev.get("k"), "size": ev.get("s"),
            "hlc": ev.get("h"), "time_ns": (ev.get("h", 0) >> 16) * 1_000_000, "vector": ev.get("v", {})}


def conflicts(journal_dir: str) -> list[dict]:
    st = _require(journal_dir)
    out = []
    for p in sorted(st.conflicts):
        cur = st.files.get(p)
        out.append({"path": _show(p), "local": describe(cur),
                    "remote": [describe(h) for h in st.conflicts[p]]})
    return out


def resolve(journal, src: str, path: bytes, take: str) -> dict:
    """End the conflict on ``path`` and publish the result (one pass)."""
    return resolve_many(journal, src, [path], take)[0]


def resolve_each(eng: Engine, paths, take: str, keep_going: bool = False) -> list[dict]:
    """``eng.resolve`` of every path, described.  ``keep_going`` (``resolve --all``): a path
    that does not resolve (a merge with overlapping changes, a refused --merge or --take)
    does not stop the others; its entry is ``{"error": message, "exit_code": 1|2}``."""
    out = []
    for p in paths:
        try:
            out.append(describe(eng.resolve(p, take)))
        except GroupError as e:
            if not keep_going:
                raise
            out.append({"error": str(e), "exit_code": getattr(e, "exit_code", 2)})
    return out


def resolve_many(journal, src: str, paths, take: str, keep_going: bool = False) -> list[dict]:
    """End the conflicts on ``paths`` with one scan, one apply batch and one upload
    (``keep_going``: see :func:`resolve_each`; what resolved is applied and published)."""
    st = _active(journal.path)
    scan(journal, src)
    store = open_store(st.url, journal.path, st.endpoint_url)
    with store:
        eng = Engine(journal, src, store, st, LocalIO(journal, src))
        eng.recover_intents()
        eng.detect_local()
        try:
            out = resolve_each(eng, paths, take, keep_going)
        finally:  # what resolved before an error is applied and published, as with --all
            eng.execute_intents()
            eng.publish()
        return out


def group_status(journal_dir: str, handle=None) -> dict | None:
    """``status``'s "group" object (None: the journal is in no group); ``handle``: the mount's service."""
    st = membership(journal_dir)
    if st is None:
        return None
    out = {"url": st.url, "device": st.device, "name": st.name, "published": st.published, "paused": st.paused,
           "pending_out": st.numbered - st.published, "pending_in": sum(len(v) for v in st.pending.values()),
           "conflicts": len(st.conflicts), "conflict_paths": [_show(p) for p in sorted(st.conflicts)[:10]],
           "peers": peers(journal_dir)}
    if handle is not None:
        out.update(service=handle.status())
    return out


def peers(journal_dir: str, now_ns: int | None = None) -> list[dict]:
    st = _require(journal_dir)
    now_ns = now_ns or time.time_ns()
    out = []
    for dev, p in sorted(st.peers.items()):
        seen_ns = p.get("heard_ns", 0)
        out.append({"device": dev, "name": p.get("name", ""), "left": p.get("left", False),
                    "last_seen_ns": seen_ns, "age_s": round((now_ns - seen_ns) / 1e9, 1) if seen_ns else None,
                    "events": p.get("last", 0), "pending_in": p.get("last", 0) - p.get("n", 0),
                    "held": p.get("held"),
                    "pending_out": st.numbered - p.get("seen", {}).get(st.device, 0)})
    return out
