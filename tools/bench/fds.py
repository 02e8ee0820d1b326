"""Descriptor benchmark (issue 16): what the bounded inode-descriptor cache costs and holds.

    .venv/bin/python -m tools.bench.fds [--quick] [--million] [--write-docs] [--json FILE]

1. The options, measured in-process on a real directory (no FUSE): the
   per-call cost of using a held O_PATH descriptor (``fstat``), of an
   ``fstatat`` through the parent and name (what lookup, readdir and
   getattr do for an inode without a descriptor), of reopening an evicted
   inode (``openat(O_PATH)`` + ``fstat`` + ``close``), of
   ``open_by_handle_at`` (+ ``fstat`` + ``close``, root only), of one LRU
   touch (``OrderedDict.move_to_end``), and the memory of one ``Node``.
2. Peak descriptors and daemon memory for trees of 100,000 and (with
   ``--million``, or in a full run) 1,000,000 empty files in 1,000-file
   directories, generated natively in SRC, then mounted ``--no-capture``
   (the mount-time scan of a million new files is another benchmark) by a
   daemon started under a descriptor limit of 1,024 (soft and hard), and
   walked with ``find`` and ``du`` (every entry is a readdirplus lookup the
   daemon keeps a node for), then ``stat``-ed again (``find -newer``
   after the kernel dropped its caches would go to the daemon again: not
   done here, the machine is shared).  Descriptors are sampled from /proc/PID/fd every
   0.1 s; memory is VmHWM and the peak of RssAnon.
3. Hot-path cost when everything fits (default budget) and when the cache
   evicts all the time (``--fd-budget 16``): ``find`` (first walk after
   mounting: every entry goes to the daemon), ``cp -a`` of the tree into
   the mount, and ``git status`` (after ``git add -A; git commit``, one
   untimed run first), each as a ratio to the same command on a native
   directory of the same disk, median of the rounds.

Everything happens under bench-work/fds/ (removed at the end); every mount
is unmounted in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import OrderedDict

from tools.bench import report
from tools.bench.scale import Mount, _terminate, run, write_docs
from tools.bench.targets import DELTAFS, ROOT, fresh_work_dir

HEADING = "## Descriptors: a bounded cache at any tree size"


def log(msg: str) -> None:
    print(f"[fds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- 1. the options, per call --------------------------------------------------------------

class _Handle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_char * 128)]


def _per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def options_part(w: str, res: dict) -> None:
    from deltafs.fdcache import FdCache
    from deltafs.ops import Node

    d = os.path.join(w, "opts")
    os.makedirs(d)
    names = [b"f%05d" % i for i in range(2000)]
    for nm in names:
        os.close(os.open(os.path.join(os.fsencode(d), nm), os.O_CREAT | os.O_WRONLY, 0o644))
    pfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    fds = [os.open(nm, O_PATH, dir_fd=pfd) for nm in names]
    reps = 20
    r = res["options"] = {}

    def each(fn):
        return lambda: [fn(i) for i in range(len(names))]

    n = len(names)
    r["fstat_held_us"] = _per_call(each(lambda i: os.fstat(fds[i])), reps) / n
    r["fstatat_name_us"] = _per_call(each(lambda i: os.stat(names[i], dir_fd=pfd, follow_symlinks=False)),
                                     reps) / n

    def reopen(i):
        fd = os.open(names[i], O_PATH, dir_fd=pfd)
        os.fstat(fd)
        os.close(fd)
    r["reopen_us"] = _per_call(each(reopen), reps) / n
    for fd in fds:
        os.close(fd)
    lru = OrderedDict((i, None) for i in range(n))
    r["lru_touch_us"] = _per_call(each(lambda i: lru.move_to_end(i)), reps) / n

    libc = ctypes.CDLL(None, use_errno=True)
    handles = []
    mount_id = ctypes.c_int()
    for nm in names:
        h = _Handle(handle_bytes=128)
        if libc.name_to_handle_at(pfd, nm, ctypes.byref(h), ctypes.byref(mount_id), 0) != 0:
            break
        handles.append(h)
    r["by_handle_us"] = None
    if len(handles) == n:
        mfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)

        def by_handle(i):
            fd = libc.open_by_handle_at(mfd, ctypes.byref(handles[i]), O_PATH)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "open_by_handle_at")
            os.fstat(fd)
            os.close(fd)
        try:
            by_handle(0)
            r["by_handle_us"] = _per_call(each(by_handle), reps) / n
        except OSError as e:
            r["by_handle_error"] = os.strerror(e.errno) if e.errno else str(e)
        os.close(mfd)
    os.close(pfd)

    fc = FdCache(1024, 256)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    root = Node(1, fc, None, b"")
    nodes = {i: Node(i, fc, root, b"f%05d" % i) for i in range(2, 100_002)}
    r["node_bytes"] = (tracemalloc.get_traced_memory()[0] - before) / len(nodes)
    tracemalloc.stop()
    del nodes


# --- 2 and 3: real mounts ------------------------------------------------------------------

class FdSampler(threading.Thread):
    """Peak descriptors, RssAnon of a daemon, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.fds, self.anon = pid, 0, 0
        self.stop = threading.Event()

    def sample(self) -> None:
        with contextlib.suppress(OSError):
            self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.anon = max(self.anon, int(line.split()[1]) * 1024)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.sample()


