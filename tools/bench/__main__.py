"""Command line of the benchmark: parse, run, print, optionally write JSON and docs."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from tools.bench import report, runner
from tools.bench import workloads as wl
from tools.bench.targets import ROOT


def _terminate(signum, frame):   # SIGTERM/SIGHUP unwind like Ctrl-C: every finally runs
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time workloads on native ext4, deltafs --no-capture and deltafs with "
                    "capture, in paired rounds,\nand print each ratio to native, the daemon's "
                    "CPU and memory, and the journal growth.",
        epilog="One of the three measurements behind docs/benchmarks.md, each of which "
               "rewrites only its own\nsection with --write-docs:\n"
               "  python -m tools.bench                    this table (top of the file)\n"
               "  python -m tools.bench.scale              mirrors, log, diff, restore at scale\n"
               "  python -m tools.bench.history_size       journal size on edit histories\n"
               "`make bench` runs the --quick mode of all three with --write-docs, "
               "`make bench-full`\nthe full mode (this program alone: about 20 min with 3 "
               "rounds on a 2-core VM, ~25 GiB of\nfree disk; it checks before starting).\n"
               "Diagnostics: DELTAFS_BENCH_PROBE=REGEX logs, for the mount rows it matches, the "
               "daemon's CPU\nper thread and page faults; DELTAFS_BENCH_PROBE_TOOLS=py-spy,strace,perf "
               "adds profiles in\nDELTAFS_BENCH_PROBE_DIR (tools/bench/runner.py, Probe). "
               "DELTAFS_BENCH_WARM=REGEX: before each matching row,\nwrite and delete "
               "DELTAFS_BENCH_WARM_MIB (3072) MiB so the row reuses warm pages (runner.warm_memory).")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (256 MiB, 64 MiB bs=4k, 1,000 files, 500 tx, edits in "
                        "1 and 64 MiB files, 10 warm + 3 after drop_caches a round, no 4 GiB "
                        "memory run); full: 1 GiB, 256 MiB bs=4k, 4,000 files, 2,000 tx, edits "
                        "up to 1 GiB (20 + 5), a 4 GiB write")
    p.add_argument("--rounds", type=int, default=3, help="counted rounds after 1 warm-up (3)")
    p.add_argument("--only", action="append", choices=[n for n, _ in wl.GROUPS],
                   help="run only this workload group (repeatable)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers as JSON")
    p.add_argument("--write-docs", action="store_true",
                   help="regenerate this program's part of docs/benchmarks.md (everything "
                        "above the keep-marker; the sections below it are kept)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "bench-work"),
                   help="where to work (default bench-work/ in the repo; same disk as native)")
    p.add_argument("--timeout", type=float, help="per-workload limit on a mount before its "
                   "daemon is killed (default 300 s quick, 1800 s full)")
    p.add_argument("--from-json", metavar="FILE",
                   help="do not run: print (and with --write-docs, write) a saved --json run")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.from_json:
        res, info, meta = report.load_json(args.from_json)
        rows = report.summarize(res)
        report.print_report(res, info, rows)
        if args.write_docs:
            from tools.bench import docs
            print(f"wrote {docs.write(res, info, rows, meta)}")
        return 0
    sizes = wl.QUICK if args.quick else wl.FULL
    timeout = args.timeout or (300.0 if args.quick else 1800.0)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    meta = report.collect_meta("quick" if args.quick else "full", args.rounds, sizes)
    meta["timeout"] = timeout
    try:
        res, info = runner.run(args.work_dir, sizes, args.rounds, args.only, timeout, args.keep)
    except KeyboardInterrupt:
        print("bench: interrupted (mounts unmounted, work directory removed)", file=sys.stderr)
        return 130
    except runner.NotEnoughDisk as e:
        print(f"bench: not enough disk space: {e}", file=sys.stderr)
        return 2
    rows = report.summarize(res)
    report.print_report(res, info, rows)
    if args.json:
        report.write_json(args.json, res, info, rows, meta)
    if args.write_docs:
        from tools.bench import docs
        print(f"wrote {docs.write(res, info, rows, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
