"""Paired rounds: every workload group runs on native, no-capture and capture in turn
(the order rotates each round), one warm-up round first, then the counted rounds."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from tools.bench import targets as tg
from tools.bench import workloads as wl

TARGET_NAMES = ("native", "nocap", "cap")


@dataclass
class Sample:
    round: int                 # 0 = warm-up
    seconds: float | None
    cpu: float = 0.0           # daemon CPU seconds during the workload and its settling
    hwm: int = 0               # daemon peak RSS (bytes) during it (whole life if reset failed)
    journal: int = 0           # journal directory: allocated bytes added (du)
    journal_used: int = 0      # LMDB pages in use added (free pages excluded)
    settle: float = 0.0        # seconds waited afterwards for the daemon to go quiet
    error: str | None = None


@dataclass
class Context:
    sizes: wl.Sizes
    corpus: str
    corpus_files: int
    can_drop: bool
    timeout: float
    target: tg.Target | None = None
    edit_seq: int = 0
    peak_reset: bool = True
    settle: object = None


@dataclass
class Results:
    order: list[str] = field(default_factory=list)          # workload names, first-seen order
    samples: dict = field(default_factory=dict)             # name -> target -> [Sample]
    events: list[str] = field(default_factory=list)         # failures, remounts, notes
    big_write: dict = field(default_factory=dict)           # target -> memory trace summary

    def add(self, name: str, target: str, s: Sample) -> None:
        if name not in self.samples:
            self.order.append(name)
            self.samples[name] = {t: [] for t in TARGET_NAMES}
        self.samples[name][target].append(s)


class GroupFailed(Exception):
    pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_group(res: Results, ctx: Context, t: tg.Target, rnd: int, gname: str, fn) -> None:
    def settle() -> float:
        return wl.wait_quiet(lambda: tg.daemon_stats(t.pid).cpu) if t.is_mount else 0.0

    ctx.target = t
    ctx.settle = settle

    def m(name: str, work, before=None) -> None:
        if before is not None:
            before()
        pid = t.pid
        s0 = tg.daemon_stats(pid)
        if t.is_mount and not tg.reset_peak(pid):
            ctx.peak_reset = False
        j0, u0 = t.journal_bytes(), t.journal_used()
        dog = None
        if t.is_mount:
            dog = threading.Timer(ctx.timeout, t.abort)
            dog.daemon = True
            dog.start()
        err = None
        t0 = time.perf_counter()
        try:
            work()
        except Exception as e:          # recorded, then the rest of the group is skipped
            err = f"{type(e).__name__}: {e}"
        elapsed = time.perf_counter() - t0
        if dog is not None:
            dog.cancel()
            if not dog.is_alive() and err and elapsed >= ctx.timeout:
                err = f"timed out after {ctx.timeout:.0f}s (daemon killed); {err}"
        waited = settle() if err is None else 0.0
        s1 = tg.daemon_stats(pid)
        sample = Sample(rnd, None if err else elapsed, cpu=max(0.0, s1.cpu - s0.cpu),
                        hwm=s1.hwm, journal=t.journal_bytes() - j0,
                        journal_used=t.journal_used() - u0, settle=waited, error=err)
        res.add(name, t.name, sample)
        tag = "warm-up" if rnd == 0 else f"round {rnd}"
        if err:
            _log(f"  {tag} {t.name:6} {name}: FAILED {err}")
            raise GroupFailed(err)
        _log(f"  {tag} {t.name:6} {name}: {elapsed:.3f}s"
             + (f"  cpu {sample.cpu:.2f}s rss {sample.hwm >> 20}MiB j+{sample.journal_used}" if t.is_mount else ""))

    try:
        fn(m, t.root, ctx)
    except GroupFailed:
        pass
    except Exception as e:   # a failure outside the timed parts (setup, clean-up)
        res.events.append(f"{tag_of(rnd)} {t.name} {gname}: {type(e).__name__}: {e}")
        _log(f"  {t.name} {gname}: setup failed: {e}")
        traceback.print_exc(file=sys.stderr)
    if t.is_mount and not t.alive():
        res.events.append(f"{tag_of(rnd)}: the {t.name} mount died during {gname}; remounted")
        _log(f"  {t.name} mount is dead: remounting")
        try:
            t.recover()
            if getattr(t, "last_log", None):
                res.events.append(f"{t.name} daemon log before the remount: "
                                  + " | ".join(t.last_log))
        except Exception as e:
            res.events.append(f"remount of {t.name} failed: {e}")


def tag_of(rnd: int) -> str:
    return "warm-up" if rnd == 0 else f"round {rnd}"


def big_write(res: Results, ctx: Context, t: tg.Target, size: int) -> None:
    """Write `size` bytes bs=1M + fsync while sampling the daemon's RSS every 0.25 s."""
    path = os.path.join(t.root, "big.dat")
    trace: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.is_set():
            trace.append((time.monotonic() - t0, tg.daemon_stats(t.pid).rss))
            stop.wait(0.25)
    th = threading.Thread(target=sample, daemon=True)
    j0, u0 = t.journal_bytes(), t.journal_used()
    c0 = tg.daemon_stats(t.pid).cpu
    th.start()
    err = None
    t0 = time.perf_counter()
    try:
        wl.write_file(path, size, wl.MiB)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    elapsed = time.perf_counter() - t0
    wl.wait_quiet(lambda: tg.daemon_stats(t.pid).cpu)
    stop.set()
    th.join()
    try:
        os.unlink(path)
    except OSError:
        pass
    rss = [r for _, r in trace if r]
    res.big_write[t.name] = {
        "bytes": size, "seconds": elapsed, "error": err,
        "rss_start": rss[0] if rss else 0, "rss_max": max(rss) if rss else 0,
        "rss_end": rss[-1] if rss else 0, "cpu": tg.daemon_stats(t.pid).cpu - c0,
        "journal": t.journal_bytes() - j0,
        "journal_used": t.journal_used() - u0, "trace": trace[::4],
    }
    _log(f"  big write {t.name}: {elapsed:.1f}s rss {rss[0] >> 20 if rss else 0}"
         f"->{max(rss) >> 20 if rss else 0}->{rss[-1] >> 20 if rss else 0} MiB")


