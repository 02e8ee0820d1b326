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
4. **The cost of a running sync on local save latency** (``--only-cost``):
   two real mounts on the same disk, one a member of a group (file:// store
   on the same disk, its sync service passing every 5 s as in any mount) with
   a peer that saves a small file and publishes it every second (a separate
   process, running through both halves of every pair), the other in no
   group.  Paired, interleaved rounds (tools/bench/paired.py; the order
   alternates per pair), each side: F small saves (500 B-8 KB, write then
   close+fsync timed), a 64 MiB write+fsync, and ``cp -a`` of a corpus of C
   small files + ``sync -f``.  After each side, untimed, the group mount runs a
   pass to its end (``group sync``) and both flush, so one side's work does
   not spill into the other's.  Reported: per side the pooled close+fsync
   latencies (median, p99), and per measure the median over pairs of
   group/solo - 1 with its distribution-free 95% interval.
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


COST_ROW = "| cost of a running sync on local saves"


def peer_loop(src: str, url: str, every: float) -> int:
    """--peer: an unmounted member that saves a small file and publishes it every ``every`` s
    (it does not pull: its own applying would load this machine, not a peer's)."""
    import signal

    m = Member.__new__(Member)
    m.src, m.url, m.endpoint = src, url, None
    m.j = Journal.open(os.path.join(src, ".deltafs"))
    m.io = sync.LocalIO(m.j, src)
    m.guard = None
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    i = 0
    while not stop:
        m.save(f"peer-{i % 50}.txt", f"peer save {i}\n".encode() * 20)
        st = S.load(m.j.path)
        with sync.open_store(st.url, m.j.path) as store:
            Engine(m.j, m.src, store, st, m.io).run_pass(pull=False)
        i += 1
        time.sleep(every)
    m.j.close()
    return 0


