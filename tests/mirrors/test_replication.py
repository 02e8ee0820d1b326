"""Replication, clone and verify against file:// and a real S3 server."""

from __future__ import annotations

import os
import random
import sys
import uuid
from pathlib import Path

import pytest

from deltafs import cli
from deltafs.errors import EXIT_MIRROR, MirrorError
from deltafs.journal import Change, Journal
from deltafs.mirrors import open_mirror
from deltafs.mirrors import format as F
from deltafs.mirrors.clone import clone_journal, verify_mirror
from deltafs.mirrors.replicate import mirror_service, replicate_once

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_journal import FakeClock, version  # noqa: E402

pytestmark = pytest.mark.timeout(120)
SEC = 10**9


class Builder:
    def __init__(self, path) -> None:
        self.clock = FakeClock(1_700_000_000 * SEC)
        self.j = Journal.open(path, create=True, clock=self.clock)
        self.fids: dict[bytes, int] = {}
        self.files: dict[bytes, bytes] = {}

    def commit(self, *changes: Change) -> list[int]:
        self.clock.ns += SEC
        return self.j.commit(list(changes))

    def write(self, path: bytes, data: bytes) -> int:
        fid = self.fids.get(path)
        base = 0
        if fid is None:
            fid = self.fids[path] = 1000 + len(self.fids)
            self.commit(Change(op="create", file_id=fid, path=path, mode=0o100644))
        else:
            with self.j.reader() as r:
                base = r.file_state(fid).content_seq
        self.files[path] = data
        return self.commit(version(self.j, fid, path, data, base_seq=base))[0]

    def history(self, rounds: int = 3, seed: int = 1) -> None:
        rnd = random.Random(seed)
        self.commit(Change(op="mkdir", file_id=1, path=b"d", mode=0o40755))
        text = b"".join(b"line %d\n" % i for i in range(4000))
        for i in range(rounds):
            pos = rnd.randrange(len(text))
            text = text[:pos] + b"edit %d\n" % i + text[pos:]
            self.write(b"d/notes.txt", text)
            self.write(b"blob.bin", rnd.randbytes(50_000 + i))
        self.write(b"empty", b"")


@pytest.fixture
def b(tmp_path):
    bl = Builder(tmp_path / "j")
    yield bl
    bl.j.close()


@pytest.fixture(params=["file", "s3"])
def mirror_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/mirror"
    request.getfixturevalue("s3_env")
    return f"s3://deltafs-test/{uuid.uuid4().hex}"  # a fresh prefix per test


def endpoint(url: str, request) -> str | None:
    return request.getfixturevalue("s3_env").endpoint_url if url.startswith("s3://") else None


@pytest.fixture
def ep(mirror_url, request):
    return endpoint(mirror_url, request)


def objects(m) -> dict[str, int]:
    return dict(m.list(""))


def log_of(j: Journal) -> list[tuple[int, bytes]]:
    with j.reader() as r:
        return [(s, v) for s, v in r.raw_records()]


def test_replicate_clone_roundtrip(b, mirror_url, ep, tmp_path):
    b.history()
    with open_mirror(mirror_url, endpoint_url=ep) as m:
        st = replicate_once(b.j, m)
        assert st.records == st.head_seq == st.last_seq > 0 and st.packs >= 1
        before = objects(m)
        again = replicate_once(b.j, m)
        assert again.records == 0 and again.bytes == 0
        assert objects(m) == before  # idempotent: no new objects
        # more history, second segment
        b.write(b"d/notes.txt", b"new content\n")
        st2 = replicate_once(b.j, m)
        assert st2.records == 1 and st2.segments == 1
        rep = verify_mirror(m, full=True)
        assert rep.errors == [] and rep.records == st2.last_seq
    args = ["clone", mirror_url, str(tmp_path / "dest")] + (["--endpoint-url", ep] if ep else [])
    assert cli.main(args) == 0
    with Journal.open(tmp_path / "dest" / ".deltafs", readonly=True) as c:
        assert log_of(c) == log_of(b.j)  # same records, seqs and hashes
        assert (v := c.verify(full=True)).ok, v.problem
    for p, data in b.files.items():
        assert (tmp_path / "dest" / os.fsdecode(p)).read_bytes() == data
    assert sorted(os.listdir(tmp_path / "dest")) == [".deltafs", "blob.bin", "d", "empty"]


