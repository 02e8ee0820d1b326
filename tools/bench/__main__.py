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
        description="Time workloads on native ext4, deltafs --no-capture and deltafs with "
                    "capture, in paired rounds, and print each ratio to native.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (256 MiB, 64 MiB bs=4k, no 1 GiB edit, no 4 GiB run)")
    p.add_argument("--rounds", type=int, default=3, help="counted rounds after 1 warm-up (3)")
    p.add_argument("--only", action="append", choices=[n for n, _ in wl.GROUPS],
                   help="run only this workload group (repeatable)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers as JSON")
    p.add_argument("--write-docs", action="store_true", help="regenerate docs/benchmarks.md")
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