def _bulk(root: str, mib: int) -> float:
    data = os.urandom(1 << 20)
    t0 = time.perf_counter()
    fd = os.open(os.path.join(root, "bulk.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def save_cost(base: str, rounds: int, files: int, bulk_mib: int, corpus_files: int) -> dict:
    """4. in the module's docstring: a mount in a group with a syncing peer vs one in none."""
    import subprocess

    from deltafs import control
    from tools.bench.guard import cli, make_corpus, small_files
    from tools.bench.paired import order, pct, ratio_summary
    from tools.bench.targets import DELTAFS, ROOT, force_unmount

    url = f"file://{base}/store"
    peer = Member(base, "peer", url)
    peer.join()
    peer.run()
    peer.j.close()
    roots, jdirs = {}, {}
    corpus = os.path.join(base, "corpus")
    make_corpus(corpus, corpus_files, seed=3)
    proc = None
    try:
        for name in ("solo", "group"):
            src, mnt = os.path.join(base, name, "src"), os.path.join(base, name, "mnt")
            os.makedirs(src)
            os.makedirs(mnt)
            cli("mount", src, mnt, *(["--group", url] if name == "group" else []))
            roots[name], jdirs[name] = mnt, os.path.join(src, ".deltafs")
        proc = subprocess.Popen([*DELTAFS[:1], "-m", "tools.bench.sync", "--peer", peer.src, url], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = {k: {"fsync_ms": [], "bulk_s": [], "cp_s": [], "lat": []} for k in roots}
        from tools.bench.targets import daemon_stats

        pids = {k: control.request(j, "status")["status"]["pid"] for k, j in jdirs.items()}
        cpu0 = {k: daemon_stats(pid).cpu for k, pid in pids.items()}
        loads, passes = [os.getloadavg()[0]], []
        for r in range(rounds + 1):  # round 0: warm-up, not counted
            for name in order(r, "solo", "group"):
                root = os.path.join(roots[name], f"r{r}")
                os.makedirs(root)
                lat = small_files(root, files, r)
                bulk = _bulk(root, bulk_mib)
                t1 = time.perf_counter()
                subprocess.run(["cp", "-a", corpus, os.path.join(root, "cp")], check=True)
                subprocess.run(["sync", "-f", root], check=True)
                cp = time.perf_counter() - t1
                if name == "group":  # untimed: the pass over this side's saves ends before the other side
                    t2 = time.perf_counter()
                    control.request(jdirs[name], "group", timeout=600)
                    passes.append(time.perf_counter() - t2)
                for j in jdirs.values():
                    control.request(j, "flush", timeout=600)
                if r:
                    out[name]["fsync_ms"].append(statistics.median(lat) * 1000)
                    out[name]["bulk_s"].append(bulk)
                    out[name]["cp_s"].append(cp)
                    out[name]["lat"] += [x * 1000 for x in lat]
            loads.append(os.getloadavg()[0])
            if r:
                g, o = out["group"], out["solo"]
                print(f"cost round {r}/{rounds}: group/solo save {g['fsync_ms'][-1] / o['fsync_ms'][-1] - 1:+.1%}, "
                      f"bulk {g['bulk_s'][-1] / o['bulk_s'][-1] - 1:+.1%}, cp {g['cp_s'][-1] / o['cp_s'][-1] - 1:+.1%}, "
                      f"load {loads[-1]:.1f}", flush=True)
        res: dict = {}
        for k, d in out.items():
            res[k] = {m: round(statistics.median(v), 4) for m, v in d.items() if m != "lat"}
            res[k].update(lat_median_ms=round(statistics.median(d["lat"]), 3), lat_p99_ms=round(pct(d["lat"], 0.99), 3),
                          saves=len(d["lat"]))
        res["daemon_cpu_s"] = {k: round(daemon_stats(pid).cpu - cpu0[k], 1) for k, pid in pids.items()}
        res["pairs"] = {m: ratio_summary(out["group"][m], out["solo"][m]) for m in ("fsync_ms", "bulk_s", "cp_s")}
        res.update(rounds=rounds, files=files, bulk_mib=bulk_mib, corpus_files=corpus_files,
                   pass_s={"median": round(statistics.median(passes), 2), "max": round(max(passes), 2)},
                   load={"min": round(min(loads), 1), "max": round(max(loads), 1),
                         "median": round(statistics.median(loads), 1)})
        with Journal.open(jdirs["group"], readonly=True) as j, j.reader() as rd:
            res["group_applied_from_peer"] = sum(1 for rec in rd.records() if rec.origin is not None)
        return res
    except BaseException:
        keep = os.environ.get("BENCH_KEEP_LOGS")
        if keep:  # the daemons' logs, for a failed run
            os.makedirs(keep, exist_ok=True)
            for name, j in jdirs.items():
                for f in os.listdir(j):
                    if f.startswith("deltafs.log"):
                        shutil.copy(os.path.join(j, f), os.path.join(keep, f"{name}-{f}"))
        raise
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for mnt in roots.values():
            force_unmount(mnt)


def _cost_rows(c: dict) -> list[str]:
    p = c["pairs"]

    def cell(m):
        x = p[m]
        return f"{x['median']:+.1%} (95% CI {x['ci95'][0]:+.1%} .. {x['ci95'][1]:+.1%})"

    g, o = c["group"], c["solo"]
    return [f"{COST_ROW}: small saves (close+fsync), {c['files']} per side x {c['rounds']} pairs | group vs solo, "
            f"median of per-pair ratios {cell('fsync_ms')}; pooled median {g['lat_median_ms']:.2f} vs "
            f"{o['lat_median_ms']:.2f} ms, p99 {g['lat_p99_ms']:.2f} vs {o['lat_p99_ms']:.2f} ms |",
            f"{COST_ROW}: write+fsync of {c['bulk_mib']} MiB | {cell('bulk_s')}; median {g['bulk_s']:.2f} vs "
            f"{o['bulk_s']:.2f} s |",
            f"{COST_ROW}: `cp -a` of {c['corpus_files']:,} small files + `sync -f` | {cell('cp_s')}; median "
            f"{g['cp_s']:.2f} vs {o['cp_s']:.2f} s (load {c['load']['min']}-{c['load']['max']}; the untimed pass "
            f"after each group side took median {c['pass_s']['median']:.1f} s" + (
                f"; daemon CPU {c['daemon_cpu_s']['group']:.0f} s in the group vs {c['daemon_cpu_s']['solo']:.0f} s"
                if "daemon_cpu_s" in c else "") + ") |"]


def update_cost(c: dict) -> None:
    """--only-cost --write-docs: replace (or add) the cost rows of the section, keep the rest."""
    from tools.bench.scale import DOC

    with open(DOC) as f:
        lines = f.read().split("\n")
    at = [i for i, ln in enumerate(lines) if ln.startswith(COST_ROW)]
    if not at:
        rows = [i for i, ln in enumerate(lines) if ln.startswith("| `resolve --all")]
        if not rows:
            raise SystemExit("no Sync groups section to add the cost rows to: run the whole bench with --write-docs")
        at = [rows[-1] + 1, rows[-1]]
    lines[at[0]:at[-1] + 1] = _cost_rows(c)
    text = "\n".join(lines).replace(" Not measured yet: the cost of a running sync service on local save latency.", "")
    with open(DOC, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--only-propagation", action="store_true", help="measure 1 only (docs: the other rows stay)")
    ap.add_argument("--only-cost", action="store_true", help="measure 4 only (docs: the other rows stay)")
    ap.add_argument("--cost-rounds", type=int, default=20)
    ap.add_argument("--cost-files", type=int, default=400)
    ap.add_argument("--cost-bulk-mib", type=int, default=64)
    ap.add_argument("--cost-corpus", type=int, default=2000)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--peer", nargs=2, metavar=("SRC", "URL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        return peer_loop(args.peer[0], args.peer[1], 1.0)
    if args.only_cost:
        if args.quick:
            args.cost_rounds, args.cost_files, args.cost_bulk_mib, args.cost_corpus = 2, 50, 8, 200
        base = tempfile.mkdtemp(prefix="deltafs-sync-cost-", dir=os.environ.get("BENCH_DIR"))
        try:
            c = save_cost(base, args.cost_rounds, args.cost_files, args.cost_bulk_mib, args.cost_corpus)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        import json

        print("cost", json.dumps(c), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(c, f, indent=1)
        print("\n".join(_cost_rows(c)))
        if args.write_docs:
            update_cost(c)
        return 0
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
    if "cost" in out:
        L += _cost_rows(out["cost"])
    else:  # measured apart (--only-cost): the rows stay
        from tools.bench.scale import DOC

        with open(DOC) as f:
            L += [ln for ln in f.read().split("\n") if ln.startswith(COST_ROW)]
    L += ["", "A mount applies a remote save at its next pass (every 5 s, or at once on `deltafs group sync -m "
          "MNT`), so through a mount add up to 5 s to the delays above. The cost rows (`--only-cost`) compare two "
          "real mounts, one in a group with a peer publishing a save a second, one in none (see the module's "
          "docstring).", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
