"""Where a `git checkout`'s journal bytes go (issue 20): records, indexes, pages.

    .venv/bin/python -m tools.bench.history_size_where [--files 60] [--json FILE] [--keep]

Builds a git repository of N Python-like files of ~18 KiB (commit a), changes
3 lines in each (commit b), checks a out into a fresh deltafs mount, then b,
and reports what the second checkout added to the journal: the whole
journal (``Journal.data_bytes()``: pack files + LMDB pages in use), each
LMDB database's pages, entries and key+value bytes, the records by op
(count, bytes, and the bytes of each record field), and the same after a
compaction pass (records moved into zstd blocks).  Beside it: how much
`git gc --aggressive` grows the repository's pack for the same change.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import msgpack

from tools.bench import report as rp
from tools.bench.history_size import GIT_ENV, lmdb_sizes, run, write_docs
from tools.bench.targets import DELTAFS, ROOT, force_unmount, is_mountpoint

sys.path.insert(0, ROOT)


def git(*args, cwd) -> str:
    return run(["git", *map(str, args)], cwd=cwd, env=GIT_ENV).stdout


def pack_bytes(repo: str) -> int:
    git("gc", "-q", "--aggressive", "--prune=now", cwd=repo)
    pack = os.path.join(repo, ".git", "objects", "pack")
    return sum(os.path.getsize(os.path.join(pack, n)) for n in os.listdir(pack) if n.endswith(".pack"))


def make_repo(repo: str, files: int, seed: int = 20) -> tuple[str, str, int]:
    """-> (commit a, commit b, git pack growth a -> b)."""
    os.makedirs(repo)
    git("init", "-q", "-b", "main", cwd=repo)
    rnd = random.Random(seed)
    src = {f"m{i}.py": [f"def f_{i}_{k}(x, y):\n    return x * {rnd.randrange(1000)} + y - "
                        f"{rnd.randrange(1000)}  # {rnd.randbytes(12).hex()}\n" for k in range(300)]
           for i in range(files)}
    for name, lines in src.items():
        with open(os.path.join(repo, name), "w") as f:
            f.write("".join(lines))
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "a", cwd=repo)
    a = git("rev-parse", "HEAD", cwd=repo).strip()
    pa = pack_bytes(repo)
    for name, lines in src.items():
        for k in rnd.sample(range(len(lines)), 3):
            lines[k] = lines[k].replace("return", "return -")
        with open(os.path.join(repo, name), "w") as f:
            f.write("".join(lines))
    git("commit", "-q", "-am", "b", cwd=repo)
    b = git("rev-parse", "HEAD", cwd=repo).strip()
    return a, b, pack_bytes(repo) - pa


def snapshot(jdir: str) -> dict:
    """Journal sizes and every record's bytes (journal closed by its writer)."""
    from deltafs.journal import Journal
    from deltafs.journal.records import decode_record
    out: dict = {}
    with Journal.open(jdir, readonly=True) as j:
        out["data_bytes"] = j.data_bytes()
        with j.reader() as r:
            st = r.stats()
            out["stored_bytes"], out["raw_bytes"] = st["stored_bytes"], st["raw_bytes"]
            out["pack_bytes"] = st["pack_bytes"]
            recs = []
            for s in range(1, r.head_seq() + 1):
                raw = bytes(r.raw_record(s))
                rec = decode_record(raw, s)
                body = msgpack.unpackb(raw[32:], raw=False, strict_map_key=False)
                recs.append((s, rec.op, raw, {k: len(msgpack.packb(k)) + len(msgpack.packb(v, use_bin_type=True))
                                                   for k, v in body.items()}))
            out["records"] = recs
    out.update(lmdb_sizes(jdir))
    return out


