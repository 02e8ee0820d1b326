"""Encrypted mirrors against plain ones (issue 24): throughput, padding, unlock.

    .venv/bin/python -m tools.bench.encrypted [--quick] [--write-docs] [--json FILE] [--keep]

1. **Throughput.** A journal made through a real mount (incompressible
   files of 8 MiB written with 1 MiB writes, plus 1,000 small files), then,
   in alternating rounds (the order rotating), one ``deltafs mirror sync``
   pass of the unmounted journal into a fresh mirror and one ``deltafs
   clone`` of it, for each of file:// plain, file:// encrypted, s3:// plain
   and s3:// encrypted (SeaweedFS on 127.0.0.1, tests/mirrors/s3server.py).
   Reported: MiB/s of SRC data, and the encrypted/plain ratio of the same
   round (median, min-max). Every clone is hash-compared with SRC. The sync
   uses the key the journal keeps and the clone a key file, so neither pays
   the passphrase's Argon2id (measured in 3; a clone with the passphrase
   adds it once).
2. **Padding.** The four histories of tools/bench/history_size (doc, log,
   sqlite, binary; ``--quick`` sizes with --quick) played through a real
   mount that replicates *live* to a plain and an encrypted file:// mirror
   (the encrypted one added with ``mirror add --encrypt`` while mounted);
   then ``mirror sync`` of the finished journal into a fresh plain and a
   fresh encrypted mirror (*bulk*). Reported: stored bytes of each and the
   encrypted/plain ratio (the overhead is padding, headers and tags).
3. **Unlock.** Argon2id calibrated here (as ``mirror add --encrypt`` does),
   then the time of unwrapping the key from the passphrase, 5 times
   (median), and of ``keys.open_reader`` of a file:// mirror.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
import traceback

from tools.bench import report
from tools.bench import scale as sc
from tools.bench.targets import ROOT, force_unmount, is_mountpoint

MiB = 1 << 20
HEADING = "## Encrypted mirrors: throughput, padding, unlock"
PASS = "bench passphrase"


def log(msg: str) -> None:
    print(f"[encrypted {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- 1. throughput ----------------------------------------------------------------------------

def throughput(w: str, res: dict, env: dict, s3, bucket: str, mounts: list, big: int, rounds: int) -> None:
    src, mnt = os.path.join(w, "src"), os.path.join(w, "mnt")
    m = sc.Mount(src, mnt, [], env)
    mounts.append(m)
    for i in range(1000):
        sc.write_small(os.path.join(mnt, f"small-{i:04d}.txt"), 1024 + (i * 37) % 8192)
    for i in range(big // (8 * MiB)):
        sc.write_big(os.path.join(mnt, f"big-{i:03d}.bin"), 8 * MiB)
    m.umount()
    journal = os.path.join(src, ".deltafs")
    expect = sc.tree_hashes(src)
    nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f != ".deltafs")
    res["bytes"] = nbytes
    ep = ["--endpoint-url", s3.endpoint_url]
    kinds = [("file", False), ("file", True), ("s3", False), ("s3", True)]
    runs: dict[str, list[dict]] = {f"{k}-{'enc' if e else 'plain'}": [] for k, e in kinds}
    for rnd in range(rounds):
        order = kinds[rnd % 4:] + kinds[:rnd % 4]
        for kind, enc in order:
            name = f"{kind}-{'enc' if enc else 'plain'}"
            url = (f"file://{w}/m-{name}-{rnd}" if kind == "file" else f"s3://{bucket}/{name}-{rnd}")
            extra = ep if kind == "s3" else []
            keyfile = []
            if enc:   # a new encrypted mirror: key blob only, then the timed pass
                sc.run(["mirror", "add", url, "--encrypt", "--journal", journal] + extra, env=env)
                kf = os.path.join(w, f"key-{name}-{rnd}")
                sc.run(["mirror", "key", "export", url, "-o", kf, "--journal", journal] + extra, env=env)
                keyfile = ["--key-file", kf]   # the clone's throughput; the unlock is measured below
            dt_sync, _ = sc.run(["mirror", "sync", url, "--journal", journal, "--json"] + extra, env=env)
            dest = os.path.join(w, f"clone-{name}-{rnd}")
            dt_clone, _ = sc.run(["clone", url, dest] + extra + keyfile, env=env)
            ok, why = sc.compare(expect, sc.tree_hashes(dest))
            if not ok:
                raise RuntimeError(f"clone of {url} differs from SRC: {why}")
            if kind == "file":
                stored = sc.dir_bytes(url[len("file://"):])[1]
            else:
                stored = sc.s3_objects(s3, bucket, url.split("/", 3)[3])[1]
            runs[name].append({"sync_s": dt_sync, "clone_s": dt_clone, "stored": stored})
            shutil.rmtree(dest, ignore_errors=True)
            if enc:
                sc.run(["mirror", "remove", url, "--journal", journal], env=env)
            log(f"round {rnd} {name}: sync {dt_sync:.2f} s, clone {dt_clone:.2f} s")
    res["runs"] = runs
    for kind in ("file", "s3"):
        for what in ("sync_s", "clone_s"):
            ratios = [p[what] / e[what] for p, e in zip(runs[f"{kind}-plain"], runs[f"{kind}-enc"])]
            res[f"{kind}_{what}_ratio"] = {"median": statistics.median(ratios), "min": min(ratios),
                                           "max": max(ratios)}


# --- 2. padding --------------------------------------------------------------------------------

def padding(w: str, res: dict, env: dict, quick: bool) -> None:
    from tools.bench import history_size as hs

    base_mount = hs.Mount
    sizes = hs.QUICK if quick else hs.FULL

    class LiveMirrors(base_mount):
        """history_size's mount, replicating live to a plain and an encrypted mirror."""

        def __init__(self, b: str) -> None:
            super().__init__(b)
            self.plain, self.enc = f"file://{b}/mirror-plain", f"file://{b}/mirror-enc"
            for url, extra in ((self.plain, []), (self.enc, ["--encrypt"])):
                sc.run(["mirror", "add", url, "-m", self.mnt] + extra, env=env)

        def close(self) -> list[str]:
            sc.run(["flush", self.mnt, "--mirrors"], env=env, timeout=1800)
            return super().close()

    hs.Mount = LiveMirrors
    os.environ.update({k: v for k, v in env.items() if k.startswith("DELTAFS_")})
    try:
        out = res["histories"] = {}
        for name in ("doc", "log", "sqlite", "binary"):
            b = os.path.join(w, "hist", name)
            log(f"history {name}: playing through a mount with two live mirrors")
            r = hs.play(name, b, sizes)
            d = {"states": r.states, "sum_bytes": r.sum_bytes}
            d["live_plain"] = sc.dir_bytes(os.path.join(b, "mirror-plain"))
            d["live_enc"] = sc.dir_bytes(os.path.join(b, "mirror-enc"))
            for kind, extra in (("bulk_plain", []), ("bulk_enc", ["--encrypt"])):
                url = f"file://{b}/{kind}"
                if extra:
                    sc.run(["mirror", "add", url, "--journal", os.path.join(b, "journal")] + extra, env=env)
                sc.run(["mirror", "sync", url, "--journal", os.path.join(b, "journal")], env=env)
                d[kind] = sc.dir_bytes(os.path.join(b, kind))
            out[name] = d
            log(f"history {name}: live {d['live_enc'][1] / d['live_plain'][1]:.3f}x, "
                f"bulk {d['bulk_enc'][1] / d['bulk_plain'][1]:.3f}x")
            for sub in ("git", "src", "stage"):
                shutil.rmtree(os.path.join(b, sub), ignore_errors=True)
    finally:
        hs.Mount = base_mount


