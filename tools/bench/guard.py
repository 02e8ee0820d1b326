"""Mass-damage guard benchmark (issue 23, docs/guard.md): files lost before an
attack is stopped, false alerts on benign heavy work, whole-corpus rollback,
and the signals' cost.

    .venv/bin/python -m tools.bench.guard [--quick] [--files N] [--trials N]
                                          [--slow-every S] [--write-docs] [--json FILE]

A corpus of mixed files (default 3,000: text, source code, PDF-like, JPEG-
and PNG-like images, office-like zips, SQLite databases; --quick: 1,000) is
generated natively in SRC and mounted with ``--guard normal --guard-action
block``.  Each attack from the issue then runs at full speed through the
mount over the whole tree (directory by directory in the first trial, a
shuffled order in the others), never waiting for the daemon:

* in-place: AES-CTR over each file, written back in place;
* encrypt-rename: the same, then rename to ``NAME.locked``;
* write-new-delete-old: ``NAME.crypt`` written, ``NAME`` deleted;
* open-then-delete: the file read, a random-named encrypted copy written,
  the original deleted (no name links them: only the counted opens do);
* first-4k: only the first 4 KiB encrypted in place;
* stripes: 16 bytes of every 64 encrypted in place;
* slow: in-place, one file every ``--slow-every`` seconds (default 30).

"Lost" counts the files whose original content or name the attacker did
destroy (every step it tried after the block stood failed with EPERM);
it is an upper bound of the files damaged before the alert.  Each trial
is undone with ``deltafs rollback --to guard-...``, checked bit-exact
against the clean corpus, and followed by ``deltafs guard resume``.

Benign work on the same mount must raise no alert: git clone / checkout /
gc of this repository, tar x, zip -r, gzip -r, rsync -a, SQLite inserts/
updates/vacuum, gpg -c of one file, a photo import (cp of many images),
office-document re-saves, a venv with pip (ensurepip), a C build (make -j2).

Then the corpus is encrypted whole with ``--guard off`` and rolled back
in one command (time, bit-exact); and the cost of the signals is measured
as the time to write and fsync small files, ``cp -a`` a corpus and
``rm -rf`` both (plus each daemon's CPU for the three) on
native ext4, a ``--guard off`` mount and a ``--guard normal`` mount,
alternating, in the same run.  Everything happens under
bench-work/guard/ and is removed; every mount is unmounted in a finally.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import time
import zipfile
import zlib

from tools.bench import report
from tools.bench.paired import pct, ratio_summary
from tools.bench.scale import write_docs
from tools.bench.targets import DELTAFS, ROOT, daemon_stats, force_unmount

HEADING = "## Mass-damage guard: files lost, false alerts, rollback"
WORDS = ("alpha beta gamma delta epsilon invoice budget report meeting notes quarterly summary customer "
         "order shipping total amount balance the of and to in for on with").split()


def log(msg: str) -> None:
    print(f"[guard {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the corpus ----------------------------------------------------------------------------------

def _text(rng: random.Random, n: int) -> bytes:
    out, size = [], 0
    while size < n:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def _source(rng: random.Random, n: int) -> bytes:
    out, size, i = [], 0, 0
    while size < n:
        f = f"def {rng.choice(WORDS)}_{i}(x, y={rng.randint(0, 99)}):\n    return x * y + {rng.randint(0, 9)}\n\n"
        out.append(f)
        size += len(f)
        i += 1
    return "".join(out).encode()


def _png(rng: random.Random, w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes((x * 3 + y + rng.randint(0, 40)) & 0xFF for x in range(w * 3))
                    for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))


def _jpeg(rng: random.Random, n: int) -> bytes:
    """JFIF header + entropy-coded-like (incompressible) scan data, as a camera writes."""
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\xff\xdb\x00\x43\x00" + bytes(rng.randint(1, 60) for _ in range(64))
    sof = b"\xff\xc0\x00\x11\x08\x01\xe0\x02\x80\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    scan = rng.randbytes(n).replace(b"\xff", b"\xff\x00")
    return b"\xff\xd8" + app0 + dqt + sof + b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00" + scan + b"\xff\xd9"


def _pdf(rng: random.Random, n: int) -> bytes:
    body = _text(rng, n)
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n2 0 obj << /Length " + b"%d" % len(body)
            + b" >>\nstream\n" + body + b"\nendstream endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def _office(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", _text(rng, 600))
        z.writestr("word/document.xml", _text(rng, rng.randint(2000, 40000)))
    return buf.getvalue()


def make_corpus(root: str, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    for i in range(n):
        d = os.path.join(root, f"dept{i % 9}", f"y{2019 + i % 5}" if i % 3 else "")
        os.makedirs(d, exist_ok=True)
        kind = i % 9
        if kind in (0, 1):
            p, data = f"notes{i}.txt", _text(rng, rng.randint(200, 30000))
        elif kind == 2:
            p, data = f"mod{i}.py", _source(rng, rng.randint(500, 20000))
        elif kind == 3:
            p, data = f"report{i}.pdf", _pdf(rng, rng.randint(3000, 60000))
        elif kind == 4:
            p, data = f"IMG_{i}.jpg", _jpeg(rng, rng.randint(8000, 120000))
        elif kind == 5:
            p, data = f"chart{i}.png", _png(rng, rng.randint(16, 96), rng.randint(16, 96))
        elif kind == 6:
            p, data = f"letter{i}.{'docx' if i % 2 else 'xlsx'}", _office(rng)
        elif kind == 7:
            p, data = f"table{i}.csv", b"\n".join(b"%d,%s,%d" % (j, rng.choice(WORDS).encode(), rng.randint(0, 10**6))
                                                   for j in range(rng.randint(20, 2000)))
        else:
            path = os.path.join(d, f"data{i}.sqlite")
            con = sqlite3.connect(path)
            con.execute("create table t (id integer primary key, v text)")
            con.executemany("insert into t (v) values (?)",
                            [(_text(rng, 80).decode(),) for _ in range(rng.randint(5, 200))])
            con.commit()
            con.close()
            continue
        with open(os.path.join(d, p), "wb") as f:
            f.write(data)
        if i % 10 == 7:
            os.chmod(os.path.join(d, p), 0o600)


def fingerprint(root: str) -> dict:
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != ".deltafs"]
        for name in files + dirs:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if os.path.isdir(p) and not os.path.islink(p):
                out[os.path.relpath(p, root)] = ("d", st.st_mode & 0o7777, b"")
            else:
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = ("f", st.st_mode & 0o7777, hashlib.sha256(f.read()).digest())
    return out


def victims(root: str, order: int) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != ".deltafs")
        out += [os.path.join(d, f) for f in sorted(files)]
    if order:
        random.Random(order).shuffle(out)
    return out


# ---- the attacks: each returns True when the original was destroyed --------------------------------

def aes(data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    e = Cipher(algorithms.AES(b"k" * 32), modes.CTR(os.urandom(16))).encryptor()
    return e.update(data) + e.finalize()


# when the current file's first destructive request returned (its open for
# writing, or the delete of the original): nothing of it was damaged before
DAMAGED_AT = [0]


def _damaging() -> None:
    DAMAGED_AT[0] = time.time_ns()


def _rewrite(p: str, fn) -> bool:
    with open(p, "rb") as f:
        data = f.read()
    try:
        with open(p, "r+b") as f:
            _damaging()
            f.write(fn(data))
    except PermissionError:
        return False
    return True


def in_place(p: str) -> bool:
    return _rewrite(p, aes)


def encrypt_rename(p: str) -> bool:
    done = in_place(p)
    try:
        os.rename(p, p + ".locked")
        return True
    except PermissionError:
        return done


def write_new_delete_old(p: str) -> bool:
    with open(p, "rb") as f:
        data = f.read()
    try:
        with open(p + ".crypt", "wb") as f:
            f.write(aes(data))
    except PermissionError:
        pass  # goes on: a real attacker would not stop at one refusal
    try:
        os.unlink(p)
        _damaging()
        return True
    except PermissionError:
        return False


def open_then_delete(p: str) -> bool:
    with open(p, "rb") as f:
        data = f.read()
    top = p.split("/dept", 1)[0]
    try:
        with open(os.path.join(top, os.urandom(12).hex()), "wb") as f:
            f.write(aes(data))
    except PermissionError:
        pass
    try:
        os.unlink(p)
        _damaging()
        return True
    except PermissionError:
        return False


def first_4k(p: str) -> bool:
    return _rewrite(p, lambda d: aes(d[:4096]) + d[4096:])


def stripes(p: str) -> bool:
    def f(data: bytes) -> bytes:
        d = bytearray(data)
        for o in range(0, len(d), 64):
            d[o:o + 16] = aes(bytes(d[o:o + 16]))
        return bytes(d)
    return _rewrite(p, f)


ATTACKS = {"in-place": in_place, "encrypt-rename": encrypt_rename, "write-new-delete-old": write_new_delete_old,
           "open-then-delete (random names)": open_then_delete, "first 4 KiB": first_4k,
           "16-byte stripes": stripes, "slow": in_place}


# ---- the mount ------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return name.replace(" ", "-").replace("(", "").replace(")", "")


def cli(*args, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([*DELTAFS, *map(str, args)], capture_output=True, timeout=timeout, env=env)
    if check and r.returncode:
        raise RuntimeError(f"deltafs {' '.join(map(str, args))}: exit {r.returncode}: "
                           f"{r.stderr.decode(errors='replace')[-500:]}")
    return r


def guard_state(src: str) -> dict:
    from deltafs import control

    j = os.path.join(src, ".deltafs")
    control.request(j, "flush")
    return control.request(j, "guard")["guard"]


def run_attack(src: str, mnt: str, clean: dict, name: str, order: int, slow_every: float,
               mode: str = "block") -> dict:
    """One trial.  ``mode`` is the mount's --guard-action: under ``block`` the
    attacker goes on through the whole tree and "lost" counts what it did
    destroy before EPERM stopped it; under ``alert`` nothing stops it, so it
    notes when it began each file and stops once the alert is saved
    (JOURNAL/guard-alert.json appears), and "before_alert" counts the files
    it began before the alert was raised (the alert's own time)."""
    hit = ATTACKS[name]
    alert_file = os.path.join(src, ".deltafs", "guard-alert.json")
    lost, t0, began, damaged = 0, time.monotonic(), [], []
    vs = victims(mnt, order)
    if name == "slow":
        vs = vs[:40]  # the block stops it long before (and each file costs slow_every)
    elif mode == "alert":
        vs = vs[:300]  # no alert by then is a miss; the rollback undoes every file
    for i, p in enumerate(vs):
        if mode == "alert" and os.path.exists(alert_file):
            break  # the attacker would not notice; the bench stops here to keep the trial short
        if name == "slow" and i:
            time.sleep(slow_every)
            if guard_state(src)["alert"]:  # stopped: no need to wait out the rest
                break
        t = DAMAGED_AT[0] = time.time_ns()
        if hit(p):
            lost += 1
            began.append(t)
            damaged.append(DAMAGED_AT[0])
    took = time.monotonic() - t0
    g = guard_state(src)
    a = g["alert"]
    res = {"attack": name, "mode": mode, "order": order, "lost": lost, "seconds": round(took, 1),
           "alert": bool(a), "refused": ((a or {}).get("blocking") or {}).get("refused", 0) if a else 0,
           "alert_files": a["files"] if a else None}
    if a:
        res["before_alert"] = sum(1 for t in began if t < a["time_ns"])
        res["damaged_before_alert"] = sum(1 for t in damaged if t < a["time_ns"])
    if not a:
        res["rollback_ok"] = False
        return res
    snap = a["snapshot"]
    for _ in range(200):
        if cli("rollback", mnt, "--to", snap, "--dry-run", check=False).returncode == 0:
            break
        time.sleep(0.05)
    t1 = time.monotonic()
    cli("rollback", mnt, "--to", snap)
    res["rollback_s"] = round(time.monotonic() - t1, 2)
    cli("guard", "resume", mnt)
    now = fingerprint(mnt)
    res["rollback_ok"] = now == clean
    if not res["rollback_ok"]:
        diff = sorted(k for k in set(now) | set(clean) if now.get(k) != clean.get(k))
        res["differences"] = diff[:20]
        log(f"{name}: after the rollback {len(diff)} entries differ, e.g. "
            + ", ".join(f"{k} ({'missing' if k not in now else 'extra' if k not in clean else 'differs'})"
                        for k in diff[:10]))
    return res


def _run(cmd, cwd=None, input=None, env=None) -> None:
    r = subprocess.run(cmd, cwd=cwd, input=input, env=env, capture_output=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"{cmd}: {r.stderr.decode(errors='replace')[-300:]}")


def benign(src: str, mnt: str, w: str) -> list[dict]:
    """Each workload, the guard's score after it and whether an alert stood."""
    rows = []
    outside = os.path.join(w, "outside")
    make_corpus(outside, 300, seed=2)

    def step(name, fn):
        if not fn:
            rows.append({"workload": name, "skipped": True})
            return
        t0 = time.monotonic()
        try:
            fn()
            err = None
        except Exception as e:  # noqa: BLE001 - recorded in the table, the run goes on
            err = str(e)[-200:]
        g = guard_state(src)
        rows.append({"workload": name, "seconds": round(time.monotonic() - t0, 1), "score": g["score"],
                     "alert": bool(g["alert"]), "error": err})
        log(f"benign {name}: score {g['score']}, alert {bool(g['alert'])}{' ERROR ' + err if err else ''}")

    def have(t):
        return shutil.which(t) is not None

    m = lambda *p: os.path.join(mnt, *p)  # noqa: E731
    step("git clone + checkout + gc", have("git") and (lambda: (
        _run(["git", "clone", "-q", "--no-hardlinks", ROOT, m("clone")]),
        _run(["git", "checkout", "-q", "HEAD~20"], cwd=m("clone")),
        _run(["git", "checkout", "-q", "-"], cwd=m("clone")),
        _run(["git", "gc", "-q"], cwd=m("clone")))))
    tarball = os.path.join(w, "c.tar")
    step("tar x (300 files)", have("tar") and (lambda: (
        _run(["tar", "cf", tarball, "-C", outside, "."]), os.mkdir(m("untar")),
        _run(["tar", "xf", tarball, "-C", m("untar")]))))
    step("zip -r of two departments", have("zip") and (lambda: _run(["zip", "-qr", m("all.zip"), "dept0", "dept1"],
                                                                      cwd=mnt)))
    step("gzip -r of a department", have("gzip") and (lambda: _run(["gzip", "-r", m("dept2")])))
    step("rsync -a (new tree, then over a department)", have("rsync") and (lambda: (
        _run(["rsync", "-a", outside + "/", m("rsynced")]),
        _run(["rsync", "-a", outside + "/", m("dept3")]))))

    def sqlite_work():  # an application's database: 50 transactions of 100 inserts, updates, deletes, vacuum
        sql = "create table t(id integer primary key, v text);" + "".join(
            "begin;" + "".join(f"insert into t(v) values('{'row %d ' % (b * 100 + i) * 20}');" for i in range(100))
            + "commit;" for b in range(50)) + \
            "update t set v = upper(v) where id % 3 = 0; delete from t where id % 7 = 0; vacuum;"
        _run(["sqlite3", m("app.db")], input=sql.encode())
    step("sqlite inserts, updates, vacuum", have("sqlite3") and sqlite_work)

    def gpg_one():
        gh = os.path.join(w, "gnupg")
        os.makedirs(gh, mode=0o700, exist_ok=True)
        f = [os.path.join(d, x) for d, _, fs in os.walk(m("dept0")) for x in fs if x.endswith(".txt")][0]
        _run(["gpg", "--homedir", gh, "--batch", "--pinentry-mode", "loopback", "--passphrase", "x", "-c", f])
    step("gpg -c of one file", have("gpg") and gpg_one)

    def photos():
        rng = random.Random(5)
        os.makedirs(os.path.join(w, "camera"), exist_ok=True)
        for i in range(300):
            with open(os.path.join(w, "camera", f"DSC{i:04d}.JPG"), "wb") as f:
                f.write(_jpeg(rng, rng.randint(50000, 300000)))
        _run(["cp", "-a", os.path.join(w, "camera"), m("photos")])
    step("photo import (300 JPEGs)", photos)

    def office():
        rng = random.Random(6)
        docs = [os.path.join(d, x) for d, _, fs in os.walk(m("dept6")) for x in fs if x.endswith((".docx", ".xlsx"))]
        for p in docs[:100]:  # an office save: a new zip under a temp name, renamed over the document
            with open(p + ".tmp~", "wb") as f:
                f.write(_office(rng))
            os.rename(p + ".tmp~", p)
    step("office re-saves (100 documents)", office)
    step("venv + pip (ensurepip)", lambda: _run([sys.executable, "-m", "venv", m("venv")]))

    def build():
        d = m("build")
        os.makedirs(d)
        for i in range(60):
            with open(os.path.join(d, f"u{i}.c"), "w") as f:
                f.write(f"int f{i}(int x) {{ return x * {i} + {i % 7}; }}\n")
        objs = " ".join(f"u{i}.o" for i in range(60))
        with open(os.path.join(d, "Makefile"), "w") as f:
            f.write(f"libu.a: {objs}\n\tar rcs $@ $^\n%.o: %.c\n\tcc -O2 -c $< -o $@\n")
        _run(["make", "-s", "-j2"], cwd=d)
        for i in range(60):  # edit everything, rebuild: every object rewritten
            with open(os.path.join(d, f"u{i}.c"), "a") as f:
                f.write(f"int g{i}(void) {{ return {i}; }}\n")
        _run(["make", "-s", "-j2"], cwd=d)
        _run(["make", "-s", "-j2", "-B"], cwd=d)
    step("C build (60 units, rebuilt twice)", have("make") and have("cc") and build)
    return rows


# ---- rollback of the whole damaged corpus, and the signals' cost -----------------------------------

def whole_rollback(src: str, mnt: str, clean: dict) -> dict:
    snap = f"bench-clean-{int(time.time())}"
    from deltafs import control

    control.request(os.path.join(src, ".deltafs"), "flush")
    control.request(os.path.join(src, ".deltafs"), "snapshot", name=snap)
    n = sum(1 for p in victims(mnt, 0) if in_place(p))
    control.request(os.path.join(src, ".deltafs"), "flush")
    t0 = time.monotonic()
    cli("rollback", mnt, "--to", snap)
    took = time.monotonic() - t0
    return {"files": n, "seconds": round(took, 1), "bit_exact": fingerprint(mnt) == clean}


def small_files(root: str, n: int, seed: int, start: int = 0) -> list[float]:
    """Write n small text files (500 B .. 8 KB; f{start}.txt on); -> each one's fsync + close latency, seconds."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    lat = []
    for i in range(start, start + n):
        data = _text(rng, rng.randint(500, 8000))
        fd = os.open(os.path.join(root, f"f{i}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        t0 = time.perf_counter()
        os.fsync(fd)
        os.close(fd)
        lat.append(time.perf_counter() - t0)
    return lat


def cost(w: str, corpus: str, files: int, rounds: int, baseline: str | None = None) -> dict:
    """The signals' cost: a --guard off and a --guard normal mount (the default
    --guard-action alert) on the same disk.  Each round runs the three
    workloads in small pieces, the sides taking turns for each piece (25
    files written and fsynced, one department of the corpus copied, one
    removed), the order of the mounts changing from piece to piece: both
    see the same load, whose drift on a shared machine is seconds.  (Until
    2026-12-06 a side ran a whole round's workload, 3-12 s, before the
    other; at load 3 single rounds then swung by +-50%.)  Reported: the
    median over rounds of normal/off, a 95% confidence interval of that
    median, and the pooled per-save close+fsync latencies (median, p99) of
    every save.  Native ext4 takes its turn in each piece as the reference.

    ``baseline``: a source tree of another deltafs (e.g. ``git archive`` of
    main), mounted ``--guard normal`` as a third side, "guard normal
    (baseline)", its daemon importing that tree (PYTHONPATH): a change to
    the guard is compared with the code before it in the same rounds."""
    targets = {"native": None, "guard off": "off", "guard normal": "normal"}
    if baseline:
        targets["guard normal (baseline)"] = "normal"
    roots = {}
    try:
        for name, level in targets.items():
            base = os.path.join(w, "cost-" + _slug(name))
            os.makedirs(os.path.join(base, "src"))
            if level is None:
                roots[name] = os.path.join(base, "src")
            else:
                os.makedirs(os.path.join(base, "mnt"))
                env = None
                if name == "guard normal (baseline)":
                    env = {**os.environ, "PYTHONPATH": os.path.abspath(baseline)}
                cli("mount", os.path.join(base, "src"), os.path.join(base, "mnt"), "--guard", level, env=env)
                roots[name] = os.path.join(base, "mnt")
        from deltafs import mounttable

        pids = {name: int(mounttable.read_record(os.path.realpath(root))["pid"])
                for name, root in roots.items() if targets[name] is not None}
        out = {k: {"write_s": [], "fsync_ms": [], "cp_s": [], "rm_s": [], "cpu_s": [], "scoring_s": [], "lat": []}
               for k in targets}
        guarded = [k for k in targets if targets[k] == "normal"]

        def flush(root: str, name: str) -> None:  # every capture of the mount's queue committed
            if name != "native":
                from deltafs import control

                control.request(os.path.join(os.path.dirname(root), "src", ".deltafs"), "flush")

        loads = [os.getloadavg()[0]]
        mounts = [k for k in targets if targets[k] is not None]
        perms = list(itertools.permutations(mounts))
        turn = [0]

        def turns() -> list[str]:  # the next order of the sides: every order of the mounts in turn
            p = perms[turn[0] % len(perms)]
            turn[0] += 1
            return ["native", *p]

        depts = sorted(os.listdir(corpus))
        blocks = max(1, files // 25)
        for r in range(rounds + 1):  # round 0: warm-up, not counted
            # Each workload runs in small pieces, the sides in turn for each piece (25 files
            # written, one department copied, one removed): the load of a shared machine
            # drifts within seconds, and a side's whole 3-12 s workload run after the other's
            # saw another load (interleaving by round alone: +-50% per round at load 3)
            acc = {k: {"write": 0.0, "cp": 0.0, "rm": 0.0, "lat": []} for k in targets}
            g0 = {k: guard_state(os.path.join(os.path.dirname(roots[k]), "src")).get("scoring_cpu_s", 0.0)
                  for k in guarded}
            c0 = {k: daemon_stats(pids.get(k)).cpu for k in targets}
            for k in targets:
                os.makedirs(os.path.join(roots[k], f"cp{r}"))
            for b in range(blocks):
                for k in turns():
                    t0 = time.perf_counter()
                    acc[k]["lat"] += small_files(os.path.join(roots[k], f"r{r}"), files // blocks,
                                                 r * 1000 + b, start=b * (files // blocks))
                    acc[k]["write"] += time.perf_counter() - t0
            for d in depts:
                for k in turns():
                    t0 = time.perf_counter()
                    subprocess.run(["cp", "-a", os.path.join(corpus, d), os.path.join(roots[k], f"cp{r}", d)],
                                   check=True)
                    acc[k]["cp"] += time.perf_counter() - t0
            for k in turns():
                t0 = time.perf_counter()
                subprocess.run(["sync", "-f", os.path.join(roots[k], f"cp{r}")], check=True)
                acc[k]["cp"] += time.perf_counter() - t0
            for k in targets:
                flush(roots[k], k)
            # rm -rf: the unlink signals (read-then-delete, replaced)
            for d in [os.path.join(f"cp{r}", d) for d in depts] + [f"r{r}", f"cp{r}"]:
                for k in turns():
                    t0 = time.perf_counter()
                    subprocess.run(["rm", "-rf", os.path.join(roots[k], d)], check=True)
                    acc[k]["rm"] += time.perf_counter() - t0
            for k in targets:
                flush(roots[k], k)
            c1 = {k: daemon_stats(pids.get(k)).cpu for k in targets}
            g1 = {k: guard_state(os.path.join(os.path.dirname(roots[k]), "src")).get("scoring_cpu_s", 0.0)
                  for k in guarded}
            if r:
                for k in targets:
                    out[k]["scoring_s"].append(g1[k] - g0[k] if k in guarded else 0.0)
                    out[k]["rm_s"].append(acc[k]["rm"])
                    out[k]["cpu_s"].append(c1[k] - c0[k])
                    out[k]["write_s"].append(acc[k]["write"])
                    out[k]["fsync_ms"].append(statistics.median(acc[k]["lat"]) * 1000)
                    out[k]["cp_s"].append(acc[k]["cp"])
                    out[k]["lat"] += [x * 1000 for x in acc[k]["lat"]]
            loads.append(os.getloadavg()[0])
            if r:
                log(f"cost round {r}/{rounds}: normal/off write {out['guard normal']['write_s'][-1] / out['guard off']['write_s'][-1] - 1:+.1%}, "
                    f"cp {out['guard normal']['cp_s'][-1] / out['guard off']['cp_s'][-1] - 1:+.1%}, "
                    f"rm {out['guard normal']['rm_s'][-1] / out['guard off']['rm_s'][-1] - 1:+.1%}, "
                    f"daemon CPU {out['guard normal']['cpu_s'][-1] / out['guard off']['cpu_s'][-1] - 1:+.1%}, load {loads[-1]:.1f}"
                    + ("; baseline/off write {:+.1%}, cp {:+.1%}, rm {:+.1%}, CPU {:+.1%}".format(
                        *(out["guard normal (baseline)"][m][-1] / out["guard off"][m][-1] - 1
                          for m in ("write_s", "cp_s", "rm_s", "cpu_s"))) if baseline else ""))
        res: dict = {k: {m: round(statistics.median(v), 3) for m, v in d.items() if m != "lat"} for k, d in out.items()}
        for k, d in out.items():
            res[k]["lat_median_ms"] = round(statistics.median(d["lat"]), 3)
            res[k]["lat_p99_ms"] = round(pct(d["lat"], 0.99), 3)
            res[k]["saves"] = len(d["lat"])
        pairs = {m: ratio_summary(out["guard normal"][m], out["guard off"][m])
                 for m in ("write_s", "fsync_ms", "cp_s", "rm_s", "cpu_s")}
        res["pairs"] = pairs
        if baseline:  # the same rows for the baseline tree, and this tree against it
            res["baseline"] = os.path.abspath(baseline)
            res["pairs_baseline"] = {m: ratio_summary(out["guard normal (baseline)"][m], out["guard off"][m])
                                     for m in ("write_s", "fsync_ms", "cp_s", "rm_s", "cpu_s")}
            res["pairs_vs_baseline"] = {m: ratio_summary(out["guard normal"][m], out["guard normal (baseline)"][m])
                                        for m in ("write_s", "fsync_ms", "cp_s", "rm_s", "cpu_s")}
            b = out["guard normal (baseline)"]
            res["scoring_share_baseline"] = round(statistics.median(
                g / c for g, c in zip(b["scoring_s"], b["cpu_s"]) if c), 4)
        on = out["guard normal"]  # the signals' own CPU: a share of the same daemon's CPU, round by round
        res["scoring_share"] = round(statistics.median(g / c for g, c in zip(on["scoring_s"], on["cpu_s"]) if c), 4)
        res["rounds"] = rounds
        res["files"] = files
        res["load"] = {"min": round(min(loads), 1), "max": round(max(loads), 1),
                       "median": round(statistics.median(loads), 1)}
        return res
    finally:
        for name, level in targets.items():
            if level is not None:
                force_unmount(os.path.join(w, "cost-" + _slug(name), "mnt"))


# ---- the report -------------------------------------------------------------------------------------

def _lost_stats(vals: list[int]) -> tuple[float | None, int | None]:
    return (statistics.median(vals), max(vals)) if vals else (None, None)


def render(a: argparse.Namespace, n: int, trials: list[dict], ben: list[dict], rb: dict | None,
           c: dict | None, total_s: float) -> str:
    rows = []
    per_mode: dict[str, list[int]] = {"block": [], "alert": [], "damaged": []}
    for name in ATTACKS:
        ts = [t for t in trials if t["attack"] == name]
        if not ts:
            continue
        blk = [t for t in ts if t.get("mode", "block") == "block"]
        alr = [t for t in ts if t.get("mode") == "alert"]
        lost = [t["lost"] for t in blk]
        before = [t["before_alert"] for t in alr if t.get("before_alert") is not None]
        per_mode["block"] += lost
        per_mode["alert"] += before
        dmg = [t["damaged_before_alert"] for t in alr if t.get("damaged_before_alert") is not None]
        per_mode["damaged"] += dmg
        af = [t["alert_files"] for t in blk if t.get("alert_files")]
        rows.append([name, f"{len(blk)} + {len(alr)}",
                     f"{statistics.median(lost):g} / {max(lost)}" if lost else "–",
                     f"{statistics.median(af):g}" if af else "–",
                     f"{statistics.median(before):g} / {max(before)}" if before else "–",
                     f"{statistics.median(dmg):g} / {max(dmg)}" if dmg else "–",
                     f"{sum(t['alert'] for t in ts)}/{len(ts)}",
                     f"{sum(t['rollback_ok'] for t in ts)}/{len(ts)}",
                     f"{statistics.median([t.get('rollback_s', 0) for t in ts]):.1f} s"])
    false = sum(1 for b in ben if b.get("alert"))
    brow = [[b["workload"], "skipped (tool missing)" if b.get("skipped") else
             f"{b['seconds']:.1f} s" + (f" (failed: {b['error']})" if b.get("error") else ""),
             "" if b.get("skipped") else f"{b['score']:g}", "" if b.get("skipped") else ("ALERT" if b["alert"] else "no")]
            for b in ben]
    summary = []
    for mode, label in (("block", "files lost before `--guard-action block` stopped the attack"),
                        ("alert", "files the attack began before the alert was raised (`--guard-action alert`)"),
                        ("damaged", "files the attack had begun to damage (its open for writing or delete of the "
                                    "original returned) before the alert (`--guard-action alert`)")):
        med, mx = _lost_stats(per_mode[mode])
        if med is None:
            continue
        summary.append([f"{label} (all attacks, all trials)", f"median {med:g}, max {mx}", "median ≤ 5, max ≤ 20",
                        report._yn(med <= 5 and mx <= 20)])
    summary.append(["false alerts on the benign set", str(false), "0", report._yn(false == 0)] if ben else
                   ["false alerts on the benign set", "not run", "0", "—"])
    if rb:
        summary.append([f"rollback of the whole damaged corpus ({rb['files']:,} files encrypted)",
                        f"{rb['seconds']:.1f} s, {'bit-exact' if rb['bit_exact'] else 'NOT bit-exact'}",
                        "≤ 60 s, bit-exact", report._yn(rb["seconds"] <= 60 and rb["bit_exact"])])
    crow = []
    if c:
        nat, off, on = c["native"], c["guard off"], c["guard normal"]
        pr = c["pairs"]
        for key, label in (("write_s", f"write + fsync {c['files']:,} small files (per round)"),
                           ("fsync_ms", "close+fsync latency, median of a round's saves"),
                           ("cp_s", "`cp -a` of the cost corpus + sync"),
                           ("rm_s", "`rm -rf` of the round's files and copy")):
            unit = "ms" if key == "fsync_ms" else "s"
            p = pr.get(key)
            if p is None:  # an earlier run's --json without this row
                continue
            crow.append([label, f"{nat[key]:.2f} {unit}", f"{off[key]:.2f} {unit}", f"{on[key]:.2f} {unit}",
                         f"{p['median']:+.1%}", f"{p['ci95'][0]:+.1%} … {p['ci95'][1]:+.1%}",
                         f"{p['min']:+.0%} … {p['max']:+.0%}"])
        if "cpu_s" in pr:  # not judged: where the time goes, whatever the machine's load
            p = pr["cpu_s"]
            crow.append(["daemon CPU per round (all three workloads, until captured)", "–", f"{off['cpu_s']:.2f} s",
                         f"{on['cpu_s']:.2f} s", f"{p['median']:+.1%}", f"{p['ci95'][0]:+.1%} … {p['ci95'][1]:+.1%}",
                         f"{p['min']:+.0%} … {p['max']:+.0%}"])
        if "scoring_share" in c:
            crow.append(["the guard's own scoring (`status --json` guard.scoring_cpu_s), share of the normal "
                         "mount's daemon CPU", "–", "–", f"{on['scoring_s']:.3f} s",
                         f"{c['scoring_share']:.1%} (median of rounds)", "", ""])
        lrow = [["close+fsync latency, every save pooled", f"{nat['lat_median_ms']:.2f} / {nat['lat_p99_ms']:.2f} ms",
                 f"{off['lat_median_ms']:.2f} / {off['lat_p99_ms']:.2f} ms",
                 f"{on['lat_median_ms']:.2f} / {on['lat_p99_ms']:.2f} ms",
                 f"{on['lat_median_ms'] / off['lat_median_ms'] - 1:+.1%} / {on['lat_p99_ms'] / off['lat_p99_ms'] - 1:+.1%}",
                 f"{off['saves']:,} saves each"]]
        judged = [k for k in ("write_s", "fsync_ms", "cp_s", "rm_s") if k in pr]
        worst_med = max(pr[k]["median"] for k in judged)
        worst_hi = max(pr[k]["ci95"][1] for k in judged)
        summary.append(["cost of the signals: guard normal vs off, median of paired rounds (worst row; "
                        "upper end of its 95% interval)", f"{worst_med:+.1%} (≤ {worst_hi:+.1%})", "≤ 5%",
                        "yes" if worst_hi <= 0.05 else ("not shown" if worst_med <= 0.05 else "NO")])
    la = a.load_before, a.load_after
    out = [HEADING, "",
           f"`python -m tools.bench.guard{' --quick' if a.quick else ''}{' ' + ' '.join(a.argv) if a.argv else ''}` "
           f"({time.strftime('%Y-%m-%d')}, {total_s / 60:.0f} min, 1-min load {la[0]:.1f} before, "
           f"{la[1]:.1f} after{'; ' + a.reused if getattr(a, 'reused', None) else ''}): a corpus of {n:,} files (text, Python source, CSV, PDF-like, JPEG- and "
           "PNG-like images, office-like zips, SQLite) in SRC, mounted `--guard normal`. "
           f"Each attack runs at full speed over the whole tree, never waiting for the daemon ({a.trials} "
           "trial(s) each per mode: directory by directory, then shuffled orders; `slow` pauses "
           f"{a.slow_every:g} s between files), first with `--guard-action block` (scoring in capture's "
           "committer), then with `--guard-action alert` (the default: scoring deferred until each "
           "commit's fsync is answered). **Lost (block)** = files whose content or name the attacker "
           "did destroy before the block refused it (an upper bound of the files damaged before the alert); "
           "**files in the alert** = the distinct files the guard had scored when it raised it; **began "
           "before the alert (alert only)** = files the unstopped attacker had begun before the alert's "
           "own time (what capture's lag plus the threshold let through). Each trial is undone by "
           "`deltafs rollback --to guard-...` and compared with the clean corpus (hash, mode, name of "
           "every entry).", "",
           report.md_table(["measurement", "result", "target", "met"], summary), "",
           report.md_table(["attack", "trials (block + alert)", "lost, block (median / max)",
                            "files in the alert, block (median)", "began before the alert, alert only (median / max)",
                            "damaged before the alert, alert only (median / max)",
                            "alerts", "rolled back exactly", "rollback"], rows)]
    if brow:
        out += ["", "Benign work on the same mount after the attacks (in this order; the score is the guard's "
                "window sum after each step, the alert threshold is 5):", "",
                report.md_table(["workload", "time", "score after", "alert"], brow)]
    if crow:
        out += ["", f"Cost: a `--guard off` and a `--guard normal` mount (default `--guard-action alert`) in "
                f"{c['rounds']} rounds after a warm-up; in each round every workload runs in small pieces (25 "
                "files written, one department copied, one removed), the mounts taking turns for each piece "
                "in changing order, so both see the same load; native ext4 takes its turn too as the "
                "reference. Per round: normal / off − 1; the table gives the median "
                "over the rounds, a distribution-free 95% interval of that median (order statistics) and the "
                f"range. The daemon CPU row (utime + stime of each mount's daemon from the start of the "
                "write to the end of a flush after the rm -rf: every capture done) is not judged; it shows "
                "the signals' own work whatever the load. 1-min load during the rounds "
                f"{c['load']['min']}–{c['load']['max']} (median {c['load']['median']}).", "",
                report.md_table(["workload", "native", "guard off", "guard normal", "normal vs off (median of pairs)",
                                 "95% interval", "range over pairs"], crow), "",
                report.md_table(["latency per save", "native (median / p99)", "guard off", "guard normal",
                                 "normal vs off (median / p99)", ""], lrow)]
    if c and c.get("pairs_vs_baseline"):  # --cost-baseline: the same rounds against another tree
        def cell(p):
            return f"{p['median']:+.1%} ({p['ci95'][0]:+.1%} … {p['ci95'][1]:+.1%})"
        brows = [[key, cell(c["pairs"][key]), cell(c["pairs_baseline"][key]), cell(c["pairs_vs_baseline"][key])]
                 for key in ("write_s", "fsync_ms", "cp_s", "rm_s", "cpu_s")]
        out += ["", f"Baseline: `{c['baseline']}` mounted `--guard normal` as a third side of the same rounds "
                "(median of rounds, 95% interval):", "",
                report.md_table(["row", "this tree vs off", "baseline vs off", "this tree vs baseline"], brows)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 files, 1 trial, slow attack 3 s apart")
    ap.add_argument("--files", type=int, help="corpus size (default 3000; --quick 1000)")
    ap.add_argument("--trials", type=int, help="orders per attack and mode (default 3; --quick 1)")
    ap.add_argument("--slow-every", type=float, help="seconds between files of the slow attack (default 30)")
    ap.add_argument("--modes", default="block,alert", help="--guard-action modes to attack (default block,alert)")
    ap.add_argument("--attacks", help="comma-separated attack names (default all; see ATTACKS)")
    ap.add_argument("--cost-files", type=int, default=500, help="small files written per mount per round")
    ap.add_argument("--cost-corpus", type=int, default=2000, help="files in the corpus `cp -a` copies per round")
    ap.add_argument("--cost-rounds", type=int, default=24)
    ap.add_argument("--cost-baseline", metavar="TREE", help="a deltafs source tree (e.g. `git archive main`) "
                    "mounted --guard normal as a third side of the cost rounds, to compare a change with it")
    ap.add_argument("--skip", action="append", default=[], choices=("attacks", "benign", "rollback", "cost"))
    ap.add_argument("--write-docs", action="store_true", help="write the section into docs/benchmarks.md")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--reuse", metavar="FILE", help="the --json of an earlier run: its results stand in for the "
                    "parts this run skips (so a long run can be split in two under a 15-minute bench lock)")
    a = ap.parse_args(argv)
    args = list(argv if argv is not None else sys.argv[1:])
    a.argv = [x for i, x in enumerate(args) if x not in ("--write-docs", "--quick", "--json", "--reuse")
              and not x.startswith(("--json=", "--reuse=")) and not (i and args[i - 1] in ("--json", "--reuse"))]
    a.load_before = os.getloadavg()[0]
    a.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    n = a.files or (1000 if a.quick else 3000)
    a.trials = a.trials or (1 if a.quick else 3)
    a.slow_every = a.slow_every if a.slow_every is not None else (3.0 if a.quick else 30.0)
    if a.quick:
        a.cost_rounds = min(a.cost_rounds, 2)
    modes = [m for m in a.modes.split(",") if m]
    attacks = a.attacks.split(",") if a.attacks else list(ATTACKS)
    for x in attacks:
        if x not in ATTACKS:
            ap.error(f"--attacks: {x!r} is none of {', '.join(ATTACKS)}")
    w = os.path.join(ROOT, "bench-work", "guard")
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    src, mnt = os.path.join(w, "src"), os.path.join(w, "mnt")
    t_start = time.monotonic()
    trials, ben, rb, c = [], [], None, None
    try:
        os.makedirs(mnt)
        make_corpus(src, n)
        corpus_copy = os.path.join(w, "corpus")
        shutil.copytree(src, corpus_copy, symlinks=True)
        log(f"corpus of {n} files")
        clean = None
        run_modes = modes if "attacks" not in a.skip else []
        if "benign" not in a.skip and not run_modes:
            run_modes = ["alert"]
        for k, mode in enumerate(run_modes):
            cli("mount", src, mnt, "--guard", "normal", "--guard-action", mode)
            if clean is None:
                clean = fingerprint(mnt)
            if "attacks" not in a.skip:
                for name in attacks:
                    if name == "slow" and mode == "alert":
                        continue  # one file every slow_every s: under block it is paced anyway; alert adds nothing
                    for t in range(a.trials):
                        res = run_attack(src, mnt, clean, name, t, a.slow_every, mode)
                        log(f"{mode} {name} #{t}: lost {res['lost']}, before alert {res.get('before_alert')} "
                            f"(damaged {res.get('damaged_before_alert')}), "
                            f"in alert {res['alert_files']}, refused {res['refused']}, "
                            f"rollback {res.get('rollback_s')} s exact {res['rollback_ok']}")
                        trials.append(res)
                        if not res["rollback_ok"]:
                            raise RuntimeError(f"{name}: the corpus is not clean after the trial; stopping")
            if "benign" not in a.skip and k == len(run_modes) - 1:
                ben = benign(src, mnt, w)
            cli("umount", mnt)
        if "rollback" not in a.skip:  # a fresh copy of the clean corpus, the guard off: the whole tree encrypted
            shutil.rmtree(src)
            shutil.copytree(corpus_copy, src, symlinks=True)
            cli("mount", src, mnt, "--guard", "off")
            if clean is None:
                clean = fingerprint(mnt)
            rb = whole_rollback(src, mnt, clean)
            log(f"whole-corpus rollback: {rb}")
            cli("umount", mnt)
        if "cost" not in a.skip:
            cost_corpus = os.path.join(w, "cost-corpus")
            make_corpus(cost_corpus, a.cost_corpus, seed=3)
            c = cost(w, cost_corpus, a.cost_files, a.cost_rounds, a.cost_baseline)
            log(f"cost: {json.dumps(c)}")
    finally:
        force_unmount(mnt)
        shutil.rmtree(w, ignore_errors=True)
    a.load_after = os.getloadavg()[0]
    a.reused = None
    if a.reuse:
        with open(a.reuse) as f:
            old = json.load(f)
        got = []
        if "attacks" in a.skip and old.get("trials"):
            trials, n = old["trials"], old["files"]
            a.trials = (old.get("params") or {}).get("trials", a.trials)
            a.slow_every = (old.get("params") or {}).get("slow_every", a.slow_every)
            got.append("attacks")
        if "benign" in a.skip and old.get("benign"):
            ben = old["benign"]
            got.append("benign set")
        if "rollback" in a.skip and old.get("rollback"):
            rb = old["rollback"]
            got.append("whole-corpus rollback")
        if "cost" in a.skip and old.get("cost"):
            c = old["cost"]
            got.append("cost")
        if got:
            lb, la = old.get("load") or (0.0, 0.0)
            a.reused = (f"{', '.join(got)} from the run of {old.get('started', '?')} "
                        f"(`{' '.join(old.get('argv') or [])}`, {old.get('minutes', '?')} min, "
                        f"1-min load {lb:.1f} before, {la:.1f} after)")
    section = render(a, n, trials, ben, rb, c, time.monotonic() - t_start)
    print(section)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"files": n, "trials": trials, "benign": ben, "rollback": rb, "cost": c,
                       "load": [a.load_before, a.load_after], "argv": a.argv, "started": a.started,
                       "params": {"trials": a.trials, "slow_every": a.slow_every},
                       "minutes": round((time.monotonic() - t_start) / 60, 1)}, f, indent=1)
    if a.write_docs:
        write_docs(section, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