def diff(before: dict, after: dict) -> dict:
    seen = {s for s, *_ in before["records"]}
    new = [(s, op, len(raw), f) for s, op, raw, f in after["records"] if s not in seen]
    raws = [(op, raw) for s, op, raw, _ in after["records"] if s not in seen]
    by_op: dict = defaultdict(lambda: {"n": 0, "bytes": 0, "fields": defaultdict(int)})
    for _, op, n, flds in new:
        d = by_op[op]
        d["n"] += 1
        d["bytes"] += n
        d["fields"]["hash"] += 32
        for k, v in flds.items():
            d["fields"][str(k)] += v
    per_db = {}
    for name in set(before["per_db"]) | set(after["per_db"]):
        b, a = before["per_db"].get(name, {}), after["per_db"].get(name, {})
        per_db[name] = {k: a.get(k, 0) - b.get(k, 0) for k in ("pages", "bytes", "entries", "kv_bytes")}
    return {"data_bytes": after["data_bytes"] - before["data_bytes"],
            "stored_bytes": after["stored_bytes"] - before["stored_bytes"],
            "raw_bytes": after["raw_bytes"] - before["raw_bytes"],
            "pack_bytes": after["pack_bytes"] - before["pack_bytes"],
            "record_bytes": sum(n for _, _, n, _ in new), "records": len(new),
            "by_op": {k: {"n": v["n"], "bytes": v["bytes"], "fields": dict(v["fields"])} for k, v in by_op.items()},
            "per_db": per_db,
            # S blocks (as compaction writes them) of the new records, and of their writes alone:
            # what records would cost at rest if unlink + create were folded into the write
            "blocks_all": blocks_bytes([r for _, r in raws]),
            "blocks_writes_only": blocks_bytes([r for op, r in raws if op == "write"])}


def blocks_bytes(values: list[bytes]) -> int:
    from deltafs.journal import compact as JC
    from deltafs.journal import schema as S
    total = 0
    for i in range(0, len(values), JC.RECORD_BLOCK):   # the S layout (schema.encode_record_block)
        blk = values[i:i + JC.RECORD_BLOCK]
        total += 1 + len(S._zstd(blk[0][:32] + blk[-1][:32] + b"".join(
            S._uvarint(len(v) - 32) + v[32:] for v in blk)))
    return total


def compact(jdir: str) -> None:
    """A compaction pass keeping every version (what the mount does every 10 minutes)."""
    run(DELTAFS + ["compact", "--journal", jdir, "--retention", "*:all", "--coalesce", "0", "--json"],
        cwd=ROOT, timeout=600)


def measure(files: int, work: str) -> dict:
    repo = os.path.join(work, "repo")
    a, b, git_growth = make_repo(repo, files)
    src, mnt, jdir = (os.path.join(work, n) for n in ("src", "mnt", "journal"))
    os.makedirs(src)
    os.makedirs(mnt)
    wt = os.path.join(mnt, "work")
    run(DELTAFS + ["mount", src, mnt, "--journal", jdir, "--coalesce", "0"], cwd=ROOT, timeout=120)
    try:
        os.mkdir(wt)
        git("--git-dir", os.path.join(repo, ".git"), "--work-tree", wt, "checkout", "-q", "-f", a, cwd=work)
    finally:
        problems = force_unmount(mnt)
    if problems or is_mountpoint(mnt):
        raise RuntimeError(f"unmount: {problems}")
    before = snapshot(jdir)
    compact(jdir)
    before_c = snapshot(jdir)
    run(DELTAFS + ["mount", src, mnt, "--journal", jdir, "--coalesce", "0"], cwd=ROOT, timeout=120)
    try:
        git("--git-dir", os.path.join(repo, ".git"), "--work-tree", wt, "checkout", "-q", b, cwd=work)
    finally:
        problems = force_unmount(mnt)
    if problems or is_mountpoint(mnt):
        raise RuntimeError(f"unmount: {problems}")
    after = snapshot(jdir)
    d = diff(before, after)
    compact(jdir)
    comp = snapshot(jdir)
    d["compacted_growth"] = comp["data_bytes"] - before_c["data_bytes"]
    d["compacted_per_db"] = diff(before_c, comp)["per_db"]
    d["compacted_pack_growth"] = comp["pack_bytes"] - before_c["pack_bytes"]
    d["before_data_bytes"] = before["data_bytes"]
    d["git_growth"] = git_growth
    d["files"] = files
    return d


TITLE = "## Where a git checkout's journal bytes go"