# --- 3. unlock ---------------------------------------------------------------------------------

def unlock(w: str, res: dict) -> None:
    from deltafs.mirrors import crypto as C
    from deltafs.mirrors import keys, open_mirror

    saved = os.environ.pop(C.KDF_ENV, None)
    try:
        t0 = time.perf_counter()
        params = C.calibrate()
        res["calibrate_s"] = time.perf_counter() - t0
        res["params"] = {"time_cost": params.time_cost, "memory_kib": params.memory_kib,
                         "parallelism": params.parallelism}
        key = C.MirrorKey.generate()
        blob = C.KeyBlob.create(key, PASS.encode(), params)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            blob.unwrap(PASS.encode(), "bench")
            times.append(time.perf_counter() - t0)
        res["unwrap_s"] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
        m = open_mirror(f"file://{w}/unlock")
        keys.write_blob(m, blob, replace=False)
        from deltafs.mirrors.encrypted import EncryptedMirror
        EncryptedMirror(m, key).put("manifest.json", b"{}")
        os.environ["DELTAFS_PASSPHRASE"] = PASS
        t0 = time.perf_counter()
        keys.open_reader(m, keys.Secrets())
        res["open_reader_s"] = time.perf_counter() - t0
    finally:
        if saved is not None:
            os.environ[C.KDF_ENV] = saved


