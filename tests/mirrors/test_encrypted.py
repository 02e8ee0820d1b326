"""Encrypted mirrors: replication, clone and verify through the CLI; what the
storage holds (no plaintext); tampering of every object kind; key handling.

The Argon2id parameters are the cheap ones of $DELTAFS_KDF_PARAMS (set
below) so these stay fast; tests/unit/test_mirror_crypto.py checks that
the default calibrates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from deltafs import cli, snapshots
from deltafs.errors import EXIT_MIRROR, EXIT_USAGE
from deltafs.journal import Journal
from deltafs.mirrors import format as F
from deltafs.mirrors import keys, open_mirror
from deltafs.mirrors.crypto import KEY_BLOB, NAME_DIR, MirrorKey, MirrorKeyError
from deltafs.mirrors.encrypted import EncryptedMirror

sys.path.insert(0, str(Path(__file__).parent))
from test_replication import Builder, b, endpoint, log_of, mirror_url  # noqa: E402,F401 (fixtures)

pytestmark = pytest.mark.timeout(180)
PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def cheap_kdf(monkeypatch):
    monkeypatch.setenv("DELTAFS_KDF_PARAMS", "1,64,1")
    monkeypatch.setenv("DELTAFS_PASSPHRASE", PASS)
    for var in ("DELTAFS_NEW_PASSPHRASE", "DELTAFS_FROM_PASSPHRASE"):
        monkeypatch.delenv(var, raising=False)


def run(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def ep_args(url, request) -> list[str]:
    ep = endpoint(url, request)
    return ["--endpoint-url", ep] if ep else []


@contextlib.contextmanager
def released(b):
    """The Builder lets go of its journal while a command writes it."""
    path = b.j.path
    b.j.close()
    try:
        yield path
    finally:
        b.j = Journal.open(path, clock=b.clock)


def add(capsys, b, url, *extra) -> tuple[int, str, str]:
    with released(b) as path:
        return run(capsys, "mirror", "add", url, "--journal", path, *extra)


def sync(capsys, b, url, *extra) -> None:
    rc, _, err = run(capsys, "mirror", "sync", url, "--journal", b.j.path, *extra)
    assert rc == 0, err


def test_encrypted_replicate_verify_clone(b, mirror_url, request, tmp_path, capsys):
    ep = ep_args(mirror_url, request)
    b.history()
    rc, out, err = add(capsys, b, mirror_url, "--encrypt", *ep)
    assert rc == 0 and "encrypted mirror" in out, err
    sync(capsys, b, mirror_url, *ep)
    b.write(b"d/notes.txt", b"second segment\n")
    snapshots.make(b.j, "before-lunch")
    sync(capsys, b, mirror_url, *ep)
    rc, out, err = run(capsys, "verify", "--mirror", mirror_url, "--full", *ep)
    assert rc == 0 and "encrypted" in out, err
    rc, out, err = run(capsys, "clone", mirror_url, tmp_path / "dest", *ep)
    assert rc == 0, err
    with Journal.open(tmp_path / "dest" / ".deltafs", readonly=True) as c:
        assert log_of(c) == log_of(b.j)
        with c.reader() as r:
            assert r.kv_get("snapshots", "before-lunch") is not None
    for p, data in b.files.items():
        assert (tmp_path / "dest" / os.fsdecode(p)).read_bytes() == data
    # the journal keeps the key (0600 in a 0700 dir); the mirror lists as encrypted
    kdir = Path(b.j.path) / "keys"
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in kdir.iterdir())
    with open_mirror(mirror_url, endpoint_url=endpoint(mirror_url, request)) as m:
        names = [n for n, _ in m.list()]
        assert KEY_BLOB in names and all(n == KEY_BLOB or n.startswith(NAME_DIR) for n in names)
        assert PASS.encode() not in m.get(KEY_BLOB)


# --- what the storage sees ------------------------------------------------------------

def corpus(b: Builder) -> tuple[list[bytes], list[bytes]]:
    """Known files and text, including what compresses to nothing and what repeats."""
    text = b"".join(b"The quick brown fox %d jumps over the lazy dog; secret plan line %d\n" % (i, i)
                    for i in range(3000))
    files = {
        b"docs/plan.txt": text,
        b"docs/letter to the bank.txt": b"Dear Sir, my account number is 1234-5678-9012. " * 40,
        b"zeros.bin": b"\0" * 200_000,
        b"random.bin": os.urandom(300_000),
        b"tiny.txt": b"a password: hunter2 hunter2 hunter2 hunter2\n",
    }
    from deltafs.journal import Change

    b.commit(Change(op="mkdir", file_id=1, path=b"docs", mode=0o40755))
    for path, data in files.items():
        b.write(path, data)
    b.write(b"docs/plan.txt", text.replace(b"lazy", b"sleepy"))
    return [text, text.replace(b"lazy", b"sleepy"), *files.values()], list(files) + [b"docs"]


def windows(data: bytes, n: int = 32) -> set[bytes]:
    return {data[i:i + n] for i in range(0, max(1, len(data) - n + 1))}


def test_no_plaintext_leaks(b, tmp_path, capsys):
    contents, paths = corpus(b)
    url = f"file://{tmp_path}/mirror"
    assert add(capsys, b, url, "--encrypt")[0] == 0
    sync(capsys, b, url)
    stored = {}
    for root, _, files in os.walk(tmp_path / "mirror"):
        for f in files:
            p = Path(root) / f
            stored[str(p.relative_to(tmp_path / "mirror"))] = p.read_bytes()
    assert len(stored) >= 4
    every = set()
    for data in stored.values():
        every |= windows(data)
    everything = b"\n".join(stored.values()) + "\n".join(stored).encode()
    for data in contents:  # no 32-byte window of any plaintext file
        leaked = [w for w in windows(data) if w in every]
        assert not leaked, f"{len(leaked)} windows of a plaintext file are in the mirror"
    for p in paths:  # no path name
        assert p not in everything and os.path.basename(p) not in everything
    with b.j.reader() as r:  # no unkeyed chunk id (raw or hex), no plaintext object name
        cids = [cid for seq, _ in r.raw_records() for _, _, refs in (r.record(seq).edit or []) for cid, _ in refs]
    assert len(cids) > 10
    for cid in cids:
        assert cid not in everything and cid.hex().encode() not in everything
    plain = EncryptedMirror(open_mirror(url), keys.KeyStore(b.j.path).load(url))
    man = F.Manifest.decode(plain.get(F.MANIFEST), url)
    for name in [F.MANIFEST] + [s["name"] for s in man.segments] + [p["name"] for p in man.packs]:
        assert name.encode() not in everything and name.split("/")[-1].split(".")[0].encode() not in everything


# --- tampering -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A journal and its encrypted file:// mirror after three passes: two
    segments with packs of their own, two snapshots objects, and the
    manifest bytes of the first pass (for a replay)."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("enc-template")
    mp.setenv("DELTAFS_KDF_PARAMS", "1,64,1")
    mp.setenv("DELTAFS_PASSPHRASE", PASS)
    mp.setenv("XDG_STATE_HOME", str(base / "state"))
    url = f"file://{base}/mirror"
    bl = Builder(base / "j")
    try:
        bl.history(rounds=2)
        snapshots.make(bl.j, "one")
        with released(bl) as path:
            assert cli.main(["mirror", "add", url, "--encrypt", "--journal", str(path)]) == 0
        assert cli.main(["mirror", "sync", url, "--journal", str(bl.j.path)]) == 0
        key = keys.KeyStore(bl.j.path).load(url)
        old_manifest = (base / "mirror" / key.encode_name(F.MANIFEST)).read_bytes()
        bl.write(b"blob2.bin", os.urandom(80_000))
        snapshots.make(bl.j, "two")
        assert cli.main(["mirror", "sync", url, "--journal", str(bl.j.path)]) == 0
        bl.write(b"d/notes.txt", b"third\n")
        assert cli.main(["mirror", "sync", url, "--journal", str(bl.j.path)]) == 0
    finally:
        bl.j.close()
        mp.undo()
    plain = EncryptedMirror(open_mirror(url), key)
    man = F.Manifest.decode(plain.get(F.MANIFEST), url)
    snaps = sorted(n for n, _ in plain.list("snapshots/"))
    assert len(man.segments) == 3 and len(man.packs) >= 2 and len(snaps) == 2
    return {"base": base, "key": key, "manifest": man, "old_manifest": old_manifest, "snapshots": snaps,
            "files": dict(bl.files)}


def _setup(template, tmp_path, monkeypatch):
    mdir = tmp_path / "mirror"
    shutil.copytree(template["base"] / "mirror", mdir)
    shutil.copytree(template["base"] / "state", tmp_path / "state")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # this machine saw the newest manifest
    return mdir, f"file://{mdir}"


def _objects(template, kind: str) -> list[str]:
    man = template["manifest"]
    return {"manifest": [F.MANIFEST], "segment": [s["name"] for s in man.segments],
            "pack": [p["name"] for p in man.packs],
            "snapshots": [man.snapshots] + [n for n in template["snapshots"] if n != man.snapshots]}[kind]


ATTACKS = [(kind, attack) for kind in ("manifest", "segment", "pack", "snapshots")
           for attack in ("flip", "truncate", "swap")] + [("manifest", "replay"), ("key", "flip"),
                                                           ("key", "truncate"), ("key", "swap")]


@pytest.mark.parametrize("kind,attack", ATTACKS, ids=[f"{k}-{a}" for k, a in ATTACKS])
def test_tampering_is_detected(template, tmp_path, monkeypatch, capsys, kind, attack):
    mdir, url = _setup(template, tmp_path, monkeypatch)
    key = template["key"]
    if kind == "key":
        path = mdir / KEY_BLOB
    else:
        names = _objects(template, kind)
        path = mdir / key.encode_name(names[0])
    data = bytearray(path.read_bytes())
    if attack == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif attack == "truncate":
        path.write_bytes(bytes(data[: len(data) - 100]))
    elif attack == "replay":
        path.write_bytes(template["old_manifest"])
    elif kind == "key":  # the blob of another mirror, same passphrase
        other = open_mirror(f"file://{tmp_path}/other")
        keys.create(other, keys.Secrets())
        shutil.copy(tmp_path / "other" / KEY_BLOB, path)
    else:  # swap with another object: the manifest with a segment, the others among their kind
        other_name = (names[1] if len(names) > 1 else _objects(template, "segment")[0])
        other = mdir / key.encode_name(other_name)
        a, b_ = path.read_bytes(), other.read_bytes()
        path.write_bytes(b_)
        other.write_bytes(a)
    rc, out, err = run(capsys, "verify", "--mirror", url, "--full")
    assert rc in (EXIT_MIRROR, EXIT_USAGE) and "ok" not in out, (rc, out, err)
    assert err.strip() and "Traceback" not in err
    expect = {"flip": ("authentication", "corrupted", "truncated"), "truncate": ("truncated", "corrupted"),
              "swap": ("authentication", "does not open", "another key"), "replay": ("rolled back",)}[attack]
    assert any(e in err for e in expect), err
    dest = tmp_path / "dest"
    rc, out, err = run(capsys, "clone", url, dest)
    assert rc in (EXIT_MIRROR, EXIT_USAGE), (rc, out, err)
    assert any(e in one_line(err) for e in expect), err
    assert not dest.exists()  # nothing written to DEST


def test_first_reader_sees_only_internal_consistency(template, tmp_path, monkeypatch, capsys):
    """A machine that never saw the newer manifest cannot tell a consistent
    replay from the truth (docs/mirrors.md says so); the one that did can."""
    mdir, url = _setup(template, tmp_path, monkeypatch)
    (mdir / template["key"].encode_name(F.MANIFEST)).write_bytes(template["old_manifest"])
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "fresh-state"))
    rc, out, err = run(capsys, "clone", url, tmp_path / "dest")
    assert rc == 0, err
    assert not (tmp_path / "dest" / "blob2.bin").exists()  # the older state
    # the clone's journal now remembers what it saw: a later rollback below it is caught
    assert list((tmp_path / "dest" / ".deltafs" / "keys").glob("*.seen"))


# --- keys ------------------------------------------------------------------------------------

class CountingMirror:
    """Records which objects a reader fetched (to show a wrong key is found
    before anything but the key blob is downloaded)."""

    def __init__(self, inner) -> None:
        self.inner, self.fetched = inner, []

    def get(self, name):
        self.fetched.append(("get", name))
        return self.inner.get(name)

    def get_range(self, name, off, n):
        self.fetched.append(("get_range", name))
        return self.inner.get_range(name, off, n)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def enc(b, tmp_path, capsys):
    b.history()
    url = f"file://{tmp_path}/mirror"
    assert add(capsys, b, url, "--encrypt")[0] == 0
    sync(capsys, b, url)
    return url


def test_wrong_passphrase_is_one_line_and_reads_only_the_key_blob(enc, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DELTAFS_PASSPHRASE", "not it")
    for args in (["verify", "--mirror", enc], ["clone", enc, tmp_path / "dest"]):
        rc, _, err = run(capsys, *args)
        assert rc == EXIT_USAGE and "wrong passphrase" in one_line(err)
    assert not (tmp_path / "dest").exists()
    counting = CountingMirror(open_mirror(enc))
    with pytest.raises(MirrorKeyError):
        keys.open_reader(counting, keys.Secrets())
    assert counting.fetched == [("get", KEY_BLOB)]
    monkeypatch.delenv("DELTAFS_PASSPHRASE")
    rc, _, err = run(capsys, "verify", "--mirror", enc)  # no passphrase at all, not on a terminal
    assert rc == EXIT_USAGE and "no passphrase was given" in one_line(err)


def test_passwd_then_clone_with_the_new_passphrase(enc, b, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DELTAFS_NEW_PASSPHRASE", "a new one")
    rc, out, err = run(capsys, "mirror", "passwd", enc)
    assert rc == 0 and "changed the passphrase" in out, err
    rc, _, err = run(capsys, "clone", enc, tmp_path / "old")  # the old passphrase is refused
    assert rc == EXIT_USAGE and "wrong passphrase" in one_line(err)
    newfile = tmp_path / "pw"
    newfile.write_text("a new one\n")
    monkeypatch.delenv("DELTAFS_PASSPHRASE")
    rc, _, err = run(capsys, "clone", enc, tmp_path / "new", "--passphrase-file", newfile)
    assert rc == 0, err
    assert (tmp_path / "new" / "d" / "notes.txt").read_bytes() == b.files[b"d/notes.txt"]
    sync(capsys, b, enc)  # the journal's stored key still works: only the wrapping changed
    rc, _, err = run(capsys, "mirror", "passwd", enc, "--passphrase-file", tmp_path / "nope")
    assert rc == EXIT_USAGE and "cannot read passphrase file" in one_line(err)


def test_key_export_import_and_key_files(enc, b, tmp_path, monkeypatch, capsys):
    kf = tmp_path / "mirror.key"
    rc, _, err = run(capsys, "mirror", "key", "export", enc, "-o", kf, "--journal", b.j.path)
    assert rc == 0, err
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600 and kf.read_text().startswith("deltafs mirror key v1")
    assert run(capsys, "mirror", "key", "export", enc, "-o", kf, "--journal", b.j.path)[0] == EXIT_USAGE  # kept
    monkeypatch.delenv("DELTAFS_PASSPHRASE")
    rc, _, err = run(capsys, "clone", enc, tmp_path / "c1", "--key-file", kf)
    assert rc == 0, err
    # a lost key blob: readers say so; import writes a new one under a new passphrase
    (tmp_path / "mirror" / KEY_BLOB).unlink()
    rc, _, err = run(capsys, "clone", enc, tmp_path / "c2")
    assert rc == EXIT_MIRROR and "no key blob" in one_line(err)
    monkeypatch.setenv("DELTAFS_PASSPHRASE", "after the loss")
    rc, out, err = run(capsys, "mirror", "key", "import", enc, kf)
    assert rc == 0 and "wrote the key blob" in out, err
    assert run(capsys, "clone", enc, tmp_path / "c3")[0] == 0
    # a corrupted blob, a key file of another mirror, a damaged key file: one line each
    other = tmp_path / "other.key"
    keys.write_key_file(str(other), MirrorKey.generate(), "file:///elsewhere")
    rc, _, err = run(capsys, "clone", enc, tmp_path / "c4", "--key-file", other)
    assert rc == EXIT_USAGE and "encrypted with another key" in one_line(err)
    rc, _, err = run(capsys, "mirror", "key", "import", enc, other)
    assert rc == EXIT_USAGE and "another key" in one_line(err)
    damaged = tmp_path / "damaged.key"
    text = kf.read_text()
    damaged.write_text(text.replace("key: ", "key: b" if "key: a" in text else "key: a"))
    rc, _, err = run(capsys, "clone", enc, tmp_path / "c5", "--key-file", damaged)
    assert rc == EXIT_USAGE and "damaged" in one_line(err)
    blob = tmp_path / "mirror" / KEY_BLOB
    blob.write_bytes(blob.read_bytes().replace(b'"argon2id"', b'"argon2xx"'))
    rc, _, err = run(capsys, "verify", "--mirror", enc)
    assert rc == EXIT_MIRROR and "corrupted" in one_line(err)
    assert not any((tmp_path / d).exists() for d in ("c2", "c4", "c5"))


def test_plain_and_encrypted_do_not_mix(b, tmp_path, capsys):
    b.history()
    plain, enc = f"file://{tmp_path}/plain", f"file://{tmp_path}/enc"
    sync(capsys, b, plain)
    rc, _, err = add(capsys, b, plain, "--encrypt")
    assert rc == EXIT_MIRROR and "--to-encrypted" in one_line(err)
    other = Builder(tmp_path / "j2")
    try:
        other.history()
        assert add(capsys, other, enc, "--encrypt")[0] == 0
        # a journal without the key never writes a plain manifest into an encrypted mirror
        with open_mirror(enc) as m:
            from deltafs.mirrors.replicate import replicate_once
            with pytest.raises(Exception) as info:
                replicate_once(b.j, m)
            assert "encrypted" in str(info.value)
            assert not m.exists(F.MANIFEST)
        # detected from the key blob: `mirror add` without --encrypt unlocks it
        rc, out, err = add(capsys, b, enc)
        assert rc == 0 and "encrypted mirror" in out, err
    finally:
        other.j.close()


def test_sync_to_encrypted_converts_and_resumes(b, tmp_path, capsys):
    b.history()
    plain, enc = f"file://{tmp_path}/plain", f"file://{tmp_path}/enc"
    assert add(capsys, b, plain)[0] == 0
    sync(capsys, b, plain)
    with released(b) as path:
        rc, out, err = run(capsys, "mirror", "sync", plain, "--to-encrypted", enc, "--journal", path)
    assert rc == 0 and "replicates to" in out, err
    key = keys.KeyStore(b.j.path).load(enc)
    assert key is not None
    man = F.Manifest.decode(EncryptedMirror(open_mirror(enc), key).get(F.MANIFEST), enc)
    victim = tmp_path / "enc" / key.encode_name(man.packs[0]["name"])
    victim.unlink()  # as if interrupted: run again, only that one is copied
    rc, out, err = run(capsys, "mirror", "sync", plain, "--to-encrypted", enc, "--journal", b.j.path, "--json")
    assert rc == 0 and '"objects": 1' in out, err
    b.write(b"after.txt", b"shipped to the new mirror by the journal\n")
    sync(capsys, b, enc)
    assert run(capsys, "clone", enc, tmp_path / "dest")[0] == 0
    assert (tmp_path / "dest" / "after.txt").exists()
    with Journal.open(tmp_path / "dest" / ".deltafs", readonly=True) as c:
        assert log_of(c) == log_of(b.j)
    # and from encrypted to a new key: the old key does not open the copy
    with released(b) as path:
        rc, out, err = run(capsys, "mirror", "sync", enc, "--to-encrypted", f"file://{tmp_path}/enc2",
                           "--journal", path)
    assert rc == 0, err
    key2 = keys.KeyStore(b.j.path).load(f"file://{tmp_path}/enc2")
    assert key2.key_id != key.key_id


async def test_service_backs_off_then_catches_up_and_reports_lag(b, tmp_path, monkeypatch, caplog):
    """The mount's mirror service on an encrypted mirror whose drive is gone for
    a while: it backs off, says why in its status, and catches up when it is
    back, with the key the journal keeps (no passphrase)."""
    import trio

    from deltafs.mirrors import replicate as R

    monkeypatch.setattr(R, "POLL_INTERVAL", 0.05)
    monkeypatch.setattr(R, "BACKOFF_BASE", 0.05)
    monkeypatch.delenv("DELTAFS_PASSPHRASE")
    (tmp_path / "usb").mkdir()
    url = f"file://{tmp_path}/usb/m"
    _, key = keys.create(open_mirror(url), keys.Secrets(key_file=str(tmp_path / "k")))
    keys.KeyStore(b.j.path).save(url, key)

    class D:
        pass

    d = D()
    d.journal, d.rec = b.j, None
    d.cfg = type("C", (), {"mirrors": (url,), "endpoint_url": None})()
    async with trio.open_nursery() as n:
        mirrors = await n.start(R.mirror_service, d)
        w = mirrors.find(url)
        os.rename(tmp_path / "usb", tmp_path / "usb-away")  # unplugged
        await trio.to_thread.run_sync(b.history)
        with trio.fail_after(30):
            while w.failures < 2:
                await trio.sleep(0.02)
        st = await w.status()
        with b.j.reader() as r:
            assert st["encrypted"] and st["state"] == "retrying" and st["lag_records"] == r.head_seq()
        assert "does not exist" in st["last_error"], st["last_error"]
        os.rename(tmp_path / "usb-away", tmp_path / "usb")
        with trio.fail_after(30):
            await w.flush()
        assert (await w.status())["lag_records"] == 0
        n.cancel_scope.cancel()
    assert any("replication failed, will retry" in r.getMessage() for r in caplog.records)
    mirror = keys.open_reader(open_mirror(url), keys.Secrets(key_file=str(tmp_path / "k")))
    with b.j.reader() as r:
        assert F.Manifest.decode(mirror.get(F.MANIFEST), url).last_seq == r.head_seq()


def test_passphrase_prompt_on_a_terminal(b, tmp_path):
    """On a terminal the passphrase is asked (twice for a new one), never echoed or taken from argv."""
    import pty
    import select
    import subprocess

    def converse(args, answers) -> tuple[int, bytes]:
        master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k != "DELTAFS_PASSPHRASE"}
        p = subprocess.Popen([sys.executable, "-m", "deltafs", *map(str, args)], stdin=slave, stdout=slave,
                             stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        seen = b""
        try:
            for want, answer in answers:
                while want not in seen:
                    r, _, _ = select.select([master], [], [], 60)
                    assert r, f"no {want!r} prompt; got {seen!r}"
                    seen += os.read(master, 4096)
                seen = seen.split(want, 1)[1]
                os.write(master, answer + b"\n")
            rc = p.wait(timeout=120)
            with contextlib.suppress(OSError):
                while select.select([master], [], [], 0.5)[0]:
                    chunk = os.read(master, 4096)
                    if not chunk:
                        break
                    seen += chunk
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            os.close(master)
        return rc, seen

    url = f"file://{tmp_path}/m"
    path = b.j.path
    b.j.close()
    try:
        rc, out = converse(["mirror", "add", url, "--encrypt", "--journal", path],
                           [(b"new passphrase for", b"typed secret"), (b"again", b"typed secret")])
        assert rc == 0 and b"typed secret" not in out, out
        assert cli.main(["mirror", "sync", url, "--journal", str(path)]) == 0  # the journal's key: no prompt
        rc, out = converse(["verify", "--mirror", url], [(b"passphrase for", b"typed wrong")])
        assert rc == EXIT_USAGE and b"wrong passphrase" in out
        rc, out = converse(["verify", "--mirror", url], [(b"passphrase for", b"typed secret")])
        assert rc == 0 and b"typed secret" not in out, out
    finally:
        b.j = Journal.open(path, clock=b.clock)
