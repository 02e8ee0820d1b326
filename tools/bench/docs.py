"""docs/benchmarks.md, regenerated from one run (``python -m tools.bench --write-docs``)."""

from __future__ import annotations

import os
import re

from tools.bench import report as rp
from tools.bench.runner import Results
from tools.bench.targets import ROOT

DOC = os.path.join(ROOT, "docs", "benchmarks.md")

METHOD = """\
- **Three targets, one run.** *native*: a plain directory on the same ext4
  disk. *no-capture*: `deltafs mount SRC MNT --no-capture` (pure
  pass-through). *capture*: `deltafs mount SRC MNT` (journal in a directory
  next to SRC on the same disk). Both mounts stay up for the whole run.
- **Paired, alternating rounds.** Each workload group runs on the three
  targets one after the other, the order rotating each round; one warm-up
  round is discarded, then {rounds} counted round(s). A ratio is taken within
  a round (target time / native time of the same round), and the table gives
  the median ratio and its min–max. Absolute times depend on the machine
  (shared, noisy, {cores} cores); ratios much less so.
- **Timing.** `time.perf_counter` around the workload only; preparation
  (building the tree, `git init`, warming the cache, dropping caches) is
  outside. After each workload the bench waits until the daemon's CPU time
  stops moving (pending captures written) before the next one starts; that
  wait is not counted in the time but its CPU is counted in the daemon CPU
  column, and shown as "capture settle": a settle above 2 s fails the row
  (captures fell behind: the time was moved out of the measurement, not saved).
- **Writes** are dd-like from Python, identical on every target: `os.write`
  of 1 MiB (or 4 KiB) blocks of random, incompressible data (a new 1 MiB
  pool per file) with each 4 KiB page stamped with its index and a per-write
  salt (nothing dedups or deltas, not even against an earlier round or the
  file it overwrites), one `fsync` at the end,
  included in the time. **Reads** use 1 MiB `readinto`; *cold* means
  `sync; echo 3 > /proc/sys/vm/drop_caches` just before ({drop}).
- **Small-file tree**: the first {files} regular files (sorted walk, files
  ≤256 KiB, no site-packages) of the Python stdlib, {tree_bytes}, copied to
  a native directory once; `cp -a` copies it into the target. `find` and
  `du -s` are timed on a warm cache (one untimed pass first). `git add -A &&
  git commit` runs after an untimed `git init`; `git status --porcelain` is
  timed after one untimed run. `rm -rf` removes the tree with its `.git`.
- **sqlite3**: Python's `sqlite3` module, `PRAGMA synchronous=FULL`, default
  (rollback) journal mode, {tx} transactions each `BEGIN; INSERT; COMMIT`.
- **Capture cost**: files of {edits} written once (untimed). Each round,
  the target is first left to settle (the daemon idle, `sync`, then the
  block devices writing less than 8 MiB in 0.5 s, at most 10 s), so the rows time the edit and not the
  write-back of the bulk rows before it; then per file {warm} 1-byte
  `pwrite` + `fsync` back to back (*warm*) and {cold} each after `sync;
  echo 3 > /proc/sys/vm/drop_caches` (*after drop_caches*), every one at
  another offset and timed alone. The table pools every edit of the
  counted rounds: median and p99 (nearest rank, so below 100 edits the
  largest). "Journal added" is measured two ways across each workload: the
  bytes in use in the LMDB environment (pages of every database, free
  pages excluded, read as an ordinary LMDB reader) — the figure judged —
  and, in parentheses, the growth of the journal directory's allocated
  bytes (du, log file excluded), which stays flat while LMDB reuses freed
  pages and jumps when the file grows.
- **Daemon**: its pid from the runtime record (`deltafs.mounttable`) or the
  journal's `lock` file; CPU = `utime+stime` from `/proc/PID/stat`; peak RSS
  = `VmHWM` from `/proc/PID/status`, reset before each workload with
  `echo 5 > /proc/PID/clear_refs` ({peak}). VmHWM counts the resident
  pages of the LMDB map (file-backed page cache, which grows with the
  journal and which the kernel reclaims), so the table also gives, in
  parentheses, the peak of `RssAnon` (heap: Python objects, buffers)
  sampled every 0.1 s during the workload.
- **Robustness**: a workload that fails is recorded and the run goes on; a
  FUSE workload that hangs past {timeout:.0f} s gets its daemon killed
  (pending requests then fail) and the mount is remounted. Every mount is
  unmounted in a `finally` (`deltafs umount`, then `fusermount3 -u`, then
  `-uz`); the work directory (`bench-work/`, gitignored) is removed.
"""


