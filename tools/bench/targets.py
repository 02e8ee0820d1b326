"""The three places a workload runs: a plain directory and two deltafs mounts.

A ``Target`` hands out a working directory (``root``) and, for a mount, the
daemon's pid so the runner can read its CPU time and memory from /proc.
Every mount made here is undone by ``close()``: ``deltafs umount``, then
``fusermount3 -u``, then ``fusermount3 -uz``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DELTAFS = [sys.executable, "-m", "deltafs"]


@dataclass
class DaemonStats:
    cpu: float = 0.0      # utime + stime, seconds
    hwm: int = 0          # VmHWM, bytes
    rss: int = 0          # VmRSS, bytes (= anon + file + shmem)
    anon: int = 0         # RssAnon: heap, Python objects, buffers
    file: int = 0         # RssFile: resident file-backed pages, i.e. the LMDB mmap (+ libraries)
    shmem: int = 0        # RssShmem


_STATUS_FIELDS = {"VmHWM:": "hwm", "VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file",
                  "RssShmem:": "shmem"}


def daemon_stats(pid: int | None) -> DaemonStats:
    if not pid:
        return DaemonStats()
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK   # fields 14, 15 of stat(5)
        st = DaemonStats(cpu)
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = _STATUS_FIELDS.get(line[:line.find(":") + 1])
                if key:
                    setattr(st, key, int(line.split()[1]) * 1024)
        return st
    except (OSError, ValueError, IndexError):
        return DaemonStats()


class RssSampler:
    """Reads the daemon's /proc/PID/status every ``interval`` s in a thread while a workload
    runs: peak RssAnon and RssFile (VmHWM has no anonymous-only counterpart), and optionally
    the whole trace as (seconds, anon, file) tuples.  ``get_pid`` is re-read at every sample
    (a remount changes the pid)."""

    def __init__(self, get_pid, interval: float = 0.1, trace: bool = False) -> None:
        self.get_pid, self.interval, self.keep = get_pid, interval, trace
        self.anon_peak = self.file_peak = self.rss_peak = 0
        self.first: DaemonStats | None = None
        self.last: DaemonStats | None = None
        self.trace: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _sample(self, t0: float) -> None:
        st = daemon_stats(self.get_pid())
        if not st.rss:   # the daemon is gone (or being remounted)
            return
        if self.first is None:
            self.first = st
        self.last = st
        self.anon_peak = max(self.anon_peak, st.anon)
        self.file_peak = max(self.file_peak, st.file)
        self.rss_peak = max(self.rss_peak, st.rss)
        if self.keep:
            self.trace.append((round(time.monotonic() - t0, 2), st.anon, st.file))

    def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            self._sample(t0)
            if self._stop.wait(self.interval):
                break
        self._sample(t0)   # one last sample after the workload

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> "RssSampler":
        self._stop.set()
        self._thread.join()
        return self


def reset_peak(pid: int | None) -> bool:
    """Reset VmHWM to the current RSS (clear_refs 5, Linux >= 4.0); False if not allowed."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tree_bytes(path: str) -> int:
    """Allocated bytes under path, like ``du -s --block-size=1`` (0 if missing)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def journal_data_bytes(path: str) -> int:
    """A journal's data as ``Journal.data_bytes()`` counts it, from outside the
    daemon: its pack files plus the LMDB pages in use (free pages excluded).

    The data file's allocation (du) stops growing once LMDB reuses freed pages; this does not.
    Read-only, as an ordinary concurrent LMDB reader; 0 if there is no environment (yet)."""
    packs = os.path.join(path, "packs")
    pack_bytes = sum(e.stat().st_size for e in os.scandir(packs) if e.name.endswith(".pack")) \
        if os.path.isdir(packs) else 0
    return pack_bytes + lmdb_used_bytes(path)


def lmdb_used_bytes(path: str) -> int:
    """Bytes in use inside an LMDB environment: pages of every database, free pages excluded."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return 0
    try:
        import lmdb
        env = lmdb.open(path, readonly=True, lock=True, max_dbs=256, subdir=True,
                        create=False, max_readers=510)
    except Exception:
        return 0
    try:
        def used(st) -> int:
            return st["psize"] * (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"])
        total = used(env.stat())
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor()]
        for name in names:
            try:
                db = env.open_db(name, create=False)
                with env.begin() as txn:
                    total += used(txn.stat(db))
            except Exception:   # a plain key in the main database, not a named one
                continue
        return total
    except Exception:
        return 0
    finally:
        env.close()


