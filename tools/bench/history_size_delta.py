"""How a growing SQLite database's in-place changes could be delta-coded (issue 20, *sqlgrow*).

    .venv/bin/python -m tools.bench.history_size_delta [--quick] [--json FILE] [--write-docs]

Plays ``history_size``'s *sqlgrow* history (same seed, same sizes) into a plain
directory, keeping every committed state of the database, and codes each
state against the previous one in several ways, without a mount or a
journal: the chunk payloads alone, no index and no records. Per state the
file is cut at ``ALIGNED_BLOCK`` (16 KiB) offsets, as an in-place capture
cuts it; a block that differs from the previous state's block at the same
offset is *in place*, a block past the previous end is *appended*.

In-place blocks, coded as:

- ``per block, same offset``: what the journal stores today
  (``chunking.compress_chunk`` against the old block at the same offset,
  zstd level 9 with the base as raw-content dictionary);
- ``per block, level 19``: the same at zstd's highest regular level;
- ``same offset + 3 bases found by content``: one block at a time, its
  dictionary the old block at its offset plus the three other old changed
  blocks sharing the most 32-byte windows with it (what a chunk payload with
  several bases could do, each block still read on its own);
- ``groups of N``: N consecutive changed blocks of a state compressed as one
  zstd frame, the dictionary being their N old blocks in the same order;
- ``one frame per state``: all changed blocks of the state in one frame
  against all their old blocks (window 16 MiB, level 9).

Appended blocks: ``compress_chunk`` against the previous state's last block
(today's base), and standalone at zstd level 19. ``xdelta3 -e -9`` of the
whole file against the previous state is beside them (the practical floor
``history_size`` reports). Nothing is mounted.
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

import zstandard

from tools.bench import history_size as hs
from tools.bench import report as rp
from tools.bench.targets import ROOT

sys.path.insert(0, ROOT)

from deltafs import chunking as C  # noqa: E402

TITLE = "## Growing database: how its in-place changes could be delta-coded"
WAYS = ("per block, same offset", "per block, level 19", "per block, same offset + 3 bases found by content",
        "groups of 4", "groups of 16", "groups of 64", "one frame per state")
WINDOW, STEP = 32, 16  # content look-up: 32-byte windows of the old changed blocks every 16 bytes


def _found_bases(new_block: bytes, index: dict[bytes, int], own: int, n: int = 3) -> list[int]:
    """Offsets of the ``n`` old changed blocks sharing the most 32-byte windows with ``new_block``."""
    hits: dict[int, int] = {}
    for q in range(0, len(new_block) - WINDOW, 4):
        o = index.get(new_block[q:q + WINDOW])
        if o is not None and o != own:
            hits[o] = hits.get(o, 0) + 1
    return [o for o, _ in sorted(hits.items(), key=lambda x: -x[1])[:n]]


def _frame(new: bytes, old: bytes, level: int = C.ZSTD_DELTA_LEVEL, window_log: int | None = None) -> int:
    kw = {"window_log": window_log} if window_log else {}
    p = zstandard.ZstdCompressionParameters.from_level(
        level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=True, write_dict_id=False, **kw)
    d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return len(zstandard.ZstdCompressor(compression_params=p, dict_data=d).compress(new)) + 1  # + codec byte


def _xdelta(old_path: str, new_path: str) -> int | None:
    if not shutil.which("xdelta3"):
        return None
    out = subprocess.run(["xdelta3", "-e", "-9", "-c", "-s", old_path, new_path], capture_output=True, check=True)
    return len(out.stdout)


def states(sz: hs.Sizes, work: str) -> list[str]:
    """The sqlgrow history's committed states, one copy of the database each."""
    rng = random.Random(f"{hs.SEED}-sqlgrow")
    db = os.path.join(work, "grow.db")
    out: list[str] = []

    def commit() -> None:
        out.append(os.path.join(work, f"state{len(out) + 1:03d}.db"))
        shutil.copyfile(db, out[-1])
    hs.grow_history(rng, sz, db, commit)
    return out


