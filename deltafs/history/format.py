"""Text and JSON output of the history tools: times, sizes, paths, log and diff lines, progress."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime

from deltafs.names import quote_name


# --- small formatting helpers ------------------------------------------------------
def iso_time(ns: int, table: bool = False) -> str:
    dt = datetime.fromtimestamp(ns / 10**9).astimezone()
    if table:
        return dt.strftime("%Y-%m-%d %H:%M:%S")
    return dt.isoformat(timespec="milliseconds")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show_path(p: bytes | None) -> str:
    if p is None:
        return ""
    return os.fsdecode(p) if p else "/"


# --- log ----------------------------------------------------------------------------
def record_entry(rec) -> dict:
    """One line of ``log``: JSON-ready."""
    d = {
        "version": rec.seq,
        "time": iso_time(rec.time_ns),
        "time_ns": rec.time_ns,
        "op": rec.op,
        "path": show_path(rec.path),
        "file_id": rec.file_id,
    }
    if rec.path2 is not None:
        d["path2"] = show_path(rec.path2)
    if rec.is_content:
        d["cause"] = rec.cause
        d["size"] = rec.size or 0
        d["stored"] = rec.stored or 0
        d["base"] = rec.base_seq or 0
    elif rec.size is not None:
        d["size"] = rec.size
    if getattr(rec, "origin", None):
        d["origin"] = rec.origin  # applied from a sync group's event DEVICE:N (docs/sync.md)
    return d


def log_line(d: dict, table: bool) -> str:
    """One entry as a table row (terminal) or tab-separated plain line."""
    op = d.get("cause") or d["op"]
    path = quote_name(d["path"]) + (f" -> {quote_name(d['path2'])}" if "path2" in d else "")
    if d["op"] == "deleted":
        path += f" (deleted in {d['deleted_version']} at {d['deleted_time']})"
    if d.get("pruned"):
        path += " (pruned)"
    if d.get("origin"):
        path += f" (from {d['origin']})"
    if table:
        t = iso_time(d["time_ns"], table=True)
        stored = human_size(d["stored"]) if "stored" in d else "-"
        return f"{d['version']:>8}  {t}  {op:<11} {human_size(d.get('size')):>10} {stored:>10}  {path}"
    return "\t".join(str(x) for x in (d["version"], d["time"], op, d.get("size", "-"),
                                       d.get("stored", "-"), path))


LOG_HEADER = f"{'VERSION':>8}  {'TIME':<19}  {'OP':<11} {'SIZE':>10} {'STORED':>10}  PATH"


def diff_file_text(d: dict, stat_only: bool) -> str:
    a, b = d["from"], d["to"]
    name = quote_name(d["path"])
    if d["identical"] and a["exists"] == b["exists"]:
        return f"{name}: identical (versions {a['version']} and {b['version']})\n"
    if d["binary"]:
        c = d["chunks"]
        return (f"Binary {name}: {a['size']} -> {b['size']} bytes (versions {a['version']} -> "
                f"{b['version']}); {c['new']} of {c['to']} chunks new ({c['new_bytes']} bytes)\n")
    if stat_only:
        return f"{name} | +{d['added_lines']} -{d['removed_lines']}\n"
    return d["diff"]


def diff_tree_line(d: dict, stat_only: bool) -> str:
    s = {"added": "A", "removed": "D", "changed": "M"}[d["status"]]
    line = f"{s}\t{quote_name(d['path'])}"
    if d["changes"] and d["changes"] != ["content"]:
        line += f"\t({', '.join(d['changes'])})"
    if stat_only:
        line += f"\t{human_size(d['from_size'])} -> {human_size(d['to_size'])}"
    return line


class ProgressLine:
    """A one-line progress printer (files, bytes, rate, ETA) for a terminal stream."""

    def __init__(self, stream=None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.t0 = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, fd: int, ft: int, bd: int, bt: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and bd < bt:
            return
        self.last = now
        el = max(now - self.t0, 1e-6)
        rate = bd / el
        eta = (bt - bd) / rate if rate > 0 else 0
        self.stream.write(f"\r{fd}/{ft} files  {human_size(bd)}/{human_size(bt)}  "
                          f"{human_size(int(rate))}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}  \x1b[K")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