def run(work_base: str, sizes: wl.Sizes, rounds: int, groups: list[str] | None,
        timeout: float, keep: bool = False) -> tuple[Results, dict]:
    os.makedirs(work_base, exist_ok=True)
    stale = tg.cleanup_stale(work_base)
    res = Results()
    if stale:
        res.events.append(f"unmounted {len(stale)} stale mount(s) from an earlier run")
    run_dir = os.path.join(work_base, time.strftime("run-%Y%m%d-%H%M%S"))
    os.makedirs(run_dir)
    info: dict = {"run_dir": run_dir}
    targets: list[tg.Target] = []
    try:
        corpus = os.path.join(run_dir, "corpus")
        nfiles, nbytes = wl.build_corpus(corpus, sizes.tree_files)
        info.update(corpus_files=nfiles, corpus_bytes=nbytes)
        can_drop = wl.drop_caches()
        info["drop_caches"] = can_drop
        if not can_drop:
            res.events.append("cannot write /proc/sys/vm/drop_caches: cold reads not measured, "
                              "warm only")
        ctx = Context(sizes, corpus, nfiles, can_drop, timeout)
        targets = tg.make_targets(run_dir)
        info["fs_type"] = fs_type(run_dir)
        chosen = [(n, f) for n, f in wl.GROUPS if not groups or n in groups]
        for rnd in range(rounds + 1):
            order = targets[rnd % 3:] + targets[:rnd % 3]
            _log(f"{tag_of(rnd)}: order {', '.join(t.name for t in order)}")
            for gname, fn in chosen:
                for t in order:
                    run_group(res, ctx, t, rnd, gname, fn)
        if sizes.big_write:
            for t in targets[1:]:
                big_write(res, ctx, t, sizes.big_write)
        info["peak_reset"] = ctx.peak_reset
        info["mounts"] = {t.name: getattr(t, "mounts", 0) for t in targets}
    finally:
        for t in targets:
            for p in t.close():
                res.events.append(f"unmount {t.name}: {p}")
        if not keep:
            if any(tg.is_mountpoint(t.root) for t in targets):
                res.events.append(f"left {run_dir} in place: something is still mounted")
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
        try:
            os.rmdir(work_base)   # only if empty
        except OSError:
            pass
    return res, info


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best, typ = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, typ = mnt, right.split()[0]
    return typ