# --- report ------------------------------------------------------------------------------------

def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%" if b else "-"


def render(res: dict, meta: dict) -> str:
    mi, sw = meta["machine"], meta["software"]
    L = [HEADING, ""]
    L.append(f"Measured by `python -m tools.bench.encrypted{' --quick' if meta['mode'] == 'quick' else ''} "
             f"--write-docs` on {meta['date']} (deltafs at commit `{sw.get('commit')}`), {mi['cpu']}, "
             f"{mi['cores']} cores. **Provisional: this machine was shared with other engineers' test runs "
             f"while it ran; wall times (and so the throughput ratios) are noisy.**")
    L.append("")
    L.append("Method: see the docstring of `tools/bench/encrypted.py`. Encrypted = `mirror add URL --encrypt` "
             "(AES-256-GCM objects in 64 KiB blocks, AES-SIV names, padding to buckets; "
             "docs/format.md \"Encrypted mirrors\").")
    tp = res.get("throughput")
    if tp:
        L += ["", f"**Throughput** ({tp['bytes'] / MiB:.0f} MiB of SRC data: {len(tp['runs']['file-plain'])} "
                  "rounds; MiB/s of SRC data per command, median; ratio = encrypted speed / plain speed of the "
                  "same round, median (min–max); target ≥ 0.80; the encrypted clone opens the mirror with a "
                  "key file, a passphrase adds the unlock time below once):", ""]
        L.append("| mirror | sync plain | sync encrypted | ratio | clone plain | clone encrypted | ratio | "
                 "stored plain | stored encrypted |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for kind in ("file", "s3"):
            p, e = tp["runs"][f"{kind}-plain"], tp["runs"][f"{kind}-enc"]

            def mbs(rows, what):
                return f"{tp['bytes'] / MiB / statistics.median(r[what] for r in rows):.0f}"

            def rr(what):
                d = tp[f"{kind}_{what}_ratio"]
                return f"{d['median']:.2f} ({d['min']:.2f}–{d['max']:.2f})"
            L.append(f"| {kind}:// | {mbs(p, 'sync_s')} | {mbs(e, 'sync_s')} | {rr('sync_s')} | "
                     f"{mbs(p, 'clone_s')} | {mbs(e, 'clone_s')} | {rr('clone_s')} | "
                     f"{p[0]['stored'] / MiB:.1f} MiB | {e[0]['stored'] / MiB:.1f} MiB "
                     f"({_pct(e[0]['stored'], p[0]['stored'])}) |")
    hi = res.get("histories")
    if hi:
        L += ["", "**Padding overhead on tools/bench/history_size's histories** (stored bytes of every object, "
                  "encrypted vs plain; *live*: replicated by the mount while the history was played, many small "
                  "passes; *bulk*: one `mirror sync` of the finished journal; target ≤ 12 %):", ""]
        L.append("| history | states | live plain | live encrypted | overhead | bulk plain | bulk encrypted | "
                 "overhead |")
        L.append("|---|---|---|---|---|---|---|---|")
        for name, d in hi.items():
            L.append(f"| {name} | {d['states']} | {d['live_plain'][1] / MiB:.2f} MiB ({d['live_plain'][0]} objects) | "
                     f"{d['live_enc'][1] / MiB:.2f} MiB ({d['live_enc'][0]}) | "
                     f"{_pct(d['live_enc'][1], d['live_plain'][1])} | {d['bulk_plain'][1] / MiB:.2f} MiB | "
                     f"{d['bulk_enc'][1] / MiB:.2f} MiB | {_pct(d['bulk_enc'][1], d['bulk_plain'][1])} |")
        tot = {k: sum(d[k][1] for d in hi.values()) for k in ("live_plain", "live_enc", "bulk_plain", "bulk_enc")}
        L.append(f"| all | | {tot['live_plain'] / MiB:.2f} MiB | {tot['live_enc'] / MiB:.2f} MiB | "
                 f"{_pct(tot['live_enc'], tot['live_plain'])} | {tot['bulk_plain'] / MiB:.2f} MiB | "
                 f"{tot['bulk_enc'] / MiB:.2f} MiB | {_pct(tot['bulk_enc'], tot['bulk_plain'])} |")
        L += ["", "The two live mirrors are replicated by two workers that do not pass at the same moments, so "
                  "their object counts differ and the *live* column of a small history moves from run to run "
                  "(doc and log hold a few tens of KiB: there the 512-byte minimum bucket and the 128 bytes of "
                  "header and tag per object dominate). The *bulk* column compares the same objects."]
    un = res.get("unlock")
    if un:
        p = un["params"]
        L += ["", f"**Unlock** (target 0.5–1 s): calibration chose Argon2id t={p['time_cost']}, "
                  f"m={p['memory_kib'] // 1024} MiB, p={p['parallelism']} in {un['calibrate_s']:.2f} s; "
                  f"unwrapping the key from the passphrase takes {un['unwrap_s']['median']:.2f} s (median of 5, "
                  f"{un['unwrap_s']['min']:.2f}–{un['unwrap_s']['max']:.2f}); opening a file:// mirror "
                  f"(key blob, unwrap, manifest check) {un['open_reader_s']:.2f} s."]
    for name, err in res.get("failures", {}).items():
        L += ["", f"**The {name} part FAILED in this run**: {report.one_line(err)}"]
    return "\n".join(L).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.encrypted", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 MiB, 2 rounds, history_size's quick histories")
    p.add_argument("--write-docs", action="store_true", help="rewrite this program's section of docs/benchmarks.md")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--from-json", metavar="FILE", help="do not run: render a saved --json run")
    p.add_argument("--only", choices=["throughput", "padding", "unlock"])
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, sc._terminate)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        section = render(saved["results"], saved["meta"])
        print(section)
        if args.write_docs:
            sc.write_docs(section, HEADING)
        return 0
    meta = {"mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": report.machine(), "software": report.software()}
    w = os.path.join(ROOT, "bench-work", "encrypted")
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(DELTAFS_PASSPHRASE=PASS, XDG_STATE_HOME=os.path.join(w, "state"))
    env.pop("DELTAFS_KDF_PARAMS", None)
    res: dict = {"failures": {}}
    mounts: list = []
    s3 = None
    try:
        if args.only in (None, "unlock"):
            res["unlock"] = {}
            try:
                unlock(w, res["unlock"])
            except Exception as e:  # noqa: BLE001
                res.pop("unlock")
                res["failures"]["unlock"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        if args.only in (None, "throughput"):
            sys.path.insert(0, sc.S3_DIR)
            from s3server import BUCKET, S3Server
            s3 = S3Server(os.path.join(w, "seaweedfs"))
            s3.start()
            s3.create_bucket(BUCKET)
            env.update(s3.env())
            res["throughput"] = {}
            try:
                throughput(w, res["throughput"], env, s3, BUCKET, mounts, 64 * MiB if args.quick else 256 * MiB,
                           2 if args.quick else 3)
            except Exception as e:  # noqa: BLE001
                res.pop("throughput")
                res["failures"]["throughput"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        if args.only in (None, "padding"):
            res["histories"] = {}
            try:
                padding(w, res, env, args.quick)
            except Exception as e:  # noqa: BLE001
                res.pop("histories", None)
                res["failures"]["padding"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for m in mounts:
            m.close()
        for d in ("mnt",):
            if is_mountpoint(os.path.join(w, d)):
                force_unmount(os.path.join(w, d))
        if s3 is not None:
            with contextlib.suppress(Exception):
                s3.close()
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "meta": meta}, f, indent=1, default=str)
    section = render(res, meta)
    print(section)
    if args.write_docs:
        sc.write_docs(section, HEADING)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