def test_clone_at_earlier_time(b, tmp_path):
    url = f"file://{tmp_path}/m"
    b.write(b"a.txt", b"one\n")
    b.write(b"a.txt", b"two\n")
    with open_mirror(url) as m:
        replicate_once(b.j, m)
    assert cli.main(["clone", url, str(tmp_path / "dest"), "--at", "2"]) == 0
    assert (tmp_path / "dest" / "a.txt").read_bytes() == b"one\n"


class CrashAfter(Exception):
    pass


class FaultyMirror:
    """Wraps a mirror and raises after the Nth upload of a kind of object.

    Simulates the process dying between uploads (a crash we cannot cause
    for real inside one test process at an exact point)."""

    def __init__(self, inner, fail_after_prefix: str, count: int = 1) -> None:
        self.inner = inner
        self.prefix = fail_after_prefix
        self.left = count
        self.url = inner.url

    def _maybe_fail(self, name: str) -> None:
        if name.startswith(self.prefix):
            self.left -= 1
            if self.left == 0:
                raise CrashAfter(name)

    def put(self, name, data):
        self.inner.put(name, data)
        self._maybe_fail(name)

    def put_if_absent(self, name, data):
        r = self.inner.put_if_absent(name, data)
        self._maybe_fail(name)
        return r

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("crash_after", ["packs/", "segments/"])
def test_resume_after_crash_between_uploads(b, mirror_url, ep, crash_after):
    b.history(rounds=4)
    with open_mirror(mirror_url, endpoint_url=ep) as m:
        with pytest.raises(CrashAfter):
            replicate_once(b.j, FaultyMirror(m, crash_after))
        man = F.Manifest.decode(m.get(F.MANIFEST), m.url)
        assert man.last_seq == 0 and man.segments == []  # nothing named yet
        st = replicate_once(b.j, m)
        assert st.last_seq == st.head_seq
        man = F.Manifest.decode(m.get(F.MANIFEST), m.url)
        assert [(s["first"], s["last"]) for s in man.segments] == [(1, st.head_seq)]  # no duplicates
        assert verify_mirror(m, full=True).errors == []
        assert len(list(m.list("segments/"))) == 1


def test_corrupt_pack_is_named(b, tmp_path, capsys):
    url = f"file://{tmp_path}/m"
    b.history()
    with open_mirror(url) as m:
        replicate_once(b.j, m)
        pack = next(n for n, _ in m.list("packs/"))
    path = tmp_path / "m" / pack
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main(["verify", "--mirror", url]) == EXIT_MIRROR
    err = capsys.readouterr().err
    assert pack in err and "corrupt" in err
    rc = cli.main(["clone", url, str(tmp_path / "dest")])
    err = capsys.readouterr().err
    assert rc == EXIT_MIRROR
    assert len(err.strip().splitlines()) == 1 and pack in err and "Traceback" not in err
    assert not (tmp_path / "dest").exists()  # nothing half-made left behind


def test_second_journal_is_refused(b, mirror_url, ep, tmp_path):
    b.history(rounds=1)
    with open_mirror(mirror_url, endpoint_url=ep) as m:
        replicate_once(b.j, m)
        with Journal.open(tmp_path / "other", create=True) as other:
            other.commit([Change(op="mkdir", file_id=5, path=b"x", mode=0o40755)])
            with pytest.raises(MirrorError, match="belongs to journal"):
                replicate_once(other, m)


