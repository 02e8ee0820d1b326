"""Where the daemon's CPU goes in a big bs=1M write + fsync: per thread, against the
same capture in one process, and under a stated memory condition (issue 19).

    python -m tools.bench.capcpu mount [--nocap] [--gib 1] [--memory as-is|warm|cold] [--preload-gib N]
    python -m tools.bench.capcpu inproc [--gib 1]
    python -m tools.bench.capcpu page-cost [--gib 1]

``mount``: a fresh mount (capture on, or ``--nocap``), a new file of GIB GiB of
fresh incompressible data written as the bench writes it (``workloads.write_file``:
bs=1M, then fsync), then the same file overwritten with other data; after each,
the daemon's CPU per thread (/proc/PID/task/*/stat, user and system) once it has
settled, and its minor faults.  ``inproc``: what a capture worker does for the
same file in this process (``ContentCapture.compute`` + ``Journal.commit``, the
file in the page cache), CPU by getrusage.  ``page-cost``: a plain native write
of GIB GiB into the page cache, started 0.1 s and then 5 s after the previous
file was deleted.

``--memory``: the page cache a write fills comes from free memory.  On this VM
(free page reporting, ``page_reporting_order=11``, nested virtualisation) pages
that were free for more than ~2 s have been handed back to the host, and the
first touch of each costs the guest ~7 us of system time: a 1 GiB write into the
page cache takes 0.24 s of CPU on pages freed just before and ~2 s on pages freed
5 s before (docs/performance-notes.md, issue 19, thirteenth session).  Which one a
bench row gets depends on what ran before it.  ``warm``: write and delete a
native file of 3 x GIB GiB right before each timed write (its pages are then
reused); ``cold``: wait 6 s first (an overwrite's O_TRUNC still frees the old file's pages
just before its writes, so it gets some of them back warm); ``as-is``: neither.
Set PYTHONPATH to the code under test (the daemon runs with cwd "/").
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

from tools.bench import targets as tg
from tools.bench import workloads as wl

MiB = 1 << 20
COLD_WAIT = 6.0  # s: longer than the kernel's page reporting delay (2 s) and its pass


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """tid -> (user s, system s) of every thread of ``pid``."""
    cpu = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return cpu
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        cpu[int(tid)] = (int(fields[11]) / tg.CLK_TCK, int(fields[12]) / tg.CLK_TCK)
    return cpu


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    return int(st[st.rindex(")") + 2:].split()[7])


def cpu_delta(before: dict, after: dict) -> list[tuple[float, int, float, float]]:
    """[(total, tid, user, system)] of each thread's CPU between two thread_cpu()s, largest first."""
    rows = []
    for tid, (u, s) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        rows.append((u - u0 + s - s0, tid, u - u0, s - s0))
    return sorted(rows, reverse=True)


def condition(memory: str, scratch_dir: str, size: int) -> None:
    if memory == "warm":
        p = os.path.join(scratch_dir, "capcpu-warm.dat")
        wl.write_file(p, 3 * size, MiB, fsync=False)
        os.unlink(p)
    elif memory == "cold":
        time.sleep(COLD_WAIT)


