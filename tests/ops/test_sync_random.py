"""Seeded randomized sync harness, no kernel (docs/sync.md).

Members are journals + SRC directories driven by the sync engine directly
(deltafs.sync.Engine with LocalIO); local edits are journaled with the
same one-path capture the unmounted apply uses.  Random edits, renames and
deletes on 2-3 members, random partial syncs (partitions), HLC clocks
offset by up to 10 minutes.  After every heal (everyone syncs until
nothing moves) it checks:

* convergence: the same open conflicts on every member (same path, same
  set of versions), and the same tree outside conflicted paths;
* nothing silently overwritten: every content that was ever published is
  still in some member's tree or conflict heads, unless a member edited,
  deleted or resolved it *while seeing it* (the harness tracks what each
  member saw when it changed a file);
* no conflict for edits that were sequential (a mode where each edit is
  preceded and followed by a full sync);
* resolving every conflict converges to one tree.

DELTAFS_SYNC_SEEDS=N runs N seeds (default 100).
"""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest

from deltafs import sync
from deltafs.journal import Journal
from deltafs.sync import LocalIO
from deltafs.sync import state as S
from deltafs.sync.engine import Engine, state_key

SEEDS = int(os.environ.get("DELTAFS_SYNC_SEEDS", "100"))
PATHS = [b"a", b"b", b"c", b"d/e", b"d/f"]