def where_time_goes(res: Results, rows: list[dict]) -> list[str]:
    """Observations computed from this run's figures."""
    notes = []
    for r in rows:
        nat, nc, c = r["native_median_s"], r["nocap"], r["cap"]
        if nat is None or nc["median_s"] is None or r["workload"].startswith("1-byte edit"):
            continue   # the edit rows have their own table
        extra = nc["median_s"] - nat
        cpu = nc["cpu_s"] or 0.0
        if nc["median"] and nc["median"] >= 1.5 and extra >= 0.1:
            notes.append(
                f"*{r['workload']}*: no-capture adds {extra:.2f} s over native "
                f"({nc['median']:.1f}×); the daemon used {cpu:.2f} s of CPU in that time, "
                f"i.e. {min(cpu / extra, 9.99) * 100:.0f}% of the added time — "
                + ("the Python request handling itself is the cost."
                   if cpu >= 0.6 * extra else
                   "most of the added time is round trips and waiting (kernel, disk), not "
                   "daemon CPU."))
        if c["median_s"] is not None and r["cap_vs_nocap"] and r["cap_vs_nocap"] > 1.15 \
                and c["median_s"] - nc["median_s"] >= 0.1:
            notes.append(
                f"*{r['workload']}*: capture costs {r['cap_vs_nocap']:.2f}× no-capture; "
                f"daemon CPU {c['cpu_s'] or 0:.2f} s vs {cpu:.2f} s, journal "
                f"+{rp._bytes(c['journal_used'])}, {c['settle_s'] or 0:.1f} s of background "
                f"work after the workload returned.")
    for r in rows:
        mt = re.match(r"write (\d+) (MiB|GiB)", r["workload"])
        used = r["cap"]["journal_used"]
        if mt and used:
            size = int(mt.group(1)) << (20 if mt.group(2) == "MiB" else 30)
            notes.append(
                f"*{r['workload']}* with capture: net journal growth {rp._bytes(used)} for "
                f"{rp._bytes(size)} of incompressible data ({used / size:.2f}×: new chunks and "
                "LMDB page overhead, minus whatever compaction/GC of earlier rounds' deleted "
                "files freed meanwhile); every byte is written twice (SRC + journal).")
    nc_rss = max((r["nocap"]["peak_rss"] for r in rows), default=0)
    c_rss = max((r["cap"]["peak_rss"] for r in rows), default=0)
    nc_anon = max((r["nocap"].get("peak_anon", 0) for r in rows), default=0)
    c_anon = max((r["cap"].get("peak_anon", 0) for r in rows), default=0)
    if nc_rss and c_rss > 2 * nc_rss and c_anon:
        notes.append(
            f"*memory*: the capture daemon peaked at {rp._bytes(c_rss)} of RSS against "
            f"{rp._bytes(nc_rss)} without capture, but only {rp._bytes(c_anon)} of it was "
            f"anonymous (heap; {rp._bytes(nc_anon)} without capture): the rest is resident "
            "pages of the LMDB map, file-backed page cache that follows the journal's size "
            "and that the kernel reclaims under memory pressure.")
    elif nc_rss and c_rss > 2 * nc_rss:
        notes.append(
            f"*memory*: the capture daemon peaked at {rp._bytes(c_rss)} of RSS against "
            f"{rp._bytes(nc_rss)} without capture; compare the peak during the reads (which "
            "allocate little) to see how much stays resident after a large write.")
    settles = [r["cap"]["settle_s"] for r in rows if r["cap"]["settle_s"]]
    if settles and max(settles) > 1.0:
        worst = max(rows, key=lambda r: r["cap"]["settle_s"] or 0)
        notes.append(
            f"*background capture*: after *{worst['workload']}* the capture daemon kept "
            f"working for {worst['cap']['settle_s']:.1f} s after the workload returned; that "
            "time is not in the ratio (its CPU is in the daemon table).")
    return notes


