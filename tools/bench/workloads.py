"""The workloads.  Each group runs in one directory and calls ``m(name, fn)``
around each timed part only; preparation and clean-up stay outside.

Writes are dd-like from Python: ``os.write`` of a fixed block size, one
``fsync`` at the end, identical on every target.  The data are random
(incompressible), a new 1 MiB pool per call, with each 4 KiB page stamped
with its index and a per-call salt, so nothing dedups, compresses or
deltas away, not even against an earlier round or the file it overwrites;
every target writes the same amount of the same kind of data.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096


@dataclass(frozen=True)
class Sizes:
    seq_1m: int          # bytes written with bs=1M, then read back cold and warm
    seq_4k: int          # bytes written with bs=4k
    tree_files: int      # files in the small-file tree
    sqlite_tx: int       # separately committed transactions
    edit_files: tuple[int, ...]   # file sizes for the 1-byte edit + fsync
    big_write: int       # 0: skip the daemon-memory run
    edit_warm: int = 10  # edits back to back per file, target and round
    edit_cold: int = 3   # edits each after drop_caches per file, target and round


QUICK = Sizes(seq_1m=256 * MiB, seq_4k=64 * MiB, tree_files=1000, sqlite_tx=500,
              edit_files=(1 * MiB, 64 * MiB), big_write=0, edit_warm=10, edit_cold=3)
FULL = Sizes(seq_1m=1 * GiB, seq_4k=256 * MiB, tree_files=4000, sqlite_tx=2000,
             edit_files=(1 * MiB, 64 * MiB, 1 * GiB), big_write=4 * GiB, edit_warm=20, edit_cold=5)

_POOL = bytearray(random.Random(20261123).randbytes(MiB))
_SALT = [0]


def write_file(path: str, size: int, bs: int, fsync: bool = True) -> None:
    _SALT[0] += 1   # a new file content every call: a round never dedups against the last
    salt = _SALT[0] << 40
    # and a new pool (~1 ms): stamped pages of the same pool would differ from the previous
    # version of the file by 8 bytes a page, so an overwrite would be a cheap delta
    _POOL[:] = random.Random(_SALT[0]).randbytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(_POOL)
        pos = 0
        while pos < size:
            n = min(bs, size - pos)
            off = pos % MiB
            if off + n > MiB:
                off = 0
            for p in range(0, n, PAGE):            # unique pages: nothing dedups
                struct.pack_into("<Q", _POOL, off + p, salt | ((pos + p) // PAGE + 1))
            done = 0
            while done < n:
                done += os.write(fd, view[off + done:off + n])
            pos += n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str, bs: int = MiB) -> int:
    buf = bytearray(bs)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def run(cmd: list[str], cwd: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-300:]}")


GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
           "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


def git(args: list[str], cwd: str) -> None:
    env = dict(os.environ, **GIT_ENV)
    r = subprocess.run(["git", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-300:]}")


def build_corpus(dest: str, nfiles: int) -> tuple[int, int]:
    """Copy the first nfiles (sorted walk) of the Python stdlib, skipping site-packages and
    files over 256 KiB, into dest on native disk.  Returns (files, bytes)."""
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        rel = os.path.relpath(dirpath, stdlib)
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for n in sorted(filenames):
            src = os.path.join(dirpath, n)
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if st.st_size > 256 * 1024 or not (os.path.isfile(src) and not os.path.islink(src)):
                continue
            shutil.copy2(src, os.path.join(dest, rel, n))
            files += 1
            size += st.st_size
            if files >= nfiles:
                return files, size
    return files, size


_FRESH_NAMES = itertools.count()

# --- groups -----------------------------------------------------------------------------
# Each group: fn(m, d, ctx) where m(name, callable) times callable and d is the target's dir.


def group_seq_1m(m, d, ctx) -> None:
    size = ctx.sizes.seq_1m
    label = _size(size)
    # a name no earlier round used: a file created where one was deleted in the last
    # REUSE_SECONDS takes that file's last version as its delta base hint (issue 20),
    # so the same name would make this row an overwrite in disguise, not a new file
    path = os.path.join(d, f"seq1m-{next(_FRESH_NAMES)}.dat")
    try:
        m(f"write {label} bs=1M +fsync", lambda: write_file(path, size, MiB))
        if ctx.can_drop:
            def cold():
                read_file(path)
            m(f"read {label} cold", cold, before=drop_caches)
        read_file(path)   # make sure it is warm, whatever the cold run did
        m(f"read {label} warm", lambda: read_file(path))
        # the file is captured now (every timed part settles): rewriting it with new data
        # pairs each new chunk with an old one, the delta path a new file never takes
        m(f"overwrite {label} bs=1M +fsync (captured file)", lambda: write_file(path, size, MiB))
    finally:
        _unlink(path)


def group_seq_4k(m, d, ctx) -> None:
    size = ctx.sizes.seq_4k
    path = os.path.join(d, f"seq4k-{next(_FRESH_NAMES)}.dat")  # a new file, as above
    try:
        m(f"write {_size(size)} bs=4k +fsync", lambda: write_file(path, size, PAGE))
    finally:
        _unlink(path)


def group_tree(m, d, ctx) -> None:
    tree = os.path.join(d, "tree")
    n = ctx.corpus_files
    try:
        m(f"cp -a {n} files", lambda: run(["cp", "-a", ctx.corpus, tree], d))
        run(["find", tree], d)
        m("find (warm)", lambda: run(["find", tree], d))
        run(["du", "-s", tree], d)
        m("du -s (warm)", lambda: run(["du", "-s", tree], d))
        git(["init", "-q"], tree)

        def add_commit():
            git(["add", "-A"], tree)
            git(["commit", "-q", "-m", "bench"], tree)
        m("git add -A && commit", add_commit)
        git(["status", "--porcelain"], tree)
        m("git status (warm)", lambda: git(["status", "--porcelain"], tree))
        m(f"rm -rf {n} files (+.git)", lambda: run(["rm", "-rf", tree], d))
    finally:
        if os.path.lexists(tree):
            shutil.rmtree(tree, ignore_errors=True)


def group_sqlite(m, d, ctx) -> None:
    path = os.path.join(d, "bench.sqlite")
    ntx = ctx.sizes.sqlite_tx

    def work():
        con = sqlite3.connect(path, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            for i in range(ntx):
                con.execute("BEGIN")
                con.execute("INSERT INTO t (v) VALUES (?)", (f"row {i} " * 8,))
                con.execute("COMMIT")
        finally:
            con.close()
    try:
        m(f"sqlite3 {ntx} tx (sync=FULL)", work)
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            _unlink(path + suffix)


EDIT_P99 = 0.010  # the edit rows' p99 target (issue 19); the median's is target_for's limit


def _disk_written() -> int:
    """Sectors written, summed over the block devices (/proc/diskstats)."""
    written = 0
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                x = line.split()
                if len(x) >= 10 and not x[2].startswith(("loop", "ram")):
                    written += int(x[9])
    except OSError:
        pass
    return written


def settle_disk(window: int = 5, quiet_sectors: int = 16384, limit: float = 10.0) -> float:
    """``sync`` (it returns once the page cache's dirty data, the rows
    before's write-back, is on disk), then wait until the block devices
    wrote less than 8 MiB (``quiet_sectors``) in the last 0.5 s (``window``
    samples 0.1 s apart), at most ``limit`` s: the edits after it time the
    edit, not a disk still busy with GiBs of earlier writes; the trickle of
    other processes (a few MiB/s) does not hold it up.  -> seconds waited
    (printed on stderr)."""
    t0 = time.monotonic()
    os.sync()
    hist = [_disk_written()]
    while time.monotonic() - t0 < limit:
        time.sleep(0.1)
        hist.append(_disk_written())
        if len(hist) > window and hist[-1] - hist[-1 - window] < quiet_sectors:
            break
    waited = time.monotonic() - t0
    print(f"  disk settled in {waited:.1f} s" + ("" if waited < limit else " (limit: still writing)"),
          file=sys.stderr, flush=True)
    return waited


def _edits(fd: int, size: int, ctx, n: int, out: list[float], cold: bool) -> None:
    """``n`` 1-byte edits (pwrite + fsync, each at another offset and byte), each timed
    into ``out``; ``cold``: each after ``sync; echo 3 > drop_caches`` (untimed)."""
    for _ in range(n):
        if cold:
            drop_caches()
        ctx.edit_seq += 1
        off = (size // 2 + ctx.edit_seq * 4099) % size
        byte = bytes([ctx.edit_seq % 251 + 1])
        t0 = time.perf_counter()
        os.pwrite(fd, byte, off)
        os.fsync(fd)
        out.append(time.perf_counter() - t0)


def _per_edit(sample, lat: list[float]) -> None:
    """An edit row's sample: each edit's latency, the round's median as its time,
    the journal growth per edit."""
    if sample is None or not lat:
        return
    sample.edits = list(lat)
    sample.seconds = statistics.median(lat)
    sample.journal //= len(lat)
    sample.journal_used //= len(lat)


def group_edit(m, d, ctx) -> None:
    """1-byte edit + fsync in existing files: fsync latency and journal bytes added.

    The files are written (untimed) the first time and kept between rounds.  Before
    the edits the target is left to settle: the daemon idle, ``sync``, the disk quiet
    (settle_disk), so the rows measure the edit, not the write-back of the bulk rows
    before.  Then, per file, ``edit_warm`` edits back to back (*warm*) and
    ``edit_cold`` edits each after drop_caches; every edit is a real change, timed
    alone (tools/bench/edit_latency.py does the same, with A/B sides)."""
    for size in ctx.sizes.edit_files:
        path = os.path.join(d, f"edit-{_size(size)}.dat")
        if not os.path.exists(path) or os.path.getsize(path) != size:
            write_file(path, size, MiB)
    ctx.settle()
    settle_disk()
    for size in ctx.sizes.edit_files:
        path = os.path.join(d, f"edit-{_size(size)}.dat")
        fd = os.open(path, os.O_RDWR)
        try:
            name = f"1-byte edit +fsync in {_size(size)}"
            modes = [("warm", ctx.sizes.edit_warm, False)]
            if ctx.can_drop:
                modes.append(("after drop_caches", ctx.sizes.edit_cold, True))
            for mode, n, cold in modes:
                lat: list[float] = []
                _per_edit(m(f"{name} ({mode})", lambda: _edits(fd, size, ctx, n, lat, cold)), lat)
        finally:
            os.close(fd)


GROUPS = [("seq_1m", group_seq_1m), ("seq_4k", group_seq_4k), ("tree", group_tree),
          ("sqlite", group_sqlite), ("edit", group_edit)]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _size(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n // MiB} MiB"
    return f"{n // 1024} KiB"


TARGETS = {  # workload prefix -> (target for capture/native median ratio, how to judge); issue 19
    "write ": ("≤2×", 2.0),
    "overwrite ": ("≤2×", 2.0),
    "read ": ("≤1.2×", 1.2),
    "cp -a": ("≤4×", 4.0),
    "find": ("≤1.3×", 1.3),
    "du -s": ("≤1.3×", 1.3),
    "git status": ("≤1.3×", 1.3),
    "rm -rf": ("≤2.5×", 2.5),
    "sqlite3": ("≤2.5×", 2.5),
    "git add": ("≤2.5×", 2.5),
}


def target_for(name: str) -> tuple[str, float | None, str]:
    """(text, limit, kind): kind 'ratio' = capture/native median; 'edit' = absolute."""
    if name.startswith("1-byte edit"):
        return ("median ≤3 ms, p99 ≤10 ms, journal <100 KiB an edit", 0.003, "edit")
    if "bs=4k" in name:
        return ("≤2×", 2.0, "ratio")
    for prefix, (text, limit) in TARGETS.items():
        if name.startswith(prefix):
            return (text, limit, "ratio")
    return ("", None, "ratio")


def wait_quiet(get_cpu, quiet: float = 0.15, limit: float = 60.0) -> float:
    """Wait until the daemon's CPU time stops moving (pending captures done); seconds waited."""
    t0 = time.monotonic()
    last = get_cpu()
    still = 0
    while time.monotonic() - t0 < limit:
        time.sleep(quiet)
        now = get_cpu()
        still = still + 1 if now == last else 0
        if still >= 2:
            break
        last = now
    return time.monotonic() - t0