class Member:
    def __init__(self, base: str, name: str, store: str, offset_ns: int) -> None:
        self.name = name
        self.src = os.path.join(base, name)
        os.makedirs(self.src)
        self.journal = Journal.open(os.path.join(base, name + ".j"), create=True,
                                    clock=lambda: time.time_ns() + offset_ns)
        self.io = LocalIO(self.journal, self.src)
        self.store_url = store
        self.offset = offset_ns

    def join(self) -> None:
        sync.join(self.journal, self.store_url)

    def sync(self) -> dict:
        st = S.load(self.journal.path)
        store = sync.open_store(st.url, self.journal.path)
        return Engine(self.journal, self.src, store, st, self.io,
                      clock=lambda: time.time_ns() + self.offset).run_pass()

    def read(self, p: bytes) -> bytes | None:
        full = os.path.join(os.fsencode(self.src), p)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                return f.read()
        return None

    def write(self, p: bytes, data: bytes) -> None:
        full = os.path.join(os.fsencode(self.src), p)
        if os.path.isdir(full):
            return
        parent = os.path.dirname(full)
        if os.path.isfile(parent):
            return
        os.makedirs(parent, exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        self.io.record([p.rpartition(b"/")[0], p] if b"/" in p else [p])

    def delete(self, p: bytes) -> None:
        os.unlink(os.path.join(os.fsencode(self.src), p))
        self.io.record([p])

    def rename(self, p: bytes, q: bytes) -> None:
        root = os.fsencode(self.src)
        if os.path.isdir(os.path.join(root, q)) or os.path.isfile(os.path.dirname(os.path.join(root, q))):
            return
        os.makedirs(os.path.dirname(os.path.join(root, q)), exist_ok=True)
        os.rename(os.path.join(root, p), os.path.join(root, q))
        self.io.record([p, q.rpartition(b"/")[0], q] if b"/" in q else [p, q])

    def tree(self) -> dict[bytes, bytes]:
        out = {}
        root = os.fsencode(self.src)
        for d, _, files in os.walk(root):
            for f in files:
                full = os.path.join(d, f)
                with open(full, "rb") as fh:
                    out[os.path.relpath(full, root)] = fh.read()
        return out

    def conflicts(self) -> dict[bytes, frozenset]:
        st = S.load(self.journal.path)
        return {p: frozenset([state_key(st.files.get(p))] + [state_key(h) for h in hs])
                for p, hs in st.conflicts.items()}

    def heads_content(self) -> set[bytes]:
        """Contents kept as conflict heads (remote branches), by their chunk lists."""
        st = S.load(self.journal.path)
        out = set()
        with self.journal.reader() as r:
            for hs in st.conflicts.values():
                for h in hs:
                    if h.get("k") == "f" and not h.get("x"):
                        out.add(b"".join(r.read_chunk(c) if r.has_chunk(c) else b"?" for c, _ in
                                         sync.store.unpack_list(h.get("l", b""))))
        return out


def heal(members, rounds: int = 6) -> None:
    for _ in range(rounds):
        moved = 0
        for m in members:
            rep = m.sync()
            moved += rep["published"] + rep["applied"] + rep["received"]
        if not moved:
            return
    raise AssertionError("the group did not settle")


def check_converged(members) -> dict:
    conf = [m.conflicts() for m in members]
    for c in conf[1:]:
        assert c == conf[0], f"open conflicts differ: {conf}"
    trees = []
    for m in members:
        t = {p: v for p, v in m.tree().items() if p not in conf[0]}
        trees.append(t)
    for t in trees[1:]:
        assert t == trees[0], "trees differ outside conflicts"
    return conf[0]


def run_seed(seed: int, base: str, sequential: bool = False) -> dict:
    rng = random.Random(seed)
    n = rng.choice([2, 3])
    store = f"file://{base}/store"
    members = [Member(base, f"m{i}", store, rng.randint(-600, 600) * 1_000_000_000) for i in range(n)]
    try:
        for m in members:
            m.join()
        written: set[bytes] = set()  # every content a member saved
        superseded: set[bytes] = set()  # contents a member changed while seeing them
        counter = 0
        for step in range(rng.randint(8, 25)):
            m = rng.choice(members)
            if sequential:
                heal(members)
            act = rng.random()
            p = rng.choice(PATHS)
            before = m.read(p)
            if act < 0.55 or before is None:
                counter += 1
                data = f"{m.name}:{counter}:{seed}".encode()
                m.write(p, data)
                if m.read(p) == data:
                    written.add(data)
                    if before is not None:
                        superseded.add(before)
            elif act < 0.75:
                m.delete(p)
                superseded.add(before)
            elif act < 0.9:
                q = rng.choice([x for x in PATHS if x != p])
                dest = m.read(q)
                m.rename(p, q)
                if m.read(q) == before and dest is not None:
                    superseded.add(dest)  # renamed over: the user saw and replaced it
            else:
                for other in rng.sample(members, rng.randint(1, n)):  # a partial sync (partition)
                    other.sync()
            if sequential:
                heal(members)
        heal(members)
        conflicts = check_converged(members)
        present = set()
        for m in members:
            present.update(m.tree().values())
            present.update(m.heads_content())
        lost = written - present - superseded
        assert not lost, f"saves lost or silently overwritten: {sorted(lost)}"
        if sequential:
            assert not conflicts, f"conflicts for sequential edits: {conflicts}"
        # resolve everything somewhere, the group converges to one tree
        for p in sorted(conflicts):
            r = rng.choice(members)
            sync.resolve(r.journal, r.src, p, rng.choice(["local", "remote"]) if len(conflicts[p]) == 2 else "local")
        heal(members)
        assert check_converged(members) == {}
        trees = [m.tree() for m in members]
        assert all(t == trees[0] for t in trees)
        return {"members": n, "conflicts": len(conflicts)}
    finally:
        for m in members:
            m.journal.close()


@pytest.fixture
def base(tmp_path):
    d = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else str(tmp_path)
    path = os.path.join(d, f"deltafs-sync-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_random_groups_converge_and_lose_nothing(base):
    total = 0
    for seed in range(SEEDS):
        d = os.path.join(base, str(seed))
        os.makedirs(d)
        total += run_seed(seed, d)["conflicts"]
        shutil.rmtree(d)
    assert total > 0  # the harness does make concurrent edits


def test_sequential_edits_never_conflict(base):
    for seed in range(max(8, SEEDS // 10)):
        d = os.path.join(base, str(seed))
        os.makedirs(d)
        run_seed(seed, d, sequential=True)
        shutil.rmtree(d)
