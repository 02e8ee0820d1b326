"""The capture daemon's anonymous memory (RssAnon) around a big write, alone.

What ``python -m tools.bench`` measures at the end of a full run, without the
rest of it: a fresh capture mount, ``cp -a`` of a FILES-file tree, a sqlite run
of TX committed transactions, optionally a 1 GiB write and overwrite (the
seq_1m group), then one SIZE write (bs=1M, incompressible, one fsync) while
/proc/PID/status is sampled every 0.02 s (--interval); then the daemon is left to settle.
Prints RssAnon after each phase, and the start / peak / end of the big write.

    python -m tools.bench.bigmem [--size-gib 4] [--files 4000] [--tx 2000] [--seq-gib 1]
    python -m tools.bench.bigmem --full-sequence [--rounds 2]

--full-sequence replays instead what the full bench's capture mount goes through
before its 4 GiB write: every workload group of ``tools.bench`` in full sizes
(1 GiB write, cold and warm reads, overwrite; 256 MiB bs=4k; cp -a, find, du, git
add/commit/status, rm -rf; sqlite; the 1-byte edit rows, drop_caches included),
warm-up plus --rounds rounds, on this one mount.

Environment variables of the daemon (DELTAFS_*) pass through: e.g.
DELTAFS_TRACEMALLOC=DIR for heap snapshots (see deltafs/mount.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sqlite3
import threading
import time
import types

from tools.bench import targets as tg
from tools.bench import workloads as wl


def _anon(pid) -> int:
    return tg.daemon_stats(pid).anon


def _full_sequence(a, t, corpus: str, phase, settle) -> None:
    """The full bench's groups, warm-up + a.rounds rounds, on the capture mount t: each
    group one phase (its parts settle in between, as the bench's m() does)."""
    sizes = dataclasses.replace(wl.FULL, tree_files=a.files, sqlite_tx=a.tx)
    nfiles = sum(len(f) for _, _, f in os.walk(corpus))
    ctx = types.SimpleNamespace(sizes=sizes, corpus=corpus, corpus_files=nfiles,
                                can_drop=wl.drop_caches(), edit_seq=0, settle=settle)

    def m(name, work, before=None):
        if before is not None:
            before()
        work()
        settle()
    d = os.path.join(t.root, "bench")
    os.makedirs(d, exist_ok=True)
    for rnd in range(a.rounds + 1):
        for gname, fn in wl.GROUPS:
            phase(f"r{rnd} {gname}", lambda: fn(m, d, ctx))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--tx", type=int, default=2000)
    ap.add_argument("--seq-gib", type=float, default=0.0, help="write + overwrite this much first (0: no)")
    ap.add_argument("--compact-every", help="the mount's --compact-every (MINUTES): compaction passes "
                    "during the sequence and the big write, as in the full bench's hour")
    ap.add_argument("--snap-every", type=float, default=10.0, help="with --snap: seconds between snapshots "
                    "during the big write")
    ap.add_argument("--full-sequence", action="store_true",
                    help="replay the full bench's groups (warm-up + --rounds) before the big write")
    ap.add_argument("--rounds", type=int, default=2, help="with --full-sequence: rounds after the warm-up")
    ap.add_argument("--idle", type=float, default=None,
                    help="seconds the daemon idles before the big write (default: 60 with --full-sequence, "
                    "where the full bench's other two targets run their last edit group and the "
                    "no-capture mount its own big write meanwhile; else 0)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--interval", type=float, default=0.02,
                    help="seconds between samples of the big write (the full bench takes 0.25, which "
                    "misses the commit's short peak)")
    ap.add_argument("--name", default="bigmem")
    ap.add_argument("--snap", help="DELTAFS_TRACEMALLOC=SNAP: a heap snapshot after each phase and "
                    "every 10 s of the big write (slow: tracemalloc)")
    a = ap.parse_args(argv)
    _, work = tg.fresh_work_dir(a.name)
    if a.snap:
        os.makedirs(a.snap, exist_ok=True)
        os.environ["DELTAFS_TRACEMALLOC"] = os.path.abspath(a.snap)

    def snap() -> None:
        if a.snap:
            now = os.path.join(a.snap, "now")
            open(now, "w").close()
            while os.path.exists(now):
                time.sleep(0.1)
    t = None
    out: dict = {"phases": []}
    try:
        corpus = os.path.join(work, "corpus")
        wl.build_corpus(corpus, a.files)
        extra = ("--compact-every", a.compact_every) if a.compact_every else ()
        t = tg.MountTarget(os.path.join(work, "cap"), "cap", capture=True, extra=extra)
        pid = t.pid

        def settle() -> None:
            wl.wait_quiet(lambda: tg.daemon_stats(pid).cpu)

        def phase(name: str, fn) -> None:
            s = tg.RssSampler(lambda: pid, interval=0.1).start()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            settle()
            s.stop()
            snap()
            row = {"phase": name, "s": round(dt, 2), "anon_peak": s.anon_peak, "anon_end": _anon(pid)}
            out["phases"].append(row)
            print(f"{name:>24}: {dt:6.1f} s  anon peak {s.anon_peak / 2**20:6.1f}  "
                  f"after {row['anon_end'] / 2**20:6.1f} MiB", flush=True)

        phase("mounted", lambda: None)
        if a.full_sequence:
            _full_sequence(a, t, corpus, phase, settle)
        tree = os.path.join(t.root, "tree")
        if not a.full_sequence:
            phase(f"cp -a {a.files}", lambda: wl.run(["cp", "-a", corpus, tree], t.root))
            phase("rm -rf", lambda: shutil.rmtree(tree))
        db = os.path.join(t.root, "bench.sqlite")

        def sql() -> None:
            con = sqlite3.connect(db, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            for i in range(a.tx):
                con.execute("BEGIN")
                con.execute("INSERT INTO t (v) VALUES (?)", (f"row {i} " * 8,))
                con.execute("COMMIT")
            con.close()
        if not a.full_sequence:
            phase(f"sqlite {a.tx} tx", sql)
        if a.seq_gib:
            p = os.path.join(t.root, "seq.dat")
            n = int(a.seq_gib * wl.GiB)
            phase(f"write {a.seq_gib} GiB", lambda: wl.write_file(p, n, wl.MiB))
            phase(f"overwrite {a.seq_gib} GiB", lambda: wl.write_file(p, n, wl.MiB))
            os.unlink(p)
        idle = a.idle if a.idle is not None else (60.0 if a.full_sequence else 0.0)
        if idle:
            time.sleep(idle)
        big = os.path.join(t.root, "big.dat")
        n = int(a.size_gib * wl.GiB)
        start = _anon(pid)
        s = tg.RssSampler(lambda: pid, interval=a.interval, trace=True).start()
        stop = threading.Event()

        def snaps() -> None:
            while not stop.wait(a.snap_every):
                snap()
        if a.snap:
            threading.Thread(target=snaps, daemon=True).start()
        t0 = time.perf_counter()
        wl.write_file(big, n, wl.MiB)
        dt = time.perf_counter() - t0
        settle()
        stop.set()
        s.stop()
        snap()
        end = _anon(pid)
        os.unlink(big)
        settle()
        out["big"] = {"gib": a.size_gib, "s": round(dt, 2), "anon_start": start,
                      "anon_peak": s.anon_peak, "anon_end": end, "anon_after_unlink": _anon(pid),
                      "trace": s.trace[:: max(1, len(s.trace) // 100)]}
        b = out["big"]
        print(f"big write {a.size_gib} GiB: {dt:.1f} s  anon {start / 2**20:.1f} -> peak "
              f"{b['anon_peak'] / 2**20:.1f} -> {end / 2**20:.1f} MiB (after unlink "
              f"{b['anon_after_unlink'] / 2**20:.1f})", flush=True)
        with open("/proc/loadavg") as f:
            out["loadavg"] = f.read().split()[:3]
        print("load", *out["loadavg"])
    finally:
        if t is not None:
            for p in t.close():
                print("unmount:", p)
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
