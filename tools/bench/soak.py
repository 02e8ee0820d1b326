"""Soak (issue 18, part 4): does throughput or memory decay as history grows?

    .venv/bin/python -m tools.bench.soak [--quick | --minutes N] [--rate OPS] [--json FILE] [--write-docs]

A real mount of a 2,000-file tree (20 directories of 100 text files of
1-16 KiB, generated natively in SRC before mounting), then a random mixed
workload through the mount at a FIXED offered rate (``--rate``, default
300 operations per second, open loop: operation i is due at t0 + i/rate;
a late operation runs at once, and slots more than a second overdue are
dropped (counted as missed), so a daemon that cannot keep up shows as fewer
operations per second, never as a catch-up burst above the rate):

* edit: overwrite 64-512 bytes at a random offset of a file (``r+b``),
* append: append a 40-200 byte line,
* atomic save: write ``NAME.tmp`` (an ignored name), fsync, rename over NAME,
* unlink: remove a file, and create a new one under a fresh name (so the
  tree keeps its 2,000 files),
* rename: rename a file to a fresh free name.

Every close is a capture.  Every 30 s a background ``deltafs compact MNT``
runs a compaction pass in the daemon (the retention's coalescing drops the
bursts of saves older than a minute, so passes really rewrite records and
packs); its wall time is recorded.  Every minute: operations per second,
p50/p99 latency of one operation (its own duration: open to close through
the mount, throttling by the capture backlog included), versions the daemon
captured, its RssAnon (/proc/PID/status), its CPU seconds (/proc/PID/stat;
also per operation, which the machine's load does not set the way it sets
operations per second), the load average, the journal's size on disk, and
the daemon-side time of that minute's compaction pass (``deltafs compact
--json``: planning, pruning, record blocks, index rewrite).
At the end ``deltafs flush``, then ``deltafs restore MNT --to DEST`` of the
whole tree, compared with SRC (paths, content, modes).

``--quick`` runs 10 minutes, the default 60.  Everything happens under
bench-work/soak/ (removed at the end unless ``--keep``); the mount is
unmounted in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

from tools.bench import report
from tools.bench.scale import Mount, _terminate, compare, run, tree_hashes, write_docs
from tools.bench.targets import DELTAFS, ROOT, fresh_work_dir

HEADING = "## Soak: throughput and memory over an hour of history"
FILES = 2000
DIRS = 20
COMPACT_EVERY_S = 30.0
OPS = (("edit", 35), ("append", 30), ("atomic_save", 20), ("unlink", 7), ("rename", 8))


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_anon(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def du(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def _text(rng: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"lorem", b"ipsum", b"soak", b"fuse",
             b"journal", b"chunk", b"42", b"x", b"history", b"capture"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


def make_tree(src: str, rng: random.Random) -> list[str]:
    names = []
    for d in range(DIRS):
        os.makedirs(os.path.join(src, f"d{d:02d}"))
        for i in range(FILES // DIRS):
            rel = f"d{d:02d}/f{i:04d}.txt"
            with open(os.path.join(src, rel), "wb") as f:
                f.write(_text(rng, rng.randint(1024, 16384)))
            names.append(rel)
    return names


class Workload:
    """The random operations; ``names`` is the list of live files (relative to the mount)."""

    def __init__(self, mnt: str, names: list[str], rng: random.Random) -> None:
        self.mnt, self.names, self.rng = mnt, names, rng
        self.fresh = 0
        self.kinds = [k for k, _ in OPS]
        self.weights = [w for _, w in OPS]

    def _new_name(self) -> str:
        self.fresh += 1
        return f"d{self.rng.randrange(DIRS):02d}/n{self.fresh:06d}.txt"

    def one(self) -> str:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        i = self.rng.randrange(len(self.names))
        rel = self.names[i]
        p = os.path.join(self.mnt, rel)
        rng = self.rng
        if kind == "edit":
            with open(p, "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(rng.randrange(max(1, size)))
                f.write(_text(rng, rng.randint(64, 512)))
        elif kind == "append":
            with open(p, "ab") as f:
                f.write(_text(rng, rng.randint(40, 200)) + b"\n")
        elif kind == "atomic_save":
            with open(p, "rb") as f:
                data = bytearray(f.read())
            at = rng.randrange(max(1, len(data)))
            data[at:at + 100] = _text(rng, rng.randint(50, 300))
            tmp = p + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            os.rename(tmp, p)
        elif kind == "unlink":
            os.unlink(p)
            new = self._new_name()
            with open(os.path.join(self.mnt, new), "wb") as f:
                f.write(_text(rng, rng.randint(1024, 16384)))
            self.names[i] = new
        else:  # rename
            new = self._new_name()
            os.rename(p, os.path.join(self.mnt, new))
            self.names[i] = new
        return kind


class Compactor(threading.Thread):
    """``deltafs compact MNT`` every COMPACT_EVERY_S seconds; records each pass's wall time."""

    def __init__(self, mnt: str, t0: float, every: float = COMPACT_EVERY_S) -> None:
        super().__init__(daemon=True)
        self.mnt, self.t0, self.every = mnt, t0, every
        self.passes: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while self.every > 0 and not self.stop.wait(self.every):
            start = time.perf_counter()
            r = subprocess.run([*DELTAFS, "compact", self.mnt, "--json"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
            dt = time.perf_counter() - start
            p = {"at_s": round(start - self.t0, 1), "seconds": round(dt, 3), "exit": r.returncode}
            with contextlib.suppress(ValueError):
                out = json.loads(r.stdout)
                for k in ("pruned_versions", "pruned", "freed_chunks", "freed_bytes", "versions_pruned",
                          "versions", "files", "files_examined", "versions_examined", "plan_full_why", "plan_s", "pass_s", "checkpoints_written",
                          "prune_s", "repack_s", "archive_s", "densify_s", "records_archived",
                          "packs_emptied", "index_pages_saved"):
                    if k in out:
                        p[k] = out[k]
            if r.returncode != 0:
                p["error"] = r.stderr.strip()[-300:]
                log(f"compact failed: {p['error']}")
            self.passes.append(p)


def status(mnt: str) -> dict:
    _, r = run(["status", mnt, "--json"], timeout=120)
    return json.loads(r.stdout)


def soak(w: str, minutes: float, rate: float, seed: int, res: dict, mounts: list,
         compact_every: float = COMPACT_EVERY_S, heap_dir: str | None = None) -> None:
    rng = random.Random(seed)
    src, mnt, dest = (os.path.join(w, x) for x in ("src", "mnt", "dest"))
    log(f"generating {FILES} files in SRC")
    names = make_tree(src, rng)
    env = os.environ.copy()
    if heap_dir:
        os.makedirs(heap_dir, mode=0o700, exist_ok=True)
        env["DELTAFS_TRACEMALLOC"] = heap_dir
    m = Mount(src, mnt, ["--compact-every", "1440"], env)
    mounts.append(m)
    st = status(mnt)
    pid = st["pid"]
    journal = st["journal"]["path"]
    log(f"mounted in {m.mount_seconds:.1f} s (daemon {pid}); soaking {minutes:g} min at {rate:g} ops/s")
    wl = Workload(mnt, names, rng)
    per_min: list[dict] = []
    t0 = time.perf_counter()
    comp = Compactor(mnt, t0, compact_every)
    comp.start()
    end = t0 + minutes * 60
    lat: list[float] = []
    kinds: dict[str, int] = {}
    late = 0
    i = 0
    minute_end = t0 + 60
    versions0 = st["capture"]["versions"]
    sampler_res: dict = {}
    cpu_prev = [cpu_s(pid), sum(os.times()[:2]), sum(os.times()[2:4])]

    def sample(idx: int, lat_: list[float], kinds_: dict, late_: int, secs: float) -> None:
        # off the workload's thread: `deltafs status` takes a moment
        try:
            s = status(mnt)
            v, pending = s["capture"]["versions"], s["capture"]["pending"]
        except Exception as e:  # noqa: BLE001 (recorded)
            v, pending = None, None
            log(f"status failed: {e}")
        lat_.sort()
        dcpu, own, kids = cpu_s(pid), sum(os.times()[:2]), sum(os.times()[2:4])
        cpu_d, cpu_o, cpu_k = dcpu - cpu_prev[0], own - cpu_prev[1], kids - cpu_prev[2]
        cpu_prev[:] = [dcpu, own, kids]
        lo, hi = 60.0 * idx, 60.0 * (idx + 1)
        passes = [c for c in comp.passes if lo <= c["at_s"] < hi and c.get("exit") == 0]
        row = {"minute": idx + 1, "ops": len(lat_), "ops_s": round(len(lat_) / secs, 1),
               "p50_ms": round(1000 * lat_[len(lat_) // 2], 2) if lat_ else None,
               "p99_ms": round(1000 * lat_[min(len(lat_) - 1, int(len(lat_) * 0.99))], 2) if lat_ else None,
               "missed": late_, "kinds": kinds_, "versions": v, "pending": pending,
               "rss_anon": rss_anon(pid), "journal_bytes": du(journal),
               "daemon_cpu_s": round(cpu_d, 2), "soak_cpu_s": round(cpu_o, 2), "cli_cpu_s": round(cpu_k, 2),
               "load1": round(os.getloadavg()[0], 2),
               "compact_pass_s": max((c.get("pass_s") or 0.0 for c in passes), default=None),
               "compact_cli_s": max((c["seconds"] for c in passes), default=None),
               "compact_examined": max((c.get("files_examined") or 0 for c in passes), default=None)}
        sampler_res[idx] = row
        log(f"minute {idx + 1}: {row['ops_s']} ops/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
            f"RssAnon {row['rss_anon'] / 2**20:.1f} MiB, journal {row['journal_bytes'] / 2**20:.1f} MiB, "
            f"versions {v}, pending {pending}, daemon CPU {row['daemon_cpu_s']} s, load {row['load1']}, "
            f"compaction pass {row['compact_pass_s']} s")

    samplers = []
    while True:
        now = time.perf_counter()
        if now >= minute_end or now >= end:
            secs = min(now, end) - (minute_end - 60)
            th = threading.Thread(target=sample, args=(len(samplers), lat, kinds, late, max(secs, 1e-3)))
            th.start()
            samplers.append(th)
            lat, kinds, late = [], {}, 0
            minute_end += 60
            if now >= end:
                break
        due = t0 + i / rate
        if due > now:
            time.sleep(due - now)
        elif now - due > 1.0:  # a second behind: drop the missed slots, no catch-up burst
            skip = int((now - due) * rate)
            late += skip
            i += skip
        s = time.perf_counter()
        k = wl.one()
        lat.append(time.perf_counter() - s)
        kinds[k] = kinds.get(k, 0) + 1
        i += 1
    comp.stop.set()
    for th in samplers:
        th.join()
    comp.join()
    per_min = [sampler_res[k] for k in sorted(sampler_res)]
    prev = versions0
    for row in per_min:
        if row["versions"] is not None and prev is not None:
            row["captured"] = row["versions"] - prev
        prev = row["versions"]
    log("flush")
    t_flush, _ = run(["flush", mnt, "--timeout", "1800"], timeout=2000)
    log(f"flushed in {t_flush:.1f} s; restore --to DEST")
    t_restore, _ = run(["restore", mnt, "--to", dest], timeout=3600, ok=(0, 1))
    ok, detail = compare(tree_hashes(src), tree_hashes(dest))
    log(f"restore in {t_restore:.1f} s: {detail}")
    res.update({"files": FILES, "minutes": minutes, "rate": rate, "seed": seed, "ops_mix": dict(OPS),
                "mount_s": m.mount_seconds, "compact_every_s": compact_every, "per_minute": per_min, "compactions": comp.passes,
                "flush_s": t_flush, "restore_s": t_restore, "restore_equal": ok, "restore_detail": detail,
                "journal_bytes_end": du(journal)})
    m.umount()


def heap_growth(heap_dir: str, top: int = 25) -> list[str]:
    """What grew in the daemon's heap between its second tracemalloc snapshot
    (after a minute of warm-up) and its last (``--tracemalloc``)."""
    import tracemalloc

    snaps = sorted(f for f in os.listdir(heap_dir) if f.startswith("heap-") and f.endswith(".snap"))
    if len(snaps) < 2:
        return [f"{heap_dir}: fewer than two heap snapshots"]
    a = tracemalloc.Snapshot.load(os.path.join(heap_dir, snaps[min(1, len(snaps) - 2)]))
    b = tracemalloc.Snapshot.load(os.path.join(heap_dir, snaps[-1]))
    out = [f"heap {snaps[min(1, len(snaps) - 2)]} -> {snaps[-1]}: "
           f"{sum(s.size for s in a.statistics('filename')) / 2**20:.1f} -> "
           f"{sum(s.size for s in b.statistics('filename')) / 2**20:.1f} MiB traced"]
    for st in b.compare_to(a, "traceback")[:top]:
        out.append(f"{st.size_diff / 1024:+10.1f} KiB {st.count_diff:+8d} blocks  (now {st.size / 1024:.1f} KiB)")
        for fr in st.traceback.format()[-8:]:
            out.append("      " + fr.strip())
    return out


def summary(res: dict) -> dict:
    pm = [r for r in res.get("per_minute", []) if r["ops"]]
    if len(pm) < 2:
        return {}
    full = [r for r in pm if r["minute"] <= int(res["minutes"])] or pm
    first, last = full[0], full[-1]
    warm = full[min(1, len(full) - 1)]
    comp = [c["seconds"] for c in res.get("compactions", []) if c.get("exit") == 0]
    return {"first_ops_s": first["ops_s"], "last_ops_s": last["ops_s"],
            "ops_ratio": round(last["ops_s"] / first["ops_s"], 3) if first["ops_s"] else None,
            "first_p99_ms": first["p99_ms"], "last_p99_ms": last["p99_ms"],
            "rss_warm": warm["rss_anon"], "rss_last": last["rss_anon"],
            "rss_max": max(r["rss_anon"] for r in full),
            "compact_median_s": statistics.median(comp) if comp else None,
            "compact_max_s": max(comp) if comp else None, "compactions": len(comp),
            **_cpu_summary(full)}


COUNTS = ("files planned", "versions planned", "versions pruned")


def _pass_parts(passes: list[dict]) -> dict:
    """{part: (median of the first 10 passes, of the last 10)} of the daemon-side pass times."""
    ok = [c for c in passes if c.get("exit") == 0 and c.get("pass_s") is not None]
    if len(ok) < 4:
        return {}
    n = min(10, len(ok) // 2)
    out = {}
    for k, name in (("pass_s", "whole pass"), ("plan_s", "planning"), ("prune_s", "pruning"),
                    ("archive_s", "record blocks"), ("densify_s", "index rewrite"), ("repack_s", "repacking")):
        a = [c[k] for c in ok[:n] if c.get(k) is not None]
        b = [c[k] for c in ok[-n:] if c.get(k) is not None]
        if a and b:
            out[name] = (statistics.median(a), statistics.median(b))
    for k, name in (("files_examined", "files planned"), ("versions_examined", "versions planned"),
                    ("versions_pruned", "versions pruned")):
        a = [c[k] for c in ok[:n] if c.get(k) is not None]
        b = [c[k] for c in ok[-n:] if c.get(k) is not None]
        if a and b:
            out[name] = (statistics.median(a), statistics.median(b))
    return out


def _per_op_ms(r: dict) -> str:
    """Daemon CPU per operation (compaction included): unlike ops/s, not set by the machine's load."""
    if r.get("daemon_cpu_s") is None or not r.get("ops"):
        return ""
    return f"{1000 * r['daemon_cpu_s'] / r['ops']:.2f}"


def _cpu_summary(rows: list[dict]) -> dict:
    if not rows or "daemon_cpu_s" not in rows[0]:
        return {}
    ops = sum(r["ops"] for r in rows)
    first, last = rows[0], rows[-1]
    return {"ops": ops, "cpu_ms_first": 1000 * first["daemon_cpu_s"] / max(first["ops"], 1),
            "cpu_ms_last": 1000 * last["daemon_cpu_s"] / max(last["ops"], 1),
            "daemon_cpu_s": sum(r["daemon_cpu_s"] for r in rows), "soak_cpu_s": sum(r["soak_cpu_s"] for r in rows),
            "cli_cpu_s": sum(r.get("cli_cpu_s") or 0 for r in rows) if "cli_cpu_s" in first else None,
            "wall_s": 60.0 * len(rows), "load_min": min(r["load1"] for r in rows),
            "load_max": max(r["load1"] for r in rows)}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(res: dict, meta: dict) -> str:
    mi, sw = meta["machine"], meta.get("software", {})
    flag = {"quick": " --quick", "full": ""}.get(meta["mode"], f" --minutes {res.get('minutes')}")
    L = [HEADING, "",
         f"Measured by `python -m tools.bench.soak{flag} --write-docs` ({res.get('minutes'):g} minutes, "
         f"{meta['date']}; deltafs at commit `{sw.get('commit')}`; {mi['cpu']}, {mi['cores']} cores, "
         f"kernel {mi['kernel']}, one ext4 disk), on a shared machine (other test runs used the same "
         "cores): absolute rates are noisy, what counts is the trend within the run.", "",
         f"{res.get('files', FILES):,} text files (1-16 KiB) in {DIRS} directories, a random mix at a "
         f"fixed offered rate of {res.get('rate', 0):g} operations/s through the mount ("
         + ", ".join(f"{k.replace('_', ' ')} {v}%" for k, v in res.get("ops_mix", dict(OPS)).items())
         + "; every close is a capture), and "
         + (f"`deltafs compact MNT` every {res.get('compact_every_s', COMPACT_EVERY_S):g} s"
            if res.get("compact_every_s", COMPACT_EVERY_S) else "no compaction")
         + ". Latency is one operation's own duration (open to close, through "
         "FUSE, throttling by the capture backlog included).", "",
         "| minute | ops/s | missed slots | p50 | p99 | versions captured | capture backlog | daemon RssAnon "
         "| journal on disk | daemon CPU s | CPU ms/op | load (1 min) | compaction pass | files planned |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res.get("per_minute", []):
        cp = r.get("compact_pass_s")
        L.append(f"| {r['minute']} | {r['ops_s']:.0f} | {r.get('missed', r.get('late', 0)):,} | "
                 f"{r['p50_ms']} ms | {r['p99_ms']} ms | "
                 f"{r.get('captured', '')} | {r.get('pending', '')} | {_mib(r['rss_anon'])} | "
                 f"{_mib(r['journal_bytes'])} | {r.get('daemon_cpu_s', '')} | "
                 f"{_per_op_ms(r)} | {r.get('load1', '')} | "
                 f"{'' if cp is None else f'{cp:.2f} s'} | {r.get('compact_examined') or ''} |")
    sm = summary(res)
    if sm:
        L += ["", f"Last full minute against the first: {sm['last_ops_s']:.0f} vs {sm['first_ops_s']:.0f} "
              f"ops/s ({sm['ops_ratio']:.2f}×); daemon RssAnon {_mib(sm['rss_warm'])} after the first minute, "
              f"{_mib(sm['rss_last'])} at the end (peak {_mib(sm['rss_max'])})."]
        if sm["compactions"]:
            L.append(f"Compaction passes: {sm['compactions']}, median {sm['compact_median_s']:.2f} s, "
                     f"longest {sm['compact_max_s']:.2f} s (`deltafs compact` wall time, its own start-up "
                     "included; the column is the daemon's pass time, the longest in that minute).")
        parts = _pass_parts(res.get("compactions", []))
        if parts:
            L.append("Inside the daemon's passes, median of the first 10 against the last 10: "
                     + ", ".join(f"{k} {a:.2f} → {b:.2f} s" if isinstance(a, float) and k not in COUNTS
                                 else f"{k} {a:,.0f} → {b:,.0f}" for k, (a, b) in parts.items()) + ".")
        if sm.get("daemon_cpu_s") is not None and sm.get("ops"):
            L.append(f"Daemon CPU per operation (compaction included; independent of how many other "
                     f"processes share the cores): {sm['cpu_ms_first']:.2f} ms in the first minute, "
                     f"{sm['cpu_ms_last']:.2f} ms in the last.")
        if sm.get("daemon_cpu_s") is not None:
            L.append(f"CPU: the daemon used {sm['daemon_cpu_s']:.0f} CPU-seconds over the run "
                     f"({sm['daemon_cpu_s'] / max(sm['wall_s'], 1):.2f} of a core), the load generator "
                     f"{sm['soak_cpu_s']:.0f}"
                     + (f", the `deltafs compact`/`status` commands it ran {sm['cli_cpu_s']:.0f}"
                        if sm.get("cli_cpu_s") is not None else "")
                     + "; the machine's 1-minute load average was "
                     f"{sm['load_min']:.1f}-{sm['load_max']:.1f} on {meta['machine']['cores']} cores.")
    if "restore_equal" in res:
        L += ["", f"`deltafs restore MNT --to DEST` after `deltafs flush` ({res['flush_s']:.1f} s) took "
              f"{res['restore_s']:.1f} s; DEST against SRC: {res['restore_detail']}."]
    if res.get("notes"):
        L.append("")
    for n in res.get("notes", []):
        L.append(f"* {n}")
    return "\n".join(L).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.soak", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="10 minutes (default: 60)")
    g.add_argument("--minutes", type=float, help="run this many minutes (for development)")
    p.add_argument("--rate", type=float, default=300.0, help="offered operations per second (300)")
    p.add_argument("--seed", type=int, default=18, help="random seed (18)")
    p.add_argument("--compact-every", type=float, default=COMPACT_EVERY_S, metavar="SECONDS",
                   help=f"seconds between compaction passes ({COMPACT_EVERY_S:g}; 0: none)")
    p.add_argument("--write-docs", action="store_true",
                   help="rewrite this program's section of docs/benchmarks.md (the others are kept)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers as JSON")
    p.add_argument("--from-json", metavar="FILE", help="do not run: render a saved --json run")
    p.add_argument("--note", action="append", default=[], help="an extra note for the docs")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--tracemalloc", metavar="DIR",
                   help="developers: heap snapshots of the daemon every minute into DIR, and what grew")
    args = p.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        p.error("--minutes must be positive")
    if args.rate <= 0:
        p.error("--rate must be positive")
    if args.compact_every < 0:
        p.error("--compact-every must be 0 or more")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                saved = json.load(f)
            saved["results"]["notes"] = args.note or saved["results"].get("notes", [])
            section = render(saved["results"], saved["meta"])
        except (OSError, ValueError, KeyError) as e:
            print(f"soak: cannot read {args.from_json}: {e}", file=sys.stderr)
            return 2
        print(section)
        if args.write_docs:
            write_docs(section, HEADING)
        return 0
    minutes = args.minutes if args.minutes is not None else (10.0 if args.quick else 60.0)
    mode = "quick" if args.quick else ("full" if args.minutes is None else "minutes")
    meta = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": report.machine(), "software": report.software()}
    res: dict = {"notes": args.note}
    base, w = fresh_work_dir("soak")
    mounts: list[Mount] = []
    failure = None
    try:
        soak(w, minutes, args.rate, args.seed, res, mounts, args.compact_every,
             os.path.abspath(args.tracemalloc) if args.tracemalloc else None)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 (reported; the mount is unmounted below)
        failure = f"{type(e).__name__}: {e}"
        log(f"FAILED: {failure}")
    finally:
        for m in reversed(mounts):
            for pr in m.close():
                log(f"cleanup problem: {pr}")
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(base)
    res["failure"] = failure
    res["summary"] = summary(res)
    if args.tracemalloc:
        try:
            res["heap_growth"] = heap_growth(os.path.abspath(args.tracemalloc))
        except (OSError, ValueError) as e:
            res["heap_growth"] = [f"cannot read the heap snapshots: {e}"]
        print("\n".join(res["heap_growth"]), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "meta": meta}, f, indent=1)
    if failure:
        return 1
    section = render(res, meta)
    print(section)
    if args.write_docs:
        write_docs(section, HEADING)
        log(f"wrote the section '{HEADING}' of docs/benchmarks.md")
    return 0 if res.get("restore_equal") else 1


if __name__ == "__main__":
    sys.exit(main())
