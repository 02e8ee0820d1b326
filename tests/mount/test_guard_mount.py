"""The mass-damage guard through a real mount (docs/guard.md): each simulated
attack on a generated corpus is detected within 20 files and undone by one
``deltafs rollback --to guard-<time>``; benign heavy work raises nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corpus import differences, fingerprint, make_corpus
from fusetools import run_cli

from deltafs import control

pytestmark = pytest.mark.timeout(300)

CORPUS = int(os.environ.get("DELTAFS_GUARD_CORPUS", "300"))
MAX_DAMAGED = 20  # docs/guard.md: the target is median <= 5, max <= 20 files lost before the alert

try:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
except ImportError:  # pragma: no cover - cryptography is a test dependency
    Cipher = None


def aes(data: bytes, key: bytes = b"k" * 32) -> bytes:
    e = Cipher(algorithms.AES(key), modes.CTR(os.urandom(16))).encryptor()
    return e.update(data) + e.finalize()


def victims(root: Path) -> list[Path]:
    """Files in the order ransomware walks a tree (directory by directory)."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != ".deltafs")
        out += [Path(d) / f for f in sorted(files) if not (Path(d) / f).is_symlink()]
    return out


# ---- the attacks: each damages ONE file -----------------------------------------------------------

def in_place(p: Path) -> None:
    data = p.read_bytes()
    with open(p, "r+b") as f:
        f.write(aes(data))


def encrypt_rename(p: Path) -> None:
    in_place(p)
    p.rename(p.with_name(p.name + ".locked"))


def write_new_delete_old(p: Path) -> None:
    p.with_name(p.name + ".crypt").write_bytes(aes(p.read_bytes()))
    p.unlink()


def first_4k(p: Path) -> None:
    with open(p, "r+b") as f:
        head = f.read(4096)
        f.seek(0)
        f.write(aes(head))


def stripes(p: Path) -> None:
    """Intermittent encryption: 16 bytes of every 64 (enough to ruin every format here)."""
    d = bytearray(p.read_bytes())
    for o in range(0, len(d), 64):
        d[o:o + 16] = aes(bytes(d[o:o + 16]))
    with open(p, "r+b") as f:
        f.write(d)


def slow(p: Path) -> None:
    time.sleep(0.3)  # the attack's own pace (a real one waits 30 s: tests/unit/test_guard.py)
    in_place(p)


ATTACKS = {"in-place": in_place, "encrypt-rename": encrypt_rename, "write-new-delete-old": write_new_delete_old,
           "first-4k": first_4k, "stripes": stripes, "slow": slow}


def guard_state(m) -> dict:
    control.request(str(m.journal), "flush")
    return control.request(str(m.journal), "guard")["guard"]


@pytest.fixture
def corpus_mount(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, CORPUS)
    m = mount_factory(src)
    return m


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_detected_and_rolled_back(corpus_mount, attack):
    m = corpus_mount
    clean = fingerprint(m.mnt)
    hit = ATTACKS[attack]
    damaged = 0
    for p in victims(m.mnt):
        hit(p)
        damaged += 1
        g = guard_state(m)
        if g["alert"] or damaged >= 60:
            break
    alert = g["alert"]
    assert alert, f"{attack}: no alert after {damaged} files (score {g['score']})"
    print(f"GUARD {attack}: alert after {damaged} damaged files; {alert['examples']}", file=sys.stderr)
    assert damaged <= MAX_DAMAGED, f"{attack}: {damaged} files damaged before the alert"
    snap = alert["snapshot"]
    assert snap and snap.startswith("guard-")

    # the alert shows everywhere: status text, --json, --check (exit 1), Prometheus
    st = run_cli("status", m.mnt, "--check")
    assert st.returncode == 1 and b"GUARD ALERT" in st.stdout
    gj = json.loads(run_cli("status", m.mnt, "--json", check=True).stdout)["guard"]
    assert gj["alert"] and gj["alerts"] == 1
    assert 0 < gj["scoring_cpu_s"] < 5, gj  # the signals' own CPU is counted (and is small)
    assert b"deltafs_guard_alert{" in run_cli("status", m.mnt, "--prometheus", check=True).stdout
    assert run_cli("guard", "status", m.mnt).returncode == 1
    assert " ERROR deltafs.guard: GUARD ALERT" in m.log_text()

    for _ in range(100):  # the daemon writes the snapshot right after the alert
        if run_cli("rollback", m.mnt, "--to", snap, "--dry-run").returncode == 0:
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    run_cli("rollback", m.mnt, "--to", snap, check=True)
    took = time.monotonic() - t0
    print(f"GUARD {attack}: rollback of the corpus took {took:.1f}s", file=sys.stderr)
    assert differences(clean, fingerprint(m.mnt)) == []
    res = run_cli("guard", "resume", m.mnt, "--json", check=True)
    assert json.loads(res.stdout)["cleared"]
    assert run_cli("guard", "status", m.mnt).returncode == 0
    # guard test finds the same attack in the journal afterwards
    res = run_cli("guard", "test", m.mnt, "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["alerts"]


def _run(cmd, cwd=None, env=None, input=None):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=240, input=input)
    assert r.returncode == 0, f"{cmd}: {r.stderr.decode(errors='replace')[-500:]}"


