"""mount --at benchmark (issue 22): how fast and small a read-only view of the past is.

    .venv/bin/python -m tools.bench.pastview [--quick] [--write-docs] [--json FILE]

Generates a journal (quick: 10,000 files, 100,000 records; full: 100,000
files, 1,000,000 records; the time it took is reported): the files are
written natively into SRC (one directory of 10,000 entries, the rest in
1,000-entry directories, and one large file: 64 MiB quick, 1 GiB full),
recorded by the first mount's scan, then small saves through the mount add
records until the count is reached.  Then, with the live mount gone, it
measures ``mount --at vHEAD`` until the command returns (the view is usable),
``ls`` of the 10,000-entry directory cold (first after mounting) and warm,
``find`` of the whole view vs ``find`` on SRC, a sequential read of the
large file (``dd bs=1M``) from the view vs from SRC (native: from the page
cache, the machine is shared and caches are not dropped), and the daemon's
peak memory (VmHWM).  Everything happens under bench-work/pastview/ and is
removed at the end; every mount is unmounted in a ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from tools.bench import report
from tools.bench.scale import write_docs
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
    out = cli("log", src).stdout.decode().splitlines()
    return max(int(x.split()[0]) for x in out if x[:1].isdigit())


def generate(w: str, files: int, records: int, big: int) -> dict:
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
    with open(os.path.join(src, "large.bin"), "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(big >> 20):
            f.write(block)
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
    return {"src": src, "seconds": time.perf_counter() - t0, "records": head_seq(src), "files": files}


def measure(w: str, gen: dict, big: int) -> dict:
    src, view = gen["src"], os.path.join(w, "view")
    os.makedirs(view)
    res: dict = {}
    head = gen["records"]
    t0 = time.perf_counter()
    subprocess.run([*DELTAFS, "mount", "--at", f"v{head}", src, view], check=True)
    res["ready_s"] = time.perf_counter() - t0
    try:
        from deltafs import mounttable

        pid = (mounttable.read_record(os.path.abspath(view)) or {}).get("pid")
        res["ls_cold_s"] = timed(["ls", os.path.join(view, "big")])
        res["ls_warm_s"] = min(timed(["ls", os.path.join(view, "big")]) for _ in range(3))
        res["ls_native_s"] = min(timed(["ls", os.path.join(src, "big")]) for _ in range(3))
        res["find_s"] = timed(["find", view])
        res["find_native_s"] = min(timed(["find", src, "-path", os.path.join(src, ".deltafs"), "-prune",
                                          "-o", "-print"]) for _ in range(2))
        dd = ["dd", "bs=1M", "of=/dev/null", "status=none"]
        res["read_s"] = timed([*dd, f"if={os.path.join(view, 'large.bin')}"])
        res["read_native_s"] = min(timed([*dd, f"if={os.path.join(src, 'large.bin')}"]) for _ in range(2))
        res["big_bytes"] = big
        if pid:
            with open(f"/proc/{pid}/status") as f:
                for ln in f:
                    if ln.startswith("VmHWM:"):
                        res["daemon_hwm_bytes"] = int(ln.split()[1]) * 1024
    finally:
        subprocess.run([*DELTAFS, "umount", view])
        force_unmount(view)
    return res


def render(gen: dict, res: dict, quick: bool) -> str:
    mb = res["big_bytes"] / 2**20
    rd, rdn = mb / res["read_s"], mb / res["read_native_s"]
    hwm = res.get("daemon_hwm_bytes")
    rows = [
        ["`mount --at` ready", f"{res['ready_s']:.2f} s", "≤ 1 s", report._yn(res["ready_s"] <= 1)],
        ["`ls` of 10,000 entries, cold", f"{res['ls_cold_s'] * 1000:.0f} ms", "≤ 500 ms",
         report._yn(res["ls_cold_s"] <= 0.5)],
        ["`ls` of 10,000 entries, warm", f"{res['ls_warm_s'] * 1000:.0f} ms (native {res['ls_native_s'] * 1000:.0f} ms)",
         "≤ 50 ms", report._yn(res["ls_warm_s"] <= 0.05)],
        ["`find` of the whole tree", f"{res['find_s']:.2f} s vs {res['find_native_s']:.2f} s on SRC "
         f"({res['find_s'] / res['find_native_s']:.1f}×)", "≤ 5×",
         report._yn(res["find_s"] <= 5 * res["find_native_s"])],
        [f"sequential read of a {mb:.0f} MiB past file", f"{rd:.0f} MB/s vs {rdn:.0f} MB/s native "
         f"({rd / rdn:.0%})", "≥ 50%", report._yn(rd >= rdn / 2)],
        ["daemon memory (VmHWM)", report._bytes(hwm) if hwm else "?", "≤ 200 MiB",
         report._yn(hwm is not None and hwm <= 200 << 20)],
    ]
    size = "quick" if quick else "full"
    return (f"{HEADING}\n\n"
            f"`python -m tools.bench.pastview{' --quick' if quick else ''}` ({size}): a journal of "
            f"{gen['files']:,} files and {gen['records']:,} records, generated in {gen['seconds']:.0f} s "
            "(files written natively, recorded by the first mount's scan, then small saves through the "
            "mount). The view is `mount --at vHEAD` with no live mount. Native read is from the page "
            "cache (caches are not dropped on this shared machine).\n\n"
            + report.md_table(["measurement", "result", "target", "met"], rows) + "\n\n"
            "The tree at WHEN is built at mount time by replaying the journal up to WHEN, so the ready "
            "time grows with the history until tree checkpoints (issue 22 part 3) land.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 files / 100,000 records")
    ap.add_argument("--files", type=int)
    ap.add_argument("--records", type=int)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    files = a.files or (10_000 if a.quick else 100_000)
    records = a.records or (100_000 if a.quick else 1_000_000)
    big = (64 << 20) if a.quick else (1 << 30)
    w = os.path.join(ROOT, "bench-work", "pastview")
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    try:
        log(f"generating {files} files, {records} records")
        gen = generate(w, files, records, big)
        log(f"generated in {gen['seconds']:.0f} s ({gen['records']} records)")
        res = measure(w, gen, big)
    finally:
        for m in ("mnt", "view"):
            force_unmount(os.path.join(w, m))
        shutil.rmtree(w, ignore_errors=True)
    section = render(gen, res, a.quick)
    print(section)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"generate": {k: v for k, v in gen.items() if k != "src"}, **res}, f, indent=1)
    if a.write_docs:
        write_docs(section, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
