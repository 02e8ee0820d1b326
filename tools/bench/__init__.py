"""deltafs benchmarks: the same workloads on native ext4, on a deltafs mount without
capture and on one with capture, in paired rounds; ratios to native.

    python -m tools.bench --quick          # a few minutes (make bench)
    python -m tools.bench                  # full sizes (make bench-full)
    python -m tools.bench --quick --json out.json --write-docs

Modules: workloads (what is timed), targets (native dir and mounts, /proc
daemon stats), runner (paired rounds, failures, watchdog), report (ratios,
tables, JSON), docs (docs/benchmarks.md).
"""