def render(d: dict, meta: dict | None = None) -> list[str]:
    """The measurement as a Markdown section (docs/benchmarks.md)."""
    g, n = d["git_growth"], d["files"]
    pd, cd = d["per_db"], d["compacted_per_db"]
    chunks_v = d["stored_bytes"]
    blocks = d["compacted_pack_growth"] - chunks_v
    L = [TITLE, "",
         "Measured by `python -m tools.bench.history_size_where --files "
         f"{n} --write-docs` (issue 20)" + (f", {meta['date']}, deltafs at commit `{meta['commit']}`" if meta else "")
         + f". A git repository of {n} Python files of ~18 KiB (commit a), then 3 lines changed "
         "in every file (commit b); a is checked out into a fresh mount (`git --git-dir R --work-tree "
         "MNT/work checkout`), the journal compacted, then b checked out, and the journal compacted "
         "again (`deltafs compact --retention '*:all'`, every version kept). git replaces each file by "
         "unlink + create + write: three records per file.", "",
         f"| what b added | bytes | per file | × git's pack growth ({g:,} B) |", "|---|---|---|---|"]

    def row(what, v):
        L.append(f"| {what} | {v:,} | {v / n:.0f} | {v / g:.2f}× |")
    row("whole journal, as written (`Journal.data_bytes()`)", d["data_bytes"])
    row("whole journal, both compacted", d["compacted_growth"])
    row("· chunk values (zstd deltas against the file's previous content)", chunks_v)
    row(f"· {d['records']} records in compressed blocks", blocks)
    inside = {"history": " (with `pathlog`)", "changes": " (with the record block index and, format 12, the checkpoints)",
              "files": " (with `paths`)"}  # journal format 10 (docs/format.md, "Named databases")
    for name in ("chunks", "history", "pathlog", "changes", "files", "paths", "checkpoints"):
        if cd.get(name, {}).get("bytes"):
            row(f"· `{name}` LMDB pages{inside.get(name, '')}", cd[name]["bytes"])
    row("records as LMDB values (before compaction)", d["record_bytes"])
    row("same records as compaction's S blocks (computed)", d["blocks_all"])
    row("only the write records as S blocks (if unlink + create were folded into the write)",
        d["blocks_writes_only"])
    L += ["", "Records as written, by op (bytes of each msgpack field, key + value; `hash` is the "
          "32-byte chain hash):", "", "| op | records | bytes | per record | largest fields |", "|---|---|---|---|---|"]
    names = {"0": "version", "1": "hlc", "2": "op", "3": "file id", "4": "path", "7": "mode", "8": "uid",
             "9": "gid", "10": "mtime", "11": "size", "16": "cause", "17": "base", "18": "edit",
             "19": "stored", "20": "content hash", "hash": "hash"}
    for op, v in sorted(d["by_op"].items()):
        f = ", ".join(f"{names.get(k, k)} {x}" for k, x in sorted(v["fields"].items(), key=lambda x: -x[1])[:6])
        L.append(f"| {op} | {v['n']} | {v['bytes']:,} | {v['bytes'] / v['n']:.0f} | {f} |")
    L += ["", "LMDB databases, growth in pages (entries) as written → after compaction: " + "; ".join(
        f"`{k}` {pd[k]['pages']} ({pd[k]['entries']}) → {cd[k]['pages']} ({cd[k]['entries']})"
        for k in sorted(pd) if any(pd[k].values()) or any(cd[k].values())) + "."]
    return L


def report(d: dict) -> None:
    print("\n".join(render(d)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.history_size_where", description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=60)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--write-docs", action="store_true", help="write the section into docs/benchmarks.md")
    p.add_argument("--from-json", metavar="FILE", help="do not run: report a saved --json run")
    args = p.parse_args(argv)
    if args.files < 1:
        print("history_size_where: --files must be at least 1", file=sys.stderr)
        return 2
    if args.from_json:
        with open(args.from_json) as f:
            d = json.load(f)
    else:
        work = tempfile.mkdtemp(prefix="deltafs-where-")
        try:
            d = measure(args.files, work)
        finally:
            mnt = os.path.join(work, "mnt")
            if is_mountpoint(mnt):
                force_unmount(mnt)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        sw = rp.software()
        d["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": sw.get("commit")}
    report(d)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(d, f, indent=1)
    if args.write_docs:
        print(f"wrote {write_docs(chr(10).join(render(d, d.get('meta'))) + chr(10), TITLE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
