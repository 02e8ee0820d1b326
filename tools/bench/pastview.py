"""mount --at benchmark (issue 22): how fast and small a read-only view of the past is.

    .venv/bin/python -m tools.bench.pastview [--quick] [--write-docs] [--json FILE]
                                             [--keep | --reuse | --generate-only]

Generates a journal (quick: 10,000 files, 100,000 records; full: 100,000
files, 1,000,000 records; the time it took is reported): the files are
written natively into SRC (one directory of 10,000 entries, the rest in
1,000-entry directories, and one large file of random bytes: 256 MiB quick,
1 GiB full), recorded by the first mount's scan, then small saves add
records until the count is reached.  Then, with the live mount gone, it
measures ``mount --at vHEAD`` until the command returns (the view is usable),
``ls`` of the 10,000-entry directory cold (first after mounting) and warm,
``find`` of the whole view (first on a fresh view, and again) vs ``find`` on
SRC (dentries cached, and after drop_caches), the FUSE requests of each
``find`` (strace, a separate run), a sequential read of the large file
(``dd bs=1M``) from the view vs from SRC cold (caches dropped, as root),
warm (page cache) and through the daemon (the view's pages dropped), the
daemon's memory (the peak of RssAnon, sampled every 0.05 s while each
timed view is mounted, and VmHWM), the history queries and ``restore --to``.
Everything happens under bench-work/pastview/ and is removed at the end
(``--keep`` keeps it, ``--reuse`` measures it again, ``--generate-only``
generates and keeps it without measuring: generation needs no bench lock
and can run niced beforehand); every mount is unmounted in a ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

from tools.bench import report
from tools.bench.scale import _terminate, write_docs
from tools.bench.targets import DELTAFS, ROOT, force_unmount

HEADING = "## Past views: mount --at"


def log(msg: str) -> None:
    print(f"[pastview {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(cmd, **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*DELTAFS, *map(str, args)], capture_output=True, check=True)


def head_seq(src: str) -> int:
    from deltafs.journal import Journal

    with Journal.open(os.path.join(src, ".deltafs"), readonly=True) as j, j.reader() as r:
        return r.head_seq()


def checkpoint_count(src: str) -> int:
    from deltafs.journal import Journal, checkpoints

    with Journal.open(os.path.join(src, ".deltafs"), readonly=True) as j, j.reader() as r:
        return len(checkpoints.seqs(r))


def catch_up(src: str) -> float:
    """Write the tree checkpoints the live mount had not written yet (its
    maintenance writes them every few seconds): -> seconds."""
    from deltafs.journal import Journal

    t0 = time.perf_counter()
    with Journal.open(os.path.join(src, ".deltafs")) as j:
        j.checkpoint_trees()
    return time.perf_counter() - t0


def best(cmd, n: int = 3) -> float:
    return min(timed(cmd) for _ in range(n))


def inproc(*args: str, n: int = 3) -> float:
    """Best wall time of ``deltafs ARGS`` run in this process (``cli.main``,
    stdout to /dev/null): the query's own cost, without the 0.3-0.4 s of
    interpreter start and imports every command pays."""
    from deltafs import cli as dcli

    null, saved = os.open(os.devnull, os.O_WRONLY), os.dup(1)
    times = []
    try:
        for _ in range(n):
            sys.stdout.flush()
            os.dup2(null, 1)
            t0 = time.perf_counter()
            try:
                rc = dcli.main(list(args))
            finally:
                sys.stdout.flush()
                times.append(time.perf_counter() - t0)
                os.dup2(saved, 1)
            if rc:
                raise RuntimeError(f"deltafs {' '.join(args)}: exit {rc}")
    finally:
        os.close(null)
        os.close(saved)
    return min(times)


def churn_direct(src: str, records: int) -> None:
    """The small saves committed straight into the journal (no mount): what
    the capture layer commits for a rewrite of a small file, one content
    version per save (``write``, its base the file's previous version),
    1,000 per transaction.  Used for the full size, where saves through
    the mount (~100-1,000 records/s on this shared machine) would take hours."""
    from deltafs import chunking
    from deltafs.journal import Change, Journal

    with Journal.open(os.path.join(src, ".deltafs")) as j:
        with j.reader() as r:
            n = r.head_seq()
            last = {}
            for k in range(500):
                p = b"churn/c%d" % k
                fid = r.file_id_at(p)
                last[p] = (r.file_state(fid).content_seq, 1) if fid else (0, 0)
        i = 0
        while n < records:
            batch, paths = [], []
            for _ in range(min(1000, records - n)):
                p = b"churn/c%d" % (i % 500)
                data = b"save %d\n" % i
                base, old = last[p]
                batch.append(Change(op="write", path=p, size=len(data), cause="write", base_seq=base,
                                    edit=[(0, old, [(chunking.chunk_id(data), len(data))])],
                                    chunks=[chunking.build_chunk(data)], mtime_ns=time.time_ns()))
                paths.append(p)
                i += 1
            for p, seq in zip(paths, j.commit(batch)):
                last[p] = (seq, 1)
            n += len(batch)


def generate(w: str, files: int, records: int, big: int, direct: bool = False) -> dict:
    src, mnt = os.path.join(w, "src"), os.path.join(w, "mnt")
    os.makedirs(os.path.join(src, "big"))
    os.makedirs(mnt)
    t0 = time.perf_counter()
    for i in range(min(files, 10_000)):
        with open(os.path.join(src, "big", f"f{i:05d}"), "wb") as f:
            f.write(b"%d\n" % i)
    for i in range(10_000, files):
        d = os.path.join(src, f"d{i // 1000:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(b"%d\n" % i)
    with open(os.path.join(src, "large.bin"), "wb") as f:  # every MiB its own: nothing deduplicates
        for _ in range(big >> 20):
            f.write(os.urandom(1 << 20))
    if direct:
        os.makedirs(os.path.join(src, "churn"))
        for k in range(500):
            with open(os.path.join(src, "churn", f"c{k}"), "wb") as f:
                f.write(b"save\n")
        subprocess.run([*DELTAFS, "mount", src, mnt], check=True)  # the first mount's scan
        subprocess.run([*DELTAFS, "umount", mnt], check=True)
        t1 = time.perf_counter()
        churn_direct(src, records)
        log(f"{head_seq(src)} records; the direct saves took {time.perf_counter() - t1:.0f} s")
        seconds = time.perf_counter() - t0
        return {"src": src, "seconds": seconds, "records": head_seq(src), "files": files, "direct": True,
                "checkpoints_live": checkpoint_count(src), "checkpoint_catch_up_s": catch_up(src),
                "checkpoints": checkpoint_count(src)}
    subprocess.run([*DELTAFS, "mount", src, mnt], check=True)
    try:
        os.makedirs(os.path.join(mnt, "churn"), exist_ok=True)
        n = 0
        while True:
            head = head_seq(src)
            if head >= records:
                break
            for _ in range(max(100, (records - head) // 3)):
                with open(os.path.join(mnt, "churn", f"c{n % 500}"), "wb") as f:
                    f.write(b"save %d\n" % n)
                n += 1
        subprocess.run([*DELTAFS, "umount", mnt], check=True)
    finally:
        force_unmount(mnt)
    seconds = time.perf_counter() - t0
    live = checkpoint_count(src)
    return {"src": src, "seconds": seconds, "records": head_seq(src), "files": files,
            "checkpoints_live": live, "checkpoint_catch_up_s": catch_up(src),
            "checkpoints": checkpoint_count(src)}


def drop_caches() -> bool:
    """Write back and drop the page cache, dentries and inodes (root only):
    the next read of any file comes from the disk.  -> whether it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def forget_pages(path: str) -> None:
    """Drop the page cache of one file (POSIX_FADV_DONTNEED): for a file of
    the view, the next read goes to the daemon again, while the journal's
    own pages stay cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def loadavg() -> float:
    return os.getloadavg()[0]


def proc_cpu(pid: int | None) -> tuple[float, int]:
    """(user + system CPU seconds, major page faults) of process ``pid`` so far."""
    if not pid:
        return 0.0, 0
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"), int(f[9])


def fuse_requests(pid: int, cmd: list[str]) -> int | None:
    """FUSE requests the daemon ``pid`` reads while ``cmd`` runs (None without
    strace): its read(2) calls whose data is a FUSE request header (its
    length field equals what the read returned).  strace slows the daemon:
    never combined with a timing."""
    if not shutil.which("strace"):
        return None
    out = f"/tmp/pastview-strace-{os.getpid()}.txt"
    tr = subprocess.Popen(["strace", "-f", "-x", "-s", "8", "-e", "trace=read", "-o", out, "-p", str(pid)],
                          stderr=subprocess.PIPE, text=True)
    try:
        for line in tr.stderr:  # "Process N attached": from now on it is watching
            if "attached" in line:
                break
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    finally:
        tr.send_signal(2)
        tr.wait(timeout=60)
    pat = re.compile(r'(?:read\(\d+, |read resumed>)"((?:\\x[0-9a-f]{2}){4})[^=]*= (\d+)')
    n = 0
    try:
        with open(out) as f:
            for ln in f:
                m = pat.search(ln)
                if m and int.from_bytes(bytes.fromhex(m.group(1).replace("\\x", "")), "little") == int(m.group(2)):
                    n += 1
    finally:
        os.unlink(out)
    return n


def syscalls(cmd: list[str]) -> int | None:
    """System calls ``cmd`` makes (strace -c), None without strace."""
    if not shutil.which("strace"):
        return None
    r = subprocess.run(["strace", "-f", "-c", "-o", "/dev/stdout", *cmd], capture_output=True, text=True)
    for ln in r.stdout.splitlines():
        if ln.strip().endswith("total"):
            return int(ln.split()[3])  # % time, seconds, usecs/call, calls, errors, "total"
    return None


class MemSampler(threading.Thread):
    """A daemon's memory while it serves: the peak of RssAnon (its anonymous
    pages: Python objects, the chunk cache, buffers) sampled every 0.05 s,
    and VmHWM (the peak of its whole resident set, which also counts the
    journal's LMDB and pack pages it has mapped and touched: file pages the
    kernel can drop at will, shared with the page cache)."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.anon, self.hwm, self.samples = pid, 0, 0, 0
        self.halt = threading.Event()

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for ln in f:
                    if ln.startswith("RssAnon:"):
                        self.anon = max(self.anon, int(ln.split()[1]) * 1024)
                    elif ln.startswith("VmHWM:"):
                        self.hwm = max(self.hwm, int(ln.split()[1]) * 1024)
            self.samples += 1
        except OSError:
            pass

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(0.05)

    def begin(self) -> "MemSampler":
        if self.pid:
            self.start()
        return self

    def end(self) -> None:
        if self.pid and self.is_alive():
            self.halt.set()
            self.join()
            self.sample()  # the last word, before the view is unmounted