def daemon_pid(mnt: str) -> int:
    _, r = run(["status", mnt, "--json"])
    return json.loads(r.stdout)["pid"]


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_tree(root: str, files: int, per_dir: int = 1000, content: bool = False) -> None:
    os.makedirs(root)
    for d in range(files // per_dir):
        sub = os.path.join(root, f"d{d:04d}")
        os.mkdir(sub)
        for i in range(per_dir):
            fd = os.open(os.path.join(sub, f"f{i:04d}.txt"), os.O_CREAT | os.O_WRONLY, 0o644)
            if content:
                os.write(fd, b"%d/%d\n" % (d, i))
            os.close(fd)


def timed(cmd: list[str], cwd: str | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-600:]}")
    return time.perf_counter() - t0


LIMIT = 1024


class LimitedMount(Mount):
    """``prlimit --nofile=N:N deltafs mount ...``: the detached daemon inherits the limit."""

    def __init__(self, src: str, mnt: str, extra: list[str], limit: int) -> None:
        self.src, self.mnt = src, mnt
        os.makedirs(src, exist_ok=True)
        os.makedirs(mnt, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run(["prlimit", f"--nofile={limit}:{limit}", *DELTAFS, "mount", src, mnt, *extra],
                       check=True, cwd=ROOT, timeout=300)
        self.mount_seconds = time.perf_counter() - t0
        self.open = True


def scale_part(w: str, files: int, res: dict, mounts: list) -> None:
    key = f"find_{files}"
    src, mnt = os.path.join(w, key, "src"), os.path.join(w, key, "mnt")
    log(f"{files} files: generating the tree natively")
    make_tree(os.path.join(src, "tree"), files)
    log(f"{files} files: mount --no-capture under a limit of {LIMIT}, find")
    m = LimitedMount(src, mnt, ["--no-capture"], LIMIT)
    mounts.append(m)
    pid = daemon_pid(mnt)
    s = FdSampler(pid)
    s.sample()
    start_fds = s.fds
    s.start()
    t = timed(["find", mnt, "-type", "f"])
    t_du = timed(["du", "-s", mnt])
    s.stop.set()
    s.join()
    s.sample()
    _, r = run(["status", mnt, "--json"])
    fds = json.loads(r.stdout)["descriptors"]
    res[key] = {"files": files, "find_s": t, "du_s": t_du, "peak_fds": s.fds, "start_fds": start_fds,
                "limit": fds["limit"], "budget": fds["budget"], "inodes": fds["inodes"],
                "evictions": fds["evictions"], "hwm": vm_hwm(pid), "anon_peak": s.anon}
    m.umount()
    shutil.rmtree(os.path.join(w, key))
    log(f"{files} files: {res[key]}")


def hot_part(w: str, files: int, rounds: int, res: dict, mounts: list) -> None:
    """find / cp -a / git status, native vs mount (default budget) vs mount (--fd-budget 16)."""
    tree_src = os.path.join(w, "hot-tree")
    make_tree(tree_src, files, per_dir=200, content=True)
    sizes = {"find": [], "cp": [], "git": []}
    out = {t: {k: [] for k in sizes} for t in ("native", "fits", "evicts")}
    extra = {"fits": [], "evicts": ["--fd-budget", "16"]}
    stats: dict = {}
    for rnd in range(rounds + 1):
        for target in ("native", "fits", "evicts"):
            base = os.path.join(w, f"hot-{target}")
            shutil.rmtree(base, ignore_errors=True)
            src = os.path.join(base, "src")
            os.makedirs(src)
            shutil.copytree(tree_src, os.path.join(src, "tree"), symlinks=True)
            subprocess.run(["git", "init", "-q"], cwd=os.path.join(src, "tree"), check=True)
            subprocess.run(["git", "add", "-A"], cwd=os.path.join(src, "tree"), check=True)
            # gc.auto=0: no `git gc --auto` packing loose objects in the background (behind
            # the mount's back, and under a running find natively)
            subprocess.run(["git", "-c", "gc.auto=0", "-c", "user.name=b", "-c", "user.email=b@b",
                            "commit", "-qm", "t"], cwd=os.path.join(src, "tree"), check=True)
            m = None
            where = src
            if target != "native":
                where = os.path.join(base, "mnt")
                m = Mount(src, where, ["--no-capture", *extra[target]], os.environ.copy())
                mounts.append(m)
            times = {"find": timed(["find", where, "-type", "f"]),
                     "cp": timed(["cp", "-a", os.path.join(where, "tree"), os.path.join(where, "copy")])}
            tree = os.path.join(where, "tree")
            subprocess.run(["git", "status", "--porcelain"], cwd=tree, check=True, stdout=subprocess.DEVNULL)
            times["git"] = timed(["git", "status", "--porcelain"], cwd=tree)
            if m is not None:
                _, r = run(["status", where, "--json"])
                stats[target] = json.loads(r.stdout)["descriptors"]
                m.umount()
            shutil.rmtree(base)
            if rnd > 0:  # round 0 warms up
                for k, v in times.items():
                    out[target][k].append(v)
        log(f"hot path round {rnd}: " + ", ".join(
            f"{t} {k} {out[t][k][-1]:.2f}s" for t in out for k in out[t] if out[t][k]))
    shutil.rmtree(tree_src)
    ratios = {}
    for target in ("fits", "evicts"):
        ratios[target] = {}
        for k in sizes:
            rr = [a / b for a, b in zip(out[target][k], out["native"][k]) if b > 0]
            ratios[target][k] = statistics.median(rr) if rr else None
    res["hot"] = {"files": files, "rounds": rounds, "ratios": ratios,
                  "native_s": {k: statistics.median(v) for k, v in out["native"].items() if v},
                  "descriptors": stats}


# --- the docs section ----------------------------------------------------------------------

def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def render(res: dict, meta: dict) -> str:
    mi, sw = meta["machine"], meta.get("software", {})
    L = [HEADING, "",
         f"Measured by `python -m tools.bench.fds{' --quick' if meta['mode'] == 'quick' else ''}"
         f" --write-docs` ({meta['mode']} run of {meta['date']}; deltafs at commit `{sw.get('commit')}`; "
         f"{mi['cpu']}, {mi['cores']} cores, kernel {mi['kernel']}, one ext4 disk). "
         "The timings were taken on a shared machine while other test runs used the same 2 cores: "
         "they are provisional. Descriptor counts and memory do not depend on the load.", ""]
    o = res.get("options")
    if o:
        bh = f"{o['by_handle_us']:.2f} µs" if o.get("by_handle_us") else \
            f"not available ({o.get('by_handle_error', 'needs CAP_DAC_READ_SEARCH')})"
        L += ["**The options, per call** (in-process, 2,000 files, warm dentry cache):", "",
              "| operation | cost |", "|---|---|",
              f"| `fstat` of a held O_PATH descriptor (an inode whose descriptor is cached) | {o['fstat_held_us']:.2f} µs |",
              f"| `fstatat(parent, name)` (lookup, readdir, getattr of an inode without one) | {o['fstatat_name_us']:.2f} µs |",
              f"| reopen through the parent: `openat(O_PATH)` + `fstat` + `close` | {o['reopen_us']:.2f} µs |",
              f"| `open_by_handle_at(O_PATH)` + `fstat` + `close` (file handles; root only) | {bh} |",
              f"| one LRU touch (`OrderedDict.move_to_end`) | {o['lru_touch_us']:.3f} µs |",
              f"| memory of one `Node` (name included, tracemalloc) | {o['node_bytes']:.0f} bytes |", ""]
    rows = [res[k] for k in sorted(res) if k.startswith("find_")]
    if rows:
        L += ["**Peak descriptors and daemon memory**, `find` then `du -s` over a tree of empty files "
              "generated in SRC (1,000 per directory), mounted `--no-capture` by a daemon started "
              f"under `ulimit -n {LIMIT}` (soft and hard):", "",
              "| files | inodes the daemon knows | peak descriptors (at start) | limit, budget | evictions "
              "| peak RSS (VmHWM) | peak RssAnon | find | du -s |",
              "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            L.append(f"| {r['files']:,} | {r['inodes']:,} | {r['peak_fds']} ({r['start_fds']}) | "
                     f"{r['limit']:,}, {r['budget']:,} | {r['evictions']:,} | {_mib(r['hwm'])} | "
                     f"{_mib(r['anon_peak'])} | {r['find_s']:.1f} s | {r.get('du_s', 0):.1f} s |")
        L += ["", "Before the cache (one O_PATH descriptor per inode the kernel knows) the same walk "
              "needed one descriptor per file and directory, so it ended in EMFILE after about "
              f"{LIMIT - 30:,} files under this limit (and after 20,000 under this machine's default).", ""]
    h = res.get("hot")
    if h:
        rt = h["ratios"]
        L += [f"**Hot path: everything fits vs evicting all the time** ({h['files']:,} small files in "
              f"200-file directories, `--no-capture`, median of {h['rounds']} rounds, ratio to native):",
              "", "| workload | native | fits (default budget) | evicts (`--fd-budget 16`) |",
              "|---|---:|---:|---:|"]
        names = {"find": "`find` (first walk after mounting)", "cp": "`cp -a` of the tree",
                 "git": "`git status` (warm)"}
        for k, label in names.items():
            L.append(f"| {label} | {h['native_s'][k]:.2f} s | {rt['fits'][k]:.2f}× | {rt['evicts'][k]:.2f}× |")
        ev = h["descriptors"].get("evicts", {})
        fi = h["descriptors"].get("fits", {})
        L += ["", f"Evictions in the last round: {fi.get('evictions', 0):,} (fits), "
              f"{ev.get('evictions', 0):,} (evicts, {ev.get('reopens', 0):,} reopens).", ""]
    for n in res.get("notes", []):
        L.append(f"* {n}")
    return "\n".join(L).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.fds", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100,000 files only, a 2,000-file hot-path tree, 1 round")
    p.add_argument("--million", action="store_true", help="also the 1,000,000-file tree (a full run has it)")
    p.add_argument("--write-docs", action="store_true",
                   help="rewrite this program's section of docs/benchmarks.md (the others are kept)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers as JSON")
    p.add_argument("--from-json", metavar="FILE", help="do not run: render a saved --json run")
    p.add_argument("--only", choices=["options", "scale", "hot"], help="run one part only")
    p.add_argument("--note", action="append", default=[], help="an extra note for the docs")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        saved["results"]["notes"] = args.note
        section = render(saved["results"], saved["meta"])
        print(section)
        if args.write_docs:
            write_docs(section, HEADING)
        return 0
    meta = {"mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": report.machine(), "software": report.software()}
    res: dict = {"notes": args.note}
    base, w = fresh_work_dir("fds")
    mounts: list[Mount] = []
    failures = {}
    try:
        parts = []
        if args.only in (None, "options"):
            parts.append(("options", lambda: options_part(w, res)))
        if args.only in (None, "scale"):
            parts.append(("scale 100k", lambda: scale_part(w, 100_000, res, mounts)))
            if args.million or not args.quick:
                parts.append(("scale 1M", lambda: scale_part(w, 1_000_000, res, mounts)))
        if args.only in (None, "hot"):
            parts.append(("hot", lambda: hot_part(w, 2000 if args.quick else 10_000, 1 if args.quick else 3,
                                                  res, mounts)))
        for name, fn in parts:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (recorded; the next part runs)
                failures[name] = f"{type(e).__name__}: {e}"
                log(f"{name} FAILED: {failures[name]}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for m in reversed(mounts):
            for pr in m.close():
                log(f"cleanup problem: {pr}")
        shutil.rmtree(w, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(base)
    res["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "meta": meta}, f, indent=1)
    section = render(res, meta)
    print(section)
    if args.write_docs and not failures:
        write_docs(section, HEADING)
        log(f"wrote the section '{HEADING}' of docs/benchmarks.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
