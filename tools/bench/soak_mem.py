"""In-process memory soak (issue 18, part 4): what grows in the daemon's heap?

    nice -n 19 .venv/bin/python -m tools.bench.soak_mem [--rounds N] [--ops N] [--files N]
        [--no-compact] [--json FILE]

The soak's workload (tools/bench/soak.py: edits, appends, atomic saves
through ignored temp names, unlink + create, renames) driven through the
no-kernel tier: ``ops.Operations``, ``capture.Recorder`` and a real
``Journal`` wired as mount.py wires them, in one trio run, with one glibc
malloc arena as the daemon has.  The journal's clock is simulated: every
operation advances it by 1/``--rate`` s, so the retention policy and the
compaction pass after each round (``--ops`` operations, 30 simulated
seconds at the defaults, as the soak's ``deltafs compact`` every 30 s) see
the same ages as in the real soak, however slowly the bench runs.

Per round it prints and records RssAnon (/proc/self/status), glibc's
``mallinfo2`` (bytes in use, free bytes kept in the heap, mmapped), the
Python objects the GC tracks, and how much RssAnon rose during each phase:
the captures of the round and each step of the compaction pass (planning,
pruning, repacking, record blocks, tree checkpoints, index rewrite).  A
phase that keeps raising the high-water mark round after round is what
grows.  No timing: the figures are bytes, so it needs no bench lock.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import trio

from deltafs import maintenance as M
from deltafs.capture import Recorder
from deltafs.journal import Journal
from deltafs.mount import _limit_malloc_arenas
from deltafs.ops import ROOT, Operations

from tools.bench.soak import DIRS, OPS, _text

CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), umask=0o022, pid=os.getpid())
T0_NS = 1_800_000_000 * 10**9


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
try:
    _libc.mallinfo2.restype = _Mallinfo2
except AttributeError:  # not glibc 2.33+
    _libc = None


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def heap() -> dict:
    """glibc's view: bytes in use (malloc'd, not freed), free bytes it keeps, mmapped blocks."""
    if _libc is None:
        return {}
    m = _libc.mallinfo2()
    return {"in_use": m.uordblks + m.hblkhd, "free_kept": m.fordblks, "mmapped": m.hblkhd}


class Clock:
    """The journal's simulated clock (ns): advanced by the workload."""

    def __init__(self) -> None:
        self.ns = T0_NS

    def __call__(self) -> int:
        return self.ns


class Phases:
    """Per phase: how far RssAnon rose while it ran (the high-water mark it set)."""

    def __init__(self) -> None:
        self.rise: dict[str, int] = {}

    def wrap(self, name: str, fn):
        def run(*a, **kw):
            before = rss_anon()
            try:
                return fn(*a, **kw)
            finally:
                self.rise[name] = self.rise.get(name, 0) + max(0, rss_anon() - before)
        return run


class Driver:
    """The soak's operations as the kernel would call the handlers (lookups forgotten again)."""

    def __init__(self, ops: Operations, names: list[bytes], rng: random.Random, clock: Clock, rate: float) -> None:
        self.ops, self.names, self.rng, self.clock, self.rate = ops, names, rng, clock, rate
        self.kinds = [k for k, _ in OPS]
        self.weights = [w for _, w in OPS]
        self.fresh = 0
        self.looked: list[int] = []

    async def ino(self, path: bytes) -> int:
        ino = ROOT
        for part in path.split(b"/"):
            ino = (await self.ops.lookup(ino, part, CTX)).st_ino
            self.looked.append(ino)
        return ino

    async def forget(self) -> None:
        counts: dict[int, int] = {}
        for ino in self.looked:
            counts[ino] = counts.get(ino, 0) + 1
        self.looked.clear()
        await self.ops.forget(list(counts.items()))

    async def parent(self, path: bytes) -> tuple[int, bytes]:
        head, _, name = path.rpartition(b"/")
        return (await self.ino(head) if head else ROOT), name

    async def write_file(self, path: bytes, data: bytes) -> None:
        p, name = await self.parent(path)
        fi, attr = await self.ops.create(p, name, 0o644, os.O_WRONLY | os.O_TRUNC, CTX)
        self.looked.append(attr.st_ino)
        await self.ops.write(fi.fh, 0, data)
        await self.ops.release(fi.fh)

    async def one(self) -> str:
        rng = self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        i = rng.randrange(len(self.names))
        path = self.names[i]
        self.clock.ns += int(1e9 / self.rate)
        if kind in ("edit", "append"):
            ino = await self.ino(path)
            size = (await self.ops.getattr(ino)).st_size
            fi = await self.ops.open(ino, os.O_WRONLY | (os.O_APPEND if kind == "append" else 0), CTX)
            if kind == "edit":
                await self.ops.write(fi.fh, rng.randrange(max(1, size)), _text(rng, rng.randint(64, 512)))
            else:
                await self.ops.write(fi.fh, size, _text(rng, rng.randint(40, 200)) + b"\n")
            await self.ops.release(fi.fh)
        elif kind == "atomic_save":
            ino = await self.ino(path)
            fi = await self.ops.open(ino, os.O_RDONLY, CTX)
            data = bytearray(await self.ops.read(fi.fh, 0, 1 << 20))
            await self.ops.release(fi.fh)
            at = rng.randrange(max(1, len(data)))
            data[at:at + 100] = _text(rng, rng.randint(50, 300))
            await self.write_file(path + b".tmp", bytes(data))
            po, no = await self.parent(path + b".tmp")
            await self.ops.rename(po, no, po, no[:-4], 0, CTX)
        elif kind == "unlink":
            p, name = await self.parent(path)
            await self.ops.unlink(p, name, CTX)
            self.fresh += 1
            new = b"d%02d/n%06d.txt" % (rng.randrange(DIRS), self.fresh)
            await self.write_file(new, _text(rng, rng.randint(1024, 16384)))
            self.names[i] = new
        else:
            self.fresh += 1
            new = b"d%02d/n%06d.txt" % (rng.randrange(DIRS), self.fresh)
            po, no = await self.parent(path)
            pn, nn = await self.parent(new)
            await self.ops.rename(po, no, pn, nn, 0, CTX)
            self.names[i] = new
        await self.forget()
        return kind