def is_mountpoint(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def force_unmount(mnt: str) -> list[str]:
    """deltafs umount, then fusermount3 -u, then -uz; return what went wrong on the way."""
    problems = []
    steps = [DELTAFS + ["umount", "--timeout", "120", mnt],
             ["fusermount3", "-u", mnt], ["fusermount3", "-uz", mnt]]
    for cmd in steps:
        if not is_mountpoint(mnt):
            break
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
            if r.returncode != 0:
                problems.append(f"{' '.join(cmd[-3:])}: {r.stderr.strip()[-200:]}")
        except (subprocess.TimeoutExpired, OSError) as e:
            problems.append(f"{' '.join(cmd[-3:])}: {e}")
    return problems


class Target:
    name = "native"
    is_mount = False

    def __init__(self, base: str) -> None:
        self.base = base
        self.root = os.path.join(base, "work")
        os.makedirs(self.root, exist_ok=True)

    @property
    def pid(self) -> int | None:
        return None

    def journal_bytes(self) -> int:
        return 0

    def journal_used(self) -> int:
        return 0

    def alive(self) -> bool:
        return True

    def recover(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> list[str]:
        return []


class MountTarget(Target):
    """deltafs mount of base/src at base/work, journal in base/journal."""

    is_mount = True

    def __init__(self, base: str, name: str, capture: bool, extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.capture = capture
        self.extra = tuple(extra)  # more `deltafs mount` options (tools/bench/bigmem.py --compact-every)
        self.base = base
        self.src = os.path.join(base, "src")
        self.root = os.path.join(base, "work")
        self.journal = os.path.join(base, "journal")
        for d in (self.src, self.root):
            os.makedirs(d, exist_ok=True)
        self._pid: int | None = None
        self.mounts = 0
        self.last_log: list[str] = []
        self.mount()

    def mount(self) -> None:
        cmd = DELTAFS + ["mount", self.src, self.root, "--journal", self.journal]
        if not self.capture:
            cmd.append("--no-capture")
        cmd += self.extra
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"deltafs mount ({self.name}) failed: {r.stderr.strip()}")
        self.mounts += 1
        self._pid = self._find_pid()

    def _find_pid(self) -> int | None:
        try:
            sys.path.insert(0, ROOT)
            from deltafs import mounttable
            rec = mounttable.read_record(os.path.realpath(self.root)) or {}
            if rec.get("pid"):
                return int(rec["pid"])
        except Exception:   # the module is being worked on: fall back to the lock file
            pass
        try:
            with open(os.path.join(self.journal, "lock")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    @property
    def pid(self) -> int | None:
        return self._pid

    def journal_bytes(self) -> int:
        # The log file is not the journal.
        total = tree_bytes(self.journal)
        for n in os.listdir(self.journal) if os.path.isdir(self.journal) else ():
            if n.startswith("deltafs.log"):
                try:
                    total -= os.lstat(os.path.join(self.journal, n)).st_blocks * 512
                except OSError:
                    pass
        return total

    def journal_used(self) -> int:
        return journal_data_bytes(self.journal)

    def alive(self) -> bool:
        if self._pid is None or not os.path.exists(f"/proc/{self._pid}"):
            return False
        try:   # statfs always reaches the daemon; a cached stat of the root may not
            r = subprocess.run(["stat", "-f", "-c", "%T", self.root], capture_output=True,
                               timeout=20)
            return r.returncode == 0 and is_mountpoint(self.root)
        except subprocess.TimeoutExpired:
            return False

    def abort(self) -> None:
        """Watchdog: a hung daemon is killed so pending requests fail instead of hanging."""
        if self._pid:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except OSError:
                pass

    def recover(self) -> None:
        """After a failure: if the mount is dead, unmount it and mount again."""
        if self.alive():
            return
        self.last_log = self.log_tail()
        self.abort()
        force_unmount(self.root)
        time.sleep(0.2)
        self.mount()

    def log_tail(self, n: int = 3) -> list[str]:
        """The daemon's last WARNING/ERROR lines (the journal dir is removed after the run)."""
        try:
            with open(os.path.join(self.journal, "deltafs.log"), errors="replace") as f:
                lines = [ln.strip() for ln in f if " WARNING " in ln or " ERROR " in ln
                         or ln.startswith(("Traceback", "  File", "RuntimeError", "OSError"))]
            return lines[-n:]
        except OSError:
            return []

    def close(self) -> list[str]:
        problems = force_unmount(self.root)
        if self._pid:
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{self._pid}") and time.monotonic() < deadline:
                try:   # our child's child is reparented; a zombie shows state Z
                    with open(f"/proc/{self._pid}/stat") as f:
                        if f.read().split(")")[-1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.05)
        if is_mountpoint(self.root):
            problems.append(f"{self.root} is still mounted")
        return problems


def make_targets(base: str) -> list[Target]:
    """native, no-capture, capture; the caller closes each in a finally block."""
    targets: list[Target] = []
    try:
        targets.append(Target(os.path.join(base, "native")))
        targets.append(MountTarget(os.path.join(base, "nocap"), "nocap", capture=False))
        targets.append(MountTarget(os.path.join(base, "cap"), "cap", capture=True))
    except BaseException:
        for t in targets:
            t.close()
        raise
    return targets


def cleanup_stale(work: str) -> list[str]:
    """Unmount anything left mounted under the bench work dir by an earlier, killed run."""
    work = os.path.realpath(work)
    left = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            if mnt.startswith(work + "/"):
                left.append(mnt)
    for mnt in sorted(left, reverse=True):
        force_unmount(mnt)
    return left


def fresh_work_dir(name: str) -> tuple[str, str]:
    """``(bench-work, bench-work/NAME)``, NAME made empty: anything an earlier, killed run left
    mounted under it is unmounted first (never descended into)."""
    base = os.path.join(ROOT, "bench-work")
    w = os.path.join(base, name)
    if os.path.isdir(w):
        for dirpath, dirnames, _ in os.walk(w):
            if is_mountpoint(dirpath):
                force_unmount(dirpath)
                dirnames.clear()
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    return base, w


def remove_tree(path: str) -> None:
    if os.path.isdir(path) and not is_mountpoint(path):
        shutil.rmtree(path, ignore_errors=True)
