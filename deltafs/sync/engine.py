"""One sync pass of a member: publish local changes, pull the others', apply (docs/sync.md).

The engine is blocking (run it in a thread from trio).  What it does to SRC
and the journal goes through an ``io`` object: :class:`deltafs.sync.local.LocalIO`
for an unmounted member; the mount's service gives its own.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import stat as _s
import time

from deltafs import chunking
from deltafs.errors import DeltafsError, MirrorError

from . import state as S
from . import store as G
from . import vv as V
from .local import View, journal_view, lstat, read_target, same_bytes, sync_hash

log = logging.getLogger(__name__)

APPLY_BATCH = 256  # intents journaled per commit
HEARTBEAT_NS = 60 * 1_000_000_000  # an idle member rewrites its head.json this often (status: last heard)
EMPTY_HASH = G.blake(b"")
# Faults a test cannot cause by timing: the process kills itself (SIGKILL) right after an
# apply batch reached SRC, before the journal recorded it ("after-write"), or in the middle of
# an upload: after its packs, after its segment, after its head.json, each before the sync
# state recorded it ("after-pack", "after-segment", "after-head"; tests/mount/test_sync_mount.py).
_KILL_POINT = os.environ.get("DELTAFS_TEST_SYNC_KILL")
# Devices whose own head.json this process has checked against its sync state (publish).
_HEAD_CHECKED: set[str] = set()


def _test_kill(point: str) -> None:
    if _KILL_POINT == point:
        os.kill(os.getpid(), signal.SIGKILL)


def device_of(journal_id: str) -> str:
    return journal_id.replace("-", "")[:16]


def head_id(ev: dict) -> str:
    return f"{ev.get('d', '?')}:{ev.get('n', 0)}"


def _deleted(ev: dict | None) -> bool:
    return ev is None or bool(ev.get("x"))


def same_state(a: dict | None, b: dict | None) -> bool:
    """Equal content (or both gone): never a conflict."""
    if _deleted(a) or _deleted(b):
        return _deleted(a) and _deleted(b)
    if a["k"] != b["k"]:
        return False
    if a["k"] == "f":
        return a.get("c") == b.get("c") and a.get("m") == b.get("m")
    if a["k"] == "l":
        return a.get("tg") == b.get("tg")
    return True


def state_key(ev: dict | None) -> tuple:
    """What makes two states equal (same_state), hashable: a conflict is the set of its states' keys."""
    if _deleted(ev):
        return ("x",)
    if ev["k"] == "f":
        return ("f", bytes(ev.get("c") or b""), ev.get("m"))
    if ev["k"] == "l":
        return ("l", bytes(ev.get("tg") or b""))
    return (ev["k"],)


def same_local(cur: dict | None, v: View) -> bool:
    """Does the journal's view of a path still equal its synced state (no local change)?"""
    if _deleted(cur):
        return v.kind is None
    if v.kind is None or v.kind != cur["k"]:
        return False
    if v.kind == "f":
        return (cur.get("ls") == v.seq or (v.chash or EMPTY_HASH) == cur.get("c")) and cur.get("m") == v.mode
    if v.kind == "l":
        return cur.get("tg") == v.target
    return True


_COPY_RE = re.compile(rb"\.conflict-[0-9a-f]{16}-[0-9]+(\.[^./]*)?$")


def conflict_copy_name(p: bytes, ev: dict) -> bytes:
    """Where --conflict-copies puts a remote head: NAME.conflict-DEVICE-N.EXT beside p."""
    head, _, name = p.rpartition(b"/")
    stem, dot, ext = name.rpartition(b".")
    if not stem:  # no extension (or a dot file): the suffix goes at the end
        stem, dot, ext = name, b"", b""
    tag = f".conflict-{ev.get('d', '0' * 16)}-{ev.get('n', 0)}".encode()
    return (head + b"/" if head else b"") + stem + tag + dot + ext


def is_conflict_copy(p: bytes) -> bool:
    """A conflict copy's name: never published (docs/sync.md)."""
    return _COPY_RE.search(p.rpartition(b"/")[2]) is not None


def in_src(src: str, p: bytes, t: dict) -> bool:
    """Does SRC already hold state t at p?"""
    st = lstat(src, p)
    if t.get("x"):
        return st is None
    if st is None:
        return False
    if t["k"] == "d":
        return _s.S_ISDIR(st.st_mode)
    if t["k"] == "l":
        return _s.S_ISLNK(st.st_mode) and read_target(src, p) == t["tg"]
    return (st.st_mode & 0o7777) == (t.get("m") or 0o644) and same_bytes(src, p, G.unpack_list(t.get("l", b"")))