def _have(tool: str) -> bool:
    if shutil.which(tool):
        return True
    if os.environ.get("CI") == "true":
        pytest.fail(f"{tool} is not installed (CI must have it)")
    return False


def test_benign_heavy_work_raises_nothing(corpus_mount, tmp_path):
    m = corpus_mount
    mnt = Path(m.mnt)
    outside = tmp_path / "outside"
    make_corpus(outside, 100, seed=2)
    done = []
    if _have("git"):  # a real repository: this one
        repo = Path(__file__).resolve().parents[2]
        _run(["git", "clone", "-q", "--no-hardlinks", str(repo), str(mnt / "clone")])
        _run(["git", "checkout", "-q", "HEAD~5"], cwd=mnt / "clone")
        _run(["git", "checkout", "-q", "-"], cwd=mnt / "clone")
        _run(["git", "gc", "-q"], cwd=mnt / "clone")
        done.append("git")
    if _have("tar"):
        _run(["tar", "cf", str(tmp_path / "c.tar"), "-C", str(outside), "."])
        (mnt / "untar").mkdir()
        _run(["tar", "xf", str(tmp_path / "c.tar"), "-C", str(mnt / "untar")])
        done.append("tar")
    if _have("zip"):
        _run(["zip", "-qr", str(mnt / "all.zip"), "dir0", "dir1"], cwd=mnt)
        done.append("zip")
    if _have("gzip"):
        _run(["gzip", "-r", str(mnt / "dir2")])
        done.append("gzip")
    if _have("rsync"):
        _run(["rsync", "-a", str(outside) + "/", str(mnt / "rsynced")])
        _run(["rsync", "-a", str(outside) + "/", str(mnt / "dir3")])
        done.append("rsync")
    if _have("sqlite3"):
        db = mnt / "app.db"
        sql = "create table t(id integer primary key, v text);" + "".join(
            f"insert into t(v) values('{'row %d ' % i * 20}');" for i in range(2000)) + \
            "update t set v = upper(v) where id % 3 = 0; delete from t where id % 7 = 0; vacuum;"
        _run(["sqlite3", str(db)], input=sql.encode())
        done.append("sqlite")
    if _have("gpg"):
        gh = tmp_path / "gnupg"
        gh.mkdir(mode=0o700)
        try:
            _run(["gpg", "--homedir", str(gh), "--batch", "--pinentry-mode", "loopback", "--passphrase", "x",
                  "-c", str(next((mnt / "dir4").glob("notes*.txt")))])
        finally:  # gpg starts an agent for this home directory: end it, or it outlives the test run
            subprocess.run(["gpgconf", "--homedir", str(gh), "--kill", "gpg-agent"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done.append("gpg")
    # a pip install into a venv in the mount (ensurepip installs pip from its bundled wheel: no network)
    _run([sys.executable, "-m", "venv", str(mnt / "venv")])
    done.append("pip")
    g = guard_state(m)
    assert g["alert"] is None, f"false alert after {done}: {g['alert']}"
    print(f"GUARD benign: {done}; score {g['score']}", file=sys.stderr)
    res = run_cli("guard", "test", m.mnt, "--json")
    assert res.stdout, res.stderr.decode(errors="replace")[-2000:]
    replay = json.loads(res.stdout)
    print(f"GUARD benign replay: {replay['hits']}", file=sys.stderr)
    assert res.returncode == 0 and not replay["alerts"]


def test_guard_off_and_bad_level(mount_factory, tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    m = mount_factory(src, "--guard", "off")
    res = run_cli("guard", "status", m.mnt)
    assert res.returncode == 2 and b"off" in res.stderr
    res = run_cli("mount", tmp_path / "s", tmp_path / "m2", "--guard", "loud")
    assert res.returncode == 2


# ---- --guard-action block, open-then-delete through opens, the alert across a remount ------------

def _attack_until_alert(m, hit, limit=60) -> int:
    damaged = 0
    for p in victims(m.mnt):
        hit(p)
        damaged += 1
        if guard_state(m)["alert"] or damaged >= limit:
            break
    return damaged


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
def test_block_stops_the_attack_and_resume_reallows(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, CORPUS)
    clean_src = fingerprint(src)
    m = mount_factory(src, "--guard-action", "block")
    clean = fingerprint(m.mnt)
    damaged, refused = [], 0
    for p in victims(m.mnt):  # the attacker goes on through the whole tree
        try:
            in_place(p)
            damaged.append(p)
        except PermissionError as e:
            assert e.errno == 1  # EPERM
            refused += 1
            for act in (lambda: p.unlink(), lambda: p.rename(p.with_name(p.name + ".locked")),
                        lambda: p.with_name(p.name + ".crypt").write_bytes(b"x"), lambda: os.truncate(p, 0),
                        lambda: p.chmod(0o000)):
                with pytest.raises(PermissionError):
                    act()
            assert p.read_bytes() == clean[os.path.relpath(p, m.mnt)][2]  # reads keep working
    g = guard_state(m)
    assert g["alert"] and g["alert"]["blocking"]["refused"] >= refused > 0
    print(f"GUARD block: {len(damaged)} files damaged, {refused} refused", file=sys.stderr)
    assert len(damaged) <= MAX_DAMAGED
    # every file after the block stood is untouched in SRC itself
    after = fingerprint(src)
    hurt = {os.path.relpath(p, m.mnt) for p in damaged}
    assert set(after) == set(clean_src)
    for k, v in clean_src.items():
        if k not in hurt:
            assert after[k] == v, k
    st = run_cli("guard", "status", m.mnt)
    assert st.returncode == 1 and b"refused" in st.stdout
    # the rollback that undoes it is let through; everyone else still is not
    snap = g["alert"]["snapshot"]
    for _ in range(100):
        if run_cli("rollback", m.mnt, "--to", snap, "--dry-run").returncode == 0:
            break
        time.sleep(0.05)
    run_cli("rollback", m.mnt, "--to", snap, check=True)
    assert differences(clean, fingerprint(m.mnt)) == []
    with pytest.raises(PermissionError):
        (Path(m.mnt) / "new.txt").write_text("no")
    run_cli("guard", "resume", m.mnt, check=True)
    (Path(m.mnt) / "new.txt").write_text("yes")
    (Path(m.mnt) / "new.txt").unlink()
    assert not g["alert"]["from_earlier_mount"]


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
def test_open_then_delete_with_random_names_is_caught_through_opens(corpus_mount):
    """No name links the new file to the old one: only the open of the
    original for reading (ops.open) does."""
    m = corpus_mount
    clean = fingerprint(m.mnt)
    n = [0]

    def attack(p: Path) -> None:
        n[0] += 1
        data = p.read_bytes()
        (Path(m.mnt) / f"{os.urandom(16).hex()}").write_bytes(aes(data))
        p.unlink()

    damaged = _attack_until_alert(m, attack)
    g = guard_state(m)
    assert g["alert"], f"no alert after {damaged} files (score {g['score']})"
    print(f"GUARD open-then-delete: alert after {damaged} files", file=sys.stderr)
    assert damaged <= MAX_DAMAGED
    assert any("read" in e["reasons"] for e in g["alert"]["examples"])
    snap = g["alert"]["snapshot"]
    for _ in range(100):
        if run_cli("rollback", m.mnt, "--to", snap, "--dry-run").returncode == 0:
            break
        time.sleep(0.05)
    run_cli("rollback", m.mnt, "--to", snap, check=True)
    assert differences(clean, fingerprint(m.mnt)) == []


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
def test_alert_survives_a_remount(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, 60)
    m = mount_factory(src)
    damaged = _attack_until_alert(m, in_place)
    g = guard_state(m)
    assert g["alert"], damaged
    snap = g["alert"]["snapshot"]
    state = m.journal / "guard-alert.json"
    for _ in range(200):  # saved right after the snapshot is pinned
        if state.exists():
            break
        time.sleep(0.05)
    assert state.stat().st_mode & 0o777 == 0o600
    m.umount(check=False)

    m.extra = ["--guard-action", "block", "--compact-every", "0.01"]
    m.start()
    g = guard_state(m)
    assert g["alert"] and g["alert"]["snapshot"] == snap and g["alert"]["from_earlier_mount"]
    assert g["alert"]["files"] >= 5
    st = run_cli("status", m.mnt, "--check")
    assert st.returncode == 1 and b"GUARD ALERT" in st.stdout
    assert run_cli("guard", "status", m.mnt).returncode == 1
    with pytest.raises(PermissionError):  # block holds after the remount too
        (Path(m.mnt) / "after-remount.txt").write_text("no")
    for _ in range(400):  # a compaction pass is due every 0.6 s: each is held
        if "compaction held: the guard's alert stands" in m.log_text():
            break
        time.sleep(0.05)
    assert "compaction held: the guard's alert stands" in m.log_text()
    held = run_cli("compact", m.mnt)  # asked for by hand, it is held too
    assert held.returncode == 2 and b"compaction is held" in held.stderr and b"Traceback" not in held.stderr
    assert run_cli("compact", m.mnt, "--dry-run").returncode == 0
    m.umount(check=False)
    held = run_cli("compact", m.src)  # and unmounted
    assert held.returncode == 2 and b"compaction is held" in held.stderr

    m.extra = ["--guard", "off"]  # the alert stands until resumed, whatever the level now
    m.start()
    assert guard_state(m)["alert"]["snapshot"] == snap
    run_cli("guard", "resume", m.mnt, check=True)
    assert not state.exists()
    (Path(m.mnt) / "after-resume.txt").write_text("yes")
    m.umount(check=False)
    m.extra = []
    m.start()
    assert guard_state(m)["alert"] is None


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
def test_block_refuses_the_first_change_after_the_crossing_file(mount_factory, tmp_path):
    """Deterministic count under --guard-action block: an attacker that fsyncs
    each file before the next (so capture is never behind it).  The guard
    scores in the committer under block, so when the fsync of the file that
    crosses the threshold returns, the alert stands: the very next open for
    writing is refused.  Damaged = exactly the files up to the crossing one."""
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, 80)
    m = mount_factory(src, "--guard-action", "block")
    damaged = []
    for p in victims(m.mnt):
        data = p.read_bytes()
        try:
            fd = os.open(p, os.O_RDWR)
        except PermissionError as e:
            assert e.errno == 1
            break
        try:
            os.write(fd, aes(data))
            os.fsync(fd)  # returns once the capture is committed (and, under block, scored)
        finally:
            os.close(fd)
        damaged.append(os.path.relpath(p, m.mnt))
    g = guard_state(m)
    a = g["alert"]
    assert a, f"no alert after {len(damaged)} files"
    print(f"GUARD block, fsync per file: {len(damaged)} damaged, {a['files']} in the alert", file=sys.stderr)
    assert a["changes_since"] == 0, "a file was damaged after the alert stood"
    assert a["blocking"]["refused"] == 1
    assert a["files"] <= 20 and a["examples"][-1]["path"] == damaged[-1], \
        f"the attack went on past the file that crossed the threshold: {damaged[-3:]} vs {a['examples'][-3:]}"
    assert set(e["path"] for e in a["examples"]) <= set(damaged)


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
def test_block_scores_a_file_at_close_before_the_next_change(mount_factory, tmp_path):
    """Encrypt, close, rename to .locked (no fsync), through a second descriptor
    (dup) that stays open: the close sends FLUSH but no RELEASE.  While the
    guard paces, the close itself queues the capture, so the rename of the
    file whose content crosses the threshold waits for its score and is
    refused; the damaged file keeps its name.  (Capturing only at RELEASE let
    that rename through: the block stood one change later.)"""
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, 80)
    m = mount_factory(src, "--guard-action", "block")
    files = victims(m.mnt)
    in_place(files[0])  # the first damaged file, made durable: from here on the guard paces
    fd = os.open(files[0], os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    assert guard_state(m)["pacing"], guard_state(m)
    refused_at = None
    for p in files[1:]:
        data = p.read_bytes()
        try:
            fd = os.open(p, os.O_RDWR)
        except PermissionError:
            refused_at = ("open", p)
            break
        keep = os.dup(fd)  # holds the FUSE handle open: no RELEASE until it closes
        try:
            os.write(fd, aes(data))
            os.close(fd)  # FLUSH
            try:
                os.rename(p, str(p) + ".locked")
            except PermissionError:
                refused_at = ("rename", p)
                break
        finally:
            os.close(keep)
    assert refused_at, "never refused"
    a = guard_state(m)["alert"]
    assert a and a["changes_since"] == 0, a
    what, p = refused_at
    assert what == "rename", f"the block stood only at the next file's open ({p.name})"
    assert p.exists() and not Path(str(p) + ".locked").exists()
    assert a["examples"][-1]["path"] == os.path.relpath(p, m.mnt)


def test_block_paces_from_the_first_new_opaque_file(mount_factory, tmp_path):
    """Under --guard-action block, a new file of random bytes (what encryption
    writes) starts pacing before any original is deleted: an attacker's first
    write-new-delete-old steps wait for their own scoring instead of running
    ahead of capture's first commits (13-23 files lost at 04:39 UTC, 5-6
    with this).  It scores nothing: a download alone raises no alert."""
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(src, "--guard-action", "block")
    (m.mnt / "notes.txt").write_bytes(b"the minutes of the meeting\n" * 200)
    g = guard_state(m)
    assert not g["pacing"], g
    (m.mnt / "notes.txt.crypt").write_bytes(os.urandom(20_000))
    g = guard_state(m)
    assert g["pacing"] and g["score"] == 0 and not g["alert"], g
    (m.mnt / "notes.txt").unlink()  # allowed: pacing only waits
    assert guard_state(m)["score"] >= 1


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
def test_resume_right_after_an_attack_does_not_re_alert(mount_factory, tmp_path):
    """`deltafs guard resume` while the attack's last changes are still being
    captured and scored: they count under the old alert (changes_since), and
    the new window starts empty (they used to fill it and raise the alert
    again at once)."""
    src = tmp_path / "src"
    src.mkdir()
    line = b"quarterly report, customer total, the budget of the meeting %d\n"
    for i in range(120):
        (src / f"doc{i:03d}.txt").write_bytes(b"".join(line % (i * 10_000 + k) for k in range(4000)))  # ~250 KB
    m = mount_factory(src)  # --guard-action alert: scoring deferred after each commit
    j = str(m.journal)
    files = victims(m.mnt)
    k = 0
    while not control.request(j, "guard")["guard"]["alert"]:  # no flush: what the guard has scored
        assert k < 60, "no alert"
        in_place(files[k])
        k += 1
    for p in files[k:k + 40]:  # the attack goes on at full speed: its captures queue up
        in_place(p)
    g = control.request(j, "guard", action="resume")["guard"]  # at once, while they are in flight
    assert g["cleared"]
    g = guard_state(m)  # flush: everything committed and scored
    assert g["alert"] is None, f"alert again after the resume: {g['alert']['files']} files"
    assert g["score"] == 0


@pytest.mark.skipif(Cipher is None, reason="needs cryptography")
@pytest.mark.parametrize("attack", ["in-place", "encrypt-rename", "write-new-delete-old"])
def test_alert_mode_paces_so_no_file_after_the_crossing_one_is_begun(mount_factory, tmp_path, attack):
    """--guard-action alert (the default) paces from the first damaged file
    on: a written file's close(2), a delete and a rename return once they
    are captured and scored.  So an attacker at full speed (no fsync)
    begins no file after the one whose damage crosses the threshold before
    the alert is raised (it began 4-6 more: capture's lag; one more when
    only the close waited and the crossing change was a delete or a
    rename), and nothing is refused.  (Pacing begins once the first damaged
    file is scored: here it is, before the rest of the attack; an attacker
    at full speed may get a few files done before that.)"""
    src = tmp_path / "src"
    src.mkdir()
    make_corpus(src, 80)
    m = mount_factory(src)
    files = victims(m.mnt)[:30]
    began, closed = {}, {}
    rel = os.path.relpath(files[0], m.mnt)
    began[rel] = time.time_ns()
    ATTACKS[attack](files[0])
    closed[rel] = time.time_ns()
    g = guard_state(m)
    assert g["pacing"] and not g["alert"], g
    for p in files[1:]:
        rel = os.path.relpath(p, m.mnt)
        began[rel] = time.time_ns()
        ATTACKS[attack](p)
        closed[rel] = time.time_ns()
    g = guard_state(m)
    a = g["alert"]
    assert a and a["blocking"] is None, g
    crossing = a["examples"][-1]["path"].removesuffix(".locked")
    early = [r for r, t in began.items() if t < a["time_ns"]]
    print(f"GUARD alert mode, full speed: {len(early)} files begun before the alert, {a['files']} in it",
          file=sys.stderr)
    assert a["time_ns"] <= closed[crossing], "the crossing file's close returned before its scoring"
    assert early[-1] == crossing and len(early) == a["files"], (early[-3:], crossing)
    assert not g["pacing"]  # the alert ends the pacing: alert only, the attack goes on