def measure(paths: list[str]) -> dict:
    B = C.ALIGNED_BLOCK
    tot = {w: 0 for w in WAYS}
    tot.update({"appended, base = last old block": 0, "appended, standalone level 19": 0, "xdelta3": 0})
    secs = {w: 0.0 for w in WAYS}
    n_in = n_app = 0
    first = os.path.getsize(paths[0])
    for a, b in zip(paths, paths[1:]):
        with open(a, "rb") as f:
            old = f.read()
        with open(b, "rb") as f:
            new = f.read()
        offs = [o for o in range(0, min(len(old), len(new)), B) if old[o:o + B] != new[o:o + B]]
        n_in += len(offs)
        t = time.perf_counter()
        tot[WAYS[0]] += sum(len(C.compress_chunk(new[o:o + B], old[o:o + B])) for o in offs)
        secs[WAYS[0]] += time.perf_counter() - t
        t = time.perf_counter()
        tot[WAYS[1]] += sum(_frame(new[o:o + B], old[o:o + B], 19) for o in offs)
        secs[WAYS[1]] += time.perf_counter() - t
        t = time.perf_counter()
        index: dict[bytes, int] = {}
        for o in offs:
            blk = old[o:o + B]
            for q in range(0, len(blk) - WINDOW, STEP):
                w = blk[q:q + WINDOW]
                if w.count(w[:1]) != WINDOW:  # not a run of one byte (free space)
                    index.setdefault(w, o)
        for o in offs:
            bases = _found_bases(new[o:o + B], index, o)
            tot[WAYS[2]] += _frame(new[o:o + B], b"".join(old[k:k + B] for k in bases[::-1]) + old[o:o + B],
                                   window_log=17)
        secs[WAYS[2]] += time.perf_counter() - t
        for g, way in ((4, WAYS[3]), (16, WAYS[4]), (64, WAYS[5])):
            t = time.perf_counter()
            for i in range(0, len(offs), g):
                oo = offs[i:i + g]
                tot[way] += _frame(b"".join(new[o:o + B] for o in oo), b"".join(old[o:o + B] for o in oo),
                                   window_log=22)
            secs[way] += time.perf_counter() - t
        if offs:
            t = time.perf_counter()
            tot[WAYS[6]] += _frame(b"".join(new[o:o + B] for o in offs), b"".join(old[o:o + B] for o in offs),
                                   window_log=24)
            secs[WAYS[6]] += time.perf_counter() - t
        for o in range(-(-len(old) // B) * B, len(new), B):  # from the first block past the old end
            n_app += 1
            tot["appended, base = last old block"] += len(C.compress_chunk(new[o:o + B], old[-B:]))
            tot["appended, standalone level 19"] += len(zstandard.ZstdCompressor(level=19).compress(new[o:o + B])) + 1
        x = _xdelta(a, b)
        tot["xdelta3"] = None if x is None or tot["xdelta3"] is None else tot["xdelta3"] + x
    return {"states": len(paths), "first_bytes": first, "last_bytes": os.path.getsize(paths[-1]),
            "inplace_blocks": n_in, "appended_blocks": n_app, "bytes": tot, "seconds": secs}


def render(d: dict, meta: dict) -> list[str]:
    b, s = d["bytes"], d["seconds"]
    cur = b[WAYS[0]]
    L = [TITLE, "",
         f"Measured by `python -m tools.bench.history_size_delta{' --quick' if meta.get('quick') else ''} "
         f"--write-docs` (issue 20), {meta['date']}, deltafs at commit `{meta.get('commit')}`, "
         f"1-min load {meta.get('load', '?')}. The *sqlgrow* history of `history_size` "
         f"({d['states']} states, the database growing from {hs.fb(d['first_bytes'])} to "
         f"{hs.fb(d['last_bytes'])}), each state coded against the previous one without a "
         "journal: chunk payloads only. Blocks are the 16 KiB aligned blocks an in-place "
         f"capture cuts; {d['inplace_blocks']} changed in place, {d['appended_blocks']} appended. "
         "*s* is the CPU time of the coding alone, for the whole history.", "",
         "| in-place blocks coded as | bytes | × today | s |", "|---|---|---|---|"]
    for w in WAYS:
        L.append(f"| {w} | {b[w]:,} | {b[w] / cur:.2f}× | {s[w]:.1f} |")
    L += ["", f"Appended blocks: {b['appended, base = last old block']:,} bytes coded as today, "
          f"{b['appended, standalone level 19']:,} standalone at level 19. "
          + (f"`xdelta3 -9` of each whole state against the previous: {b['xdelta3']:,} bytes."
             if b.get("xdelta3") else ""), "",
          "What it shows: SQLite moves cells between pages when it inserts into an index or "
          "splits a page, so a changed page's new bytes are mostly in *other* old pages of the "
          "same transaction, not in the old page at its own offset. A delta against one base "
          "block cannot reach them (a better single base found by content helps little: the "
          "moved cells come from several pages); coding a state's changed blocks together "
          "against all their old blocks does. That needs a chunk payload with several bases, "
          "or one payload for a group of blocks (a journal format change, left open in issue 20); "
          "the table bounds what it would save on this history."]
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.history_size_delta", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="history_size's quick sizes (~10 s)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--write-docs", action="store_true", help="write the section into docs/benchmarks.md")
    p.add_argument("--from-json", metavar="FILE", help="do not run: report a saved --json run")
    args = p.parse_args(argv)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            print(f"history_size_delta: cannot read {args.from_json}: {e}", file=sys.stderr)
            return 2
    else:
        work = tempfile.mkdtemp(prefix="deltafs-delta-")
        try:
            d = measure(states(hs.QUICK if args.quick else hs.FULL, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        d["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": rp.software().get("commit"),
                     "quick": args.quick, "load": f"{os.getloadavg()[0]:.2f}"}
    text = render(d, d["meta"])
    print("\n".join(text))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(d, f, indent=1)
    if args.write_docs:
        print(f"wrote {hs.write_docs(chr(10).join(text) + chr(10), TITLE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