def finished_intents(journal_dir: str, src: str) -> dict[bytes, str]:
    """Intents a crash left that SRC already holds: path -> "DEVICE:N".  The scan that
    journals them (the next mount's, or an unmounted pass's) tags them with that origin
    and cause ``sync``, as the apply would have (docs/sync.md, "Crash mid-apply")."""
    st = S.load(journal_dir)
    if st is None or not st.intents:
        return {}
    out = {}
    for p, t in st.intents.items():
        try:
            if in_src(src, p, t):
                out[p] = head_id(t)
        except OSError:
            continue
    return out


class PassReport(dict):
    pass


def _cache_records(r, seen: dict) -> None:
    """Make this reader (a fresh one, detect_local's alone) answer ``record(seq)`` from
    records already decoded: journal_view and chunk_list ask for a new file's content and
    last records, which the detection loop has just read."""
    real = r.record
    r.record = lambda seq: seen[seq] if seq in seen else real(seq)


def _apply_order(intents: dict) -> list:
    """The order intents are applied in: deletes first, deepest first (a directory's
    children before it, or its delete would find it not empty and keep it), then the
    others in the order they came.  Deletes first also make a case-only rename (a -> A)
    right on a case-insensitive SRC: a is gone before A is written (docs/sync.md)."""
    gone = sorted((kv for kv in intents.items() if kv[1].get("x")), key=lambda kv: kv[0], reverse=True)
    return gone + [kv for kv in intents.items() if not kv[1].get("x")]