def test_sync_and_list_cli(b, tmp_path, capsys):
    import json

    url = f"file://{tmp_path}/m"
    b.history(rounds=1)
    jdir = b.j.path
    b.j.close()
    assert cli.main(["mirror", "sync", url, "--journal", jdir, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lag_records"] == 0 and out["records"] == out["head_seq"]
    assert cli.main(["mirror", "list", "--journal", jdir, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["url"] == url and row["seq"] == out["head_seq"] and row["lag_records"] == 0
    b.j = Journal.open(jdir)


def test_snapshots_are_mirrored(b, tmp_path):
    url = f"file://{tmp_path}/m"
    b.write(b"a", b"x")
    b.j.kv_put("snapshots", "release", {"seq": 2, "time_ns": 1})
    with open_mirror(url) as m:
        replicate_once(b.j, m)
        clone_journal(m, str(tmp_path / "c"))
    with Journal.open(tmp_path / "c", readonly=True) as c, c.reader() as r:
        assert r.kv_get("snapshots", "release") == {"seq": 2, "time_ns": 1}


def test_unreachable_s3_is_a_mirror_error(b):
    from s3server import closed_port

    b.write(b"a", b"x")
    with open_mirror("s3://deltafs-test/x", endpoint_url=f"http://127.0.0.1:{closed_port()}") as m:
        with pytest.raises(MirrorError):
            replicate_once(b.j, m)


async def test_service_replicates_new_commits(b, tmp_path, monkeypatch):
    """The mount's service, driven directly: replicates, then follows new commits."""
    import trio

    from deltafs.mirrors import replicate as R

    monkeypatch.setattr(R, "POLL_INTERVAL", 0.05)
    monkeypatch.setattr(R, "BACKOFF_BASE", 0.05)

    class D:
        pass

    d = D()
    d.journal = b.j
    d.rec = None
    d.cfg = type("C", (), {"mirrors": (f"file://{tmp_path}/m",), "endpoint_url": None})()
    b.write(b"a", b"x")
    async with trio.open_nursery() as n:
        await n.start(mirror_service, d)
        with trio.fail_after(10):
            while True:
                with b.j.reader() as r:
                    st = r.kv_get("mirrors", f"file://{tmp_path}/m")
                    if st and st["seq"] == r.head_seq():
                        break
                await trio.sleep(0.05)
        await trio.to_thread.run_sync(b.write, b"a", b"y")
        with b.j.reader() as r:
            head = r.head_seq()
        with trio.fail_after(10):
            while True:
                with open_mirror(f"file://{tmp_path}/m") as m:
                    if F.Manifest.decode(m.get(F.MANIFEST), m.url).last_seq == head:
                        break
                await trio.sleep(0.05)
        n.cancel_scope.cancel()


# --- compaction: pruned versions --------------------------------------------------
def _content(j: Journal, seq: int) -> bytes:
    with j.reader() as r:
        return b"".join(r.read_chunk(cid) for cid, _ in r.chunk_list(seq))


def _versions(b: Builder, rounds: int = 4) -> dict[int, tuple[bytes, bytes]]:
    """Content versions: seq -> (path, data); a random blob (its chunks die with
    its version) and a text file edited in place (its chunks are shared)."""
    rnd = random.Random(7)
    out = {}
    text = b"".join(b"line %d\n" % i for i in range(3000))
    for i in range(rounds):
        data = rnd.randbytes(40_000 + i)
        out[b.write(b"blob.bin", data)] = (b"blob.bin", data)
        pos = rnd.randrange(len(text))
        text = text[:pos] + b"edit %d\n" % i + text[pos:]
        out[b.write(b"notes.txt", text)] = (b"notes.txt", text)
    return out


def _prune_middle(b: Builder, versions: dict) -> set[int]:
    by_path: dict[bytes, list[int]] = {}
    for seq, (p, _) in sorted(versions.items()):
        by_path.setdefault(p, []).append(seq)
    doomed = {s for seqs in by_path.values() for s in seqs[1:-1]}
    res = b.j.prune(doomed, [s for s in versions if s not in doomed])
    assert res.versions_pruned == len(doomed) and res.chunks_freed > 0
    return doomed


def test_replicate_and_clone_after_compaction(b, mirror_url, ep, tmp_path):
    versions = _versions(b)
    doomed = _prune_middle(b, versions)
    with open_mirror(mirror_url, endpoint_url=ep) as m:
        st = replicate_once(b.j, m)
        assert st.last_seq == st.head_seq and st.pruned == len(doomed)
        rep = verify_mirror(m, full=True)
        assert rep.errors == [] and rep.pruned == len(doomed)
        crep = clone_journal(m, str(tmp_path / "c"))
        assert crep.pruned == len(doomed)
    with Journal.open(tmp_path / "c") as c:
        assert log_of(c) == log_of(b.j)
        with c.reader() as r:
            assert r.pruned_seqs() == doomed
        for seq, (_, data) in versions.items():
            if seq not in doomed:
                assert _content(c, seq) == data, f"version {seq}"
        assert c.verify(full=True).ok
    args = ["clone", mirror_url, str(tmp_path / "dest")] + (["--endpoint-url", ep] if ep else [])
    assert cli.main(args) == 0
    for p, data in b.files.items():
        assert (tmp_path / "dest" / os.fsdecode(p)).read_bytes() == data
    assert cli.main(["verify", "--mirror", mirror_url, "--full"] + (["--endpoint-url", ep] if ep else [])) == 0


def test_mirror_keeps_working_after_shipped_versions_are_pruned(b, tmp_path):
    url = f"file://{tmp_path}/m"
    versions = _versions(b)
    with open_mirror(url) as m:
        replicate_once(b.j, m)  # every version shipped whole
        _prune_middle(b, versions)  # then compaction frees chunks the mirror holds
        more = _versions(b, rounds=2)
        st = replicate_once(b.j, m)
        assert st.last_seq == st.head_seq and st.pruned == 0
        assert verify_mirror(m, full=True).errors == []
        clone_journal(m, str(tmp_path / "c"))
    with Journal.open(tmp_path / "c", readonly=True) as c:
        for seq, (_, data) in {**versions, **more}.items():  # the mirror still has them all
            assert _content(c, seq) == data, f"version {seq}"


def test_records_in_blocks_replicate_and_clone_unchanged(b, mirror_url, ep, tmp_path):
    """Compaction moved most records into record blocks: the mirror still
    gets every record byte for byte, and so does a clone."""
    from deltafs.journal import compact as JC

    b.history(rounds=60)
    assert b.j.archive_records() >= 2 * JC.RECORD_BLOCK
    with open_mirror(mirror_url, endpoint_url=ep) as m:
        half = replicate_once(b.j, m)  # then more records, and more blocks, after the cursor
        for i in range(JC.RECORD_BLOCK):
            b.write(b"d/more.txt", b"round %d\n" % i)
        assert b.j.archive_records() >= JC.RECORD_BLOCK
        st = replicate_once(b.j, m)
        assert st.last_seq == st.head_seq > half.last_seq
        assert verify_mirror(m, full=True).errors == []
        clone_journal(m, str(tmp_path / "c"))
    with Journal.open(tmp_path / "c", readonly=True) as c:
        assert log_of(c) == log_of(b.j)
        assert c.verify(full=True).ok


def test_values_with_several_bases_replicate_and_clone(mirror_url, ep, tmp_path):
    """Journal format 9: a chunk value that is a delta against several bases
    ships with every base (and theirs), and the clone decodes it."""
    from test_multi_base import _history

    (tmp_path / "src").mkdir()
    d, seq, data, _ = _history(tmp_path / "src", saves=2)
    with d.j.reader() as r:
        assert any(len(r.chunk_info(cid).bases) > 1 for cid, _ in r.chunk_list(seq))
    with open_mirror(mirror_url, endpoint_url=ep) as m:
        st = replicate_once(d.j, m)
        assert st.last_seq == st.head_seq
        rep = verify_mirror(m, full=True)
        assert rep.errors == []
        clone_journal(m, str(tmp_path / "c"))
    with Journal.open(tmp_path / "c", readonly=True) as c:
        assert log_of(c) == log_of(d.j)
        assert _content(c, seq) == data
        with c.reader() as r:
            assert any(len(r.chunk_info(cid).bases) > 1 for cid, _ in r.chunk_list(seq))
        assert (v := c.verify(full=True)).ok, v.problem
    d.j.close()