STATIC_NOTES = """\
- Ratios below 1× happen and are not magic: on a 2-core shared VM the
  noise between rounds is ±10–20%, and a FUSE mount with the writeback
  cache may batch writes differently. Look at the min–max, not only the
  median.
- Everything that is not a large sequential transfer is dominated by the
  number of FUSE requests × the per-request cost of the Python daemon
  (DESIGN.md §10: ~55–70 µs per request): `cp -a`, `git add`, `rm -rf` and
  sqlite (several writes + fsyncs per transaction, each a round trip).
- fsync through FUSE is a writeback flush, a round trip and the backing
  fsync; with capture on, it also waits until the version is durable in the
  journal (a second disk flush unless grouped).
- What each change bought and why targets are met or missed (hand-written,
  figures quoted with their date and commit): [performance-notes.md](performance-notes.md).
"""


def render(res: Results, info: dict, rows: list[dict], meta: dict) -> str:
    m, sw = meta["machine"], meta["software"]
    sizes = meta["sizes"]
    edits = ", ".join(rp._bytes(x).replace(".0 ", " ") for x in sizes["edit_files"])
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m tools.bench "
        + ("--quick " if meta["mode"] == "quick" else "") + "--write-docs`, the first of "
        "the seven measurements that `make bench` (quick) and `make bench-full` (full) run in "
        "sequence. Each section below the marker further down is written by its own program: "
        "the other six of them (`tools.bench.scale`, `tools.bench.history_size`, "
        "`tools.bench.encrypted`, `tools.bench.fds`, `tools.bench.soak`, `tools.bench.pastview`) "
        "and three run on their own (`tools.bench.history_size_where`, `tools.bench.guard`, "
        "`tools.bench.sync`); each section says which program, when and at which commit. "
        "Figures here are ratios to native ext4 on the same disk, measured in one run; "
        "regenerate them rather than editing this file.",
        "",
        "## What was measured, when",
        "",
        f"- Date: {meta['date']}; mode: **{meta['mode']}** ({meta['rounds']} counted "
        f"round{'s' if meta['rounds'] != 1 else ''} after 1 warm-up"
        + (f"; the run took {info['wall_s'] / 60:.0f} min" if info.get("wall_s") else "") + ").",
        f"- deltafs {sw['deltafs']} at commit `{sw['commit']}` (\"{sw['commit_subject']}\")"
        + (", with uncommitted changes in deltafs/ by other engineers in the working tree "
           "at the time of the run" if sw["deltafs_dirty"] else "") + ".",
        f"- Capture state: {rp.capture_state(res, rows)}.",
    ]
    for t, n in rp.hangs(res).items():
        lines.append(
            f"- **The {t} daemon stopped answering {n} time(s)** during this run: the bench "
            f"killed it after {meta.get('timeout', 0):.0f} s, recorded the workload as failed and "
            "remounted (see *Failures and events* below). Cells with fewer counted samples "
            "than rounds show n.")
    lines += [
        "",
        "## Machine and software",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores (shared, noisy VM); RAM {rp._bytes(m['ram'])}; "
        f"kernel {m['kernel']}",
        f"- Work directory filesystem: {info.get('fs_type', '?')} (native, SRC and journals "
        "all on it)",
        f"- Python {sw['python']}, pyfuse3 {sw['pyfuse3']}, libfuse {sw['libfuse']}, "
        f"{sw['git']}, SQLite {sw['sqlite']}",
        "",
        "## Method",
        "",
        METHOD.format(rounds=meta["rounds"], cores=m["cores"],
                      drop="permitted on this machine" if info.get("drop_caches")
                      else "NOT permitted here: only warm reads were measured",
                      files=info.get("corpus_files", "?"),
                      tree_bytes=rp._bytes(info.get("corpus_bytes", 0)),
                      tx=sizes["sqlite_tx"], edits=edits, warm=sizes.get("edit_warm", 1),
                      cold=sizes.get("edit_cold", 0),
                      peak="reset permitted" if info.get("peak_reset", True)
                      else "reset NOT permitted: peak is over the daemon's life so far",
                      timeout=meta.get("timeout", 0)),
        "## Results",
        "",
        "Targets are for the capture mount (median ratio to native), plus capture ≤"
        f"{rp.CAP_VS_NOCAP}× no-capture. Capture-cost rows give absolute fsync latency in "
        "the time column and are judged on absolute targets.",
        "",
        rp.md_table(*rp.table_rows(rows)),
        "",
        "### Capture cost of a small edit",
        "",
        "Latency of a 1-byte edit + fsync (median / p99 of every edit of the counted rounds, "
        "warm and after drop_caches), and what each edit adds to the journal.",
        "",
        rp.md_table(*rp.capture_rows(rows)),
        "",
        "### Daemon CPU, memory, journal growth",
        "",
        "Median per counted round; peak RSS is the largest VmHWM seen during the workload "
        "(it includes the resident pages of the LMDB map), *anon* the largest RssAnon "
        "sampled during it (the heap).",
        "",
        rp.md_table(*rp.daemon_rows(rows)),
        "",
    ]
    if res.big_write:
        size = rp._bytes(next(iter(res.big_write.values()))["bytes"]).replace(".0 ", " ")
        lines += [
            "### Daemon memory while writing a large file",
            "",
            f"After the rounds, one {size} file is written to each mount (bs=1M, incompressible, "
            "one fsync), then the bench waits until the daemon is idle (*settle*) and deletes "
            "the file. `/proc/PID/status` is read every 0.25 s from the start of the write to "
            "the end of the settle: `RssAnon` (heap: Python objects, buffers, queues) must stay "
            "flat whatever the file size; `RssFile` is mostly the resident pages of the LMDB "
            "map (page cache the kernel reclaims under pressure), which follows the journal. "
            f"*Flat* means the anonymous peak stays within "
            f"{rp._bytes(next(iter(res.big_write.values())).get('flat_limit', 0))} of its start.",
            "",
            rp.md_table(*rp.big_write_rows(res.big_write)),
            "",
        ]
        lines += rp.big_write_verdicts(res.big_write)
        lines.append("")
    else:
        lines += ["The daemon-memory run (a 4 GiB write, anonymous and file-backed RSS sampled "
                  "every 0.25 s) is part of the full mode only and was not run for these "
                  "figures.", ""]
    lines += ["## Where the time goes", ""]
    lines += [f"- {n}" for n in where_time_goes(res, rows)]
    lines += [STATIC_NOTES]
    fails = [f for r in rows for f in r["failures"]]
    if fails or res.events:
        lines += ["## Failures and events in this run", ""]
        lines += [f"- {rp.one_line(f, 400)}" for f in res.events + fails]
        lines.append("")
    return "\n".join(lines)


KEEP_MARKER = "<!-- Sections below are written by other measurements; --write-docs keeps them. -->"


def write(res: Results, info: dict, rows: list[dict], meta: dict) -> str:
    text = render(res, info, rows, meta)
    try:
        with open(DOC) as f:
            old = f.read()
    except OSError:
        old = ""
    kept = old[old.index(KEEP_MARKER):] if KEEP_MARKER in old else KEEP_MARKER + "\n"
    text = text.rstrip("\n") + "\n\n" + kept
    rp.replace_file(DOC, text)
    return DOC
