"""Paired rounds: every workload group runs on native, no-capture and capture in turn
(the order rotates each round), one warm-up round first, then the counted rounds."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
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
    anon: int = 0              # peak RssAnon sampled every 0.1 s (heap: Python objects, buffers)
    file: int = 0              # peak RssFile sampled likewise (resident LMDB map pages, libraries)
    journal: int = 0           # journal directory: allocated bytes added (du)
    journal_used: int = 0      # journal data added: pack files + LMDB pages in use (free pages excluded)
    settle: float = 0.0        # seconds waited afterwards for the daemon to go quiet
    error: str | None = None
    edits: list | None = None  # edit rows: each edit's seconds (``seconds`` is their median)


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


def _watchdog(timeout: float, t: tg.Target) -> threading.Timer:
    """Kill the mount's daemon if a workload hangs past ``timeout`` (pending requests then fail)."""
    dog = threading.Timer(timeout, t.abort)
    dog.daemon = True
    dog.start()
    return dog


class Probe:
    """Diagnostics for chosen rows (not part of a normal run): with DELTAFS_BENCH_PROBE set to a
    regular expression, every mount row whose name matches it is watched from just after its
    ``before`` step (drop_caches) to the end of its settle wait: the daemon's page faults and its
    CPU per thread are logged, so work left over from an earlier row (a capture still settling,
    maintenance at a tick) shows beside the row's own.  When DELTAFS_BENCH_PROBE_TOOLS names them
    (``py-spy``, ``strace``, ``perf``: comma-separated) it also writes a py-spy profile
    (``--threads``, raw; PY_SPY names the binary), an ``strace -c -f`` summary and a
    ``perf record -g`` profile of the daemon to DELTAFS_BENCH_PROBE_DIR (default /tmp), one file
    per row, target and round (the tools slow the daemon: their rows' times do not count)."""

    def __init__(self, name: str, t: tg.Target, rnd: int) -> None:
        pat = os.environ.get("DELTAFS_BENCH_PROBE")
        self.on = bool(pat) and t.is_mount and t.pid is not None and re.search(pat, name) is not None
        if not self.on:
            return
        self.pid = t.pid
        out = os.environ.get("DELTAFS_BENCH_PROBE_DIR", "/tmp")
        stem = os.path.join(out, f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}-{t.name}-r{rnd}")
        self.label = f"{name} {t.name} round {rnd}"
        self.t0 = self._threads()
        self.faults0 = self._faults()
        self.procs = []
        tools = os.environ.get("DELTAFS_BENCH_PROBE_TOOLS", "")
        if "py-spy" in tools:
            spy = os.environ.get("PY_SPY", "py-spy")
            self.procs.append(subprocess.Popen(
                [spy, "record", "-p", str(self.pid), "--threads", "--rate", "250", "--format", "raw",
                 "-o", stem + ".spy.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if "strace" in tools:
            self.procs.append(subprocess.Popen(
                ["strace", "-c", "-f", "-o", stem + ".strace.txt", "-p", str(self.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if "perf" in tools:
            self.procs.append(subprocess.Popen(
                ["perf", "record", "-g", "-F", "999", "-o", stem + ".perf.data", "-p", str(self.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if self.procs:
            time.sleep(1.0)   # let them attach

    def _threads(self) -> dict:
        cpu = {}
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                try:
                    with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                        st = f.read()
                    fields = st[st.rindex(")") + 2:].split()
                    comm = st[st.index("(") + 1:st.rindex(")")]
                    cpu[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / tg.CLK_TCK)
                except (OSError, ValueError):
                    pass
        except OSError:
            pass
        return cpu

    def _faults(self) -> tuple[int, int]:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2:].split()
            return int(fields[7]), int(fields[9])   # minflt, majflt (fields 10, 12 of stat(5))
        except (OSError, ValueError, IndexError):
            return 0, 0

    def done(self) -> None:
        if not self.on:
            return
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except Exception:
                p.kill()
        t1 = self._threads()
        f0, f1 = self.faults0, self._faults()
        rows = sorted(((c - self.t0.get(tid, ("", 0.0))[1], tid, comm) for tid, (comm, c) in t1.items()),
                      reverse=True)
        _log(f"  probe {self.label}: faults minor {f1[0] - f0[0]} major {f1[1] - f0[1]}; "
             "daemon CPU per thread: "
             + ", ".join(f"{tid} {comm} {d:.2f}s" for d, tid, comm in rows if d > 0.005))


def warm_memory(name: str, t: tg.Target) -> bool:
    """Diagnostics (not part of a normal run): with DELTAFS_BENCH_WARM set to a regular
    expression, before each row whose name matches it a plain file of DELTAFS_BENCH_WARM_MIB
    (default 3072) MiB is written into the page cache beside the target's directory and deleted,
    so the row's writes reuse pages freed just now.  On this VM (free page reporting) a page
    free for more than ~2 s has gone back to the host, and its first touch costs ~7 us of
    system time: 1 GiB written into the page cache took 0.2 s of CPU on pages freed just
    before and 1.3-2 s on pages freed 5 s before (issue 19, thirteenth session,
    docs/performance-notes.md).  Without this, which a row gets depends on what ran before it.
    -> whether it warmed."""
    pat = os.environ.get("DELTAFS_BENCH_WARM")
    if not pat or re.search(pat, name) is None:
        return False
    mib = int(os.environ.get("DELTAFS_BENCH_WARM_MIB", "3072"))
    path = os.path.join(t.base, "warm-memory.tmp")
    wl.write_file(path, mib << 20, 1 << 20, fsync=False)
    os.unlink(path)
    return True


def run_group(res: Results, ctx: Context, t: tg.Target, rnd: int, gname: str, fn) -> None:
    def settle() -> float:
        return wl.wait_quiet(lambda: tg.daemon_stats(t.pid).cpu) if t.is_mount else 0.0

    ctx.target = t
    ctx.settle = settle

    def m(name: str, work, before=None) -> Sample:
        if before is not None:
            before()
        warm_memory(name, t)
        probe = Probe(name, t, rnd)
        pid = t.pid
        s0 = tg.daemon_stats(pid)
        if t.is_mount and not tg.reset_peak(pid):
            ctx.peak_reset = False
        j0, u0 = t.journal_bytes(), t.journal_used()
        dog = sampler = None
        if t.is_mount:
            sampler = tg.RssSampler(lambda: t.pid).start()
            dog = _watchdog(ctx.timeout, t)
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
        probe.done()
        if sampler is not None:
            sampler.stop()
        sample = Sample(rnd, None if err else elapsed, cpu=max(0.0, s1.cpu - s0.cpu),
                        hwm=s1.hwm, anon=sampler.anon_peak if sampler else 0,
                        file=sampler.file_peak if sampler else 0,
                        journal=t.journal_bytes() - j0,
                        journal_used=t.journal_used() - u0, settle=waited, error=err)
        res.add(name, t.name, sample)
        tag = "warm-up" if rnd == 0 else f"round {rnd}"
        if err:
            _log(f"  {tag} {t.name:6} {name}: FAILED {err}")
            raise GroupFailed(err)
        _log(f"  {tag} {t.name:6} {name}: {elapsed:.3f}s"
             + (f"  cpu {sample.cpu:.2f}s rss {sample.hwm >> 20}MiB (anon {sample.anon >> 20}, "
                f"file {sample.file >> 20}) j+{sample.journal_used}" if t.is_mount else ""))
        return sample

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


FLAT_LIMIT = 128 << 20   # "flat": the anonymous peak stays within this of its start


def big_write(res: Results, ctx: Context, t: tg.Target, size: int) -> None:
    """Write `size` bytes bs=1M + fsync while sampling the daemon's memory every 0.25 s.

    RssAnon (the heap: Python objects, buffers, queues) is what must stay flat whatever
    the file size; RssFile is mostly the resident pages of the LMDB map, page cache the
    kernel reclaims under pressure, which grows with the journal.  Both are kept apart."""
    path = os.path.join(t.root, "big.dat")
    tg.reset_peak(t.pid)
    j0, u0 = t.journal_bytes(), t.journal_used()
    c0 = tg.daemon_stats(t.pid).cpu
    sampler = tg.RssSampler(lambda: t.pid, interval=0.25, trace=True).start()
    dog = _watchdog(ctx.timeout, t)
    err = None
    t0 = time.perf_counter()
    try:
        wl.write_file(path, size, wl.MiB)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    elapsed = time.perf_counter() - t0
    dog.cancel()
    if err and elapsed >= ctx.timeout:
        err = f"timed out after {ctx.timeout:.0f}s (daemon killed); {err}"
    n_write = len(sampler.trace)   # samples taken while the write ran
    settle = 0.0
    if err is None:
        settle = wl.wait_quiet(lambda: tg.daemon_stats(t.pid).cpu, limit=max(60.0, ctx.timeout))
    sampler.stop()
    end = tg.daemon_stats(t.pid)
    try:
        os.unlink(path)
    except OSError:
        pass
    first = sampler.first or tg.DaemonStats()
    last = sampler.last or tg.DaemonStats()
    during = [(a, f) for _, a, f in sampler.trace[:max(n_write, 1)]]

    def at(frac: float) -> int:   # anonymous RSS at a fraction of the write
        return during[min(len(during) - 1, int(frac * (len(during) - 1)))][0] if during else 0
    trace = sampler.trace
    step = max(1, len(trace) // 200)
    res.big_write[t.name] = {
        "bytes": size, "seconds": elapsed, "settle_s": settle, "error": err,
        "cpu": end.cpu - c0, "hwm": end.hwm,
        "rss_start": first.rss, "rss_max": sampler.rss_peak, "rss_end": last.rss,
        "anon_start": first.anon, "anon_max": sampler.anon_peak, "anon_end": last.anon,
        "anon_max_write": max((a for a, _ in during), default=0),
        "anon_quarters": [at(q) for q in (0.25, 0.5, 0.75, 1.0)],
        "file_start": first.file, "file_max": sampler.file_peak, "file_end": last.file,
        "flat_limit": FLAT_LIMIT,
        "flat": None if not sampler.first else sampler.anon_peak - first.anon <= FLAT_LIMIT,
        "journal": t.journal_bytes() - j0, "journal_used": t.journal_used() - u0,
        "trace": trace[::step], "trace_columns": ["s", "anon", "file"],
    }
    b = res.big_write[t.name]
    _log(f"  big write {t.name}: {elapsed:.1f}s (+{settle:.1f}s settle)"
         f" anon {b['anon_start'] >> 20}->max {b['anon_max'] >> 20}->{b['anon_end'] >> 20} MiB,"
         f" file {b['file_start'] >> 20}->max {b['file_max'] >> 20}->{b['file_end'] >> 20} MiB"
         + (f" FAILED {err}" if err else ""))
    if not t.alive():
        res.events.append(f"the {t.name} mount died during the {wl._size(size)} write; remounted")
        try:
            t.recover()
        except Exception as e:
            res.events.append(f"remount of {t.name} failed: {e}")


class NotEnoughDisk(RuntimeError):
    pass


def disk_needed(sizes: wl.Sizes, rounds: int, corpus_bytes: int) -> int:
    """A generous estimate of the bytes a run needs at its peak on the work disk.

    The capture journal keeps every round's data (default retention keeps every version of
    the last 24 hours, deleted files included): all the writes of every round, the edit
    files, the tree twice (cp -a and git's objects) and the big write, plus LMDB overhead.
    Each target also holds its edit files and one sequential file at a time."""
    per_round = sizes.seq_1m + sizes.seq_4k + 2 * corpus_bytes
    journal = (rounds + 1) * per_round + sum(sizes.edit_files) + sizes.big_write
    files = 3 * (max(sizes.seq_1m, sizes.seq_4k) + sum(sizes.edit_files) + 2 * corpus_bytes)
    return int(1.15 * journal) + files + sizes.big_write + (1 << 30)


def run(work_base: str, sizes: wl.Sizes, rounds: int, groups: list[str] | None,
        timeout: float, keep: bool = False) -> tuple[Results, dict]:
    os.makedirs(work_base, exist_ok=True)
    # Only our own earlier runs: other measurements (history_size, scale) mount under
    # bench-work/ too, possibly right now.
    stale = [m for d in sorted(os.listdir(work_base)) if d.startswith("run-")
             for m in tg.cleanup_stale(os.path.join(work_base, d))]
    res = Results()
    if stale:
        res.events.append(f"unmounted {len(stale)} stale mount(s) from an earlier run")
    run_dir = os.path.join(work_base, time.strftime("run-%Y%m%d-%H%M%S"))
    os.makedirs(run_dir)
    info: dict = {"run_dir": run_dir}
    t_start = time.monotonic()
    targets: list[tg.Target] = []
    try:
        corpus = os.path.join(run_dir, "corpus")
        nfiles, nbytes = wl.build_corpus(corpus, sizes.tree_files)
        info.update(corpus_files=nfiles, corpus_bytes=nbytes)
        need, free = disk_needed(sizes, rounds, nbytes), shutil.disk_usage(run_dir).free
        info.update(disk_needed=need, disk_free=free)
        if free < need:
            raise NotEnoughDisk(f"{run_dir}: {free / wl.GiB:.1f} GiB free, this run needs about "
                                f"{need / wl.GiB:.1f} GiB (fewer --rounds, --quick, or "
                                "--work-dir on a larger disk)")
        _log(f"disk: {free / wl.GiB:.1f} GiB free, about {need / wl.GiB:.1f} GiB needed")
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
            _log(f"{time.strftime('%H:%M:%S')} {tag_of(rnd)}: order "
                 f"{', '.join(t.name for t in order)}")
            for gname, fn in chosen:
                for t in order:
                    run_group(res, ctx, t, rnd, gname, fn)
        if sizes.big_write:
            _log(f"{time.strftime('%H:%M:%S')} daemon memory: {wl._size(sizes.big_write)} write")
            for t in targets[1:]:
                big_write(res, ctx, t, sizes.big_write)
        info["peak_reset"] = ctx.peak_reset
        info["wall_s"] = time.monotonic() - t_start
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