def mount_view(src: str, view: str, seq: int) -> tuple[float, int | None]:
    from deltafs import mounttable

    t0 = time.perf_counter()
    subprocess.run([*DELTAFS, "mount", "--at", f"v{seq}", src, view], check=True)
    ready = time.perf_counter() - t0
    return ready, (mounttable.read_record(os.path.abspath(view)) or {}).get("pid")


def unmount_view(view: str) -> None:
    subprocess.run([*DELTAFS, "umount", view])
    force_unmount(view)


def measure(w: str, gen: dict, big: int, rounds: int = 3) -> dict:
    src, view = gen["src"], os.path.join(w, "view")
    os.makedirs(view, exist_ok=True)
    res: dict = {"load_start": loadavg(), "big_bytes": big}
    head = gen["records"]
    native_find = ["find", src, "-path", os.path.join(src, ".deltafs"), "-prune", "-o", "-print"]
    past_big, native_big = os.path.join(view, "large.bin"), os.path.join(src, "large.bin")
    dd = ["dd", "bs=1M", "of=/dev/null", "status=none"]
    res["ready_s"], pid = mount_view(src, view, head)
    mem = [MemSampler(pid).begin()]  # every timed view's daemon, sampled while it serves
    try:
        res["ls_cold_s"] = timed(["ls", os.path.join(view, "big")])
        res["ls_warm_s"] = min(timed(["ls", os.path.join(view, "big")]) for _ in range(3))
        res["ls_native_s"] = min(timed(["ls", os.path.join(src, "big")]) for _ in range(3))
        # find: the first over the view (every entry new to the kernel), then again
        # (kernel-cached: long entry/attr timeouts, cached listings); native warm
        # (dentries cached) and cold (after drop_caches: from the disk)
        res["find_s"] = timed(["find", view])
        res["find_warm_s"] = median([timed(["find", view]) for _ in range(rounds)])
        res["find_native_s"] = median([timed(native_find) for _ in range(rounds)])
        res["find_entries"] = len(subprocess.run(["find", view], capture_output=True, check=True).stdout.splitlines())
        # sequential read of the large file, in alternating rounds, median of each:
        # warm = page cache (the view opens with keep_cache: the past never changes);
        # daemon = the view's page cache of that file dropped (fadvise DONTNEED), the
        # journal's pages cached: every byte is decoded by the daemon, read through FUSE
        warm, warm_n, daemon = [], [], []
        timed([*dd, f"if={past_big}"])
        timed([*dd, f"if={native_big}"])
        for _ in range(rounds):
            warm.append(timed([*dd, f"if={past_big}"]))
            warm_n.append(timed([*dd, f"if={native_big}"]))
            forget_pages(past_big)
            daemon.append(timed([*dd, f"if={past_big}"]))
        res["read_warm_s"], res["read_native_warm_s"], res["read_daemon_s"] = map(median, (warm, warm_n, daemon))
    finally:
        mem[-1].end()
        unmount_view(view)
    # cold: caches dropped before each read (page cache, dentries, inodes), a fresh
    # view each time (its chunk cache empty); native and past alternate
    if drop_caches():
        cold, cold_n, find_cold_n, cold_cpu, cold_faults = [], [], [], [], []
        for _ in range(max(1, rounds - 1)):
            _, pid = mount_view(src, view, head)
            mem.append(MemSampler(pid).begin())
            try:
                drop_caches()
                c0 = proc_cpu(pid)
                cold.append(timed([*dd, f"if={past_big}"]))
                c1 = proc_cpu(pid)
                cold_cpu.append((c1[0] - c0[0]) / (big / 2**30))
                cold_faults.append(c1[1] - c0[1])
            finally:
                mem[-1].end()
                unmount_view(view)
            drop_caches()
            cold_n.append(timed([*dd, f"if={native_big}"]))
            drop_caches()
            find_cold_n.append(timed(native_find))
        res["read_cold_s"], res["read_native_cold_s"] = median(cold), median(cold_n)
        res["find_native_cold_s"] = median(find_cold_n)
        res["read_cold_cpu_per_gib"], res["read_cold_majflt"] = median(cold_cpu), median(cold_faults)
    if any(m.samples for m in mem):
        res["daemon_anon_bytes"] = max(m.anon for m in mem)
        res["daemon_hwm_bytes"] = max(m.hwm for m in mem)
        res["daemon_mem_samples"] = sum(m.samples for m in mem)
    # requests per find (strace slows the daemon: a separate view, not timed)
    _, pid = mount_view(src, view, head)
    try:
        if pid:
            res["find_requests"] = fuse_requests(pid, ["find", view])
            res["find_requests_again"] = fuse_requests(pid, ["find", view])
        if pid and drop_caches():  # READ requests of a cold and of a warm read of the large file
            res["read_requests_cold"] = fuse_requests(pid, [*dd, f"if={past_big}"])
            res["read_requests_warm"] = fuse_requests(pid, [*dd, f"if={past_big}"])
        res["find_syscalls"] = syscalls(["find", view])
        res["find_native_syscalls"] = syscalls(native_find)
    finally:
        unmount_view(view)
    # history queries (no mount): a file with few versions, one with many, two moments
    # 1,000 records apart, and a restore of the 10,000-entry directory
    few, many = os.path.join(src, "big", "f00001"), os.path.join(src, "churn", "c7")
    res["log_s"] = inproc("log", few)
    res["log_cli_s"] = best([*DELTAFS, "log", few])
    res["log_many_s"] = inproc("log", many)
    res["log_many_versions"] = len(cli("log", "--records", many).stdout.splitlines())
    res["cat_s"] = inproc("cat", "--at", f"v{head // 2}", few)
    res["cat_cli_s"] = best([*DELTAFS, "cat", "--at", f"v{head // 2}", few])
    res["diff_s"] = inproc("diff", src, f"v{head - 1000}", f"v{head}", n=2)
    res["diff_cli_s"] = best([*DELTAFS, "diff", src, f"v{head - 1000}", f"v{head}"], 2)
    res["diff_paths"] = len(cli("diff", src, f"v{head - 1000}", f"v{head}").stdout.splitlines())
    # each round into a DEST of its own, all removed at the end: ext4 without a journal
    # (this machine's) skips inodes freed in the last dirty_expire (30 s) when it allocates,
    # looking each up: a restore right after the removal of the previous round's 10,000
    # files paid ~3x the system time.  Dirty data is written back before each round, so
    # the restore's one syncfs syncs its own files, not what the bench wrote before
    times, dests = [], []
    for i in range(rounds):
        dests.append(os.path.join(w, f"restored{i}"))
        os.sync()
        times.append(timed([*DELTAFS, "restore", "--at", f"v{head}", "--to", dests[-1], os.path.join(src, "big")]))
        res["restore_files"] = sum(len(f) for _, _, f in os.walk(dests[-1]))
    res["restore_s"] = median(times)
    res["restore_all_s"] = times
    # restore --to an existing directory (--force merges into it): an empty one (each
    # file a temp name renamed into place), one that holds every file already with the
    # same bytes (the rounds above: each checked and kept), and the same after a byte was
    # appended to every file (each replaced, atomically: temp files synced together, then
    # renamed).  CPU = the restore process's user + system seconds (getrusage of the children)
    fresh = list(dests)
    for kind, targets in (("empty", None), ("same", fresh), ("changed", fresh)):
        times, cpu = [], []
        for i in range(rounds):
            d = targets[i] if targets else os.path.join(w, f"existing{i}")
            if not targets:
                os.makedirs(d)
                dests.append(d)
            if kind == "changed":
                for name in os.listdir(d):
                    with open(os.path.join(d, name), "ab") as f:
                        f.write(b"+")
            os.sync()
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            times.append(timed([*DELTAFS, "restore", "--at", f"v{head}", "--to", d, "--force",
                                os.path.join(src, "big")]))
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
            n = sum(len(f) for _, _, f in os.walk(d))
            if n != res["restore_files"]:
                raise RuntimeError(f"restore --force into {d}: {n} files, not {res['restore_files']}")
        res[f"restore_{kind}_s"], res[f"restore_{kind}_all_s"] = median(times), times
        res[f"restore_{kind}_cpu_s"] = median(cpu)
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
    res["load_end"] = loadavg()
    return res