def make_tree(src: str, files: int, rng: random.Random) -> list[bytes]:
    names = []
    per = max(1, files // DIRS)
    for d in range(DIRS):
        os.makedirs(os.path.join(src, f"d{d:02d}"))
        for i in range(per):
            rel = f"d{d:02d}/f{i:04d}.txt"
            with open(os.path.join(src, rel), "wb") as f:
                f.write(_text(rng, rng.randint(1024, 16384)))
            names.append(rel.encode())
    return names


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


async def soak(work: str, a, out: dict) -> None:
    rng = random.Random(a.seed)
    src = os.path.join(work, "src")
    os.makedirs(src)
    names = make_tree(src, a.files, rng)
    jdir = os.path.join(src, ".deltafs")
    clock = Clock()
    policy = M.RetentionPolicy()
    rows = out.setdefault("rounds", [])
    with Journal.open(jdir, create=True, clock=clock) as j:
        ph = Phases()
        for name in ("prune", "repack", "archive_records", "checkpoint_trees", "densify_index"):
            setattr(j, name, ph.wrap(name, getattr(j, name)))
        real_plan = M.plan_incremental
        M.plan_incremental = ph.wrap("plan", real_plan)
        rec = Recorder(j, src)
        jst = os.stat(jdir)
        ops = Operations(src, hidden=(jst.st_dev, jst.st_ino), recorder=rec, fd_limit=1024)
        d = Driver(ops, names, rng, clock, a.rate)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(rec.run)
                await rec.scan(ops, jst.st_ino)
                await rec.drain()
                for rnd in range(1, a.rounds + 1):
                    ph.rise.clear()
                    before = rss_anon()
                    for _ in range(a.ops):
                        try:
                            await d.one()
                        except OSError as e:  # FUSEError is one
                            if getattr(e, "errno", None) != errno.ENOENT:
                                raise
                    await rec.drain()
                    ph.rise["capture"] = max(0, rss_anon() - before)
                    rep = None
                    if not a.no_compact:
                        rep = await trio.to_thread.run_sync(M.compact, j, policy)
                    with j.reader() as r:
                        head = r.head_seq()
                    row = {"round": rnd, "seq": head, "rss_anon": rss_anon(), **heap(),
                           "gc_objects": len(gc.get_objects()),
                           "rise": {k: v for k, v in ph.rise.items() if v},
                           "data_mdb": os.stat(os.path.join(jdir, "data.mdb")).st_blocks * 512}
                    if rep is not None:
                        row.update(pruned=rep.versions_pruned, files_examined=rep.files_examined,
                                   versions_examined=rep.versions_examined, archived=rep.records_archived,
                                   index_pages_saved=rep.index_pages_saved, packs_emptied=rep.packs_emptied)
                    rows.append(row)
                    rise = " ".join(f"{k} +{_mib(v)}" for k, v in row["rise"].items())
                    print(f"round {rnd}: seq {head}, RssAnon {_mib(row['rss_anon'])} MiB, in use "
                          f"{_mib(row.get('in_use', 0))}, free kept {_mib(row.get('free_kept', 0))}, "
                          f"objects {row['gc_objects']}, data.mdb {_mib(row['data_mdb'])} MiB, "
                          f"examined {row.get('files_examined')}; rose in: {rise or '-'}", flush=True)
                nursery.cancel_scope.cancel()
        finally:
            M.plan_incremental = real_plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ops", type=int, default=9000, help="operations per round (30 s at --rate)")
    ap.add_argument("--rate", type=float, default=300.0, help="simulated operations per second")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--no-compact", action="store_true", help="no compaction pass between rounds")
    ap.add_argument("--json", help="write the rounds here")
    a = ap.parse_args(argv)
    _limit_malloc_arenas()
    work = tempfile.mkdtemp(prefix="soak-mem-")
    out: dict = {"args": vars(a)}
    try:
        trio.run(soak, work, a, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
