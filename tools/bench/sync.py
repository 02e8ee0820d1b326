"""Sync groups (issue 25): propagation delay, a new member's first sync, bulk resolve.

    .venv/bin/python -m tools.bench.sync [--quick] [--write-docs] [--no-s3]

Members are unmounted trees driven in this process by the sync engine
(deltafs.sync.Engine with LocalIO: the code a mount's sync service runs,
minus the mount), each with its own SRC and journal on the same disk.

1. **Propagation delay** of one save: member A writes a 4 KiB-64 KiB file
   and journals it, then A's pass and B's pass run back to back; the time
   from A's close to B's SRC holding the bytes. Median and p99 of N saves,
   through file:// and through s3:// (SeaweedFS on 127.0.0.1). A mount adds
   the wait for its next pass (every 5 s; `group sync -m MNT` asks for one).
2. **A new member's first sync**: a tree of F files / S bytes published by
   A, then `clone --join` (sync.clone) into an empty DEST: seconds, MiB/s.
3. **Resolve with --all**: C concurrent edits on two members (C conflicts
   on both), then ``resolve_many(--take remote)`` on one (one scan, one
   apply batch, one upload) and the other member's pass that takes them.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

from deltafs import sync
from deltafs.journal import Journal
from deltafs.sync import state as S
from deltafs.sync.engine import Engine
from deltafs.sync.incoming import IncomingGuard

HEADING = "## Sync groups"


class Member:
    def __init__(self, base: str, name: str, url: str, env_endpoint: str | None = None) -> None:
        self.src = os.path.join(base, name)
        os.makedirs(self.src)
        self.j = Journal.open(os.path.join(self.src, ".deltafs"), create=True)
        self.io = sync.LocalIO(self.j, self.src)
        self.guard = IncomingGuard("normal")  # as a mount's service: incoming segments are scored
        self.url = url
        self.endpoint = env_endpoint

    def join(self) -> None:
        sync.join(self.j, self.url, endpoint_url=self.endpoint)

    def run(self) -> dict:
        st = S.load(self.j.path)
        store = sync.open_store(st.url, self.j.path, st.endpoint_url)
        with store:
            return Engine(self.j, self.src, store, st, self.io, guard=self.guard).run_pass()

    def save(self, rel: str, data: bytes) -> None:
        with open(os.path.join(self.src, rel), "wb") as f:
            f.write(data)
        self.io.record([os.fsencode(rel)])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def propagation(base: str, url: str, n: int, endpoint=None) -> dict:
    a, b = Member(base, "a", url, endpoint), Member(base, "b", url, endpoint)
    a.join()
    b.join()
    a.run()
    b.run()
    rng = random.Random(1)
    times = []
    for i in range(n):
        data = os.urandom(rng.choice([4096, 16384, 65536]))
        name = f"f{i % 8}.bin"
        t0 = time.perf_counter()
        a.save(name, data)
        a.run()
        b.run()
        with open(os.path.join(b.src, name), "rb") as f:
            assert f.read() == data
        times.append(time.perf_counter() - t0)
    for m in (a, b):
        m.j.close()
    return {"n": n, "median_s": statistics.median(times), "p99_s": pct(times, 0.99)}


def first_sync(base: str, url: str, files: int, size: int) -> dict:
    a = Member(base, "a", url)
    rng = random.Random(2)
    per = size // files
    for i in range(files):
        d = os.path.join(a.src, f"d{i % 50}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(rng.randbytes(per))
    sync.scan(a.j, a.src)
    a.join()
    t0 = time.perf_counter()
    a.run()
    publish = time.perf_counter() - t0
    dest = os.path.join(base, "new")
    os.makedirs(dest)
    t0 = time.perf_counter()
    with Journal.open(os.path.join(dest, ".deltafs"), create=True) as j:
        rep = sync.clone(j, dest, url, join=True)
    secs = time.perf_counter() - t0
    assert rep["applied"] >= files, rep
    a.j.close()
    return {"files": files, "bytes": per * files, "publish_s": publish, "clone_s": secs,
            "mib_s": per * files / secs / 2**20}


def bulk_resolve(base: str, url: str, n: int) -> dict:
    a, b = Member(base, "a", url), Member(base, "b", url)
    for i in range(n):
        with open(os.path.join(a.src, f"c{i}"), "w") as f:
            f.write("base\n")
    sync.scan(a.j, a.src)
    a.join()
    b.join()
    a.run()
    b.run()
    for i in range(n):
        with open(os.path.join(a.src, f"c{i}"), "w") as f:
            f.write(f"a {i}\n")
        with open(os.path.join(b.src, f"c{i}"), "w") as f:
            f.write(f"b {i}\n")
    sync.scan(a.j, a.src)
    sync.scan(b.j, b.src)
    a.run()
    b.run()
    a.run()
    assert len(sync.conflicts(a.j.path)) == n and len(sync.conflicts(b.j.path)) == n
    paths = [os.fsencode(c["path"]) for c in sync.conflicts(b.j.path)]
    t0 = time.perf_counter()
    sync.resolve_many(b.j, b.src, paths, "remote")
    resolve = time.perf_counter() - t0
    t0 = time.perf_counter()
    a.run()
    take = time.perf_counter() - t0
    assert sync.conflicts(a.j.path) == [] and sync.conflicts(b.j.path) == []
    for m in (a, b):
        m.j.close()
    return {"conflicts": n, "resolve_s": resolve, "other_member_s": take}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--only-propagation", action="store_true", help="measure 1 only (docs: the other rows stay)")
    args = ap.parse_args(argv)
    n = 20 if args.quick else 60
    files, size = (1000, 32 << 20) if args.quick else (10_000, 1 << 30)
    base = tempfile.mkdtemp(prefix="deltafs-sync-bench-", dir=os.environ.get("BENCH_DIR"))
    out = {}
    try:
        d = os.path.join(base, "p1")
        os.makedirs(d)
        out["file"] = propagation(d, f"file://{d}/store", n)
        print("propagation file://", out["file"], flush=True)
        if not args.no_s3:
            sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "mirrors"))
            from s3server import BUCKET, S3Server, find_weed

            if find_weed():
                server = S3Server(os.path.join(base, "weed"), weed=find_weed())
                server.start()
                try:
                    server.create_bucket(BUCKET)
                    os.environ.update(server.env())
                    d = os.path.join(base, "p2")
                    os.makedirs(d)
                    out["s3"] = propagation(d, f"s3://{BUCKET}/bench", n, server.endpoint_url)
                    print("propagation s3://", out["s3"], flush=True)
                finally:
                    server.close()
        if args.only_propagation:
            if args.write_docs:
                update_propagation(out)
            return 0
        d = os.path.join(base, "f")
        os.makedirs(d)
        out["first"] = first_sync(d, f"file://{d}/store", files, size)
        print("first sync", out["first"], flush=True)
        d = os.path.join(base, "r")
        os.makedirs(d)
        out["resolve"] = bulk_resolve(d, f"file://{d}/store", 1000)
        print("resolve", out["resolve"], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.write_docs:
        from tools.bench.scale import write_docs

        write_docs(render(out, args.quick), HEADING)
    return 0


def _propagation_rows(out: dict) -> list[str]:
    rows = []
    for key, what in (("file", "file://"), ("s3", "s3:// (SeaweedFS, 127.0.0.1)")):
        if key in out:
            p = out[key]
            rows.append(f"| propagation of a save through {what}, passes back to back ({p['n']} saves) | "
                        f"median {p['median_s'] * 1000:.0f} ms, p99 {p['p99_s'] * 1000:.0f} ms |")
    return rows


def update_propagation(out: dict) -> None:
    """--only-propagation --write-docs: replace the propagation rows of the section, keep the rest."""
    from tools.bench.scale import DOC

    with open(DOC) as f:
        lines = f.read().split("\n")
    at = [i for i, ln in enumerate(lines) if ln.startswith("| propagation of a save through")]
    if not at:
        raise SystemExit("no propagation rows in the Sync groups section: run the whole bench with --write-docs")
    lines[at[0]:at[-1] + 1] = _propagation_rows(out)
    with open(DOC, "w") as f:
        f.write("\n".join(lines))


def render(out: dict, quick: bool) -> str:
    L = [HEADING, "", "Written by `python -m tools.bench.sync" + (" --quick" if quick else "") + " --write-docs` "
         f"on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores, shared and loaded). Members are unmounted "
         "trees driven in one process by the sync engine (what a mount's sync service runs, minus the mount); "
         "see the module's docstring for the method.", "",
         "| measure | result |", "|---|---|"]
    L += _propagation_rows(out)
    f = out["first"]
    L.append(f"| a new member's first sync (`clone --join`), {f['files']:,} files / {f['bytes'] / 2**20:.0f} MiB | "
             f"{f['clone_s']:.1f} s ({f['mib_s']:.1f} MiB/s); publishing them took {f['publish_s']:.1f} s |")
    r = out["resolve"]
    L.append(f"| `resolve --all --take remote` of {r['conflicts']:,} conflicts | {r['resolve_s']:.1f} s; the other "
             f"member's pass taking them {r['other_member_s']:.1f} s |")
    L += ["", "A mount applies a remote save at its next pass (every 5 s, or at once on `deltafs group sync -m "
          "MNT`), so through a mount add up to 5 s to the delays above. Not measured yet: the cost of a running "
          "sync service on local save latency.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