def render(gen: dict, res: dict, quick: bool) -> str:
    mb = res["big_bytes"] / 2**20
    hwm, anon = res.get("daemon_hwm_bytes"), res.get("daemon_anon_bytes")

    def speed(k: str) -> float:
        return mb / res[k]

    def x(a: float, b: float) -> str:
        return f"{a / b:.1f}×"

    find, fw, fn = res["find_s"], res["find_warm_s"], res["find_native_s"]
    fnc = res.get("find_native_cold_s")
    rows = [
        ["`mount --at` ready", f"{res['ready_s']:.2f} s", "≤ 1 s", report._yn(res["ready_s"] <= 1)],
        ["`ls` of 10,000 entries, cold", f"{res['ls_cold_s'] * 1000:.0f} ms", "≤ 500 ms",
         report._yn(res["ls_cold_s"] <= 0.5)],
        ["`ls` of 10,000 entries, warm", f"{res['ls_warm_s'] * 1000:.0f} ms (native {res['ls_native_s'] * 1000:.0f} ms)",
         "≤ 50 ms", report._yn(res["ls_warm_s"] <= 0.05)],
    ]
    if fnc is not None:
        rows.append([f"`find` of the whole tree ({res['find_entries']:,} entries), cold: first `find` of a fresh "
                     "view vs SRC with caches dropped", f"{find:.2f} s vs {fnc:.2f} s ({x(find, fnc)})", "≤ 5×",
                     report._yn(find <= 5 * fnc)])
    rows += [
        ["`find`, warm: again (kernel-cached) vs SRC with dentries cached",
         f"{fw:.3f} s vs {fn:.3f} s ({x(fw, fn)})", "≤ 5×", report._yn(fw <= 5 * fn)],
        ["`find`, first `find` of a fresh view vs SRC warm (mixed)", f"{find:.2f} s vs {fn:.3f} s ({x(find, fn)})",
         "≤ 5×", report._yn(find <= 5 * fn)],
    ]
    if "read_cold_s" in res:
        rows.append([f"sequential read of a {mb:.0f} MiB past file, cold (caches dropped for both)",
                     f"{speed('read_cold_s'):.0f} MB/s vs {speed('read_native_cold_s'):.0f} MB/s native "
                     f"({res['read_native_cold_s'] / res['read_cold_s']:.0%})", "≥ 50%",
                     report._yn(res["read_native_cold_s"] / res["read_cold_s"] >= 0.5)])
    rows += [
        [f"sequential read of a {mb:.0f} MiB past file, warm (page cache, both)",
         f"{speed('read_warm_s'):.0f} MB/s vs {speed('read_native_warm_s'):.0f} MB/s native "
         f"({res['read_native_warm_s'] / res['read_warm_s']:.0%})", "≥ 50%",
         report._yn(res["read_native_warm_s"] / res["read_warm_s"] >= 0.5)],
        ["same, through the daemon (the view's pages dropped, the journal's cached)",
         f"{speed('read_daemon_s'):.0f} MB/s", "", ""],
        ["daemon memory: peak RssAnon (VmHWM, with the journal's mapped file pages)",
         f"{report._bytes(anon) if anon else '?'} ({report._bytes(hwm) if hwm else '?'})", "≤ 200 MiB",
         report._yn(anon is not None and anon <= 200 << 20)],
        ["`log PATH`, 1 version / " f"{res['log_many_versions']:,} records (CLI wall)",
         f"{res['log_s'] * 1000:.0f} ms / {res['log_many_s'] * 1000:.0f} ms "
         f"({res['log_cli_s'] * 1000:.0f} ms)", "≤ 100 ms", report._yn(res["log_s"] <= 0.1)],
        ["`cat PATH --at T`, T mid-history (CLI wall)",
         f"{res['cat_s'] * 1000:.0f} ms ({res['cat_cli_s'] * 1000:.0f} ms)", "≤ 200 ms",
         report._yn(res["cat_s"] <= 0.2)],
        ["`diff` of two moments 1,000 records apart (CLI wall)",
         f"{res['diff_s']:.2f} s ({res['diff_cli_s']:.2f} s), {res['diff_paths']} paths", "≤ 1 s",
         report._yn(res["diff_s"] <= 1)],
        [f"`restore --to` of {res['restore_files']:,} files (CLI wall, median of {len(res['restore_all_s'])})",
         f"{res['restore_files'] / res['restore_s']:,.0f} files/s ({res['restore_s']:.2f} s)",
         "≥ 5,000 files/s", report._yn(res["restore_files"] / res["restore_s"] >= 5000)],
    ]
    for kind, what in (("empty", "into an existing empty directory"),
                       ("same", "over an existing copy (same bytes: each file checked, kept)"),
                       ("changed", "over a changed copy (every file replaced)")):
        if f"restore_{kind}_s" not in res:
            continue
        t = res[f"restore_{kind}_s"]
        rows.append([f"`restore --to DEST --force` {what} (CLI wall, median of "
                     f"{len(res[f'restore_{kind}_all_s'])}; restore's CPU)",
                     f"{res['restore_files'] / t:,.0f} files/s ({t:.2f} s; CPU {res[f'restore_{kind}_cpu_s']:.2f} s)",
                     "≥ 5,000 files/s", report._yn(res["restore_files"] / t >= 5000)])
    size = "quick" if quick else "full"
    rd = ""
    if "read_cold_cpu_per_gib" in res:
        rd = (f"Cold, the daemon used {res['read_cold_cpu_per_gib']:.2f} CPU seconds per GiB read "
              f"({res['read_cold_majflt']:,} major page faults per read of the file)")
        if res.get("read_requests_cold") is not None:
            rd += (f"; the read took {res['read_requests_cold']:,} FUSE requests cold (READs of up to 1 MiB, "
                   f"with OPEN and RELEASE) and {res['read_requests_warm']:,} warm")
        rd += ". "
    req = ""
    if res.get("find_requests") is not None:
        req = (f"FUSE requests per `find` of the view: {res['find_requests']:,} on a fresh view, "
               f"{res['find_requests_again']:,} the second time (strace of the daemon; `find` itself makes "
               f"{res.get('find_syscalls') or '?'} system calls there, {res.get('find_native_syscalls') or '?'} on SRC). ")
    return (f"{HEADING}\n\n"
            f"`python -m tools.bench.pastview{' --quick' if quick else ''}` ({size}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1-min load {res['load_start']:.1f} at the start, "
            f"{res['load_end']:.1f} at the end (2 shared cores): a journal of "
            f"{gen['files']:,} files and {gen['records']:,} records, generated in {gen['seconds']:.0f} s "
            + (f"(1-min load {gen['load'][0]:.1f} → {gen['load'][1]:.1f}) " if gen.get("load") else "")
            + "(files written natively, recorded by the first mount's scan, then small saves "
            + ("committed straight into the journal, one content version each, as a capture commits them"
               if gen.get("direct") else "through the mount") + "). The view is `mount --at vHEAD` with no live "
            f"mount. The large file is {mb:.0f} MiB of random bytes (nothing deduplicates or compresses). "
            "Timings are medians of alternating rounds, native beside the view.\n\n"
            + report.md_table(["measurement", "result", "target", "met"], rows) + "\n\n"
            "Which rows carry the targets: the read target is judged cold, a past file read for the first "
            "time against a native file read from the disk: that is the path deltafs' code is on (the chunk "
            "index, pack reads, decoding, FUSE). " + rd + "Warm, both come from the kernel page cache (the view "
            "opens files with keep_cache: no READ reaches the daemon): the gap there is "
            "the kernel's FUSE page cache (4 KiB folios, per-folio work in `filemap_read`, per `perf`) against "
            "ext4's large folios, which no daemon change reaches. `find` is compared like for like (cold with "
            "cold, warm with warm) and, strictest, a fresh view against a warm SRC. The view answers plain "
            "READDIR as well as READDIRPLUS (deltafs's pyfuse3 patch `readdirplus_auto`, docs/fuse-notes.md): "
            "the kernel asks READDIRPLUS only at the start of each listing, so a first `find` no longer makes "
            "an inode and a dentry in the kernel for every entry (about 2 µs each). " + req + "\n\n"
            "Daemon memory is judged on the peak of RssAnon (sampled every 0.05 s while each timed view was "
            f"mounted, {res.get('daemon_mem_samples', 0):,} samples): the daemon's own anonymous memory "
            "(Python objects, the tree, the decoded-chunk cache, buffers), what it costs the machine. VmHWM "
            "also counts every page of the journal's LMDB maps and packs the daemon has touched: file pages, "
            "shared with the page cache and dropped by the kernel under pressure, which grow with what was "
            "read (a 1 GiB file read through the view maps its packs), not with what the daemon keeps.\n\n"
            f"Tree checkpoints (format 7): the live mount had written {gen['checkpoints_live']} while "
            f"the history was generated; writing the rest took {gen['checkpoint_catch_up_s']:.1f} s "
            f"({gen['checkpoints']} in all). The tree at WHEN is built from the nearest checkpoint and "
            "the records after it (at most 4,096), so the ready time depends on the number of entries, "
            "not on the length of the history. `log`, `cat` and `diff` are timed in the bench's process "
            "(`cli.main`: the query's own cost); the CLI wall time in parentheses adds a fresh "
            "interpreter's start and imports.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 files / 100,000 records")
    ap.add_argument("--files", type=int)
    ap.add_argument("--records", type=int)
    ap.add_argument("--direct", action="store_true",
                    help="commit the small saves straight into the journal (default for the full size)")
    ap.add_argument("--through-mount", action="store_true", help="the saves through the mount, also at full size")
    ap.add_argument("--workdir", help="scratch directory (removed at the end; default bench-work/pastview)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir and its journal (for --reuse)")
    ap.add_argument("--reuse", action="store_true", help="measure the journal a --keep run left in --workdir")
    ap.add_argument("--generate-only", action="store_true",
                    help="generate the journal and keep it (for --reuse), measure nothing: needs no bench lock")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    files = a.files or (10_000 if a.quick else 100_000)
    records = a.records or (100_000 if a.quick else 1_000_000)
    big = (256 << 20) if a.quick else (1 << 30)
    w = a.workdir or os.path.join(ROOT, "bench-work", "pastview")
    saved = os.path.join(w, "generated.json")
    try:
        if a.reuse and os.path.exists(saved):
            with open(saved) as f:
                gen = json.load(f)
            big = os.path.getsize(os.path.join(gen["src"], "large.bin"))
            log(f"reusing {gen['src']} ({gen['records']} records)")
        else:
            shutil.rmtree(w, ignore_errors=True)
            os.makedirs(w)
            log(f"generating {files} files, {records} records")
            direct = a.direct or not (a.quick or a.through_mount)
            load0 = loadavg()
            gen = generate(w, files, records, big, direct)
            gen["load"] = [load0, loadavg()]
            log(f"generated in {gen['seconds']:.0f} s ({gen['records']} records)")
            with open(saved, "w") as f:
                json.dump(gen, f)
            if a.generate_only:
                log(f"kept in {w}: measure it with --reuse --workdir {w}")
                return 0
        # the CLI runs below start fresh interpreters: with the package's bytecode
        # compiled, as an install leaves it (PYTHONDONTWRITEBYTECODE would otherwise
        # have every run compile deltafs' sources again)
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "deltafs")],
                       check=False, stdout=subprocess.DEVNULL)
        res = measure(w, gen, big)
    except KeyboardInterrupt:   # Ctrl-C, SIGTERM, SIGHUP: unmount (below), no traceback
        log("interrupted")
        return 130
    finally:
        for m in ("mnt", "view"):
            force_unmount(os.path.join(w, m))
        if not (a.keep or a.generate_only):
            shutil.rmtree(w, ignore_errors=True)
    if a.json:  # first: the figures survive a render that fails
        with open(a.json, "w") as f:
            json.dump({"generate": {k: v for k, v in gen.items() if k != "src"}, **res}, f, indent=1)
    section = render(gen, res, a.quick)
    print(section)
    if a.write_docs:
        write_docs(section, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
