"""Ratios, the table (text and Markdown), the JSON dump and docs/benchmarks.md."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import time

from tools.bench import workloads as wl
from tools.bench.runner import Results
from tools.bench.targets import ROOT

CAP_VS_NOCAP = 1.3  # issue 19
# seconds the capture daemon may keep working after a workload returned (the quiet
# detection itself takes 0.3 s): more, and the row fails (captures fell behind)
SETTLE_LIMIT = 2.0


def counted(samples):
    return [s for s in samples if s.round > 0]


def ok_times(samples) -> dict[int, float]:
    return {s.round: s.seconds for s in counted(samples) if s.seconds is not None}


def pct(v: list[float], q: float) -> float:
    """Nearest-rank percentile (below 100 samples the p99 is the largest)."""
    s = sorted(v)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def edit_times(samples) -> list[float]:
    """Every counted edit's latency, pooled over the rounds (a sample from before the
    edit rows timed several edits counts as its one edit)."""
    out: list[float] = []
    for s in counted(samples):
        if s.error is None and s.seconds is not None:
            out.extend(s.edits if s.edits else [s.seconds])
    return out


def edit_stats(samples) -> dict:
    v = edit_times(samples)
    return {"median_s": statistics.median(v) if v else None, "p99_s": pct(v, 0.99) if v else None,
            "n": len(v)}


def ratios(res: Results, name: str, target: str, base: str = "native") -> list[float]:
    num = ok_times(res.samples[name][target])
    den = ok_times(res.samples[name][base])
    return [num[r] / den[r] for r in sorted(num) if r in den and den[r] > 0]


def summarize(res: Results) -> list[dict]:
    rows = []
    for name in res.order:
        per = res.samples[name]
        nat = ok_times(per["native"])
        row: dict = {"workload": name,
                     "native_median_s": statistics.median(nat.values()) if nat else None,
                     "native_n": len(nat)}
        for t in ("nocap", "cap"):
            r = ratios(res, name, t)
            row[t] = {"median": statistics.median(r) if r else None,
                      "min": min(r) if r else None, "max": max(r) if r else None, "n": len(r)}
            times = ok_times(per[t])
            row[t]["median_s"] = statistics.median(times.values()) if times else None
            c = counted(per[t])
            row[t]["cpu_s"] = statistics.median([s.cpu for s in c if s.error is None]) \
                if any(s.error is None for s in c) else None
            row[t]["peak_rss"] = max((s.hwm for s in c), default=0)
            row[t]["peak_anon"] = max((s.anon for s in c), default=0)
            row[t]["peak_file"] = max((s.file for s in c), default=0)
            js = [s.journal for s in c if s.error is None]
            row[t]["journal_bytes"] = statistics.median(js) if js else None
            ju = [s.journal_used for s in c if s.error is None]
            row[t]["journal_used"] = statistics.median(ju) if ju else None
            row[t]["settle_s"] = statistics.median([s.settle for s in c]) if c else None
        cn = ratios(res, name, "cap", "nocap")
        row["cap_vs_nocap"] = statistics.median(cn) if cn else None
        failures = [f"{name} on {t}, {'warm-up' if s.round == 0 else 'round %d' % s.round}: "
                    f"{one_line(s.error)}"
                    for t in ("native", "nocap", "cap") for s in per[t] if s.error]
        row["failures"] = failures
        text, limit, kind = wl.target_for(name)
        row["target"] = text
        if kind == "edit":  # every edit pooled: median and p99 against the absolute targets
            for t in ("native", "nocap", "cap"):
                row.setdefault("edits", {})[t] = edit_stats(per[t])
            e = row["edits"]["cap"]
            jb = row["cap"]["journal_used"]
            row["met"] = None if e["median_s"] is None else (
                e["median_s"] <= limit and e["p99_s"] <= wl.EDIT_P99 and (jb or 0) < 100 * 1024)
        else:
            med = row["cap"]["median"]
            row["met"] = None if (med is None or limit is None) else med <= limit
        row["met_vs_nocap"] = None if row["cap_vs_nocap"] is None else \
            row["cap_vs_nocap"] <= CAP_VS_NOCAP
        # captures that fall behind (still working long after the workload returned) fail
        # the row, whatever its ratio: the time would only be moved, not saved
        settle = row["cap"]["settle_s"]
        row["settle_ok"] = None if settle is None else settle <= SETTLE_LIMIT
        if row["settle_ok"] is False:
            row["met"] = False
        rows.append(row)
    return rows


def replace_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: a reader
    (or a crash) never sees half a docs/benchmarks.md."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _r(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _rng(d: dict, full: int = 0) -> str:
    if d["median"] is None:
        return "failed"
    n = f", n={d['n']}" if d["n"] < full else ""
    return f"{d['median']:.2f}× ({d['min']:.2f}–{d['max']:.2f}{n})"


def _s(x: float | None) -> str:
    if x is None:
        return "failed"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f}"


def _settle(r: dict) -> str:
    s = r["cap"].get("settle_s")
    if s is None:
        return "—"
    return f"{s:.1f} s" + ("" if r.get("settle_ok", True) else " NO (captures fell behind)")


def _yn(x: bool | None) -> str:
    return "—" if x is None else ("yes" if x else "NO")


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["workload", "native median (s)", "no-capture / native", "capture / native",
            "capture / no-capture", "target (capture)", "met?", f"cap/nocap ≤{CAP_VS_NOCAP}×?",
            f"capture settle (≤{SETTLE_LIMIT:.0f} s)"]
    body = []
    for r in rows:
        full = max(r["nocap"]["n"], r["cap"]["n"], r.get("native_n", 0))
        body.append([r["workload"], _s(r["native_median_s"]), _rng(r["nocap"], full),
                     _rng(r["cap"], full),
                     _r(r["cap_vs_nocap"]), r["target"], _yn(r["met"]), _yn(r["met_vs_nocap"]),
                     _settle(r)])
    return head, body


def _rss(d: dict) -> str:
    """Peak RSS (VmHWM), with the sampled anonymous peak when there is one."""
    if not d.get("peak_anon"):
        return _bytes(d["peak_rss"])
    return f"{_bytes(d['peak_rss'])} (anon {_bytes(d['peak_anon'])})"


def daemon_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["workload", "no-capture CPU (s)", "capture CPU (s)", "no-capture peak RSS (anon)",
            "capture peak RSS (anon)", "journal added: data (du)", "capture settle (s)"]
    body = []
    for r in rows:
        nc, c = r["nocap"], r["cap"]
        body.append([r["workload"],
                     "—" if nc["cpu_s"] is None else f"{nc['cpu_s']:.2f}",
                     "—" if c["cpu_s"] is None else f"{c['cpu_s']:.2f}",
                     _rss(nc), _rss(c),
                     f"{_bytes(c['journal_used'])} ({_bytes(c['journal_bytes'])})",
                     "—" if c["settle_s"] is None else f"{c['settle_s']:.1f}"])
    return head, body


def capture_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["1-byte edit + fsync in", "native median / p99", "no-capture median / p99",
            "capture median / p99", "edits", "journal added an edit: data (du)", "target", "met?"]
    body = []
    for r in rows:
        if not r["workload"].startswith("1-byte edit"):
            continue
        ms = lambda x: "failed" if x is None else f"{x * 1000:.1f}"
        e = r.get("edits") or {t: {"median_s": r["native_median_s"] if t == "native" else r[t]["median_s"],
                                   "p99_s": None, "n": 0} for t in ("native", "nocap", "cap")}
        mp = lambda d: "failed" if d["median_s"] is None else \
            f"{ms(d['median_s'])} / {'—' if d['p99_s'] is None else ms(d['p99_s'])} ms"
        body.append([r["workload"].rsplit(" in ", 1)[-1], mp(e["native"]), mp(e["nocap"]), mp(e["cap"]),
                     str(e["cap"]["n"]),
                     f"{_bytes(r['cap']['journal_used'])} ({_bytes(r['cap']['journal_bytes'])})",
                     r["target"], _yn(r["met"])])
    return head, body


def text_table(head, body) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def md_table(head, body) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
    return "\n".join(out)


def print_report(res: Results, info: dict, rows: list[dict]) -> None:
    print()
    print(text_table(*table_rows(rows)))
    print()
    ch, cb = capture_rows(rows)
    if cb:
        print("capture cost of a small edit (every edit of the counted rounds, median / p99 in ms):")
        print(text_table(ch, cb))
        print()
    print("daemon (median per counted round; peak RSS = max VmHWM during the workload, "
          "anon = peak RssAnon sampled every 0.1 s):")
    print(text_table(*daemon_rows(rows)))
    if res.big_write:
        print()
        print("daemon memory while writing one large file (RSS sampled every 0.25 s):")
        print(text_table(*big_write_rows(res.big_write)))
        for line in big_write_verdicts(res.big_write):
            print(line)
    if info.get("wall_s"):
        print(f"\nthe run took {info['wall_s'] / 60:.1f} min")
    fails = [f for r in rows for f in r["failures"]]
    if fails or res.events:
        print()
        for f in res.events + fails:
            print(f"note: {one_line(f, 400)}")


def big_write_rows(big: dict) -> tuple[list[str], list[list[str]]]:
    """One row per mount: time, then anonymous and file-backed RSS at start / max / end."""
    head = ["target", "written", "write +fsync (s)", "settle (s)", "anon start → max → end",
            "anon at ¼ ½ ¾ end of the write", "file-backed start → max → end", "VmHWM",
            "journal added: data (du)"]
    body = []
    for t, b in big.items():
        if "anon_max" not in b:   # a JSON from before the anon/file split
            body.append([t, _bytes(b["bytes"]), f"{b['seconds']:.1f}", "—",
                         f"total {_bytes(b['rss_start'])} → {_bytes(b['rss_max'])} → "
                         f"{_bytes(b['rss_end'])}", "—", "—", "—",
                         f"{_bytes(b['journal_used'])} ({_bytes(b['journal'])})"])
            continue
        arrow = lambda k: f"{_bytes(b[k + '_start'])} → {_bytes(b[k + '_max'])} → {_bytes(b[k + '_end'])}"
        body.append([t, _bytes(b["bytes"]),
                     f"{b['seconds']:.1f}" + (" FAILED" if b["error"] else ""),
                     f"{b.get('settle_s', 0):.1f}", arrow("anon"),
                     " / ".join(_bytes(x) for x in b["anon_quarters"]), arrow("file"),
                     _bytes(b["hwm"]),
                     f"{_bytes(b['journal_used'])} ({_bytes(b['journal'])})"])
    return head, body


def big_write_verdicts(big: dict) -> list[str]:
    out = []
    for t, b in big.items():
        if b.get("error"):
            out.append(f"- {t}: the write FAILED: {one_line(b['error'])}")
        if b.get("flat") is None:
            continue
        grow = b["anon_max"] - b["anon_start"]
        out.append(
            f"- {t}: anonymous memory {'stayed flat' if b['flat'] else 'did NOT stay flat'}: "
            f"its peak was {_bytes(grow)} above the start (limit {_bytes(b['flat_limit'])}; "
            f"{_bytes(grow * (1 << 30) / b['bytes'])} per GiB written) while "
            f"{_bytes(b['bytes'])} went through; file-backed pages (the LMDB map, page "
            f"cache the kernel can reclaim) went from {_bytes(b['file_start'])} to a peak of "
            f"{_bytes(b['file_max'])}.")
    return out


def load_json(path: str):
    """A saved run (``--json``) back as (Results, info, meta): re-render without re-running."""
    from tools.bench.runner import Sample
    with open(path) as f:
        d = json.load(f)
    res = Results(events=d.get("events", []), big_write=d.get("big_write", {}))
    for name, per in d["samples"].items():
        for t, ss in per.items():
            for s in ss:
                res.add(name, t, Sample(**s))
    return res, d["info"], d["meta"]


def write_json(path: str, res: Results, info: dict, rows: list[dict], meta: dict) -> None:
    raw = {name: {t: [dataclasses.asdict(s) for s in ss] for t, ss in per.items()}
           for name, per in res.samples.items()}
    with open(path, "w") as f:
        json.dump({"meta": meta, "info": info, "summary": rows, "samples": raw,
                   "big_write": res.big_write, "events": res.events}, f, indent=1)


# --- machine and software ------------------------------------------------------------------

def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        mem = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": mem, "kernel": platform.release()}


def software() -> dict:
    import sys
    out = {"python": platform.python_version()}
    try:
        import pyfuse3
        out["pyfuse3"] = pyfuse3.__version__
    except Exception:
        out["pyfuse3"] = "?"
    out["libfuse"] = _cmd(["pkg-config", "--modversion", "fuse3"]) or \
        _cmd(["fusermount3", "-V"]).rsplit(" ", 1)[-1]
    try:
        sys.path.insert(0, ROOT)
        from deltafs import __version__
        out["deltafs"] = __version__
    except Exception:
        out["deltafs"] = "?"
    out["commit"] = _cmd(["git", "rev-parse", "--short", "HEAD"])
    out["commit_subject"] = _cmd(["git", "log", "-1", "--format=%s"])
    dirty = _cmd(["git", "status", "--porcelain", "--", "deltafs"])
    out["deltafs_dirty"] = bool(dirty)
    out["git"] = _cmd(["git", "--version"])
    out["sqlite"] = __import__("sqlite3").sqlite_version
    return out


def collect_meta(mode: str, rounds: int, sizes: wl.Sizes) -> dict:
    return {"mode": mode, "rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(), "software": software(), "sizes": dataclasses.asdict(sizes)}


def hangs(res: Results) -> dict[str, int]:
    """Per target: workloads during which the daemon stopped answering (watchdog fired)."""
    out: dict[str, int] = {}
    for per in res.samples.values():
        for t, ss in per.items():
            out[t] = out.get(t, 0) + sum(1 for s in ss if s.error and "timed out" in s.error)
    return {t: n for t, n in out.items() if n}


def capture_state(res: Results, rows: list[dict]) -> str:
    added = sum(max(s.journal, s.journal_used) for per in res.samples.values()
                for s in per["cap"])
    nocap = sum(max(s.journal, s.journal_used) for per in res.samples.values()
                for s in per["nocap"])
    if added <= 0:
        return ("capture was NOT active: the capture mount's journal did not grow, so the "
                "capture column measures the same pass-through as no-capture (the mount "
                "accepts the flag either way)")
    return (f"capture was active: the capture mount's journal grew by {_bytes(added)} over the "
            f"timed workloads (the no-capture journal by {_bytes(nocap)})")
