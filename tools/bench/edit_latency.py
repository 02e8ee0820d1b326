"""1-byte edit + fsync latency, warm and after drop_caches, with A/B sides (issue 19).

The main bench times one edit per round per file size, after its other
workloads, so its median is of 3 samples taken in whatever state the
bulk rows left.  This one times many edits in a steady state, the way the
issue's target row reads ("1 MiB to 1 GiB file, warm and after
drop_caches: median <= 3 ms, p99 <= 10 ms"):

    python -m tools.bench.edit_latency --side main=/tmp/main-tree --side branch=. \\
        --sizes 1M,64M,1G --rounds 4 --warm 25 --cold 5

Each side is a deltafs source tree, mounted with this interpreter and
``PYTHONPATH=TREE`` (so two commits compare in one run under the same
load); ``native`` (a plain directory) is always measured too.  Files are
written once per side (untimed), then every round runs each side in turn
(the order alternating): ``--warm`` edits back to back, then ``--cold``
edits each after ``sync; echo 3 > /proc/sys/vm/drop_caches``.  An edit is
``pwrite`` of one byte at a new offset + ``fsync``, timed together, as in
``tools.bench`` (the edit group).  Prints median, p90, p99 and max per
side, size and mode, and the 1-min load average before and after.

``--trace`` sets DELTAFS_TRACE for the mounts (deltafs/trace.py): each
captured fsync's stage timestamps go to WORK/trace-SIDE.jsonl, and a
summary of the median time between stages is printed.

Not a test and not part of benchmarks.md: figures go to
docs/performance-notes.md by hand, with date, commit and load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from tools.bench.paired import pct

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(s[-1:], 1)
    return int(s.rstrip("KMG")) * mult


def label(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def write_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


class Side:
    def __init__(self, name: str, tree: str | None, work: str, trace: bool, extra: list[str]) -> None:
        self.name, self.tree = name, tree
        self.base = os.path.join(work, name)
        self.src = os.path.join(self.base, "src")
        self.mnt = os.path.join(self.base, "mnt")
        self.dir = self.mnt if tree else self.src
        self.trace = os.path.join(work, f"trace-{name}.jsonl") if trace and tree else None
        self.extra = extra
        self.seq = 0
        self.fds: dict[int, int] = {}

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.path.abspath(self.tree)
        if self.trace:
            env["DELTAFS_TRACE"] = self.trace
        else:
            env.pop("DELTAFS_TRACE", None)
        return env

    def deltafs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deltafs", *args], env=self.env(), cwd=self.base,
                              check=check, capture_output=True, text=True, timeout=600)

    def setup(self, sizes: list[int]) -> None:
        os.makedirs(self.src, exist_ok=True)
        if self.tree:
            os.makedirs(self.mnt, exist_ok=True)
            self.deltafs("mount", self.src, self.mnt, *self.extra)
        for size in sizes:
            path = os.path.join(self.dir, f"edit-{label(size).replace(' ', '')}.dat")
            write_file(path, size)
            self.fds[size] = os.open(path, os.O_RDWR)
        if self.tree:
            self.deltafs("flush", self.mnt)
        if self.trace and os.path.exists(self.trace):
            os.unlink(self.trace)  # the setup's own fsyncs are not edits

    def edit(self, size: int) -> float:
        self.seq += 1
        off = (size // 2 + self.seq * 4099) % size
        byte = bytes([self.seq % 251 + 1])
        fd = self.fds[size]
        t0 = time.perf_counter()
        os.pwrite(fd, byte, off)
        os.fsync(fd)
        return time.perf_counter() - t0

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.tree:
            r = self.deltafs("umount", self.mnt, check=False)
            if r.returncode:
                subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
                subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)


def summarize(v: list[float]) -> str:
    ms = [x * 1000 for x in v]
    return (f"median {statistics.median(ms):6.2f}  p90 {pct(ms, 0.9):6.2f}  p99 {pct(ms, 0.99):6.2f}  "
            f"max {max(ms):6.2f} ms  (n={len(ms)})")


def trace_summary(path: str) -> list[str]:
    """Median ms at which each stage is reached (first occurrence), over the traced fsyncs."""
    if not path or not os.path.exists(path):
        return []
    at: dict[str, list[float]] = {}
    order: dict[str, float] = {}
    n = 0
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            n += 1
            seen = set()
            for t, th, st in d["stages"]:
                key = f"{st} [{th}]"
                if key in seen:
                    continue
                seen.add(key)
                at.setdefault(key, []).append(t)
                order[key] = order.get(key, 0.0) + t
    rows = sorted(at, key=lambda k: statistics.median(at[k]))
    return [f"  {statistics.median(at[k]):8.3f} ms  p90 {pct(at[k], 0.9):8.3f}  ({len(at[k])}/{n})  {k}"
            for k in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", action="append", default=[], metavar="NAME=TREE",
                   help="a deltafs source tree to mount (repeatable; default: this one as 'this')")
    p.add_argument("--work", default=os.path.join(ROOT, "bench-work", "edit-latency"))
    p.add_argument("--sizes", default="1M,64M,1G")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warm", type=int, default=25, help="edits back to back per size, side and round")
    p.add_argument("--cold", type=int, default=5, help="edits after drop_caches per size, side and round")
    p.add_argument("--trace", action="store_true", help="DELTAFS_TRACE stage timestamps (deltafs/trace.py)")
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--mount-arg", action="append", default=[], help="extra argument to deltafs mount")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    specs = [s.split("=", 1) for s in args.side] or [["this", ROOT]]
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    sides = [Side(n, t, args.work, args.trace, args.mount_arg) for n, t in specs]
    if not args.no_native:
        sides.insert(0, Side("native", None, args.work, False, []))
    res: dict = {}
    print(f"load {loadavg()} at start, {time.strftime('%H:%M:%S', time.gmtime())} UTC", flush=True)
    try:
        for s in sides:
            s.setup(sizes)
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for s in order:
                for size in sizes:
                    for _ in range(args.warm):
                        res.setdefault((s.name, size, "warm"), []).append(s.edit(size))
                    for _ in range(args.cold):
                        drop_caches()
                        res.setdefault((s.name, size, "cold"), []).append(s.edit(size))
            print(f"round {rnd + 1}/{args.rounds} done, load {loadavg()}", flush=True)
    finally:
        for s in sides:
            s.close()
    print(f"load {loadavg()} at end, {time.strftime('%H:%M:%S', time.gmtime())} UTC")
    for size in sizes:
        for mode in ("warm", "cold"):
            for s in sides:
                v = res.get((s.name, size, mode))
                if v:
                    print(f"{label(size):>7} {mode} {s.name:>10}: {summarize(v)}")
    for s in sides:
        if s.trace:
            print(f"stages of {s.name} (ms after the FSYNC request's arrival, median):")
            print("\n".join(trace_summary(s.trace)))
    with open(os.path.join(args.work, "result.json"), "w") as f:
        json.dump({f"{k[0]}|{k[1]}|{k[2]}": v for k, v in res.items()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