class Engine:
    def __init__(self, journal, src: str, store, st: S.SyncState, io, *, clock=time.time_ns,
                 publish: bool = True, guard=None) -> None:
        self.guard = guard  # incoming.IncomingGuard: scores a peer's segment before it is applied
        self.publishing = publish  # False: a plain clone, which never writes into the store
        self.journal = journal
        self.jdir = journal.path
        self.src = src
        self.store = store
        self.st = st
        self.io = io
        self.dev = st.device
        self.clock = clock
        self.report = PassReport(published=0, received=0, applied=0, conflicts=0, merged=0, pending=0, held=0)
        self.dirty = False  # state changed since the last save
        self.in_pass = False  # run_pass: steps mark the state dirty; it is saved when it must be
        self._queued: set | None = None  # st.outbox_chunks as a set (_local_event)
        self._conflicted: set[bytes] = set()  # paths that met a concurrent remote change (report "conflicts")

    def save(self) -> None:
        S.save(self.jdir, self.st)
        self.dirty = False

    def checkpoint(self) -> None:
        """A step's changes are done.  Alone (resolve, leave) the state is saved now; in a
        pass it is saved once at the end, or sooner where it must be durable: before
        SRC changes (execute_intents), before and after an upload (publish).  A crash
        or an error in between rewinds the state to that save, which every step
        meets again as it met it the first time (docs/sync.md, "Crash safety")."""
        if self.in_pass:
            self.dirty = True
        else:
            self.save()

    # ---- the pass ---------------------------------------------------------------
    def run_pass(self, pull: bool = True) -> PassReport:
        self.in_pass = True
        try:
            self.recover_intents()
            self.detect_local()
            self.publish()
            self.retry_pending()
            if pull:
                self.pull()
            self.execute_intents()
            self.publish(force_head=pull)
        finally:
            self.in_pass = False
        if self.dirty:
            self.save()
        self.report["pending"] = sum(len(v) for v in self.st.pending.values())
        self.report["open_conflicts"] = len(self.st.conflicts)
        return self.report

    # ---- local changes -> events ----------------------------------------------------
    def detect_local(self) -> int:
        st = self.st
        with self.journal.reader() as r:
            head = r.head_seq()
            if head <= st.cursor:
                return 0
            touched: set[bytes] = set()
            saves: dict[bytes, list] = {}  # path -> its local content versions in this range, in order
            latest: dict[bytes, object] = {}  # path -> its last record in the range
            for rec in r.records(st.cursor + 1, head):
                for p in (rec.path, rec.path2):
                    if p:
                        touched.add(p)
                        latest[p] = rec
                if rec.is_content and rec.origin is None and rec.version_hash:
                    saves.setdefault(rec.path, []).append(rec)
                elif rec.op in ("rename", "unlink") and rec.path in saves:
                    del saves[rec.path]  # (its versions went elsewhere, or away: the states say it)
                if rec.op == "rename":
                    for p in (rec.path, rec.path2):
                        pre = p + b"/"
                        touched.update(k for k in st.files if k.startswith(pre))
                        touched.update(q for q, _, _ in r.current_tree(pre))
            # a path's last record and last content version: what journal_view reads (one
            # or two records a path, not the whole range)
            _cache_records(r, {rec.seq: rec for recs in (latest.values(), (v[-1] for v in saves.values()))
                               for rec in recs})
            made = 0
            for p in sorted(touched):
                if p in st.intents:
                    continue  # being applied: execute_intents checks it is still untouched
                if is_conflict_copy(p):
                    continue  # a conflict copy is this member's own: never published
                v = journal_view(r, p)
                if v.kind == "n":
                    continue
                cur = st.files.get(p)
                if same_local(cur, v):
                    if cur is not None and v.kind == "f" and cur.get("ls") != v.seq:
                        st.files[p] = dict(cur, ls=v.seq)  # (a new value: S.CACHED)
                        self.dirty = True
                    continue
                if cur is None and v.kind is None:
                    continue
                if v.kind == "f" and not is_conflict_copy(p):
                    # every save between two passes is a version on every member (docs/sync.md),
                    # a conflicted path's too: each event includes the one before it, so a peer
                    # keeps one head for it (the newest) and a member that took this side
                    # applies each save in turn
                    for rec in saves.get(p, [])[:-1]:
                        if rec.seq == v.seq or (cur is not None and sync_hash(r, rec) == cur.get("c")):
                            continue
                        refs = r.chunk_list(rec.seq)
                        mid = View(kind="f", seq=rec.seq, size=sum(n for _, n in refs), mode=v.mode,
                                   mtime_ns=rec.mtime_ns, chash=sync_hash(r, rec), hlc=rec.hlc)
                        cur = self._local_event(r, p, mid, cur)
                        made += 1
                full = self._local_event(r, p, v, cur)
                made += 1
                if full.get("x") and st.conflicts.get(p):
                    # deleted while in conflict: a delete never wins over the concurrent edits
                    target, rest = self._edit_over_delete(full, st.conflicts.pop(p))
                    if rest:
                        st.conflicts[p] = rest
                    st.intents[p] = target
            st.cursor = head
        if made:
            self.checkpoint()
        else:
            self.dirty = True  # (the cursor)
        return made

    def _local_event(self, r, p: bytes, v: View, cur: dict | None, base_v: dict | None = None,
                     extra: dict | None = None) -> dict:
        st = self.st
        n = st.numbered + 1
        vec = dict(cur["v"] if base_v is None else base_v) if cur or base_v else {}
        vec[self.dev] = n
        ev = {"p": p, "k": v.kind or (cur["k"] if cur else "f"), "x": v.kind is None, "v": vec,
              "h": v.hlc or (self.clock() // 1_000_000) << 16, **(extra or {})}
        if cur is not None and not cur.get("x") and cur.get("k") == "f" and cur.get("c"):
            ev["pc"] = cur["c"]  # the content this change was made on (resolve --merge: the ancestor)
        if v.kind == "f":
            refs = r.chunk_list(v.seq) if v.seq else []
            ev.update(c=v.chash or EMPTY_HASH, l=G.pack_list(refs), s=v.size, m=v.mode, t=v.mtime_ns, o=v.seq)
            if self._queued is None:
                self._queued = set(st.outbox_chunks)
            queued = self._queued
            for cid, ln in refs:
                if cid not in st.chunks and cid not in queued and cid != chunking.zero_id(ln):
                    st.outbox_chunks.append(cid)
                    queued.add(cid)
        elif v.kind == "l":
            ev["tg"] = v.target
        elif v.kind == "d":
            ev["m"] = v.mode
        value, h = G.event_value(st.last_hash, ev)
        st.outbox.append(value)
        st.last_hash, st.numbered = h, n
        full = dict(ev, d=self.dev, n=n, ls=v.seq, eq=[vec])
        st.files[p] = full
        return full

    # ---- publishing ---------------------------------------------------------------------
    def publish(self, force_head: bool = False) -> int:
        st = self.st
        seen = {d: p.get("n", 0) for d, p in st.peers.items()}
        if not self.publishing or not st.outbox and not force_head:
            return 0
        if not st.outbox and seen == st.head_seen and self.clock() - st.head_ns < HEARTBEAT_NS and not st.left:
            return 0  # nothing new to say: head.json is rewritten only as a heartbeat
        orphans = self._adopt_own_head()
        if st.outbox:
            self.save()  # the events are durable before any of them is uploaded
        if st.outbox_chunks:
            with self.journal.reader() as r:
                items = []
                for cid in st.outbox_chunks:
                    if cid in st.chunks:
                        continue
                    items.append((cid, chunking.compress_chunk(r.read_chunk(cid))))
            from deltafs.mirrors import format as F

            for group in F.split_packs(items):
                data = G.encode_pack(group)
                name = G.pack_name(self.dev, data)
                self.store.put(name, data)
                off = len(F.PACK_MAGIC)
                for cid, val in group:
                    st.chunks[cid] = [name, off, len(val)]
                    off += len(val)
                st.packs.append(name)
            _test_kill("after-pack")
        n = len(st.outbox)
        if n:
            first, last = st.published + 1, st.numbered
            name = G.segment_name(self.dev, first, last)
            self.store.put(name, G.encode_segment(self.dev, first, last, list(st.outbox)))
            st.segments.append({"name": name, "first": first, "last": last})
            _test_kill("after-segment")
        head = G.Head(device=self.dev, name=st.name, last=st.numbered, last_hash=st.last_hash.hex(),
                      segments=st.segments, packs=st.packs,
                      seen=seen, left=st.left, updated_ns=self.clock())
        self.store.put(G.head_name(self.dev), head.encode())
        if n:
            _test_kill("after-head")
        if orphans:
            self._remove_orphans(orphans, {s["name"] for s in st.segments} | set(st.packs))
        st.head_ns, st.head_seen = head.updated_ns, seen
        st.published = st.numbered
        st.outbox, st.outbox_chunks = [], []
        self._queued = None
        self.report["published"] += n
        if n or not self.in_pass:
            self.save()  # uploaded: not published a second time after an error later in the pass
        else:
            self.dirty = True  # a heartbeat (head.json only): written again if this is lost
        return n

    def _adopt_own_head(self) -> list[str]:
        """Once per process: does the store's head.json of this device name more than the
        state says was published?  Then a crash (kill -9) came after the head was written
        and before the state recorded it: its segments and packs are published, and peers
        may have read them.  Take them as published, so the outbox's first events are not
        published a second time under another segment name (peers would see the stream
        change under them).

        -> this device's orphans: the objects under its own prefix (never a peer's) that
        neither that head nor the state names, listed before this publish writes anything,
        so older than the head reconciled with: a crash before the head write left them
        (peers never read an object no head names).  publish removes them once its own
        head is written."""
        st = self.st
        if self.dev in _HEAD_CHECKED or st.left:
            return []
        head = G.read_head(self.store, self.dev)
        if head is not None and head.last > st.published:
            k = head.last - st.published
            if k > len(st.outbox) or bytes(st.outbox[k - 1][:G.HASH_LEN]).hex() != head.last_hash:
                raise G.GroupCorruptError(f"group store {self.store.url}: {G.head_name(self.dev)} names events "
                                          f"this member never made (up to {head.last}; it made {st.numbered}): "
                                          "is a copy of this journal a member too?")
            log.warning("sync: events %d-%d were published before a crash recorded it: taken as published",
                        st.published + 1, head.last)
            for name in head.packs:
                if name not in st.packs:
                    for cid, off, ln in G.read_pack_index(self.store, name):
                        st.chunks.setdefault(cid, [name, off, ln])
            st.segments, st.packs = list(head.segments), list(head.packs)
            st.outbox = st.outbox[k:]
            st.published = head.last
            st.head_ns, st.head_seen = head.updated_ns, dict(head.seen)
            self.save()
        _HEAD_CHECKED.add(self.dev)
        named = {s["name"] for s in st.segments} | set(st.packs)
        if head is not None:
            named |= {s["name"] for s in head.segments} | set(head.packs)
        try:
            return [name for name, _ in self.store.list(f"members/{self.dev}/") if name not in named]
        except MirrorError as e:
            log.warning("sync: cannot list this member's objects in %s (orphans stay): %s", self.store.url, e)
            return []

    def _remove_orphans(self, orphans: list[str], named: set[str]) -> None:
        """Delete this device's objects a crash left unnamed (after the new head.json)."""
        gone = 0
        for name in orphans:
            if name in named:
                continue  # written again by this publish (the same segment range, the same pack)
            try:
                self.store.delete(name)
                gone += 1
            except MirrorError as e:
                log.warning("sync: cannot remove the orphan %s from %s: %s", name, self.store.url, e)
        if gone:
            log.info("sync: removed %d object(s) of this member that a crash before its head.json left "
                        "in %s", gone, self.store.url)
        self.report["orphans_removed"] = self.report.get("orphans_removed", 0) + gone

    # ---- pulling --------------------------------------------------------------------------
    def pull(self) -> int:
        st = self.st
        got = 0
        for dev in G.list_members(self.store):
            if dev == self.dev:
                continue
            head = G.read_head(self.store, dev)
            if head is None:
                continue
            peer = st.peers.setdefault(dev, {"n": 0, "hash": bytes(32), "packs": []})
            if peer.get("seen_ns") != head.updated_ns or peer.get("last") != head.last:
                peer["heard_ns"] = time.time_ns()  # by this machine's clock (the peer's may be off)
                self.dirty = True  # what the peer has seen of us (status: pending out) is kept
            peer.update(name=head.name, last=head.last, seen_ns=head.updated_ns, left=head.left,
                        seen=dict(head.seen))
            for name in head.packs:
                if name in peer["packs"]:
                    continue
                for cid, off, ln in G.read_pack_index(self.store, name):
                    st.chunks.setdefault(cid, [name, off, ln])
                peer["packs"].append(name)
            for seg in head.segments:
                if seg["last"] <= peer["n"]:
                    continue
                if peer.get("held"):
                    self.report["held"] += 1
                    break  # the guard holds this peer until `deltafs guard resume`
                if seg["first"] != peer["n"] + 1:
                    raise G.GroupCorruptError(f"group store {self.store.url}: {dev}'s segments changed "
                                              f"under this member (expected one from event {peer['n'] + 1})")
                events, h = G.decode_segment(self.store.get(seg["name"]), seg["name"], self.store.url, dev,
                                             seg["first"], seg["last"], peer["hash"])
                trusted = peer.get("trusted", 0)  # events let through by a guard resume
                if self.guard is not None and seg["last"] > trusted:
                    alert = self.guard.check(self, dev, [e for e in events if e.get("n", 0) > trusted])
                    if alert is not None:
                        from .incoming import describe

                        peer["held"] = {"from": seg["first"], "time_ns": time.time_ns(), **describe(alert)}
                        log.error("sync: the damage guard holds peer %s (%s): its events from %d on trip the "
                                  "detector (score %.2f >= %s, e.g. %s); nothing of them is applied until "
                                  "`deltafs guard resume`", dev, head.name, seg["first"], alert.score,
                                  alert.threshold, b", ".join(h_.key for h_ in alert.hits[:3]).decode(errors="replace"))
                        self.report["held"] += 1
                        self.save()
                        break
                for ev in events:
                    t = st.intents.get(ev["p"])
                    if t is not None and not ev.get("x") and V.includes(ev["v"], t["v"]):
                        self.execute_intents()  # a later save of the same path: apply each in turn
                    self.handle(ev)
                    got += 1
                peer["n"], peer["hash"] = seg["last"], h
                self.checkpoint()
        if got and self.in_pass and not st.intents:
            # the peers' positions are durable before anything later in the pass can fail, so
            # the incoming guard never scores these segments twice (with intents,
            # execute_intents' first save records them)
            self.save()
        self.report["received"] += got
        return got

    def effective(self, p: bytes) -> dict | None:
        return self.st.intents.get(p) or self.st.files.get(p)

    def _settled(self, p: bytes) -> bool:
        if p in self.st.intents:
            return True
        if self.st.pending.get(p):
            return False
        with self.journal.reader() as r:
            v = journal_view(r, p)
        return same_local(self.st.files.get(p), v) and self.io.settled(p, v) and not self.io.busy(p)

    def handle(self, ev: dict) -> str:
        """Decide what a remote event means here (docs/sync.md, the rules)."""
        st = self.st
        p = ev["p"]
        self.dirty = True
        if is_conflict_copy(p):
            return "known"  # (never published; a member of an older version may have)
        if not self._settled(p):
            st.pending.setdefault(p, []).append(ev)
            return "pending"
        cur = self.effective(p)
        if cur is None:
            cur = {"p": p, "k": ev["k"], "x": True, "v": {}}
        heads = st.conflicts.get(p, [])
        cv = cur["v"]  # everything known about p (rejected deletes, equal states included)
        eqs = cur.get("eq") or [cv]  # vectors of the versions whose state p holds now
        if V.includes(cv, ev["v"]) or any(V.includes(h["v"], ev["v"]) for h in heads):
            return "known"
        heads = [h for h in heads if not V.includes(ev["v"], h["v"])]
        target, apply = None, False
        if any(V.includes(ev["v"], q) for q in eqs):  # made on top of what p holds: newer
            target, apply = dict(ev, v=V.merge(cv, ev["v"]), eq=[ev["v"]]), True
        elif same_state(cur, ev):
            target = dict(cur, v=V.merge(cv, ev["v"]), eq=eqs + [ev["v"]])
            self.report["merged"] += 1
        elif _deleted(cur):  # a delete never wins over a concurrent edit: it comes back
            target, apply = dict(ev, v=V.merge(cv, ev["v"]), eq=[ev["v"]]), True
        elif _deleted(ev):  # the edit stays; the delete is known (and rejected)
            target = dict(cur, v=V.merge(cv, ev["v"]), eq=eqs)
        else:
            heads.append(ev)
            self._conflicted.add(p)
            self.report["conflicts"] = len(self._conflicted)  # files, not events (a file's saves are several)
            log.info("conflict on %r: local %s, remote %s", p, head_id(cur), head_id(ev))
            if st.conflict_copies and ev.get("k") == "f":  # also as a file beside it (applied as a sync)
                cp = conflict_copy_name(p, ev)
                if cp not in st.files and self._settled(cp):
                    st.intents[cp] = dict(ev, p=cp, eq=[ev["v"]])
        if target is not None:
            keep = []
            for h in heads:
                if any(V.includes(q, h["v"]) for q in target["eq"]):
                    continue
                if same_state(target, h):
                    target["v"] = V.merge(target["v"], h["v"])
                    target["eq"] = target["eq"] + [h["v"]]
                    continue
                keep.append(h)
            heads = keep
            if _deleted(target) and heads:  # the delete lost to the concurrent edits: one comes back
                target, heads = self._edit_over_delete(target, heads)
                apply = True
        if heads:
            st.conflicts[p] = heads
        else:
            st.conflicts.pop(p, None)
        if target is None:
            return "conflict"
        if apply:
            st.intents[p] = target
            return "apply"
        if p in st.intents:
            st.intents[p] = dict(st.intents[p], v=target["v"], eq=target["eq"])
        else:
            st.files[p] = dict(st.files.get(p) or {}, **target)
        return "merged"

    @staticmethod
    def _edit_over_delete(target: dict, heads: list) -> tuple[dict, list]:
        """A delete with concurrent edits left: the edits win; the same one on every member."""
        h = max(heads, key=lambda e: (state_key(e), head_id(e)))
        rest = [e for e in heads if e is not h]
        return dict(h, v=V.merge(target["v"], h["v"]), eq=[h["v"]]), rest

    def retry_pending(self) -> None:
        st = self.st
        for p in sorted(st.pending):
            evs = st.pending.pop(p)
            if not self._settled(p):
                st.pending[p] = evs
                continue
            for ev in evs:
                self.handle(ev)

    # ---- applying ---------------------------------------------------------------------------
    def _pieces(self, refs):
        """The bytes of a chunk list, chunk by chunk, each checked against its id."""
        with self.journal.reader() as r:
            for cid, ln in refs:
                if cid == chunking.zero_id(ln):
                    yield bytes(ln)
                elif r.has_chunk(cid):
                    yield r.read_chunk(cid)
                else:
                    loc = self.st.chunks.get(cid)
                    if loc is None:
                        raise G.GroupCorruptError(f"group store {self.store.url}: chunk {cid.hex()} is in no pack")
                    name, off, n = loc
                    payload = self.store.get_range(name, off, n)
                    try:
                        raw = chunking.decompress_chunk(payload)
                    except Exception as e:  # noqa: BLE001
                        raise G.GroupCorruptError(f"group store {self.store.url}: chunk {cid.hex()} in {name} "
                                                  f"cannot be decoded: {e}") from None
                    if len(raw) != ln or chunking.chunk_id(raw) != cid:
                        raise G.GroupCorruptError(f"group store {self.store.url}: chunk {cid.hex()} in {name} "
                                                  "does not match its id")
                    yield raw

    def _write(self, p: bytes, t: dict, created: list) -> dict:
        """Make SRC hold state t at p; -> the state actually reached."""
        io = self.io
        if t.get("x"):
            if not io.remove(p):  # a directory with files this delete did not know: it stays
                return dict(t, x=False, k="d")
        elif t["k"] == "f":
            io.write_file(p, self._pieces(G.unpack_list(t.get("l", b""))), t.get("m") or 0o644, t.get("t"), created)
        elif t["k"] == "l":
            io.write_symlink(p, t["tg"], created)
        elif t["k"] == "d":
            io.make_dir(p, t.get("m") or 0o755, created)
        return t

    def _in_src(self, p: bytes, t: dict) -> bool:
        return in_src(self.src, p, t)

    def execute_intents(self) -> int:
        st = self.st
        done = 0
        while st.intents:
            batch = _apply_order(st.intents)[:APPLY_BATCH]
            self.save()  # the intents are durable before SRC changes
            touched: list[bytes] = []
            reached: dict[bytes, dict] = {}
            for p, t in batch:
                created: list[bytes] = []
                if self.io.busy(p) or not self.io.settled(p, self._view(p)):
                    del st.intents[p]  # a local change came in: meet it after its detection
                    st.pending.setdefault(p, []).append(t)
                    continue
                self.io.tag(p, head_id(t))  # journaled with cause sync and this origin
                try:
                    reached[p] = self._write(p, t, created)
                except (OSError, MirrorError, DeltafsError) as e:
                    log.warning("sync: cannot apply %s to %s: %s (retried next pass)", head_id(t), p, e)
                    self.io.untag(p)
                    del st.intents[p]
                    st.pending.setdefault(p, []).append(t)
                    continue
                touched.append(p)
                touched.extend(created)
                for c in created:
                    if reached.get(c) is not None and reached[c].get("x"):
                        # a delete this batch made, lost to a file added inside: present again
                        reached[c] = dict(reached[c], x=False, k="d")
                    else:
                        reached.setdefault(c, None)
            if touched:
                self.io.flush()
                _test_kill("after-write")  # tests only: kill -9 between SRC and the journal
            seqs = self.io.record(touched) if touched else {}
            with self.journal.reader() as r:
                for p, t in reached.items():
                    v = journal_view(r, p)
                    if t is None:  # a parent directory made for a child: present, vector unchanged
                        old = st.files.get(p)
                        t = dict(old or {"p": p, "v": {}}, k="d", x=False, m=v.mode)
                        t.setdefault("eq", [t["v"]])
                    else:
                        st.intents.pop(p, None)
                        seq = seqs.get(p) or (v.seq if v.kind == "f" and v.seq != (st.files.get(p) or {}).get("ls")
                                              else 0)
                        if seq:
                            st.origins[seq] = head_id(t)  # which device's version this journal version is
                        done += 1
                    st.files[p] = dict(t, ls=v.seq)
            self.checkpoint()  # (the next batch's save, or the pass's, records it)
        self.report["applied"] += done
        return done

    def _view(self, p: bytes) -> View:
        with self.journal.reader() as r:
            return journal_view(r, p)

    def recover_intents(self) -> int:
        """Intents left by a crash: finish them, or meet them again after detection."""
        st = self.st
        if not st.intents:
            return 0
        n = 0
        for p, t in list(st.intents.items()):
            v = self._view(p)
            if self._in_src(p, t):
                if not (v.kind is None if t.get("x") else v.kind == t["k"] and
                        (t["k"] != "f" or v.chash == t.get("c"))):
                    self.io.tag(p, head_id(t))
                    self.io.record([p])
                    v = self._view(p)
                if v.kind == "f" and v.seq and v.seq != (st.files.get(p) or {}).get("ls"):
                    st.origins[v.seq] = head_id(t)
                st.files[p] = dict(t, ls=v.seq)
                del st.intents[p]
                n += 1
            elif same_local(st.files.get(p), v) and self.io.settled(p, v):
                continue  # SRC untouched: execute_intents applies it
            else:
                del st.intents[p]
                st.pending.setdefault(p, []).append(t)
        self.save()
        return n

    # ---- conflicts ----------------------------------------------------------------------------
    def resolve(self, p: bytes, take: str) -> dict:
        """End the conflict on p with the local state, the remote one, or a named head
        (``take`` "merge": a three-way text merge, :meth:`merge`)."""
        st = self.st
        heads = st.conflicts.get(p)
        if not heads:
            raise G.GroupError(f"{p.decode('utf-8', 'surrogateescape')} has no open conflict")
        cur = st.files.get(p)
        if take == "merge":
            return self.merge(p, cur, heads)
        if take == "local":
            chosen = cur
        elif take == "remote":
            if len(heads) > 1:
                raise G.GroupError(f"{p.decode('utf-8', 'surrogateescape')} has {len(heads)} remote versions ("
                                   + ", ".join(head_id(h) for h in heads) + "): name one with --take DEVICE:N")
            chosen = heads[0]
        else:
            chosen = next((h for h in [cur, *heads] if h is not None and
                           (head_id(h) == take or head_id(h).startswith(take.split(":")[0]) and
                            head_id(h).endswith(":" + take.split(":")[-1]) and ":" in take)), None)
            if chosen is None:
                raise G.GroupError(f"{take!r} is none of the versions of {p.decode('utf-8', 'surrogateescape')} "
                                   f"in conflict ({', '.join(head_id(h) for h in [cur, *heads] if h)})")
        n = st.numbered + 1
        vec = V.merge(cur["v"] if cur else {}, *(h["v"] for h in heads))
        vec[self.dev] = n
        ev = {k: chosen[k] for k in ("p", "k", "x", "h", "c", "l", "s", "m", "t", "tg", "o") if k in (chosen or {})}
        ev.update(p=p, v=vec, r=[head_id(h) for h in [cur, *heads] if h])
        if "k" not in ev:
            ev.update(k="f", x=True)
        value, h = G.event_value(st.last_hash, ev)
        st.outbox.append(value)
        st.last_hash, st.numbered = h, n
        full = dict(ev, d=self.dev, n=n, eq=[vec])
        del st.conflicts[p]
        if chosen is cur:
            st.files[p] = dict(full, ls=(cur or {}).get("ls", 0))
        else:
            st.intents[p] = full
        return full  # the caller saves (execute_intents, publish)

    # ---- resolve --merge ----------------------------------------------------------------------
    def _ancestor(self, r, p: bytes, cur: dict, heads: list) -> bytes | None:
        """The common ancestor's bytes: the content each side's change was made on (``pc``),
        found in this journal's history of p; when the sides name different ones, the older
        (the other is a descendant of it on one side).  None: not known here."""
        want = {h.get("pc") for h in [cur, *heads] if h.get("pc")}
        if not want:
            return None
        found: dict = {}
        for seq in r.versions_under(p):  # newest first
            rec = r.record(seq)
            if rec.path == p and rec.is_content and rec.version_hash:
                h = sync_hash(r, rec)
                if h in want and h not in found:
                    found[h] = seq
        if not found:
            return None
        return r.read_content(min(found.values()))

    def merge(self, p: bytes, cur: dict | None, heads: list) -> dict:
        """resolve --merge: git merge-file of the local text, the ancestor and the one remote
        head.  Clean: the result is written (a version with cause sync, this member's resolve
        event as origin) and published as the resolution.  Not clean: the file gets the merge
        with conflict markers (a local save), the conflict stays open, MergeConflictError."""
        import subprocess
        import tempfile

        show = p.decode("utf-8", "surrogateescape")
        st = self.st
        if len(heads) > 1:
            raise G.GroupError(f"{show} has {len(heads)} remote versions: --merge takes one; end the others "
                               "first with --take")
        (h,) = heads
        if _deleted(cur) or _deleted(h) or cur.get("k") != "f" or h.get("k") != "f":
            raise G.GroupError(f"{show}: --merge merges two file contents; one side is "
                               f"{'deleted' if _deleted(cur) or _deleted(h) else 'not a file'}: use --take")
        with self.journal.reader() as r:
            local = r.read_content(cur["ls"]) if cur.get("ls") else b""
            base = self._ancestor(r, p, cur, heads)
        remote = b"".join(self._pieces(G.unpack_list(h.get("l", b""))))
        if base is None:
            raise G.GroupError(f"{show}: the common ancestor of {head_id(cur)} and {head_id(h)} is not in this "
                               "journal's history: --merge cannot tell what each side changed; use --take")
        if any(b"\0" in x[:1 << 20] for x in (local, base, remote)):
            raise G.GroupError(f"{show} is not a text file: --merge merges text; use --take")
        with tempfile.TemporaryDirectory(prefix="deltafs-merge-") as tmp:
            names = []
            for i, data in enumerate((local, base, remote)):
                names.append(os.path.join(tmp, str(i)))
                with open(names[-1], "wb") as f:
                    f.write(data)
            try:
                res = subprocess.run(["git", "merge-file", "-p", "-L", "local", "-L", "ancestor", "-L",
                                      head_id(h), *names], capture_output=True, check=False)
            except FileNotFoundError:
                raise G.GroupError("resolve --merge needs git (git merge-file): install it, or use --take") \
                    from None
        if res.returncode < 0 or res.returncode > 127:
            raise G.GroupError(f"{show}: git merge-file failed: {res.stderr.decode(errors='replace').strip()}")
        merged, clashes = res.stdout, res.returncode
        mode = cur.get("m") or 0o644
        created: list[bytes] = []
        if clashes:  # a local save with the markers; the conflict stays open
            self.io.write_file(p, [merged], mode, None, created)
            self.io.flush()
            self.io.record([*created, p])
            raise MergeConflictError(
                f"{show}: {clashes} change(s) of local and {head_id(h)} overlap: the file now holds the merge "
                f"with conflict markers (<<<<<<< local, >>>>>>> {head_id(h)}); the conflict stays open: edit the "
                f"file, then `deltafs resolve {show} --take local`")
        origin = f"{self.dev}:{st.numbered + 1}"
        self.io.tag(p, origin)
        try:
            self.io.write_file(p, [merged], mode, None, created)
            self.io.flush()
            self.io.record([*created, p])
        finally:
            self.io.untag(p)
        with self.journal.reader() as r:
            v = journal_view(r, p)
            full = self._local_event(r, p, v, cur, base_v=V.merge(cur["v"], h["v"]),
                                     extra={"r": [head_id(cur), head_id(h)]})
        if v.seq:
            st.origins[v.seq] = origin
        del st.conflicts[p]
        return full


class MergeConflictError(G.GroupError):
    """resolve --merge could not merge cleanly: the file holds conflict markers (exit 1)."""

    exit_code = 1