def write_bytes(pid: int) -> int:
    """Bytes ``pid`` sent to the block layer so far (/proc/PID/io; 0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mount(gib: int, capture: bool, memory: str, work: str, preload: int = 0) -> list[str]:
    base = tempfile.mkdtemp(prefix="capcpu-", dir=work)
    out = []
    t = tg.MountTarget(base, "cap" if capture else "nocap", capture)
    try:
        pid = t.pid
        path = os.path.join(t.root, "big.dat")
        size = gib << 30

        def settle():
            wl.wait_quiet(lambda: tg.daemon_stats(pid).cpu)
        for k in range(preload):  # a journal with history: its chunk index as big as a few GiB make it
            wl.write_file(os.path.join(t.root, f"preload{k}.dat"), 1 << 30, MiB)
            settle()
        for label in ("write", "overwrite"):
            condition(memory, base, size)
            c0, f0, b0 = thread_cpu(pid), minor_faults(pid), write_bytes(pid)
            w0 = time.perf_counter()
            wl.write_file(path, size, MiB)
            wall = time.perf_counter() - w0
            settle()
            rows = cpu_delta(c0, thread_cpu(pid))
            line = (f"{label} {gib} GiB {t.name} ({memory}, load {os.getloadavg()[0]:.2f}): wall {wall:.2f} s, "
                    f"daemon CPU {sum(r[0] for r in rows):.2f} s (user {sum(r[2] for r in rows):.2f}, system "
                    f"{sum(r[3] for r in rows):.2f}), minor faults {minor_faults(pid) - f0}, written "
                    f"{(write_bytes(pid) - b0) / MiB:.0f} MiB; per thread: "
                    + ", ".join(f"{tid} {c:.2f} (u {u:.2f} s {s:.2f})" for c, tid, u, s in rows if c > 0.005))
            print(line, flush=True)
            out.append(line)
    finally:
        for p in t.close():
            print("unmount problem:", p, flush=True)
        shutil.rmtree(base, ignore_errors=True)
    return out


def inproc(gib: int, work: str) -> list[tuple[str, float, float]]:
    """-> [(label, compute CPU s, commit CPU s)] for a fresh file and its overwrite."""
    from deltafs.capture.recorder import Recorder
    from deltafs.journal import Journal
    base = tempfile.mkdtemp(prefix="capcpu-", dir=work)
    os.makedirs(os.path.join(base, "src"))
    j = Journal.open(os.path.join(base, "journal"), create=True)
    rec = Recorder(j, os.path.join(base, "src"))
    path = os.path.join(base, "src", "big.dat")
    size = gib << 30 if gib > 0 else 8 * MiB  # 0: a quick self-test size
    seq = 0
    res = []

    def cpu(a, b) -> float:
        return (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)
    try:
        for label in ("fresh", "overwrite"):
            wl.write_file(path, size, MiB, fsync=False)
            fd = os.open(path, os.O_RDONLY)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            w0 = time.perf_counter()
            try:
                dirty = [(0, size)] if seq else None
                ch, lc = rec.content.compute(fd, b"big.dat", "write", dirty, seq or None,
                                             rec.content.take(seq) if seq else None)
            finally:
                os.close(fd)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            seq = j.commit([ch])[-1]
            if lc is not None:
                rec.content.remember_list(seq, *lc)
            r2 = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.perf_counter() - w0
            res.append((label, cpu(r0, r1), cpu(r1, r2)))
            print(f"in process, {label} {size / (1 << 30):g} GiB (load {os.getloadavg()[0]:.2f}): wall {wall:.2f} s, "
                  f"CPU {cpu(r0, r2):.2f} s (compute {cpu(r0, r1):.2f}, commit {cpu(r1, r2):.2f}; user "
                  f"{r2.ru_utime - r0.ru_utime:.2f}, system {r2.ru_stime - r0.ru_stime:.2f}), minor faults "
                  f"{r2.ru_minflt - r0.ru_minflt}", flush=True)
    finally:
        j.close()
        shutil.rmtree(base, ignore_errors=True)
    return res


def page_cost(gib: int, work: str) -> None:
    path = os.path.join(work, "capcpu-page.dat")
    buf = os.urandom(MiB)
    for gap in (0.1, 5.0, 0.1, 5.0):
        if os.path.exists(path):
            os.unlink(path)
        time.sleep(gap)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(gib * 1024):
                os.write(fd, buf)
        finally:
            os.close(fd)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(f"native write {gib} GiB into the page cache, {gap:g} s after the last delete (load "
              f"{os.getloadavg()[0]:.2f}): system CPU {r1.ru_stime - r0.ru_stime:.2f} s", flush=True)
    os.unlink(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("mount", "inproc", "page-cost"))
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--nocap", action="store_true", help="mount with --no-capture")
    ap.add_argument("--memory", choices=("as-is", "warm", "cold"), default="as-is")
    ap.add_argument("--preload-gib", type=int, default=0,
                    help="mount: first write this many 1 GiB files (a journal with history; 2: ~130,000 chunks)")
    ap.add_argument("--work-dir", default=None, help="where to work (default: bench-work/ in the repo)")
    a = ap.parse_args(argv)
    work = a.work_dir or os.path.join(tg.ROOT, "bench-work")
    os.makedirs(work, exist_ok=True)
    if a.mode == "mount":
        mount(a.gib, not a.nocap, a.memory, work, a.preload_gib)
    elif a.mode == "inproc":
        inproc(a.gib, work)
    else:
        page_cost(a.gib, work)


if __name__ == "__main__":
    main()
